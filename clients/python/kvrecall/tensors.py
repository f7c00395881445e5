"""Wire tensors: numpy arrays to and from {dtype, shape, data}, and bf16 bit patterns."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import numpy as np

# Wire dtype -> numpy dtype of the array `decode_tensor` returns. bf16 has no
# numpy dtype: it travels and comes back as uint16 bit patterns.
_NUMPY_OF_WIRE = {
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "f32": np.dtype("<f4"),
    "i32": np.dtype("<i4"),
}
# ... and in this machine's byte order: the arrays returned.
_NATIVE_OF_WIRE = {wire: dt.newbyteorder("=") for wire, dt in _NUMPY_OF_WIRE.items()}
# The wire dtypes whose bytes are already in this machine's order (all, on a little-endian one).
_NATIVE_DTYPE = {wire: dt for wire, dt in _NUMPY_OF_WIRE.items() if dt.isnative}


# --- bf16 ------------------------------------------------------------------


def to_bf16_bits(x: Any) -> np.ndarray:
    """float values -> bf16 bit patterns (uint16), rounding to nearest even.

    NaN stays NaN (quiet); overflow rounds to +-inf as IEEE rounding does.
    """
    a = np.asarray(x, dtype=np.float32)
    flat = np.ascontiguousarray(a).reshape(-1)
    bits = flat.view(np.uint32).astype(np.uint64)  # room for the carry
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(flat)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16).astype(np.uint16)) | np.uint16(0x0040)
    return rounded.reshape(a.shape)


def from_bf16_bits(bits: Any) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 values (exact)."""
    b = np.asarray(bits, dtype=np.uint16)
    wide = np.left_shift(b.reshape(-1).astype(np.uint32), np.uint32(16))
    return wide.view(np.float32).reshape(b.shape)


# --- tensors ---------------------------------------------------------------


def tensor(array: Any, dtype: Optional[str] = None, view: bool = False) -> Dict[str, Any]:
    """A wire tensor {dtype, shape, data} from a numpy array (or anything
    np.asarray takes). view: data is a memoryview of the array's bytes (no
    copy where it is already contiguous, little-endian and of the wire
    dtype), valid while the array is unchanged.

    dtype None: taken from the array (float16 -> f16, float32 -> f32,
    int32 -> i32; float64 is sent as f32). dtype "f16" or "f32" converts
    floats. dtype "bf16" takes either float values (rounded to nearest even)
    or uint16 bit patterns; a uint16 array also passes as "f16" bits.
    """
    if isinstance(array, dict) and {"dtype", "shape", "data"} <= set(array):
        return array  # already a wire tensor
    a = np.asarray(array)
    kind, size = a.dtype.kind, a.dtype.itemsize
    if dtype is None:
        if kind == "f" and size == 2:
            dtype = "f16"
        elif kind == "f" and size in (4, 8):
            dtype = "f32"
        elif kind == "i" and size == 4:
            dtype = "i32"
        else:
            raise TypeError(f"cannot infer a wire dtype for numpy dtype {a.dtype}; pass dtype=")
    bits = kind == "u" and size == 2  # uint16 bit patterns
    if dtype == "bf16":
        data = a if bits else to_bf16_bits(a)
    elif dtype == "f16":
        data = a if bits else a.astype(np.float16, copy=False)
    elif dtype == "f32":
        data = a.astype(np.float32, copy=False)
    elif dtype == "i32":
        data = a.astype(np.int32, copy=False)
    else:
        raise ValueError(f'dtype must be "f16", "bf16", "f32" or "i32", got {dtype!r}')
    data = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False))
    return {"dtype": dtype, "shape": [int(s) for s in data.shape], "data": memoryview(data.reshape(-1)).cast("B") if view else data.tobytes()}


# Binary fields from this size up stay parts of their own in pack_parts.
_PART = 1 << 16


def pack_parts(value: Any, packer: Any) -> List[Union[bytes, memoryview]]:
    """msgpack of `value` (maps, with `packer` for everything else) as a
    list of parts whose bytes, one after another, are its packing: large
    memoryviews (tensor data from tensor(view=True)) are parts as they are,
    behind a bin32 header, so that a document upload's tensors go to the
    socket without being copied into one buffer."""
    parts: List[Union[bytes, memoryview]] = []
    head = bytearray()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            n = len(x)
            head.extend(bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdf" + n.to_bytes(4, "big"))
            for k, v in x.items():
                head.extend(packer.pack(k))
                walk(v)
        elif isinstance(x, memoryview) and x.nbytes >= _PART:
            head.extend(b"\xc6" + x.nbytes.to_bytes(4, "big"))
            parts.append(bytes(head))
            head.clear()
            parts.append(x)
        else:
            head.extend(packer.pack(x))

    walk(value)
    if head:
        parts.append(bytes(head))
    return parts


def decode_tensor(t: Dict[str, Any]) -> np.ndarray:
    """A wire tensor -> numpy array of its shape (bf16 as uint16 bit
    patterns): a new array, the caller's, whatever holds the data (bytes,
    or a view of a receive buffer that the next read writes over)."""
    data = t["data"]
    if type(data) is bytes:
        # msgpack's bin, copied into an array of the shape in one numpy call
        # (frombuffer, reshape and astype cost 2x as much in a decode step on
        # the 2-core VM, its caches cold after the wait for the answer). A
        # buffer of another length goes on to the checks below.
        dt = _NATIVE_DTYPE.get(t["dtype"])
        if dt is not None:
            try:
                a = np.ndarray(t["shape"], dt, bytearray(data))
                if a.nbytes == len(data):
                    return a
            except (TypeError, ValueError):
                pass
    dt = _NUMPY_OF_WIRE.get(t["dtype"])
    if dt is None:
        raise ValueError(f"unknown wire dtype {t['dtype']!r}")
    if isinstance(data, str):  # JSON replies carry base64
        import base64

        data = base64.b64decode(data)
    a = np.frombuffer(data, dtype=dt).reshape(t["shape"])
    return a.astype(_NATIVE_OF_WIRE[t["dtype"]], copy=True)
