"""Shared-memory tensors on the decode stream (DESIGN.md "Wire protocol").

kvrecall runs on the LLM server's own host: a stream opened with
`Client.open_stream(shm=64 << 20)` makes a file `kvrecall-<name>` in
/dev/shm (the server's --shm-dir), maps it, attaches it to the stream
(`{id, shm: {name, bytes}}`) and unlinks it once the server has mapped it
too. Then a batch's q, k, v and a document upload's k, v, q are copied
into the segment and sent as `{dtype, shape, at}`, and each batch step
asks for its out and lse `into` the segment: a frame carries no tensor
bytes either way, and a batch of 32 steps crosses no socket with its
0.5-1 MB. A single attend goes the same way with `stream.shm_attend =
True`; by default it stays on the lean byte form (kvrecall.lean), which
cost less client time on the 2-core VM (bench/results/transport-vm-python-shm.md).
kvrecall.shm_plan packs a batch of the common form once.

Layout (one request at a time on a stream, so every attend and batch starts
at offset 0): the request's tensors one after another, each at a multiple
of 4, then per step its answer span (out, then lse at the next multiple of
4). A document upload in flight takes slot `i % window` of the segment cut
into `window` slots. What does not fit goes as bytes, as without a segment.

The results are the caller's arrays, copied out of the segment; with
`stream.shm_views = True` a planned batch's out and lse are views of the
segment instead, valid until the stream's next request (which writes over
them).
"""

from __future__ import annotations

import math
import mmap
import os
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .client import AttendResult, BatchResults
from .errors import KvrecallError
from .tensors import decode_tensor, tensor
from .wire import attend_fields, batch_step

__all__ = ["AttachRetry", "Segment", "SHM_DIR"]

SHM_DIR = "/dev/shm"

_NUMPY = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "i32": np.dtype("<i4")}


def _align(n: int) -> int:
    return (n + 3) & ~3


class AttachRetry:
    """When a stream tries again the attach it was refused. A refusal need
    not last (over the server's --shm-total-bytes while other streams held
    it, a full tmpfs), and a stream refused once stayed on bytes for the
    rest of its life. Not at every call: a try costs making the file and a
    round trip answered by an error frame. Counted in the stream's requests
    (no clock: an idle stream tries nothing): FIRST after the refusal, the
    wait doubling at each refusal up to LAST. At ~1 ms a decode request a
    cap that frees is noticed within about a second, and where the refusal
    lasts (another host, --shm-dir off) one wasted round trip per 1024
    requests is all it costs. An attach of at least the size refused ends
    it. The TypeScript client's (clients/ts/shm.ts) is the same."""

    FIRST = 8
    LAST = 1024

    def __init__(self) -> None:
        self.nbytes = 0  # the attach refused last (0: none wanted), in `directory`
        self.directory = SHM_DIR
        self.at = 0  # the request id from which it is tried again
        self._wait = 0

    def refused(self, nbytes: int, directory: str, now: int) -> None:
        self._wait = min(self.LAST, max(self.FIRST, 2 * self._wait))
        self.nbytes, self.directory, self.at = int(nbytes), directory, now + self._wait

    def attached(self, nbytes: int) -> None:
        if nbytes >= self.nbytes:
            self.nbytes, self._wait = 0, 0

    def due(self, now: int, have: int) -> bool:
        """Whether to try it now; `have`: the bytes of the segment attached (0: none)."""
        # More than LAST short of it: the ids wrapped (a plan's uint32 id goes back to 1).
        return self.nbytes > have and (now >= self.at or self.at - now > self.LAST)


class _NoRoom(Exception):
    """A request's tensors do not fit the segment (it goes as bytes)."""


