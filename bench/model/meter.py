"""Per-configuration accumulators of bench:model (bench/model/run.py) and their summary."""

from __future__ import annotations

from typing import Dict, List

import numpy as np


class Meter:
    """One configuration's accumulators at one length."""

    def __init__(self, layers: int):
        z = lambda: np.zeros(layers)  # noqa: E731
        self.n = z()
        self.err, self.err_max, self.oracle_err = z(), z(), z()
        self.recall, self.oracle_recall = z(), z()
        self.exact, self.estimated, self.scanned = z(), z(), z()
        self.server_ms: List[List[float]] = [[] for _ in range(layers)]
        self.rtt_ms: List[float] = []
        self.token_ms: List[float] = []
        self.tf_argmax: List[np.ndarray] = []
        self.kl: List[float] = []  # per trial: mean KL(dense || this) over its teacher-forced positions
        self.logit_diff: List[float] = []  # per trial: largest |logit - dense's| (the local reference's meter)
        self.answers: List[bytes] = []
        self.keys: List[bytes] = []
        self.setup_ms: List[float] = []
        self.trial_ids: List[int] = []  # per trial, in the order of tf_argmax, answers, ...

    SUMS = ("n", "err", "oracle_err", "recall", "oracle_recall", "exact", "estimated", "scanned")
    LISTS = ("rtt_ms", "token_ms", "tf_argmax", "kl", "logit_diff", "answers", "keys", "setup_ms", "trial_ids")

    def merge(self, other: "Meter") -> None:
        """Adds another meter's trials (another worker's, or one finished trial's)."""
        for f in self.SUMS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.err_max = np.maximum(self.err_max, other.err_max)
        for li, ms in enumerate(other.server_ms):
            self.server_ms[li].extend(ms)
        for f in self.LISTS:
            getattr(self, f).extend(getattr(other, f))

    def to_plain(self) -> Dict[str, object]:
        """JSON-ready (the worker states travel between machines whose numpy versions differ, where pickles of
        numpy objects do not load)."""
        d: Dict[str, object] = {f: [float(x) for x in getattr(self, f)] for f in self.SUMS + ("err_max",)}
        d.update(server_ms=self.server_ms, rtt_ms=self.rtt_ms, token_ms=self.token_ms, kl=self.kl,
                 logit_diff=self.logit_diff, setup_ms=self.setup_ms, trial_ids=[int(i) for i in self.trial_ids],
                 tf_argmax=[[int(x) for x in a] for a in self.tf_argmax],
                 answers=[a.decode("latin-1") for a in self.answers], keys=[k.decode("latin-1") for k in self.keys])
        return d

    @staticmethod
    def from_plain(d: Dict[str, object]) -> "Meter":
        m = Meter(len(d["n"]))
        for f in Meter.SUMS + ("err_max",):
            setattr(m, f, np.asarray(d[f], np.float64))
        for f in ("server_ms", "rtt_ms", "token_ms", "kl", "logit_diff", "setup_ms", "trial_ids"):
            setattr(m, f, list(d[f]))
        m.tf_argmax = [np.asarray(a, np.int64) for a in d["tf_argmax"]]
        m.answers = [a.encode("latin-1") for a in d["answers"]]
        m.keys = [k.encode("latin-1") for k in d["keys"]]
        return m

    def in_trial_order(self) -> "Meter":
        """The per-trial lists sorted by trial id: every configuration's meter lines up with dense's."""
        order = np.argsort(self.trial_ids, kind="stable")
        for f in ("tf_argmax", "kl", "logit_diff", "answers", "keys", "trial_ids"):
            vals = getattr(self, f)
            if len(vals) == len(order):  # logit_diff: the local meter's only
                setattr(self, f, [vals[i] for i in order])
        return self

    def observe(self, held, li: int, q, k, v, r, rtt: float) -> None:
        held.append(li, k, v)
        err, oracle_err, recall, rec_or = held.measure(li, q, r.out, r.selection)
        self.n[li] += 1
        self.err[li] += err.mean()
        self.err_max[li] = max(self.err_max[li], err.max())
        self.oracle_err[li] += oracle_err.mean()
        self.recall[li] += recall.mean()
        self.oracle_recall[li] += rec_or.mean()
        st = r.stats
        tokens = float(st["tokens"])
        self.exact[li] += st["attended"] / tokens
        self.estimated[li] += st.get("estimated", 0.0) / tokens
        self.scanned[li] += st["scanned"] / tokens
        self.server_ms[li].append(float(st["ms"]))
        self.rtt_ms.append(rtt * 1e3)

    def summary(self, dense: "Meter") -> Dict[str, object]:
        n = np.maximum(self.n, 1)
        layers = [dict(err=self.err[i] / n[i], err_max=self.err_max[i], oracle_err=self.oracle_err[i] / n[i],
                       recall=self.recall[i] / n[i], oracle_recall=self.oracle_recall[i] / n[i],
                       exact_share=self.exact[i] / n[i], estimated_share=self.estimated[i] / n[i],
                       scanned_share=self.scanned[i] / n[i], server_ms_mean=float(np.mean(self.server_ms[i])))
                  for i in range(len(n))]
        # Dense on this configuration's trials: merged runs may have run a configuration on some of dense's trials.
        if list(self.trial_ids) == list(dense.trial_ids):
            pick = list(range(len(dense.tf_argmax)))
        else:
            at = {t: i for i, t in enumerate(dense.trial_ids)}
            pick = [at[t] for t in self.trial_ids]
        mine = np.concatenate(self.tf_argmax)
        theirs = np.concatenate([dense.tf_argmax[i] for i in pick])
        kl = float(np.mean(self.kl))
        hits = [a == k for a, k in zip(self.answers, self.keys)]
        dense_hits = [dense.answers[i] == dense.keys[i] for i in pick]
        dense_answers = [dense.answers[i] for i in pick]
        all_ms = np.concatenate([np.asarray(x) for x in self.server_ms])
        return dict(
            layers=[{k: float(v) for k, v in d.items()} for d in layers],
            err=float(np.mean([d["err"] for d in layers])),
            oracle_err=float(np.mean([d["oracle_err"] for d in layers])),
            recall=float(np.mean([d["recall"] for d in layers])),
            exact_share=float(np.mean(self.exact / n)),
            estimated_share=float(np.mean(self.estimated / n)),
            scanned_share=float(np.mean(self.scanned / n)),
            agreement=float(np.mean(mine == theirs)), agreement_steps=int(len(mine)),
            kl=kl,
            pass_key=dict(hits=int(sum(hits)), trials=len(hits), dense_hits=int(sum(dense_hits)),
                          lost_vs_dense=int(sum(d and not h for h, d in zip(hits, dense_hits))),
                          same_as_dense=int(sum(a == b for a, b in zip(self.answers, dense_answers))),
                          answers=[a.decode("latin-1") for a in self.answers]),
            latency=dict(server_ms_p50=pct(all_ms, 50), server_ms_p99=pct(all_ms, 99), server_ms_mean=float(all_ms.mean()),
                         rtt_ms_p50=pct(self.rtt_ms, 50), rtt_ms_p99=pct(self.rtt_ms, 99),
                         token_ms_p50=pct(self.token_ms, 50), session_open_ms_mean=float(np.mean(self.setup_ms))),
        )


def kl_mean(dense_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(dense) || softmax(logits)), nats."""
    lq, lp = log_softmax(dense_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(lq) * (lq - lp), axis=1)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def pct(x, q) -> float:
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else float("nan")
