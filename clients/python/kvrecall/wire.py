"""Attend and batch requests, the stream's and HTTP's, as msgpack parts
written from the arrays' own bytes (`attend_parts`, `http_attend_parts`,
`batch_parts`): no body dict, no packed copy of the tensors, a tensor's
header bytes cached by dtype, shape and alignment, its data at an offset
of the message that is a multiple of 4 (the server reads f32 in place).

The answer side has no module of its own: msgpack.unpackb reads the answer
where it lies in the receive buffer (the WebSocket's or the HTTP
connection's: a memoryview, no copy of the payload), and decode_tensor
copies each tensor once into the array returned. A walk of the answer in Python that left the tensors as views of
the buffer cost more than it saved (2-core VM, hot loop: 15 us against
unpackb's 3 us for a 32x128 f32 answer; through msgpack.Unpacker's
read_map_header/skip/tell 5 us): a 16 KB copy is well under a microsecond,
each Python step is not.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack
import numpy as np

from .tensors import tensor

__all__ = ["attend_fields", "attend_parts", "batch_parts", "http_attend_parts"]

# --- requests --------------------------------------------------------------
# The attend fields' rules, shared with the dict form (client.attend_body).


def is_half(x: Any) -> bool:
    """A 16-bit float array (sent in its own dtype)."""
    return isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize == 2


def q_wire_dtype(q: Any, q_dtype: Optional[str]) -> Optional[str]:
    """The dtype q is sent in: the one asked, else its own if 16-bit, else f32."""
    return q_dtype if q_dtype is not None else None if is_half(q) else "f32"


def optional_fields(scale: Optional[float], position: Optional[int], returns: Optional[Sequence[str]], out_dtype: Optional[str]) -> List[Tuple[str, Any]]:
    """An attend's optional fields that were given, as (wire name, value), in the order they are sent."""
    fields: List[Tuple[str, Any]] = []
    if scale is not None:
        fields.append(("scale", float(scale)))
    if position is not None:
        fields.append(("position", int(position)))
    if returns is not None:
        fields.append(("return", list(returns)))
    if out_dtype is not None:
        fields.append(("outDtype", str(out_dtype)))
    return fields


def check_kv(k: Any, v: Any, position: Optional[int]) -> None:
    if (k is None) != (v is None):
        raise ValueError("k and v come together or not at all")
    if k is None and position is not None:
        raise ValueError("position names the appended token: send k and v with it")


# The wire dtype of an array sent as it is.
_WIRE_OF = {np.dtype("<f2"): "f16", np.dtype("<f4"): "f32", np.dtype("<i4"): "i32"}
# A field's key and tensor head by (key, dtype, shape, its offset in the message mod 4): its bytes, and their length with the data's.
_HEADS: Dict[Tuple[bytes, str, Tuple[int, ...], int], Tuple[bytes, int]] = {}
# The optional fields' keys, packed once (optional_fields names them).
_KEYS = {name: msgpack.packb(name) for name in ("scale", "position", "return", "outDtype")}
# The "shape" and "data" keys for each padding of a tensor's head (0-3 bytes): a str8 or str16 header where a
# fixstr would do, so any msgpack decoder reads the same map (as the TypeScript client's core/msgpack-parts.ts).
_PADDED_KEYS = {
    0: (b"\xa5shape", b"\xa4data"),
    1: (b"\xa5shape", b"\xd9\x04data"),
    2: (b"\xa5shape", b"\xda\x00\x04data"),
    3: (b"\xd9\x05shape", b"\xda\x00\x04data"),
}


def _tensor_head(name: bytes, wire: str, shape: Tuple[int, ...], at: int, packer: msgpack.Packer) -> Tuple[bytes, int]:
    """The msgpack of a field `name` (its packed key) holding {dtype, shape,
    data}, up to the data's bytes, for a field starting at offset `at` of
    the message, padded so that the data starts at a multiple of 4: the
    server then reads an f32 q in place (a Float32Array over the body)
    instead of copying it out (counted in /metrics as
    kvrecall_f32_unaligned_copies_total); and the bytes to the field's end."""
    nbytes = (2 if wire in ("f16", "bf16") else 4) * int(np.prod(shape, dtype=np.int64))
    dtype_b, shape_b, bin_b = name + b"\x83\xa5dtype" + packer.pack(wire), packer.pack(list(shape)), b"\xc6" + nbytes.to_bytes(4, "big")
    pad = -(at + len(dtype_b) + 6 + len(shape_b) + 5 + len(bin_b)) % 4
    shape_key, data_key = _PADDED_KEYS[pad]
    head = dtype_b + shape_key + shape_b + data_key + bin_b
    return head, len(head) + nbytes