class Segment:
    """The client's side of a stream's segment: a file in `directory`
    (the server's --shm-dir), mapped shared; unlink() once the server has
    mapped it."""

    def __init__(self, nbytes: int, directory: str = SHM_DIR):
        if nbytes <= 0 or nbytes % 4:
            raise ValueError(f"a segment's size is a positive multiple of 4, not {nbytes}")
        self.nbytes = int(nbytes)
        self.name = f"py{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self.path = os.path.join(directory, "kvrecall-" + self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, self.nbytes)
            self.mm = mmap.mmap(fd, self.nbytes)  # MAP_SHARED, read and write
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)  # the mapping holds the file
        self.u8 = np.frombuffer(self.mm, np.uint8)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        self.u8 = np.empty(0, np.uint8)  # its export of the mapping goes first
        try:
            self.mm.close()
        except BufferError:  # a caller's view still lives: the mapping goes with it
            pass

    def put(self, t: Dict[str, Any], at: int) -> Tuple[Dict[str, Any], int]:
        """A wire tensor's bytes copied in at `at` (a multiple of 4): the
        tensor as a reference there, and the next free offset."""
        data = t["data"]
        n = data.nbytes if isinstance(data, (memoryview, np.ndarray)) else len(data)
        self.mm[at : at + n] = data
        return {"dtype": t["dtype"], "shape": t["shape"], "at": at}, _align(at + n)

    def array(self, ref: Dict[str, Any]) -> np.ndarray:
        """A copy of the tensor the answer names (bf16 as uint16 bit patterns)."""
        dt = _NUMPY[ref["dtype"]]
        shape = tuple(ref["shape"])
        at = int(ref["at"])
        return self.u8[at : at + math.prod(shape) * dt.itemsize].view(dt).reshape(shape).copy()


def _answer_bytes(q_shape: Sequence[int], out_dtype: Optional[str]) -> int:
    """An answer span's bytes: out (q's shape, in the dtype asked), then lse (f32 per q head) at a multiple of 4."""
    out = math.prod(q_shape) * (2 if out_dtype in ("f16", "bf16") else 4)
    return _align(out) + 4 * int(q_shape[0])


# Arrays sent as they are: their wire dtype when no other is asked (or the same is).
_AS_IS = {np.dtype("<f4"): "f32", np.dtype("<f2"): "f16"}


def first_as_is_step(steps: Sequence[Any]) -> Optional[Dict[str, Any]]:
    """A batch's first step when it can open a batch written side by side
    (_uniform here, kvrecall.shm_plan.batch_key): a dict whose q is a 2-D
    array of a dtype sent as it is; else None. Each checks k and the later
    steps its own way (the plan also wants k 2-D, and leaves the later
    steps' dtypes to its copy's casting="no")."""
    if not steps or type(steps[0]) is not dict:
        return None
    q0 = steps[0].get("q")
    return steps[0] if type(q0) is np.ndarray and q0.dtype in _AS_IS and q0.ndim == 2 else None


def _wire(x: Any, dt: Optional[str]) -> Dict[str, Any]:
    """A tensor as kvrecall.tensors.tensor(view=True) makes it, without its
    checks where the array is already contiguous and of the wire dtype."""
    if type(x) is np.ndarray and x.flags.c_contiguous:
        wire = _AS_IS.get(x.dtype)
        if wire is not None and (dt is None or dt == wire):
            return {"dtype": wire, "shape": list(x.shape), "data": x}
    return tensor(x, dt, view=True)


def step_fields(seg: Segment, at: int, fields: Tuple[Any, ...]) -> Tuple[Dict[str, Any], int, int]:
    """An attend's fields (kvrecall.wire.attend_fields': checked) with q, k,
    v written into the segment from `at` (_NoRoom when they do not fit); the
    offset after them, and the answer span's bytes."""
    q, q_dtype, k, v, dtype, extra = fields
    body: Dict[str, Any] = {}
    for name, x, dt in [("q", q, q_dtype)] + ([("k", k, dtype), ("v", v, dtype)] if k is not None else []):
        t = _wire(x, dt)
        if at + t["data"].nbytes > seg.nbytes:
            raise _NoRoom()
        body[name], at = seg.put(t, at)
    body.update(extra)
    return body, at, _answer_bytes(body["q"]["shape"], body.get("outDtype"))


