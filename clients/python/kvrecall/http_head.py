"""An HTTP/1.1 answer's head (status line and header lines), read by both of
the client's HTTP readers: kvrecall._http for its calls and
kvrecall.websocket for the answer to its upgrade. One parser, so both
refuse the same malformed heads; each caller turns a HeadError into its
own exception, with its own message."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Union

__all__ = ["Head", "HeadError", "HeadTooLong", "BadStatusLine", "BadHeaderLine", "answer_head"]

_END = b"\r\n\r\n"


class HeadError(ValueError):
    """A head the client will not read: `line` is what was wrong with it."""

    def __init__(self, message: str, line: str = ""):
        super().__init__(message)
        self.line = line


class HeadTooLong(HeadError):
    """No blank line within the bytes the caller allows for the head."""


class BadStatusLine(HeadError):
    """The first line is not `HTTP/1.x <3 digits> [reason]`."""


class BadHeaderLine(HeadError):
    """A header line without a name and a colon."""


class Head(NamedTuple):
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    status: int
    reason: str
    headers: Dict[str, str]  # lower-case names; a repeated name keeps its last value
    body_at: int  # where the body starts: past the blank line


def answer_head(buf: Union[bytes, bytearray], have: int, limit: int) -> Optional[Head]:
    """The head at the start of buf[:have], or None while its blank line has
    not come (read more and call again). The head, blank line included,
    must end within `limit` bytes: HeadTooLong once that many are read
    without it. BadStatusLine, BadHeaderLine for a malformed head."""
    end = buf.find(_END, 0, min(have, limit))
    if end < 0:
        if have >= limit:
            raise HeadTooLong(f"answer head not ended within {limit} bytes")
        return None
    status_line, *header_lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    # isdigit alone passes "²" (latin-1 superscripts), which int() refuses; RFC 9112 says three digits.
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        raise BadStatusLine(f"not an HTTP/1.x status line: {status_line[:80]!r}", status_line)
    headers: Dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name:
            raise BadHeaderLine(f"malformed header line {line!r}", line)
        headers[name.lower()] = value.strip()
    return Head(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers, end + len(_END))
