"""The stream attend's common case with as little Python per call as it
can have (issue #14: a decode call's overhead on the GPU host): q, k and v
numpy arrays of a wire dtype, C-contiguous, sent as they are.

- Request: the whole frame (WebSocket header, zero key, msgpack) is made
  once per session, layer, tensor dtypes and shapes and optional fields
  given (a `Plan`); a call writes its id and position into the plan's
  bytes (uint32, 0xce: the width fixed, so the tensors' offsets and the
  frame's length do not change; msgpack allows any width) and hands
  [head, q, k head, k, v head, v, tail] to one sendmsg.
- Answer: the bytes of an answer of the plan's form (`{id, out, lse,
  stats}`) are the same but for the id, the tensors' data and stats: the
  first answer is decoded by msgpack and its layout learned (checked
  against that decoding); later answers are checked against it byte for
  byte and out and lse copied out of the receive buffer into the caller's
  arrays, stats alone decoded by msgpack. An answer of any other form (an
  error, another dtype) goes to msgpack whole, as every answer did.

Everything else (returns, dtype conversions, other arrays) takes the
general path (kvrecall.wire), whose bytes these are but for the widths of
id and position.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Tuple

import msgpack
import numpy as np

from .client import AttendResult
from .wire import attend_fields, attend_parts
from .ws_frame import OP_BINARY, frame_header

__all__ = ["Plan", "plan_key"]

# The sent dtypes of an array sent as it is: q's (kvrecall.wire.q_wire_dtype: a 16-bit q goes as it is, f32 as it is), k's and v's.
_Q_OK = frozenset((np.dtype("<f2"), np.dtype("<f4")))
_KV_OK = frozenset((np.dtype("<f2"), np.dtype("<f4"), np.dtype("<i4")))
# A placeholder whose msgpack is 0xce and four bytes: the id's and position's width in a plan.
_WIDE = 0x80000000
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
# An answer's out and lse: their numpy dtype by wire dtype (this machine's order; bf16 as bit patterns).
_NUMPY = {"f16": np.dtype("<f2").newbyteorder("="), "bf16": np.dtype("<u2").newbyteorder("="), "f32": np.dtype("<f4").newbyteorder("=")}


def plan_key(session: Any, layer: Any, q: Any, k: Any, v: Any, scale: Any, position: Any, out_dtype: Any) -> Optional[Tuple[Any, ...]]:
    """The plan's key for an attend, None where it takes the general path
    (an array to convert, k without v, an id or position out of uint32)."""
    if type(q) is not np.ndarray or q.dtype not in _Q_OK or not q.flags.c_contiguous or type(session) is not str or type(layer) is not int:
        return None
    if k is None:
        if v is not None or position is not None:
            return None
        kv: Tuple[Any, ...] = ()
    else:
        if type(k) is not np.ndarray or type(v) is not np.ndarray or k.dtype not in _KV_OK or v.dtype not in _KV_OK or not (k.flags.c_contiguous and v.flags.c_contiguous):
            return None
        kv = (k.dtype, k.shape, v.dtype, v.shape)
    if position is not None and (type(position) is not int or not 0 <= position <= 0xFFFFFFFF):
        return None
    return (session, layer, q.dtype, q.shape, kv, scale is not None, position is not None, out_dtype)


class Plan:
    """One form of attend request, its frame's constant bytes, and (once
    answers came) their layouts."""

    __slots__ = ("head", "kh", "vh", "tail", "nbytes", "id_at", "pos_at", "scale_at", "answers")

    def __init__(self, packer: msgpack.Packer, session: str, layer: int, q: np.ndarray, k: Any, v: Any, scale: Any, position: Any, out_dtype: Any):
        fields = attend_fields(q, k, v, None if scale is None else 1.0, None if position is None else _WIDE, None, None, None, out_dtype)
        parts = attend_parts(packer, _WIDE, session, layer, fields)
        nbytes = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        ws = frame_header(OP_BINARY, nbytes) + b"\0\0\0\0"
        # The id is the map's first entry: the map's header (1 byte), "id" (3), 0xce and its 4 bytes.
        if parts[0][1:5] != b"\xa2id\xce":
            raise AssertionError("kvrecall.lean: the request's head is not as planned")
        self.head = bytearray(ws + parts[0])
        self.id_at = len(ws) + 5
        self.kh, self.vh = (parts[2], parts[4]) if k is not None else (None, None)
        self.tail = bytearray(parts[-1]) if len(parts) in (3, 7) else None
        self.nbytes = len(ws) + nbytes
        self.pos_at = self.tail.index(b"\xa8position\xce") + 10 if position is not None else -1
        self.scale_at = self.tail.index(b"\xa5scale\xcb") + 7 if scale is not None else -1
        # Its answers' layouts by where the id's bytes end (5, 6, 7 or 9): None until one came, False for none.
        self.answers: List[Any] = [None] * 10

    def parts(self, id_: int, q: np.ndarray, k: Any, v: Any, scale: Any, position: Any) -> list:
        """The frame's parts for this call: its id, position and scale
        written into the plan's bytes (sendmsg copies them before the next
        call writes again), the arrays as they are."""
        _U32.pack_into(self.head, self.id_at, id_)
        tail = self.tail
        if position is not None:
            _U32.pack_into(tail, self.pos_at, position)
        if scale is not None:
            _F64.pack_into(tail, self.scale_at, float(scale))
        if k is None:
            return [self.head, q] if tail is None else [self.head, q, tail]
        return [self.head, q, self.kh, k, self.vh, v] if tail is None else [self.head, q, self.kh, k, self.vh, v, tail]


def _bin_at(data: Any, at: int) -> Tuple[int, int]:
    """The msgpack bin at `at`: its data's offset and length."""
    t = data[at]
    if t == 0xC4:
        return at + 2, data[at + 1]
    if t == 0xC5:
        return at + 3, int.from_bytes(data[at + 1 : at + 3], "big")
    if t == 0xC6:
        return at + 5, int.from_bytes(data[at + 1 : at + 5], "big")
    raise ValueError("not a bin")