def attend_body(seg: Segment, session: str, layer: int, kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A stream attend {session, layer, q, k?, v?, ..., into} by the segment,
    or None where it does not fit (sent as bytes then)."""
    try:
        fields, at, span = step_fields(seg, 0, attend_fields(**kwargs))
    except _NoRoom:
        return None
    if at + span > seg.nbytes:
        return None
    return {"session": str(session), "layer": int(layer), **fields, "into": at}


def attend_result(seg: Segment, frame: Dict[str, Any]) -> AttendResult:
    """The answer of an attend by the segment: out and lse copied out of it."""
    from .client import attend_result as by_bytes

    out, lse = frame.get("out"), frame.get("lse")
    if not (isinstance(out, dict) and "at" in out and isinstance(lse, dict) and "at" in lse):
        return by_bytes(frame)
    r = AttendResult(out=seg.array(out), lse=seg.array(lse), stats=frame.get("stats", {}))
    if frame.get("selection") is not None:
        r.selection = [decode_tensor(t) for t in frame["selection"]]
    if frame.get("kv") is not None:
        r.kv = {"k": [decode_tensor(t) for t in frame["kv"]["k"]], "v": [decode_tensor(t) for t in frame["kv"]["v"]]}
    return r


def batch_body(seg: Segment, layer: int, steps: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A batch {layer, steps} by the segment: the steps' tensors side by side
    from 0, then their answer spans one after another; None where it does
    not fit."""
    fast = _uniform(steps)
    if fast is not None:
        return _batch_stacked(seg, layer, steps, *fast)
    at, bodies, spans = 0, [], []
    try:
        for step in steps:
            session, fields = batch_step(step)
            body, at, span = step_fields(seg, at, fields)
            bodies.append({"session": session, **body})
            spans.append(span)
    except _NoRoom:
        return None
    if at + sum(spans) > seg.nbytes:
        return None
    for body, span in zip(bodies, spans):
        body["into"] = at
        at += span
    return {"layer": int(layer), "steps": bodies}


def batch_results(seg: Segment, frame: Dict[str, Any]) -> BatchResults:
    """A batch's answer by the segment: per step an AttendResult (out and lse
    copied out) or a KvrecallError; `ms` the batch's server time. When
    every step answered out, lse and stats alone, in one dtype and shape,
    at one stride, the arrays are rows of one array per field, each copied
    out in one numpy call."""
    results = frame["results"]
    out = BatchResults(_stacked(seg, results) or (KvrecallError.from_wire(r["error"]) if isinstance(r, dict) and "error" in r else attend_result(seg, r) for r in results))
    stats = frame.get("stats")
    if isinstance(stats, dict) and isinstance(stats.get("ms"), (int, float)):
        out.ms = float(stats["ms"])
    return out


def upload_body(seg: Segment, slot: int, slots: int, body: Dict[str, Any]) -> bool:
    """Moves an upload body's tensors (views: Client._kv_body) into slot
    `slot` of `slots`: True when they fit (the body then carries
    references), else False and the body is left as it was."""
    size = (seg.nbytes // slots) & ~3
    names = [n for n in ("k", "v", "q") if n in body]
    if sum(_align(body[n]["data"].nbytes) for n in names) > size:
        return False
    at = slot * size
    for n in names:
        body[n], at = seg.put(body[n], at)
    return True


def _stacked(seg: Segment, results: List[Any]) -> Optional[List[AttendResult]]:
    if not results or not all(isinstance(r, dict) and len(r) == 3 and isinstance(r.get("out"), dict) and "at" in r["out"] for r in results):
        return None
    o0, l0 = results[0]["out"], results[0]["lse"]
    if not isinstance(l0, dict) or o0.get("dtype") not in _NUMPY or l0.get("dtype") != "f32":
        return None
    stride = (results[1]["out"]["at"] - o0["at"]) if len(results) > 1 else 4
    gap = l0.get("at", -1) - o0["at"]
    for i, r in enumerate(results):
        o, l = r["out"], r.get("lse")
        if not isinstance(l, dict) or o["dtype"] != o0["dtype"] or o["shape"] != o0["shape"] or l.get("shape") != l0["shape"]:
            return None
        if o["at"] != o0["at"] + i * stride or l.get("at") != o["at"] + gap:
            return None
    if stride <= 0 or stride % 4:
        return None
    n = len(results)
    dt = _NUMPY[o0["dtype"]]
    o_shape, l_shape = tuple(o0["shape"]), tuple(l0["shape"])
    o_count, l_count = int(np.prod(o_shape, dtype=np.int64)), int(np.prod(l_shape, dtype=np.int64))
    outs = np.ndarray((n, o_count), dtype=dt, buffer=seg.mm, offset=o0["at"], strides=(stride, dt.itemsize)).reshape((n,) + o_shape).copy()
    lses = np.ndarray((n, l_count), dtype=np.float32, buffer=seg.mm, offset=l0["at"], strides=(stride, 4)).reshape((n,) + l_shape).copy()
    return [AttendResult(out=outs[i], lse=lses[i], stats=r["stats"]) for i, r in enumerate(results)]


_STEP_KEYS = frozenset(("session", "q", "k", "v", "position", "scale", "out_dtype"))


def _uniform(steps: Sequence[Any]) -> Optional[Tuple[np.dtype, Tuple[int, ...], Optional[np.dtype], Tuple[int, ...], Optional[str]]]:
    """The common batch: every step {session, q, k?, v?, position?, scale?,
    out_dtype?} with q (and k, v) contiguous arrays of one wire dtype and
    shape, k and v in all steps or none, one out_dtype: (q's dtype, shape,
    k's dtype, shape, out_dtype); else None."""
    s0 = first_as_is_step(steps)
    if s0 is None:
        return None
    q0, k0 = s0["q"], s0.get("k")
    with_kv = k0 is not None
    if with_kv and (type(k0) is not np.ndarray or k0.dtype not in _AS_IS):
        return None
    out_dtype = s0.get("out_dtype")
    qd, qs = q0.dtype, q0.shape
    kd, ks = (k0.dtype, k0.shape) if with_kv else (None, ())
    for s in steps:
        if type(s) is not dict or not _STEP_KEYS.issuperset(s) or "session" not in s or s.get("out_dtype") != out_dtype:
            return None
        q, k, v = s.get("q"), s.get("k"), s.get("v")
        if type(q) is not np.ndarray or q.dtype != qd or q.shape != qs or not q.flags.c_contiguous:
            return None
        if with_kv:
            if type(k) is not np.ndarray or type(v) is not np.ndarray or k.dtype != kd or v.dtype != kd or k.shape != ks or v.shape != ks:
                return None
            if not (k.flags.c_contiguous and v.flags.c_contiguous):
                return None
        elif k is not None or v is not None or s.get("position") is not None:
            return None
    return qd, qs, kd, ks, out_dtype


def _batch_stacked(seg: Segment, layer: int, steps: Sequence[Dict[str, Any]], qd: np.dtype, qs: Tuple[int, ...], kd: Optional[np.dtype], ks: Tuple[int, ...], out_dtype: Optional[str]) -> Optional[Dict[str, Any]]:
    """batch_body's common case: the steps' q side by side, then their k,
    then their v, each written in one numpy call; then the answer spans."""
    n = len(steps)
    qb = _align(math.prod(qs) * qd.itemsize)
    kb = _align(math.prod(ks) * kd.itemsize) if kd is not None else 0
    span = _answer_bytes(qs, out_dtype)
    k0 = n * qb
    v0 = k0 + n * kb
    into0 = v0 + n * kb
    if into0 + n * span > seg.nbytes or qb != math.prod(qs) * qd.itemsize or kb != math.prod(ks) * (kd.itemsize if kd else 0):
        return None  # no room, or rows not at multiples of 4 (the general path pads each)

    def stack(name: str, at: int, dt: np.dtype, shape: Tuple[int, ...]) -> None:
        out = seg.u8[at : at + n * math.prod(shape) * dt.itemsize].view(dt).reshape((n * shape[0],) + tuple(shape[1:]))
        np.concatenate([s[name] for s in steps], axis=0, out=out)

    stack("q", 0, qd, qs)
    if kd is not None:
        stack("k", k0, kd, ks)
        stack("v", v0, kd, ks)
    qw, kw, ql, kl = _AS_IS[qd], _AS_IS[kd] if kd is not None else "", list(qs), list(ks)
    bodies = []
    for i, s in enumerate(steps):
        body: Dict[str, Any] = {"session": str(s["session"]), "q": {"dtype": qw, "shape": ql, "at": i * qb}}
        if kd is not None:
            body["k"] = {"dtype": kw, "shape": kl, "at": k0 + i * kb}
            body["v"] = {"dtype": kw, "shape": kl, "at": v0 + i * kb}
        if s.get("scale") is not None:
            body["scale"] = float(s["scale"])
        if s.get("position") is not None:
            body["position"] = int(s["position"])
        if out_dtype is not None:
            body["outDtype"] = str(out_dtype)
        body["into"] = into0 + i * span
        bodies.append(body)
    return {"layer": int(layer), "steps": bodies}
