"""kvrecall-code-13M decoded through a kvrecall session (shared by run.py and
clients/python/tests/test_model_fidelity.py).

- `make_trial`: a held-out context with a planted pass key; the numpy
  prefill of its document part (everything before the last `steps` bytes):
  per layer post-RoPE K/V rounded to f16 (as kvrecall stores them) and the
  prefill queries.
- `push_document`: the document's K/V (f16) and prefill queries into kvrecall,
  indexed at seal for the given methods.
- `decode`: the last `steps` positions teacher-forced, then greedy bytes
  (the pass-key answer), every layer's attention at the decode position
  answered by a callable (a kvrecall session over the stream, or `Held`'s
  float64 dense attention); returns the logits and the answer.
- `Held`: a float64 mirror of what a session holds (the document's f16 K/V and
  every appended token's k/v rounded to f16): dense reference attention over
  it, the probabilities, and the exact top-k oracle at a given count.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(HERE), str(REPO / "clients" / "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

import heldout  # noqa: E402
from model import Model, model_dir  # noqa: E402,F401

PASS_KEY_DIGITS = 5


@dataclass
class Trial:
    seq: bytes  # the whole context: document, then the teacher-forced tail (ends with the question)
    key: bytes  # the planted five digits
    at: int  # offset of the plant
    n_doc: int  # tokens pushed as the document
    k16: List[np.ndarray]  # per layer [kvHeads, n_doc, 64] float16
    v16: List[np.ndarray]
    q: List[np.ndarray]  # per layer [qHeads, n_doc, 64] float32 (prefill queries)
    prefill_s: float = 0.0

    @property
    def ctx(self) -> int:
        return len(self.seq)


def trial_rng(seed: int, length: int, trial: int) -> np.random.Generator:
    """Trial `trial` at `length` draws from its own stream: the same context and key whichever worker runs it."""
    return np.random.default_rng([seed, length, trial])


def make_trial(model: Model, text: bytes, ctx: int, steps: int, rng: np.random.Generator) -> Trial:
    """A pass-key context of ctx bytes whose plant lies inside the document (the first ctx - steps bytes)."""
    n_doc = ctx - steps
    line = len(b"\x1fpass key: 00000\n")
    for _ in range(1000):
        seq, key, at = heldout.plant(text, ctx, rng)
        if at + line <= n_doc:
            break
    else:
        raise RuntimeError(f"could not plant a pass key inside a {n_doc}-byte document")
    t0 = time.perf_counter()
    pre = model.prefill(np.frombuffer(seq[:n_doc], np.uint8), keep_qkv=True, logits="none")
    return Trial(seq, key, at, n_doc, [k.astype(np.float16) for k in pre.k], [v.astype(np.float16) for v in pre.v],
                 pre.q, time.perf_counter() - t0)


def model_spec(model: Model) -> Dict[str, object]:
    from kvrecall import model_shape

    c = model.cfg
    return model_shape(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, "f16")


def push_document(client, doc: str, model: Model, trial: Trial, methods: Sequence[str], query_stride: int = 4,
                  chunk: int = 4096, cluster_size: Optional[int] = None) -> Dict[str, object]:
    """The trial's document into kvrecall (K/V f16, prefill queries f32), sealed and ready. Only the query rows the
    document keeps (tokens t with t % query_stride == 0) travel, with `queryStride` on each upload: a quarter of
    the bytes at stride 4 (32K bytes: 96 MB of f32 queries instead of 384 MB)."""
    from kvrecall.client import tensor

    spec = model_spec(model)
    client.create_document(doc, spec, methods=list(methods), query_stride=query_stride, cluster_size=cluster_size)
    try:
        for layer in range(spec["layers"]):
            n = trial.k16[layer].shape[1]
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                body: Dict[str, object] = dict(layer=layer, start=start, k=tensor(trial.k16[layer][:, start:end], None),
                                               v=tensor(trial.v16[layer][:, start:end], None))
                first = -(-start // query_stride) * query_stride
                if first < end:
                    body["q"] = tensor(np.ascontiguousarray(trial.q[layer][:, first:end:query_stride], np.float32), "f32")
                    body["queryStride"] = query_stride
                client._call("POST", f"/v1/documents/{doc}/kv", body)
        client.seal_document(doc)
        return client.wait_document_ready(doc, 600)
    except BaseException:
        client.delete_document(doc)
        raise


def index_methods(client) -> List[str]:
    """The methods a document may name (from the server's answer to an unknown one; nothing is created)."""
    from kvrecall import KvrecallError, model_shape

    try:
        client.create_document("kvrecall-method-probe", model_shape(1, 1, 1, 8), methods=["no-such-method"])
    except KvrecallError as e:
        if "list of:" in e.message:
            return [m.strip() for m in e.message.split("list of:")[1].split(",") if m.strip()]
        raise
    client.delete_document("kvrecall-method-probe")
    raise RuntimeError("the server accepted an unknown method")


def session_methods(client) -> List[str]:
    """The methods a session may name (from the server's answer to an unknown one)."""
    from kvrecall import KvrecallError, model_shape

    try:
        client.create_session(model_shape(1, 1, 1, 8), method="no-such-method")
    except KvrecallError as e:
        return [m.strip() for m in e.message.split("one of:")[1].split(",") if m.strip()]
    raise RuntimeError("the server accepted an unknown method")


class Held:
    """What a session over the trial's document holds, in float64: the document's f16 K/V, then each appended
    token's k/v rounded to f16. `append` then `reference` per (step, layer)."""

    def __init__(self, model: Model, trial: Trial, extra: int):
        self.scale = float(model.scale)
        self.group = model.cfg.n_heads // model.cfg.n_kv_heads
        cap = trial.n_doc + extra
        self.k, self.v = [], []
        for k16, v16 in zip(trial.k16, trial.v16):
            K = np.empty((k16.shape[0], cap, k16.shape[2]))
            V = np.empty_like(K)
            K[:, :trial.n_doc], V[:, :trial.n_doc] = k16, v16
            self.k.append(K), self.v.append(V)
        self.n = [trial.n_doc] * len(self.k)

    def append(self, li: int, k: np.ndarray, v: np.ndarray) -> None:
        n = self.n[li]
        self.k[li][:, n] = np.asarray(k, np.float32).astype(np.float16)
        self.v[li][:, n] = np.asarray(v, np.float32).astype(np.float16)
        self.n[li] = n + 1

    def reference(self, li: int, q: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Dense float64 attention of q [qHeads, 64] over everything held in layer li: (out [qHeads, 64],
        probabilities [qHeads, tokens])."""
        n, G = self.n[li], self.group
        q = np.asarray(q, np.float64)
        out = np.empty((q.shape[0], self.k[li].shape[2]))
        p = np.empty((q.shape[0], n))
        for g in range(self.k[li].shape[0]):
            s = (q[g * G:(g + 1) * G] @ self.k[li][g, :n].T) * self.scale
            s -= s.max(axis=1, keepdims=True)
            e = np.exp(s)
            e /= e.sum(axis=1, keepdims=True)
            p[g * G:(g + 1) * G] = e
            out[g * G:(g + 1) * G] = e @ self.v[li][g, :n]
        return out, p

    def oracle(self, li: int, p: np.ndarray, counts: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """The exact top-k oracle: per kv head the counts[g] tokens of highest mean probability over the group,
        attention renormalised over them. Returns (out [qHeads, 64], recall [qHeads])."""
        n, G = self.n[li], self.group
        out = np.empty((p.shape[0], self.v[li].shape[2]))
        recall = np.empty(p.shape[0])
        for g in range(self.k[li].shape[0]):
            pg = p[g * G:(g + 1) * G]
            m = int(min(max(counts[g], 1), n))
            top = np.argpartition(-pg.mean(axis=0), m - 1)[:m] if m < n else np.arange(n)
            sub = pg[:, top]
            mass = sub.sum(axis=1)
            out[g * G:(g + 1) * G] = (sub / mass[:, None]) @ self.v[li][g, top]
            recall[g * G:(g + 1) * G] = mass
        return out, recall

    def dense_attend(self, li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Model attend callback: append, then dense float64 attention (as float32)."""
        self.append(li, k, v)
        return self.reference(li, q)[0].astype(np.float32)

    def measure(self, li: int, q: np.ndarray, out: np.ndarray, selection: Sequence[Sequence[int]]) -> Tuple[np.ndarray, ...]:
        """An answer `out` [qHeads, 64] to q in layer li (after append) against the float64 reference: per query
        head (error |out - o_ref| / |o_ref|, the exact top-k oracle's error at the selection's count per kv head,
        the selection's attention recall, the oracle's recall)."""
        o_ref, p = self.reference(li, q)
        ref = np.linalg.norm(o_ref, axis=1)
        err = np.linalg.norm(np.asarray(out, np.float64) - o_ref, axis=1) / ref
        G = self.group
        recall = np.concatenate([p[g * G:(g + 1) * G, np.asarray(sel, np.int64)].sum(axis=1)
                                 for g, sel in enumerate(selection)])
        o_or, rec_or = self.oracle(li, p, [len(sel) for sel in selection])
        return err, np.linalg.norm(o_or - o_ref, axis=1) / ref, recall, rec_or


Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Decoded:
    logits: np.ndarray  # [steps, vocab]: the teacher-forced positions' logits (the last one predicts digit 1)
    answer: bytes  # the greedy pass-key answer (PASS_KEY_DIGITS bytes)
    all_logits: np.ndarray  # [steps + digits - 1, vocab]: every decoded position's logits, free-running ones too
    step_s: List[float] = field(default_factory=list)  # wall seconds per decoded position (all layers + model)


def decode(model: Model, trial: Trial, attend: Attend, on_step: Optional[Callable[[int, bool], None]] = None,
           digits: int = PASS_KEY_DIGITS) -> Decoded:
    """Positions n_doc..ctx-1 teacher-forced (the true bytes in), then digits-1 greedy bytes: the answer is the
    argmax at the last teacher-forced position and after each greedy byte. on_step(i, teacher_forced) is called
    before own position i (0 = the first after the document) is decoded."""
    steps = trial.ctx - trial.n_doc
    logits = np.empty((steps + digits - 1, model.cfg.vocab), np.float32)
    times = []
    answer: List[int] = []
    for i in range(steps + digits - 1):
        tf = i < steps
        if on_step:
            on_step(i, tf)
        byte = trial.seq[trial.n_doc + i] if tf else answer[-1]
        t0 = time.perf_counter()
        lg = model.decode_step(byte, trial.n_doc + i, attend)
        times.append(time.perf_counter() - t0)
        logits[i] = lg
        if i >= steps - 1:
            answer.append(int(np.argmax(lg)))
    return Decoded(logits[:steps], bytes(answer), logits, times)


class SessionAttend:
    """Model attend callback through a kvrecall session over a stream: one frame per layer, with the position's
    k/v (f16) and `position`. sid: one session for every layer, or a list of one per layer (a per-layer policy:
    each session then holds only the layers it answers). observe(layer, q, k, v, AttendResult, seconds)."""

    def __init__(self, stream, sid, layers: int, returns: Sequence[str] = ("out",),
                 observe: Optional[Callable[[int, np.ndarray, np.ndarray, np.ndarray, object, float], None]] = None):
        self.stream, self.layers = stream, layers
        self.sids = [sid] * layers if isinstance(sid, str) else list(sid)
        if len(self.sids) != layers:
            raise ValueError(f"{len(self.sids)} session ids for {layers} layers")
        self.returns = list(returns)
        self.observe = observe
        self.position = 0

    def __call__(self, li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        r = self.stream.attend(self.sids[li], li, np.ascontiguousarray(q, np.float32), k=np.ascontiguousarray(k),
                               v=np.ascontiguousarray(v), position=self.position, returns=self.returns, dtype="f16")
        rtt = time.perf_counter() - t0
        if self.observe:
            self.observe(li, q, k, v, r, rtt)
        if li == self.layers - 1:
            self.position += 1
        return r.out