class Layout:
    """An answer's bytes past its id: out's head, its data, the bytes to
    lse's data, lse's data, the bytes to stats' map, the map to the end."""

    __slots__ = ("pre", "out_at", "out_n", "out_dtype", "out_shape", "mid", "lse_at", "lse_n", "lse_dtype", "lse_shape", "post", "stats_at")

    @classmethod
    def learn(cls, data: Any, id_end: int, frame: Dict[str, Any]) -> Optional["Layout"]:
        """The layout of `data` (an answer, `frame` its msgpack decoding),
        the id's bytes ending at `id_end`; None where it is not {id, out,
        lse, stats} in that order or its bytes do not decode to `frame`."""
        try:
            if bytes(data[:4]) != b"\x84\xa2id" or list(frame) != ["id", "out", "lse", "stats"] or not isinstance(frame["stats"], dict):
                return None
            out, lse = frame["out"], frame["lse"]
            lay = cls()
            lay.out_dtype, lay.lse_dtype = _NUMPY[out["dtype"]], _NUMPY[lse["dtype"]]
            lay.out_shape, lay.lse_shape = tuple(out["shape"]), tuple(lse["shape"])
            # The data are last in out's map and in lse's ({dtype, shape, data}: the server's order; a key's
            # str header may be wider than it need be, padding the data to a multiple of 4).
            body = bytes(data)
            lay.out_at, lay.out_n = _bin_at(data, body.index(b"data", id_end) + 4)
            lay.pre = body[id_end : lay.out_at]
            lay.lse_at, lay.lse_n = _bin_at(data, body.index(b"data", lay.out_at + lay.out_n) + 4)
            lay.mid = body[lay.out_at + lay.out_n : lay.lse_at]
            lay.stats_at = body.index(b"stats", lay.lse_at + lay.lse_n) + 5
            lay.post = body[lay.lse_at + lay.lse_n : lay.stats_at]
            r = lay.read(data, id_end)
        except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException):
            return None
        if r is None or r.out.tobytes() != out["data"] or r.lse.tobytes() != lse["data"] or r.stats != frame["stats"]:
            return None
        return lay

    def read(self, data: Any, id_end: int) -> Optional[AttendResult]:
        """The answer in `data` as an AttendResult (out and lse copied out,
        the caller's), None where its bytes are not of this layout."""
        out_at, lse_at = self.out_at, self.lse_at
        stats_at = self.stats_at
        if (
            len(data) <= stats_at
            or data[id_end:out_at] != self.pre
            or data[out_at + self.out_n : lse_at] != self.mid
            or data[lse_at + self.lse_n : stats_at] != self.post
        ):
            return None
        try:
            stats = msgpack.unpackb(data[stats_at:], raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException):
            return None
        if type(stats) is not dict:
            return None
        out = np.empty(self.out_shape, self.out_dtype)
        memoryview(out).cast("B")[:] = data[out_at : out_at + self.out_n]
        lse = np.empty(self.lse_shape, self.lse_dtype)
        memoryview(lse).cast("B")[:] = data[lse_at : lse_at + self.lse_n]
        return AttendResult(out=out, lse=lse, stats=stats)
