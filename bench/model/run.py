"""bench:model -- kvrecall-code-13M decoded end to end through kvrecall, with every retrieval method.

Per trial: a held-out context (Debian python3 dist-packages code, not the training corpus) of `length` bytes with a
planted pass key, ending with the question `\\x1fpass key? `. The numpy model prefills the document part (all but
the last --steps bytes); its per-layer post-RoPE K/V (f16) and prefill queries (kept at stride 4) are pushed as one
kvrecall document sealed with the methods the run asks for and `wave` (its clusters are what `estimate` reads, on by
default for every method but exact over such a document). Then, per configuration (a method at the server's default
`estimate`, optionally also without it, or a per-layer policy), a session over the document decodes the last --steps
positions teacher-forced and then greedily the five pass-key digits: every layer's attention at the decode
position is the session's answer (the stream transport, one frame per layer, with the position's q, k, v and
`position`); the rest of the model runs in numpy.

Measured, per configuration and per layer (means over trials, decode steps and query heads):
- attention output error |o - o_ref| / |o_ref|, o_ref = float64 dense attention over what the session holds
  (the document's f16 K/V and every appended token's f16 k/v, mirrored locally);
- the exact top-k oracle's error at the same exact count (per kv head the session's selection size; the tokens of
  highest mean probability over the GQA group; computed locally), and both attention recalls (mass covered);
- exact share (stats.attended / stats.tokens), estimated share (stats.estimated / tokens), scanned share;
- next-byte top-1 agreement with dense (dense = the same decode through `exact`) over the teacher-forced
  positions, and the mean KL(dense || method) of the next-byte distributions;
- pass-key accuracy (greedy, five digits exact), and keys lost where dense found them;
- per-step latency: the server's stats.ms and the client's round trip per layer, and per token (all layers).

    python3 bench/model/run.py                      # defaults: 8K bytes, 4 trials, 32 positions (the VM)
    python3 bench/model/run.py --lengths 8192,16384,32768 --trials 100
    python3 bench/model/run.py --url http://127.0.0.1:8700 --methods exact,wave,ivf
    python3 bench/model/run.py --session-defaults --tag vm-defaults   # every method at the server's default budgets
    python3 bench/model/run.py --methods wave --policy 'wide L1-2:0=wave@64,1-2=wave@0.04,3-5=wave@0.02'

Writes bench/results/model-<tag>.json and .md (tag: --tag, else `vm` on a CPU server, else the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def _python_with_deps() -> None:
    """`python3` may be one without numpy and msgpack (a pyenv shim before Debian's): run again under
    KVRECALL_PYTHON or /usr/bin/python3, as test/integration/python-client.test.ts looks for one."""
    try:
        import msgpack  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        if not os.environ.get("KVRECALL_BENCH_REEXEC"):
            for py in (os.environ.get("KVRECALL_PYTHON"), "/usr/bin/python3"):
                if py and os.path.exists(py) and os.path.realpath(py) != os.path.realpath(sys.executable):
                    os.environ["KVRECALL_BENCH_REEXEC"] = "1"
                    os.execv(py, [py, *sys.argv])
        raise


_python_with_deps()

import numpy as np  # noqa: E402

import kvdecode  # noqa: E402
from kvdecode import REPO, Held, SessionAttend, Trial, decode, make_trial, push_document  # noqa: E402
import heldout  # noqa: E402
from machine import cpu_name  # noqa: E402
from model import Model  # noqa: E402

# The order of the tables; a method the server does not know is left out.
METHOD_ORDER = ["exact", "wave", "hnsw", "ivf", "retrieval-attention", "squeezed", "squeezed-2l", "infiniretri",
                "nosa", "topk-blocks"]


@dataclass
class Config:
    label: str
    method: str
    estimate: Optional[bool]  # None: the server's default (on for every method but exact over a document with wave)
    # A per-layer policy: (method, estimate, budget) per layer (None: the session's default / --budget). One session
    # per method in the plan, its per-layer overrides in the session's `layers`; method and estimate above unused.
    plan: Optional[List[Tuple[str, Optional[bool], Optional[float]]]] = None

    def layer_plan(self, layers: int) -> List[Tuple[str, Optional[bool], Optional[float]]]:
        return self.plan or [(self.method, self.estimate, None)] * layers


def parse_policy(spec: str, layers: int) -> Config:
    """`label:0-1=wave,2-5=retrieval-attention+est@0.05` (ranges of layers = method, `+est`/`-est` for estimate
    on/off, `@budget` for that layer's budget instead of --budget; layers not named use `exact`)."""
    label, _, body = spec.rpartition(":")
    if not body or not label:
        raise SystemExit(f"--policy {spec!r}: expected label:layers=method,...")
    plan: List[Tuple[str, Optional[bool], Optional[float]]] = [("exact", None, None)] * layers
    for part in body.split(","):
        rng, _, meth = part.partition("=")
        meth, _, bud = meth.partition("@")
        budget = None if not bud else (int(float(bud)) if float(bud) >= 1 else float(bud))
        a, _, b = rng.partition("-")
        est: Optional[bool] = None
        for suffix, val in (("+est", True), ("-est", False)):
            if meth.endswith(suffix):
                meth, est = meth[:-len(suffix)], val
        for li in range(int(a), int(b or a) + 1):
            if not 0 <= li < layers:
                raise SystemExit(f"--policy {spec!r}: layer {li} is not one of the model's {layers}")
            plan[li] = (meth.strip(), est, budget)
    return Config(label.strip(), "policy", None, plan)


def plan_sessions(plan: List[Tuple[str, Optional[bool], Optional[float]]]) -> Dict[str, List[Dict[str, object]]]:
    """Per method in a plan, the `layers` policy of its one session: the plan's budget and estimate in the layers
    it answers ({} elsewhere: the session's own, unused)."""
    out: Dict[str, List[Dict[str, object]]] = {}
    for li, (method, est, budget) in enumerate(plan):
        layers = out.setdefault(method, [{} for _ in plan])
        if budget is not None:
            layers[li]["budget"] = budget
        if est is not None:
            layers[li]["estimate"] = est
    return out


def configs_for(methods: List[str], estimate_off: bool) -> List[Config]:
    out = [Config("exact", "exact", None)]
    for m in methods:
        if m == "exact":
            continue
        out.append(Config(m, m, None))
        if estimate_off:
            out.append(Config(f"{m} -estimate", m, False))
    return out


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
        self.tf_logits: List[np.ndarray] = []
        self.answers: List[bytes] = []
        self.keys: List[bytes] = []
        self.setup_ms: List[float] = []

    def observe(self, held: Held, li: int, q, k, v, r, rtt: float) -> None:
        held.append(li, k, v)
        o_ref, p = held.reference(li, q)
        ref = np.linalg.norm(o_ref, axis=1)
        err = np.linalg.norm(r.out.astype(np.float64) - o_ref, axis=1) / ref
        counts = [len(s) for s in r.selection]
        G = held.group
        recall = np.concatenate([p[g * G:(g + 1) * G, np.asarray(sel, np.int64)].sum(axis=1)
                                 for g, sel in enumerate(r.selection)])
        o_or, rec_or = held.oracle(li, p, counts)
        self.n[li] += 1
        self.err[li] += err.mean()
        self.err_max[li] = max(self.err_max[li], err.max())
        self.oracle_err[li] += (np.linalg.norm(o_or - o_ref, axis=1) / ref).mean()
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
        mine = np.concatenate(self.tf_argmax)
        theirs = np.concatenate(dense.tf_argmax)
        lp = log_softmax(np.concatenate(self.tf_logits))
        lq = log_softmax(np.concatenate(dense.tf_logits))
        kl = float(np.mean(np.sum(np.exp(lq) * (lq - lp), axis=1)))
        hits = [a == k for a, k in zip(self.answers, self.keys)]
        dense_hits = [a == k for a, k in zip(dense.answers, dense.keys)]
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
            pass_key=dict(hits=int(sum(hits)), trials=len(hits),
                          lost_vs_dense=int(sum(d and not h for h, d in zip(hits, dense_hits))),
                          same_as_dense=int(sum(a == b for a, b in zip(self.answers, dense.answers))),
                          answers=[a.decode("latin-1") for a in self.answers]),
            latency=dict(server_ms_p50=pct(all_ms, 50), server_ms_p99=pct(all_ms, 99), server_ms_mean=float(all_ms.mean()),
                         rtt_ms_p50=pct(self.rtt_ms, 50), rtt_ms_p99=pct(self.rtt_ms, 99),
                         token_ms_p50=pct(self.token_ms, 50), session_open_ms_mean=float(np.mean(self.setup_ms))),
        )


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def pct(x, q) -> float:
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else float("nan")


def machine(health: Dict[str, object]) -> Dict[str, object]:
    gpu = health.get("gpu") or {}
    gpu_name = gpu.get("name") if isinstance(gpu, dict) else None
    return dict(cpu=cpu_name(), cores=os.cpu_count(), arch=platform.machine(), python=platform.python_version(),
                numpy=np.__version__, backend=health.get("backend"), threads=health.get("threads"),
                gpu=gpu_name, server_version=health.get("version"))


def default_tag(m: Dict[str, object]) -> str:
    if m.get("backend") == "cpu" or not m.get("gpu"):
        return "vm"
    name = str(m["gpu"]).lower()
    for t in ("h200", "h100", "a100", "l40s", "l4"):
        if t in name:
            return t
    return "gpu"


def run_length(a, client, model: Model, text: bytes, length: int, configs: List[Config], doc_methods: List[str],
               log) -> Dict[str, object]:
    L = model.cfg.n_layers
    meters = {c.label: Meter(L) for c in configs}
    local = Meter(L)  # numpy dense over the f16 K/V (float64 attention): what `exact` should reproduce
    rng = np.random.default_rng(a.seed + length)
    timing = dict(prefill_s=0.0, push_s=0.0, decode_s={c.label: 0.0 for c in configs}, local_dense_s=0.0)
    trial_s: List[float] = []
    loads: List[float] = []  # the 1-minute load average at each trial's end (other jobs share the cores)
    extra = a.steps + kvdecode.PASS_KEY_DIGITS
    for trial_i in range(a.trials):
        if trial_i > 0 and a.deadline and time.time() > a.deadline:
            log(f"[{length}] --minutes reached: {trial_i} trials")
            break
        t_trial = time.perf_counter()
        trial: Trial = make_trial(model, text, length, a.steps, rng)
        timing["prefill_s"] += trial.prefill_s
        doc = f"model-{length}-{trial_i}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        push_document(client, doc, model, trial, doc_methods, query_stride=a.query_stride, chunk=a.chunk)
        push_s = time.perf_counter() - t0
        timing["push_s"] += push_s
        try:
            t0 = time.perf_counter()
            held = Held(model, trial, extra)
            d = decode(model, trial, held.dense_attend)
            local.tf_argmax.append(d.logits.argmax(axis=1)), local.tf_logits.append(d.logits)
            local.answers.append(d.answer), local.keys.append(trial.key)
            timing["local_dense_s"] += time.perf_counter() - t0
            line = [f"[{length}] trial {trial_i}: plant at {trial.at}, key {trial.key.decode()}, prefill "
                    f"{trial.prefill_s:.1f}s, push+seal {push_s:.1f}s, local dense {d.answer.decode('latin-1')!r}"]
            with client.open_stream() as stream:
                for c in configs:
                    m = meters[c.label]
                    t0 = time.perf_counter()
                    plan = c.layer_plan(L)
                    sessions: Dict[str, str] = {}
                    try:
                        for method, layers in plan_sessions(plan).items():
                            params: Dict[str, object] = {} if a.session_defaults else dict(budget=a.budget, sinks=a.sinks, window=a.window)
                            if c.plan:
                                params["layers"] = layers
                            elif c.estimate is not None:
                                params["estimate"] = c.estimate
                            if a.ef:
                                params["ef"] = a.ef
                            sessions[method] = client.create_session(kvdecode.model_spec(model), documents=[doc],
                                                                     method=method, **params)["id"]
                        m.setup_ms.append((time.perf_counter() - t0) * 1e3)
                        held = Held(model, trial, extra)
                        att = SessionAttend(stream, [sessions[p[0]] for p in plan], L, returns=("out", "selection"),
                                            observe=lambda li, q, k, v, r, rtt, m=m, held=held: m.observe(held, li, q, k, v, r, rtt))
                        t0 = time.perf_counter()
                        n_rtt = len(m.rtt_ms)
                        d = decode(model, trial, att)
                        timing["decode_s"][c.label] += time.perf_counter() - t0
                        r = np.asarray(m.rtt_ms[n_rtt:]).reshape(-1, L).sum(axis=1)
                        m.token_ms.extend(r.tolist())
                    finally:
                        for sid in sessions.values():
                            client.delete_session(sid)
                    m.tf_argmax.append(d.logits.argmax(axis=1)), m.tf_logits.append(d.logits)
                    m.answers.append(d.answer), m.keys.append(trial.key)
                    line.append(f"{c.label} {d.answer.decode('latin-1')!r}")
            trial_s.append(time.perf_counter() - t_trial)
            loads.append(os.getloadavg()[0])
            line.append(f"trial {trial_s[-1]:.0f}s, load {loads[-1]:.1f}")
            log("; ".join(line))
        finally:
            client.delete_document(doc)
    dense = meters["exact"]
    results = [dict(label=c.label, method=c.method, estimate=c.estimate,
                    **({"plan": [list(p) for p in c.plan]} if c.plan else {}), **meters[c.label].summary(dense))
               for c in configs]
    local_vs_exact = dict(
        agreement=float(np.mean(np.concatenate(local.tf_argmax) == np.concatenate(dense.tf_argmax))),
        pass_key_hits=int(sum(x == k for x, k in zip(local.answers, local.keys))),
        same_answers=int(sum(x == y for x, y in zip(local.answers, dense.answers))),
        max_logit_diff=float(max(np.abs(x - y).max() for x, y in zip(local.tf_logits, dense.tf_logits))))
    return dict(length=length, trials=len(trial_s), steps=a.steps, document_tokens=length - a.steps,
                configs=results, local_dense=local_vs_exact, trial_s=[round(x, 1) for x in trial_s],
                load_per_trial=[round(x, 1) for x in loads],
                timing={k: (round(v, 2) if isinstance(v, float) else {kk: round(vv, 2) for kk, vv in v.items()})
                        for k, v in timing.items()})


def fmt(x: float, d: int = 3) -> str:
    return f"{x:.{d}f}"


def per_trial(r: Dict[str, object]) -> str:
    ts, tm, n = r.get("trial_s") or [], r["timing"], max(1, r["trials"])
    decode = sum(tm["decode_s"].values()) + tm["local_dense_s"]
    loads = r.get("load_per_trial") or []
    whole = f"{np.mean(ts):.0f} s (min {min(ts):.0f}, max {max(ts):.0f}" if ts else "n/a ("
    whole += f"; load {min(loads):.1f}-{max(loads):.1f})" if loads else ")"
    return (f"{whole}: prefill {tm['prefill_s'] / n:.0f} s, push + seal {tm['push_s'] / n:.0f} s, decode of every "
            f"configuration and the local reference {decode / n:.0f} s")


def markdown(res: Dict[str, object]) -> str:
    m, p = res["machine"], res["params"]
    out = ["# bench:model -- kvrecall-code-13M decoded through kvrecall", "",
           "Written by `bench/model/run.py` (`npm run bench:model`). Every layer's attention at every decode position "
           "is a kvrecall session's answer (stream transport, one frame per layer); the rest of the model runs in "
           "numpy. Errors are against float64 dense attention over what the session holds (the document's f16 K/V "
           "and the appended tokens' f16 k/v); the oracle is the exact top-k (by mean probability over the GQA "
           "group) at the session's own exact count per kv head. Agreement and KL are against the same decode "
           "through `exact` (teacher-forced positions only); the pass key is the free-running greedy answer.", "",
           f"- machine: {m['cpu']}, {m['cores']} cores, {m['arch']}; server backend {m['backend']} "
           f"({m['threads']} native threads){', GPU ' + m['gpu'] if m.get('gpu') else ''}; Python {m['python']}, "
           f"numpy {m['numpy']}",
           ("- sessions: the server's defaults (budget, sinks, window per method: engine/sessions.ts)" if p.get("session_defaults") else
            f"- sessions: budget {p['budget']} (of the context), sinks {p['sinks']}, window {p['window']}") +
           f"{', ef ' + str(p['ef']) if p['ef'] else ''}; document prefill queries kept at stride {p['query_stride']}; "
           f"document sealed with {', '.join(p['document_methods'])}",
           f"- held-out text: {p['heldout']} (seed {p['seed']}); model {p['model']}",
           f"- wall time {res['wall_s']:.0f} s; load average at the end {res['load_average'][0]:.1f} "
           f"(other jobs may share the cores), {res['date']}", ""]
    for r in res["lengths"]:
        L = len(r["configs"][0]["layers"])
        ld = r["local_dense"]
        tm = r["timing"]
        out += [f"## {r['length']} bytes ({r['document_tokens']} document tokens, {r['trials']} trials, "
                f"{r['steps']} teacher-forced positions + {kvdecode.PASS_KEY_DIGITS - 1} free-running)", "",
                f"`exact` through kvrecall vs numpy dense over the same f16 K/V (float64 attention): next-byte "
                f"agreement {fmt(ld['agreement'])}, same pass-key answers {ld['same_answers']}/{r['trials']}, "
                f"max logit difference {ld['max_logit_diff']:.2e}. Prefill {tm['prefill_s']:.1f} s, push + seal "
                f"{tm['push_s']:.1f} s (all trials); per trial {per_trial(r)}.", "",
                "| config | exact share | est. share | scanned share | mean err | oracle err | recall | "
                "top-1 = dense | KL (nats) | pass key | lost vs dense | server ms p50 / p99 | rtt ms p50 | ms / token |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in r["configs"]:
            pk, lt = c["pass_key"], c["latency"]
            out.append(f"| {c['label']} | {100 * c['exact_share']:.1f}% | {100 * c['estimated_share']:.1f}% | "
                       f"{100 * c['scanned_share']:.1f}% | {fmt(c['err'])} | {fmt(c['oracle_err'])} | "
                       f"{fmt(c['recall'])} | {fmt(c['agreement'])} | {c['kl']:.4f} | {pk['hits']}/{pk['trials']} | "
                       f"{pk['lost_vs_dense']} | {lt['server_ms_p50']:.2f} / {lt['server_ms_p99']:.2f} | "
                       f"{lt['rtt_ms_p50']:.2f} | {lt['token_ms_p50']:.1f} |")
        for c in r["configs"]:
            if c.get("plan"):
                out.append(f"\nPolicy `{c['label']}`: " + ", ".join(
                    f"L{i} {m}{'' if e is None else (' +estimate' if e else ' -estimate')}"
                    f"{'' if b is None else f' (budget {b})'}" for i, (m, e, b) in enumerate(c["plan"])))
        out += ["", "Attention output error per layer (mean; the exact top-k oracle at the same count in brackets):", "",
                "| config | " + " | ".join(f"L{i}" for i in range(L)) + " |",
                "| --- |" + " ---: |" * L]
        for c in r["configs"]:
            out.append(f"| {c['label']} | " + " | ".join(f"{fmt(x['err'])} ({fmt(x['oracle_err'])})" for x in c["layers"])
                       + " |")
        out += ["", "Attention recall per layer (mass of the exact part; the oracle's in brackets) and exact share:", "",
                "| config | " + " | ".join(f"L{i}" for i in range(L)) + " |",
                "| --- |" + " ---: |" * L]
        for c in r["configs"]:
            out.append(f"| {c['label']} | " + " | ".join(
                f"{fmt(x['recall'])} ({fmt(x['oracle_recall'])}) {100 * x['exact_share']:.1f}%" for x in c["layers"])
                       + " |")
        out += ["", "Decode wall time per configuration (s, all trials, incl. the local float64 reference): " +
                ", ".join(f"{k} {v:.1f}" for k, v in tm["decode_s"].items()), ""]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="", help="a running kvrecall server (default: start this checkout's)")
    ap.add_argument("--token", default=os.environ.get("KVRECALL_TOKEN") or None)
    ap.add_argument("--lengths", default="8192", help="context bytes, comma-separated (full run: 8192,16384,32768)")
    ap.add_argument("--trials", type=int, default=4, help="pass-key trials per length (full run: 100)")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced decode positions at the end of the context")
    ap.add_argument("--budget", type=float, default=0.025, help="session budget: tokens, or a fraction (<1) of the context")
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--ef", type=int, default=0, help="search effort (0: each method's default)")
    ap.add_argument("--methods", default="", help="comma-separated (default: every method the server knows)")
    ap.add_argument("--estimate-off", action="store_true",
                    help="also run every method with estimate off (the default is the server's: on over a document with wave)")
    ap.add_argument("--session-defaults", action="store_true",
                    help="sessions at the server's default budget, sinks and window (ignores --budget, --sinks, --window)")
    ap.add_argument("--policy", action="append", default=[],
                    help="a per-layer policy, e.g. 'ra wide L0:0=retrieval-attention@0.05,1-5=retrieval-attention-est' "
                         "(repeatable; layers not named use exact; one session per method, per-layer budget and "
                         "estimate through the session's `layers`)")
    ap.add_argument("--query-stride", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4096, help="upload chunk (tokens)")
    ap.add_argument("--minutes", type=float, default=0,
                    help="start no new trial after this many minutes of the run (0: run every trial); at least one per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="machine tag for the result files (default: vm on a CPU server)")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    budget = int(a.budget) if a.budget >= 1 else a.budget
    a.budget = budget
    a.deadline = time.time() + 60 * a.minutes if a.minutes > 0 else 0.0

    from kvrecall import Client

    t_start = time.time()
    server = None
    if not a.url:
        sys.path.insert(0, str(REPO / "clients" / "python" / "tests"))
        import serve

        why = serve.available()
        if why:
            sys.exit(f"cannot start a server: {why}; pass --url")
        server = serve.start()
        a.url = server.url
        print(f"started {a.url} (data {server.data})", flush=True)
    try:
        client = Client(a.url, token=a.token, timeout=600)
        health = client.health()
        mach = machine(health)
        known = kvdecode.session_methods(client)
        wanted = [m.strip() for m in a.methods.split(",") if m.strip()] or METHOD_ORDER + sorted(set(known) - set(METHOD_ORDER))
        unknown = [m for m in wanted if m not in known]
        if unknown:
            sys.exit(f"the server does not know {unknown}; it knows {known}")
        methods = [m for m in wanted if m in known]
        configs = configs_for(methods, a.estimate_off)
        n_layers = int(json.loads((kvdecode.model_dir() / "config.json").read_text())["num_hidden_layers"])
        configs += [parse_policy(p, n_layers) for p in a.policy]
        for c in configs:
            for method, _, _ in c.layer_plan(n_layers):
                if method not in known:
                    sys.exit(f"{c.label}: the server does not know {method}; it knows {known}")
        if "wave" not in known:
            sys.exit("the server has no wave method; estimate needs it")
        # Sealed with what the configurations use and wave (estimate's clusters): every other method's index would
        # cost seal time for nothing (16K bytes on the 2-core VM: hnsw 57 s, wave 40 s, squeezed-2l 13 s, ...).
        used = {meth for c in configs for meth, _, _ in c.layer_plan(n_layers)} | {"wave"}
        doc_methods = [m for m in known if m in used and m != "exact"]
        model = Model()
        text = heldout.corpus(a.seed)
        log = lambda s: print(s, flush=True)  # noqa: E731
        log(f"{len(configs)} configurations: {', '.join(c.label for c in configs)}")
        lengths = []
        for length in [int(x) for x in a.lengths.split(",") if x.strip()]:
            lengths.append(run_length(a, client, model, text, length, configs, doc_methods, log))
        res = dict(bench="model", machine=mach,
                   params=dict(budget=a.budget, sinks=a.sinks, window=a.window, ef=a.ef, steps=a.steps,
                               session_defaults=a.session_defaults,
                               query_stride=a.query_stride, document_methods=doc_methods, seed=a.seed,
                               heldout=os.environ.get("KVRECALL_HELDOUT_DIR", heldout.DEFAULT_DIR),
                               model="kvrecall-code-13M (bench/model/model.py, numpy float32)"),
                   lengths=lengths, wall_s=time.time() - t_start, load_average=list(os.getloadavg()), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        md = markdown(res)
        print(md)
        if not a.no_write:
            tag = a.tag or default_tag(mach)
            out = Path(a.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"model-{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
            (out / f"model-{tag}.md").write_text(md)
            print(f"wrote {out / f'model-{tag}.json'} and .md", flush=True)
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
