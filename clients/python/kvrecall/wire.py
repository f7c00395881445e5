"""Attend and batch requests, the stream's and HTTP's, as msgpack parts
written from the arrays' own bytes (`attend_parts`, `http_attend_parts`,
`batch_parts`): no body dict, no packed copy of the tensors, a tensor's
header bytes cached by dtype and shape.

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
_HEADS: Dict[Tuple[str, Tuple[int, ...]], bytes] = {}
# The optional fields' keys, packed once (optional_fields names them).
_KEYS = {name: msgpack.packb(name) for name in ("scale", "position", "return", "outDtype")}


def _tensor_parts(x: Any, dtype: Optional[str], packer: msgpack.Packer) -> Tuple[bytes, Any]:
    """A wire tensor as two parts: its msgpack up to the data's bytes, and
    the data (the array itself where it is contiguous, little-endian and of
    the wire dtype: no copy)."""
    wire = _WIRE_OF.get(x.dtype) if type(x) is np.ndarray and x.flags.c_contiguous else None
    if wire is None or (dtype is not None and dtype != wire):
        t = tensor(x, dtype, view=True)
        wire, data = t["dtype"], t["data"]
        shape = tuple(t["shape"])
    else:
        data, shape = x, x.shape
    key = (wire, shape)
    head = _HEADS.get(key)
    if head is None:
        nbytes = (2 if wire in ("f16", "bf16") else 4) * int(np.prod(shape, dtype=np.int64))
        head = b"\x83\xa5dtype" + packer.pack(wire) + b"\xa5shape" + packer.pack(list(shape)) + b"\xa4data" + b"\xc6" + nbytes.to_bytes(4, "big")
        if len(_HEADS) < 256:  # a model has a few shapes; a caller cycling through many gets no cache
            _HEADS[key] = head
    return head, data


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
    (q, q's wire dtype, k, v, their dtype, the other fields as (packed key,
    value) pairs)."""
    check_kv(k, v, position)
    extra = [(_KEYS[name], value) for name, value in optional_fields(scale, position, returns, out_dtype)]
    return q, q_wire_dtype(q, q_dtype), k, v, dtype, extra


def _step(packer: msgpack.Packer, head: bytes, entries: int, session: Optional[str], fields: Tuple[Any, ...]) -> List[Any]:
    """One attend's map: `entries` packed in `head`, then session (unless None), q, k?, v? and the rest."""
    q, q_dtype, k, v, dtype, extra = fields
    pack = packer.pack
    n = entries + (1 if session is None else 2) + (2 if k is not None else 0) + len(extra)
    qh, qd = _tensor_parts(q, q_dtype, packer)
    named = b"" if session is None else b"\xa7session" + pack(session)
    parts: List[Any] = [(bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")) + head + named + b"\xa1q" + qh, qd]
    if k is not None:
        kh, kd = _tensor_parts(k, dtype, packer)
        vh, vd = _tensor_parts(v, dtype, packer)
        parts += [b"\xa1k" + kh, kd, b"\xa1v" + vh, vd]
    if extra:
        parts.append(b"".join(key + pack(value) for key, value in extra))
    return parts


def attend_parts(packer: msgpack.Packer, id_: int, session: str, layer: int, fields: Tuple[Any, ...]) -> List[Any]:
    """A stream attend request's payload as parts (bytes and arrays) whose
    bytes, one after another, are msgpack's packing of {id, layer, session,
    q, k?, v?, ...}: written to the socket as they are (sendmsg), the
    arrays' bytes never joined. fields: attend_fields'. packer: the
    caller's (one thread at a time)."""
    return _step(packer, b"\xa2id" + packer.pack(id_) + b"\xa5layer" + packer.pack(layer), 2, session, fields)


def http_attend_parts(packer: msgpack.Packer, layer: int, fields: Tuple[Any, ...]) -> List[Any]:
    """The body of POST /v1/sessions/:sid/attend ({layer, q, k?, v?, ...};
    the session is in the path) as parts, as attend_parts."""
    return _step(packer, b"\xa5layer" + packer.pack(layer), 1, None, fields)


def batch_parts(packer: msgpack.Packer, id_: Optional[int], layer: int, steps: Sequence[Dict[str, Any]]) -> List[Any]:
    """A batch request {id, layer, steps: [...]} (a stream's; without id,
    the body of POST /v1/attend) as parts, as attend_parts; each step a dict
    of attend's arguments with its session (as Client.attend_batch takes
    them)."""
    n = len(steps)
    count = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")
    named = b"\x82" if id_ is None else b"\x83\xa2id" + packer.pack(id_)
    parts: List[Any] = [named + b"\xa5layer" + packer.pack(layer) + b"\xa5steps" + count]
    for step in steps:
        if not isinstance(step, dict) or "session" not in step:
            raise TypeError("a batch step is a dict with a session id and q")
        fields = dict(step)
        session = str(fields.pop("session"))
        if "return" in fields:
            fields["returns"] = fields.pop("return")
        parts += _step(packer, b"", 0, session, attend_fields(**fields))
    return parts
