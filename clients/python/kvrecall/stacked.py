"""A running batch's step as whole arrays: `Stream.attend_stacked` (issue #14).

An LLM server steps its running batch together: one layer, n sessions, q
as one array [n, qHeads, d], the new token's k and v as [n, kvHeads, d],
their positions as n integers. With the stream's shared-memory segment
(kvrecall.shm) that is one frame of the stacked form (api/stacked.ts):

    {id, layer, sessions, q: {dtype, shape: [n, qHeads, d], at}, k?, v?,
     positions?: {dtype: i32, shape: [n], at}, outDtype?, into}

whose bytes are made once per form (the sessions in order, dtypes, shapes:
`StackedPlan`); a call copies q, k, v and the positions into the segment
(one numpy call each) and writes its id into the frame. The answer, `{id,
out, lse, stats: {ms}}` with out [n, qHeads, d] and lse [n, qHeads] in the
segment where the request asked, is read by its bytes as learned from the
first answer (msgpack decodes it then, and any answer of another form,
such as one with `errors`). No Python object is made per step.

Results (`Stacked`): out and lse are views of the segment, valid until the
stream's next request (which writes over them), unless the caller gives
`out=` and `lse=` arrays: then the answer is copied into those once.
`errors` lists the steps that failed as (index, code, message); their rows
are NaN (bf16: its NaN's bits), the other steps are answered. A batch that
fails whole raises KvrecallError. Arrays of the wrong shape or dtype raise
ValueError or TypeError before anything is sent (nothing is appended).

`Stream.stacked_inputs` gives the segment's own q, k, v and positions
arrays of a form: passed back as they are, none is copied in (a caller that
writes its batch there saves the copies; like every input they are written
over by the stream's next request).

Without a segment, or where the batch does not fit it, the same call goes
as `attend_batch`'s steps (bytes) and its results are stacked into fresh
arrays (or the caller's): the same answers, bit for bit.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack
import numpy as np

from .errors import KvrecallError
from .shm_plan import _AS_IS, _P, _Form, _align, _map

__all__ = ["Stacked", "StackedPlan", "stacked_key"]

_F64 = struct.Struct(">d")
_OUT = {None: np.dtype("<f4"), "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
# A failed step's rows: NaN in the out dtype (bf16 as its bits).
_NAN = {np.dtype("<f4"): np.float32("nan"), np.dtype("<f2"): np.float16("nan"), np.dtype("<u2"): np.uint16(0x7FC0)}
_NO_ERRORS: List[Tuple[int, str, str]] = []


class Stacked:
    """A stacked batch's answer: out [n, qHeads, d], lse [n, qHeads] (f32),
    the steps that failed as (index, code, message), the server's ms."""

    __slots__ = ("out", "lse", "errors", "ms")

    def __init__(self, out: np.ndarray, lse: np.ndarray, errors: List[Tuple[int, str, str]], ms: Optional[float]):
        self.out, self.lse, self.errors, self.ms = out, lse, errors, ms

    def __iter__(self):  # out, lse = stream.attend_stacked(...)
        return iter((self.out, self.lse))

    def __repr__(self) -> str:
        return f"Stacked(out={self.out.shape} {self.out.dtype}, lse={self.lse.shape}, errors={self.errors!r}, ms={self.ms})"