def _tensor_parts(name: bytes, x: Any, dtype: Optional[str], packer: msgpack.Packer, at: int) -> Tuple[bytes, Any, int]:
    """A tensor field starting at offset `at` of the message as two parts:
    its key and msgpack up to the data's bytes (which start at a multiple
    of 4), and the data (the array itself where it is contiguous,
    little-endian and of the wire dtype: no copy); and the field's length."""
    wire = _WIRE_OF.get(x.dtype) if type(x) is np.ndarray and x.flags.c_contiguous else None
    if wire is None or (dtype is not None and dtype != wire):
        t = tensor(x, dtype, view=True)
        wire, data = t["dtype"], t["data"]
        shape = tuple(t["shape"])
    else:
        data, shape = x, x.shape
    key = (name, wire, shape, at & 3)
    cached = _HEADS.get(key)
    if cached is None:
        cached = _tensor_head(name, wire, shape, at, packer)
        if len(_HEADS) < 1024:  # a model has a few shapes; a caller cycling through many gets no cache
            _HEADS[key] = cached
    return cached[0], data, cached[1]


def attend_fields(
    q: Any,
    k: Any = None,
    v: Any = None,
    scale: Optional[float] = None,
    position: Optional[int] = None,
    returns: Optional[Sequence[str]] = None,
    dtype: Optional[str] = None,
    q_dtype: Optional[str] = None,
    out_dtype: Optional[str] = None,
) -> Tuple[Any, Optional[str], Any, Any, Optional[str], List[Tuple[bytes, Any]]]:
    """An attend's arguments (Client.attend's, a batch step's) checked, as
    (q, q's wire dtype, k, v, their dtype, the other fields as (wire name,
    value) pairs: optional_fields')."""
    check_kv(k, v, position)
    return q, q_wire_dtype(q, q_dtype), k, v, dtype, optional_fields(scale, position, returns, out_dtype)


def _step(packer: msgpack.Packer, head: bytes, entries: int, session: Optional[str], fields: Tuple[Any, ...], at: int) -> Tuple[List[Any], int]:
    """One attend's map, starting at offset `at` of the message: `entries`
    packed in `head`, then session (unless None), q, k?, v? and the rest;
    and the offset where it ends."""
    q, q_dtype, k, v, dtype, extra = fields
    pack = packer.pack
    n = entries + (1 if session is None else 2) + (2 if k is not None else 0) + len(extra)
    named = b"" if session is None else b"\xa7session" + pack(session)
    first = (bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")) + head + named
    at += len(first)
    qh, qd, span = _tensor_parts(b"\xa1q", q, q_dtype, packer, at)
    at += span
    parts: List[Any] = [first + qh, qd]
    if k is not None:
        kh, kd, span = _tensor_parts(b"\xa1k", k, dtype, packer, at)
        at += span
        vh, vd, span = _tensor_parts(b"\xa1v", v, dtype, packer, at)
        at += span
        parts += [kh, kd, vh, vd]
    if extra:
        rest = b"".join(_KEYS[key] + pack(value) for key, value in extra)
        parts.append(rest)
        at += len(rest)
    return parts, at


def attend_parts(packer: msgpack.Packer, id_: int, session: str, layer: int, fields: Tuple[Any, ...]) -> List[Any]:
    """A stream attend request's payload as parts (bytes and arrays) whose
    bytes, one after another, are msgpack's packing of {id, layer, session,
    q, k?, v?, ...}, each tensor's data at an offset that is a multiple of 4:
    written to the socket as they are (sendmsg), the arrays' bytes never
    joined. fields: attend_fields'. packer: the caller's (one thread at a
    time)."""
    return _step(packer, b"\xa2id" + packer.pack(id_) + b"\xa5layer" + packer.pack(layer), 2, session, fields, 0)[0]


def http_attend_parts(packer: msgpack.Packer, layer: int, fields: Tuple[Any, ...]) -> List[Any]:
    """The body of POST /v1/sessions/:sid/attend ({layer, q, k?, v?, ...};
    the session is in the path) as parts, as attend_parts."""
    return _step(packer, b"\xa5layer" + packer.pack(layer), 1, None, fields, 0)[0]


def batch_parts(packer: msgpack.Packer, id_: Optional[int], layer: int, steps: Sequence[Dict[str, Any]]) -> List[Any]:
    """A batch request {id, layer, steps: [...]} (a stream's; without id,
    the body of POST /v1/attend) as parts, as attend_parts; each step a dict
    of attend's arguments with its session (as Client.attend_batch takes
    them)."""
    n = len(steps)
    count = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")
    named = b"\x82" if id_ is None else b"\x83\xa2id" + packer.pack(id_)
    parts: List[Any] = [named + b"\xa5layer" + packer.pack(layer) + b"\xa5steps" + count]
    at = len(parts[0])
    for step in steps:
        session, fields = batch_step(step)
        step_parts, at = _step(packer, b"", 0, session, fields, at)
        parts += step_parts
    return parts


def batch_step(step: Any) -> Tuple[str, Tuple[Any, ...]]:
    """A batch step (a dict of attend's arguments with its session; `return`
    or `returns`): its session and attend_fields'."""
    if not isinstance(step, dict) or "session" not in step:
        raise TypeError("a batch step is a dict with a session id and q")
    fields = dict(step)
    session = str(fields.pop("session"))
    if "return" in fields:
        fields["returns"] = fields.pop("return")
    return session, attend_fields(**fields)
