"""A WebSocket frame's bytes as the client writes them (RFC 6455 5.2,
5.3): the opcodes, the header up to the masking key, and the masking.
kvrecall.websocket sends and reads frames with them; kvrecall.lean makes
a plan's whole frame once with frame_header."""

from __future__ import annotations

import struct
from typing import Union

try:  # only to mask large frames faster; everything works without it
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

__all__ = ["OP_CONTINUATION", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG", "frame_header", "mask"]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def mask(payload: Union[bytes, bytearray, memoryview], key: bytes) -> Union[bytes, memoryview]:
    """payload XOR the 4-byte key repeated (RFC 6455 5.3): bytes, or for a
    large payload a memoryview of a new buffer. Through numpy when it is
    importable (about 7 us for 20 KB), else through Python's big integers
    (about 75 us for 20 KB; the faster of the two below 1 KiB)."""
    n = len(payload)
    if n == 0:
        return b""
    if _np is not None and n >= 1024:
        out = _np.frombuffer(payload, _np.uint8).copy()
        whole = n - n % 4
        words = out[:whole].view(_np.uint32)
        _np.bitwise_xor(words, _np.frombuffer(key, _np.uint32)[0], out=words)
        if whole < n:
            out[whole:] ^= _np.frombuffer(key[: n - whole], _np.uint8)
        return out.data
    pattern = key * (n // 4) + key[: n % 4]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(pattern, "little")).to_bytes(n, "little")


def frame_header(opcode: int, length: int, fin: bool = True, masked: bool = True) -> bytes:
    """A frame's first bytes up to (not including) the masking key."""
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", b0, m | length)
    if length < 1 << 16:
        return struct.pack("!BBH", b0, m | 126, length)
    return struct.pack("!BBQ", b0, m | 127, length)