def stacked_key(layer: Any, sessions: Any, q: Any, k: Any, v: Any, positions: Any, out_dtype: Any, out: Any, lse: Any, scale: Any = None) -> Tuple[Tuple[Any, ...], Optional[np.ndarray]]:
    """The call's form (the plan's key) and its positions as an integer
    array; ValueError or TypeError for arrays that cannot be this batch."""
    if type(layer) is not int or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    if not isinstance(sessions, (list, tuple)) or not sessions:
        raise TypeError("sessions must be a non-empty list of session ids")
    names = tuple(sessions)
    for s in names:
        if type(s) is not str:
            raise TypeError(f"a session id is a str, got {type(s).__name__}")
    n = len(names)
    if not isinstance(q, np.ndarray) or q.dtype not in _AS_IS or q.ndim != 3 or q.shape[0] != n:
        raise ValueError(f"q must be a float32 or float16 array [n={n}, qHeads, d], got {_desc(q)}")
    if (k is None) != (v is None):
        raise ValueError("k and v come together")
    kd, ks = None, ()
    if k is not None:
        if not isinstance(k, np.ndarray) or k.dtype not in _AS_IS or k.ndim != 3 or k.shape[0] != n or k.shape[2] != q.shape[2]:
            raise ValueError(f"k must be a float32 or float16 array [n={n}, kvHeads, d={q.shape[2]}], got {_desc(k)}")
        if not isinstance(v, np.ndarray) or v.dtype != k.dtype or v.shape != k.shape:
            raise ValueError(f"v must be of k's dtype and shape ({k.dtype} {list(k.shape)}), got {_desc(v)}")
        kd, ks = k.dtype, k.shape[1:]
    pos = None
    if positions is not None:
        if k is None:
            raise ValueError("positions are those of appended k and v: give k and v")
        pos = np.asarray(positions)
        if pos.dtype.kind not in "iu" or pos.shape != (n,):
            raise ValueError(f"positions must be {n} integers, got {_desc(pos)}")
        # A list's min and max: numpy's reductions cost ~10 us more on the 2-core VM, on every call.
        values = pos.tolist()
        if min(values) < 0 or max(values) > 0x7FFFFFFF:
            raise ValueError("positions must be in [0, 2^31)")
    if out_dtype not in _OUT:
        raise ValueError(f"out_dtype must be f32, f16 or bf16, got {out_dtype!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        scale = float(scale)
    if (out is None) != (lse is None):
        raise ValueError("out and lse come together (or neither: views of the segment)")
    if out is not None:
        want = (n,) + q.shape[1:]
        if not isinstance(out, np.ndarray) or out.dtype != _OUT[out_dtype] or out.shape != want or not out.flags.writeable:
            raise ValueError(f"out must be a writable {_OUT[out_dtype]} array {list(want)}, got {_desc(out)}")
        if not isinstance(lse, np.ndarray) or lse.dtype != np.float32 or lse.shape != want[:2] or not lse.flags.writeable:
            raise ValueError(f"lse must be a writable float32 array {list(want[:2])}, got {_desc(lse)}")
    return (layer, names, q.dtype, q.shape[1:], kd, ks, pos is not None, out_dtype, scale), pos


def _desc(x: Any) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


class StackedPlan:
    """A stacked batch's frame, made once per form, and its segment's layout:
    q, k, v, positions from 0 (each at a multiple of 4), then out's rows
    from `into`, then lse's at the next multiple of 4."""

    def __init__(self, seg: Any, layer: int, sessions: Tuple[str, ...], qd: np.dtype, qs: Tuple[int, ...], kd: Optional[np.dtype], ks: Tuple[int, ...], position: bool, out_dtype: Optional[str], scale: Optional[float] = None):
        n = self.n = len(sessions)
        self.qs, self.q_at = (n,) + tuple(qs), 0
        self.qd, self.kd = qd, kd
        at = _align(math.prod(self.qs) * qd.itemsize)
        self.ks = (n,) + tuple(ks)
        self.k_at = at
        if kd is not None:
            at = _align(at + math.prod(self.ks) * kd.itemsize)
        self.v_at = at
        if kd is not None:
            at = _align(at + math.prod(self.ks) * kd.itemsize)
        self.pos_at = at
        if position:
            at += 4 * n
        self.into = at
        self.out_dt = _OUT[out_dtype]
        self.lse_at = _align(at + math.prod(self.qs) * self.out_dt.itemsize)
        self.fits = self.lse_at + 4 * n * qs[0] <= seg.nbytes
        f = _Form()
        entries = 5 + (2 if kd is not None else 0) + (1 if position else 0) + (1 if out_dtype is not None else 0) + (1 if scale is not None else 0)
        f.add(_map(entries) + _P("id"))
        self.id_at = f.u32()
        f.add(_P("layer") + _P(int(layer)) + _P("sessions") + _P(list(sessions)))
        f.add(_P("q") + _P({"dtype": _AS_IS[qd], "shape": list(self.qs), "at": 0}))
        if kd is not None:
            f.add(_P("k") + _P({"dtype": _AS_IS[kd], "shape": list(self.ks), "at": self.k_at}))
            f.add(_P("v") + _P({"dtype": _AS_IS[kd], "shape": list(self.ks), "at": self.v_at}))
        if position:
            f.add(_P("positions") + _P({"dtype": "i32", "shape": [n], "at": self.pos_at}))
        if out_dtype is not None:
            f.add(_P("outDtype") + _P(out_dtype))
        if scale is not None:
            f.add(_P("scale") + _P(scale))
        f.add(_P("into") + _P(self.into))
        self.frame = f.buf
        # The segment's arrays, made once: the call's inputs are copied into them, its answers read from them.
        self.views: Dict[str, np.ndarray] = {}
        if self.fits:
            u8 = seg.u8
            self.q = u8[0 : math.prod(self.qs) * qd.itemsize].view(qd).reshape(self.qs)
            if kd is not None:
                kb = math.prod(self.ks) * kd.itemsize
                self.k = u8[self.k_at : self.k_at + kb].view(kd).reshape(self.ks)
                self.v = u8[self.v_at : self.v_at + kb].view(kd).reshape(self.ks)
            if position:
                self.pos = u8[self.pos_at : self.pos_at + 4 * n].view("<i4")
            self.out = u8[self.into : self.into + math.prod(self.qs) * self.out_dt.itemsize].view(self.out_dt).reshape(self.qs)
            self.lse = u8[self.lse_at : self.lse_at + 4 * n * qs[0]].view("<f4").reshape(self.qs[:2])
        # The answer's bytes between its id and its ms (a float64 at the end), by where the id's bytes end: learned once.
        self.answers: List[Any] = [None] * 10

    def write(self, q: np.ndarray, k: Any, v: Any, pos: Optional[np.ndarray]) -> None:
        """The call's arrays into the segment, but those that are the segment's already (Stream.stacked_inputs)."""
        if q is not self.q:
            np.copyto(self.q, q, casting="no")
        if k is not None:
            if k is not self.k:
                np.copyto(self.k, k, casting="no")
            if v is not self.v:
                np.copyto(self.v, v, casting="no")
        if pos is not None and pos is not self.pos:
            np.copyto(self.pos, pos, casting="unsafe")  # checked in [0, 2^31)

    def read(self, data: Any, id_: int) -> Any:
        """The answer frame `data` to this request: its ms (a float) where its
        bytes are of the learned form; else its msgpack decoding (a dict), or
        None for another request's answer."""
        t = data[4] if len(data) > 9 and data[:4] == b"\x84\xa2id" else 0xFF
        id_end = 5 if t < 0x80 else 6 if t == 0xCC else 7 if t == 0xCD else 9 if t == 0xCE else 0
        if id_end and (t if id_end == 5 else int.from_bytes(data[5:id_end], "big")) == id_:
            pre = self.answers[id_end]
            if pre and data[-9] == 0xCB and data[id_end:-8] == pre:
                return _F64.unpack_from(data, len(data) - 8)[0]
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(frame, dict) or (frame.get("id") != id_ and not ("id" not in frame and "error" in frame)):
            return None
        if id_end and self.answers[id_end] is None:
            self.answers[id_end] = self._learn(data, id_end, frame) or False
        return frame

    def _learn(self, data: Any, id_end: int, frame: Dict[str, Any]) -> Optional[bytes]:
        """The bytes of a clean answer ({id, out, lse, stats: {ms}} where
        the plan asked) from its id's end to its ms' data, None for another."""
        if list(frame) != ["id", "out", "lse", "stats"] or not self.planned(frame) or list(frame["stats"]) != ["ms"]:
            return None
        if data[-9] != 0xCB or _F64.unpack_from(data, len(data) - 8)[0] != frame["stats"]["ms"]:
            return None
        return bytes(data[id_end:-8])

    def planned(self, frame: Dict[str, Any]) -> bool:
        """Whether the answer's out and lse are where and as the plan asked."""
        out, lse = frame.get("out"), frame.get("lse")
        return (
            isinstance(out, dict)
            and isinstance(lse, dict)
            and out.get("at") == self.into
            and out.get("shape") == list(self.qs)
            and out.get("dtype") == _wire_out(self.out_dt)
            and lse.get("at") == self.lse_at
            and lse.get("shape") == list(self.qs[:2])
            and lse.get("dtype") == "f32"
        )


def _wire_out(dt: np.dtype) -> str:
    return "f32" if dt == np.dtype("<f4") else "f16" if dt == np.dtype("<f2") else "bf16"


def answer(plan: StackedPlan, got: Any, out: Optional[np.ndarray], lse: Optional[np.ndarray]) -> Stacked:
    """A stacked answer from what StackedPlan.read returned: the segment's
    views, or copies into `out` and `lse`; failed steps' rows NaN."""
    if isinstance(got, float):
        errors, ms = _NO_ERRORS, got
    else:
        if "error" in got:
            raise KvrecallError.from_wire(got["error"])
        if not plan.planned(got):
            raise ConnectionError("kvrecall stream: a stacked answer not where it was asked")
        errors = [(int(i), str(c), str(m)) for i, c, m in got.get("errors") or ()]
        stats = got.get("stats")
        ms = float(stats["ms"]) if isinstance(stats, dict) and isinstance(stats.get("ms"), (int, float)) else None
    o, l = plan.out, plan.lse
    for i, _, _ in errors:
        o[i] = _NAN[o.dtype]
        l[i] = np.nan
    if out is None:
        return Stacked(o, l, errors, ms)
    np.copyto(out, o)
    np.copyto(lse, l)
    return Stacked(out, lse, errors, ms)


def by_steps(stream: Any, layer: int, names: Sequence[str], q: np.ndarray, k: Any, v: Any, pos: Optional[np.ndarray], out_dtype: Optional[str], out: Optional[np.ndarray], lse: Optional[np.ndarray], scale: Optional[float] = None) -> Stacked:
    """attend_stacked without a segment (or one too small): attend_batch's
    steps, the results stacked into fresh arrays or the caller's."""
    steps: List[Dict[str, Any]] = []
    for i, s in enumerate(names):
        step: Dict[str, Any] = {"session": s, "q": q[i]}
        if k is not None:
            step["k"], step["v"] = k[i], v[i]
        if pos is not None:
            step["position"] = int(pos[i])
        if out_dtype is not None:
            step["out_dtype"] = out_dtype
        if scale is not None:
            step["scale"] = scale
        steps.append(step)
    rs = stream.attend_batch(layer, steps)
    n, heads = len(names), q.shape[1]
    if out is None:
        out = np.empty((n,) + q.shape[1:], _OUT[out_dtype])
        lse = np.empty((n, heads), np.float32)
    assert lse is not None
    errors: List[Tuple[int, str, str]] = []
    for i, r in enumerate(rs):
        if isinstance(r, Exception):
            errors.append((i, getattr(r, "code", "internal"), getattr(r, "message", str(r))))
            out[i] = _NAN[out.dtype]
            lse[i] = np.nan
        else:
            out[i] = r.out
            lse[i] = r.lse
    return Stacked(out, lse, errors, getattr(rs, "ms", None))
