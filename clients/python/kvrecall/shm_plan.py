"""The shared-memory stream's common requests made once (kvrecall.shm).

A decode loop sends the same request again and again: the same sessions,
layer, shapes and dtypes; only q, k, v (in the segment), the positions and
the id change. Here such a request's frame is packed once per form, with
its id and positions as uint32 (0xce: fixed width) at known offsets; a call
writes its tensors into the segment (a batch's q side by side, one numpy
call per field), its id and positions into the frame, and sends it. The
answer is read by msgpack (small: no tensor bytes) and its out and lse
copied out of the segment where the request asked them written.

Why: the general path (kvrecall.shm) built a dict per step and a dict per
tensor, and packed them: on the 2-core VM ~0.1 ms of a 32-step batch's
~0.57 ms of client CPU, and more checks per step; the server's part of the
same batch (wall less server ms, measured with a bare client) was ~0.41 ms.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack
import numpy as np

from .client import AttendResult, BatchResults
from .errors import KvrecallError
from .shm import _AS_IS, first_as_is_step

_P = msgpack.Packer(use_bin_type=True).pack
U32 = struct.Struct(">I")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _map(n: int) -> bytes:
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _ref(dtype: str, shape: Sequence[int], at: int) -> bytes:
    return _P({"dtype": dtype, "shape": list(shape), "at": at})


class _Form:
    """One request form's frame: bytes, the id's offset, the positions' offsets (n x 4 byte indices)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos: List[int] = []

    def add(self, b: bytes) -> None:
        self.buf += b

    def u32(self) -> int:
        self.buf += b"\xce\x00\x00\x00\x00"
        return len(self.buf) - 4

    @staticmethod
    def entries(kv: Any, position: bool, out_dtype: Optional[str]) -> int:
        """A step map's entries: session, q, into, and k, v, position, outDtype where given."""
        return 3 + (2 if kv else 0) + (1 if position else 0) + (1 if out_dtype else 0)

    def step(self, session: str, q: Tuple[str, Tuple[int, ...], int], kv: Optional[Tuple[str, Tuple[int, ...], int, int]], position: bool, out_dtype: Optional[str], into: int, header: bool = True) -> None:
        """A step's map (without its header when the caller wrote one, with more entries of its own)."""
        if header:
            self.add(_map(self.entries(kv, position, out_dtype)))
        self.add(_P("session") + _P(session) + _P("q") + _ref(*q))
        if kv:
            self.add(_P("k") + _ref(kv[0], kv[1], kv[2]) + _P("v") + _ref(kv[0], kv[1], kv[3]))
        if position:
            self.add(_P("position"))
            self.pos.append(self.u32())
        if out_dtype:
            self.add(_P("outDtype") + _P(out_dtype))
        self.add(_P("into") + _P(into))


class BatchPlan:
    """A batch of one form: its steps' sessions in order, q (and k, v) of one
    dtype and shape, positions in all or none, one out_dtype, no scale."""

    def __init__(self, seg: Any, layer: int, sessions: Sequence[str], qd: np.dtype, qs: Tuple[int, ...], kd: Optional[np.dtype], ks: Tuple[int, ...], position: bool, out_dtype: Optional[str]):
        n = len(sessions)
        self.n, self.qs, self.ks, self.qd, self.kd = n, qs, ks, qd, kd
        self.qb = math.prod(qs) * qd.itemsize
        self.kb = math.prod(ks) * kd.itemsize if kd is not None else 0
        out_bytes = math.prod(qs) * (2 if out_dtype in ("f16", "bf16") else 4)
        self.span = _align(out_bytes) + 4 * qs[0]
        self.k0 = n * self.qb
        self.v0 = self.k0 + n * self.kb
        self.into0 = self.v0 + n * self.kb
        self.fits = self.qb % 4 == 0 and self.kb % 4 == 0 and self.into0 + n * self.span <= seg.nbytes
        self.out_dt = np.dtype("<f4") if out_dtype in (None, "f32") else np.dtype("<f2") if out_dtype == "f16" else np.dtype("<u2")
        self.out_shape, self.lse_at = qs, _align(out_bytes)
        f = _Form()
        f.add(b"\x83" + _P("id"))
        self.id_at = f.u32()
        f.add(_P("layer") + _P(int(layer)) + _P("steps") + (bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")))
        qw = _AS_IS[qd]
        for i, s in enumerate(sessions):
            kv = (_AS_IS[kd], ks, self.k0 + i * self.kb, self.v0 + i * self.kb) if kd is not None else None
            f.step(str(s), (qw, qs, i * self.qb), kv, position, out_dtype, self.into0 + i * self.span)
        self.frame = f.buf
        self.pos_index = (np.asarray(f.pos, dtype=np.intp)[:, None] + np.arange(4)) if f.pos else None
        self.u8 = np.frombuffer(self.frame, np.uint8)

    def write(self, seg: Any, steps: Sequence[Dict[str, Any]], positions: Optional[List[int]]) -> bool:
        """The steps' tensors into the segment and their positions into the
        frame; False (nothing sent) where an array is not of the plan's dtype
        and shape."""
        n = self.n
        try:
            for name, at, dt, shape in (("q", 0, self.qd, self.qs), ("k", self.k0, self.kd, self.ks), ("v", self.v0, self.kd, self.ks)):
                if dt is None:
                    break
                out = seg.u8[at : at + n * math.prod(shape) * dt.itemsize].view(dt).reshape((n * shape[0],) + shape[1:])
                np.concatenate([s[name] for s in steps], axis=0, out=out, casting="no")
        except (TypeError, ValueError):
            return False
        if positions is not None:
            if min(positions) < 0 or max(positions) > 0xFFFFFFFF:
                return False
            self.u8[self.pos_index] = np.array(positions, dtype=">u4").view(np.uint8).reshape(n, 4)
        return True

    def results(self, seg: Any, frame: Dict[str, Any], views: bool = False) -> Optional[BatchResults]:
        """The answer as rows of one out and one lse array (copies, or with
        `views` strided views of the segment), when every step answered
        where the plan asked; else None (read the general way)."""
        results = frame.get("results")
        if not isinstance(results, list) or len(results) != self.n:
            return None
        for r in results:
            if "error" in r:
                return None
        last = results[-1]
        if results[0]["out"].get("at") != self.into0 or last["lse"].get("at") != self.into0 + (self.n - 1) * self.span + self.lse_at:
            return None
        n, count, heads = self.n, math.prod(self.out_shape), self.out_shape[0]
        outs = np.ndarray((n, count), dtype=self.out_dt, buffer=seg.mm, offset=self.into0, strides=(self.span, self.out_dt.itemsize)).reshape((n,) + self.out_shape)
        lses = np.ndarray((n, heads), dtype=np.float32, buffer=seg.mm, offset=self.into0 + self.lse_at, strides=(self.span, 4))
        if not views:
            outs, lses = outs.copy(), lses.copy()
        out = BatchResults(AttendResult(out=outs[i], lse=lses[i], stats=r["stats"]) for i, r in enumerate(results))
        stats = frame.get("stats")
        if isinstance(stats, dict) and isinstance(stats.get("ms"), (int, float)):
            out.ms = float(stats["ms"])
        return out


class AttendPlan:
    """A single attend of one form: its session and layer, q (and k, v) of
    one dtype and shape, with or without a position, one out_dtype, no
    scale: q at 0, k and v after it, out and lse after them."""

    def __init__(self, seg: Any, session: str, layer: int, qd: np.dtype, qs: Tuple[int, ...], kd: Optional[np.dtype], ks: Tuple[int, ...], position: bool, out_dtype: Optional[str]):
        self.qb = math.prod(qs) * qd.itemsize
        self.kb = math.prod(ks) * kd.itemsize if kd is not None else 0
        self.k0 = _align(self.qb)
        self.v0 = self.k0 + _align(self.kb)
        self.into = self.v0 + _align(self.kb)
        out_bytes = math.prod(qs) * (2 if out_dtype in ("f16", "bf16") else 4)
        self.lse_at = self.into + _align(out_bytes)
        self.fits = self.lse_at + 4 * qs[0] <= seg.nbytes
        self.out_dt = np.dtype("<f4") if out_dtype in (None, "f32") else np.dtype("<f2") if out_dtype == "f16" else np.dtype("<u2")
        self.qs, self.heads = qs, qs[0]
        kv = (_AS_IS[kd], ks, self.k0, self.v0) if kd is not None else None
        # {id, layer, session, q, ...}: the id and layer in front of the step's entries.
        f = _Form()
        f.add(_map(2 + _Form.entries(kv, position, out_dtype)) + _P("id"))
        self.id_at = f.u32()
        f.add(_P("layer") + _P(int(layer)))
        f.step(str(session), (_AS_IS[qd], qs, 0), kv, position, out_dtype, self.into, header=False)
        self.frame = f.buf
        self.pos_at = f.pos[0] if f.pos else None

    def write(self, seg: Any, q: np.ndarray, k: Any, v: Any, position: Optional[int]) -> None:
        seg.mm[0 : self.qb] = q
        if self.kb:
            seg.mm[self.k0 : self.k0 + self.kb] = k
            seg.mm[self.v0 : self.v0 + self.kb] = v
        if self.pos_at is not None:
            U32.pack_into(self.frame, self.pos_at, position)

    def result(self, seg: Any, frame: Dict[str, Any], views: bool = False) -> Optional[AttendResult]:
        """The answer's out and lse (copies, or views with `views`) where the plan asked them; else None."""
        out, lse = frame.get("out"), frame.get("lse")
        if not isinstance(out, dict) or out.get("at") != self.into or not isinstance(lse, dict) or lse.get("at") != self.lse_at or len(frame) != 4:
            return None
        o = seg.u8[self.into : self.into + math.prod(self.qs) * self.out_dt.itemsize].view(self.out_dt).reshape(self.qs)
        l = seg.u8[self.lse_at : self.lse_at + 4 * self.heads].view(np.float32)
        return AttendResult(out=o if views else o.copy(), lse=l if views else l.copy(), stats=frame["stats"])


def attend_key(session: Any, layer: int, q: Any, k: Any, v: Any, position: Any, out_dtype: Any) -> Optional[Tuple[Any, ...]]:
    """The plan's key for an attend of the planned form (q, k, v contiguous
    arrays of a wire dtype, as they are sent), or None."""
    if type(q) is not np.ndarray or q.dtype not in _AS_IS or q.ndim != 2 or not q.flags.c_contiguous:
        return None
    if k is None:
        if v is not None or position is not None:
            return None
        kd, ks = None, ()
    else:
        if type(k) is not np.ndarray or type(v) is not np.ndarray or k.dtype not in _AS_IS or v.dtype != k.dtype or k.ndim != 2 or v.shape != k.shape:
            return None
        if not (k.flags.c_contiguous and v.flags.c_contiguous):
            return None
        kd, ks = k.dtype, k.shape
    if position is not None and (type(position) is not int or not 0 <= position <= 0xFFFFFFFF):
        return None
    if out_dtype is not None and type(out_dtype) is not str:
        return None
    return (str(session), int(layer), q.dtype, q.shape, kd, ks, position is not None, out_dtype)


_KEYS = frozenset(("session", "q", "k", "v", "position", "out_dtype"))


def batch_key(layer: int, steps: Sequence[Any]) -> Optional[Tuple[Tuple[Any, ...], Optional[List[int]]]]:
    """The plan's key for a batch of the planned form (one loop over the
    steps), with its positions; None for any other."""
    s0 = first_as_is_step(steps)
    if s0 is None:
        return None
    q0, k0 = s0["q"], s0.get("k")
    if k0 is not None and (type(k0) is not np.ndarray or k0.dtype not in _AS_IS or k0.ndim != 2):
        return None
    keys, od, qs = s0.keys(), s0.get("out_dtype"), q0.shape
    has_pos = s0.get("position") is not None
    if not _KEYS.issuperset(keys) or "session" not in keys or (has_pos and k0 is None) or ((k0 is None) != (s0.get("v") is None)):
        return None
    ks = k0.shape if k0 is not None else ()
    sessions: List[Any] = []
    positions: Optional[List[int]] = [] if has_pos else None
    try:
        for s in steps:
            if type(s) is not dict or s.keys() != keys or s.get("out_dtype") != od or s["q"].shape != qs:
                return None
            if k0 is not None and (s["k"].shape != ks or s["v"].shape != ks):
                return None
            sessions.append(s["session"])
            if positions is not None:
                p = s["position"]
                if type(p) is not int:
                    return None
                positions.append(p)
    except (AttributeError, KeyError):  # a step's q, k or v not an array: the general path says what is wrong
        return None
    return (int(layer), tuple(sessions), q0.dtype, qs, k0.dtype if k0 is not None else None, ks, has_pos, od), positions


def error_of(frame: Dict[str, Any]) -> KvrecallError:
    return KvrecallError.from_wire(frame["error"])
