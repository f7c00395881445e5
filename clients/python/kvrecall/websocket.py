"""A small blocking WebSocket client (RFC 6455) over `socket`, standard
library only (numpy, when importable, only makes masking large frames
faster): what kvrecall's `GET /v1/stream` needs.

    ws = WebSocket.connect("http://127.0.0.1:8700/v1/stream", headers={"authorization": "Bearer T"})
    ws.send_binary(b"...")          # one masked binary frame
    data = ws.recv()                # the next whole message (bytes; str for a text message)
    ws.close()

- Handshake: HTTP/1.1 GET with `Upgrade: websocket`, a random `Sec-WebSocket-Key`, and the answer's
  `Sec-WebSocket-Accept` checked. A refusal (any status but 101) raises `HandshakeError` with the status,
  headers and body. No extensions and no subprotocols are asked for; an answer that names one is refused.
- Frames: client frames are masked with a fresh random key each; payload
  lengths of 7, 16 and 64 bits both ways; fragmented messages (continuation
  frames) are put together, with control frames allowed between fragments;
  a ping is answered with a pong carrying its payload; a close frame is
  answered with a close frame and ends the connection (`ConnectionClosed`).
- TCP_NODELAY is on: a request is one write and goes out at once. The timeout is the kernel's (kernel_timeouts), on Linux
  without TLS. A read may poll before it blocks (`spin`, kvrecall.spin).
- Receiving: frames are read (recv_into) into one warm buffer and parsed
  where they lie; `recv_view()` gives a binary message without a copy.
- Not thread-safe: one thread sends and receives at a time (`close()` from another makes a waiting `recv()` raise).
- `http://` and `ws://` are plain TCP; `https://` and `wss://` use TLS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from .http_head import BadStatusLine, Head, HeadError, HeadTooLong, answer_head
from .socket_io import IOV_MAX, kernel_timeouts, send_rest, timed_out
from .spin import spin_recv_into
from .ws_frame import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, frame_header, mask

T = TypeVar("T")

__all__ = ["WebSocket", "WebSocketError", "HandshakeError", "ConnectionClosed"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_MAX_HEADER = 64 * 1024  # the handshake answer's status line and headers


class WebSocketError(OSError):
    """A protocol violation by the peer, or a failed handshake."""


class HandshakeError(WebSocketError):
    """The server did not switch protocols: its status, headers and body."""

    def __init__(self, status: int, reason: str, headers: Dict[str, str], body: bytes):
        super().__init__(f"websocket handshake refused: {status} {reason}".rstrip())
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class ConnectionClosed(WebSocketError):
    """The connection is closed: by a close frame (its code and reason), or
    by the socket ending (code 1006)."""

    def __init__(self, code: int = 1006, reason: str = ""):
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


# A frame up to this size is read into the warm receive buffer (grown to
# hold it); a larger one into a buffer of its own.
_KEEP = 16 << 20
_ZERO_KEY = b"\0\0\0\0"


class WebSocket:
    """One client connection. Make it with `WebSocket.connect`."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"", max_message: int = 1 << 31, zero_mask: bool = False, recv_buffer: int = 1 << 16):
        self.sock = sock
        self.max_message = max_message
        # A zero masking key leaves the payload as it is: no masked copy of
        # every frame. Masking guards proxies against script-driven browsers;
        # a program's own client may skip it (the frames stay valid).
        self.zero_mask = zero_mask
        # Frames are read into one warm buffer and parsed where they lie:
        # _rbuf[_pos:_end] is read but not yet parsed.
        self._rbuf = bytearray(max(recv_buffer, len(leftover)))
        self._rbuf[: len(leftover)] = leftover
        self._pos, self._end = 0, len(leftover)
        self._closed: Optional[ConnectionClosed] = None
        self._close_sent = False
        self._can_sendmsg = hasattr(sock, "sendmsg") and not isinstance(sock, ssl.SSLSocket)
        self.spin = 0.0  # seconds a read with nothing buffered polls before it blocks (kvrecall.spin)

    # connecting -----------------------------------------------------------

    @classmethod
    def connect(
        cls,
        url: str,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        max_message: int = 1 << 31,
        zero_mask: bool = False,
        recv_buffer: int = 1 << 16,
    ) -> "WebSocket":
        """Opens a TCP (or TLS) connection to `url` and upgrades it.

        url: ws://, wss://, http:// or https:// with the path to upgrade.
        headers: more request headers (e.g. authorization). timeout: seconds
        for the connection, the handshake and every later socket operation
        (None blocks). zero_mask: mask frames with the key 0 (payloads sent
        as they are). recv_buffer: the receive buffer's first size (it grows
        to hold a larger frame). Raises HandshakeError when the server
        refuses.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss", "http", "https"):
            raise ValueError(f"url must be ws://, wss://, http:// or https://, got {url!r}")
        tls = parts.scheme in ("wss", "https")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
            leftover = _handshake(sock, host, port, path, headers or {})
            kernel_timeouts(sock, timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, leftover, max_message=max_message, zero_mask=zero_mask, recv_buffer=recv_buffer)

    # sending ---------------------------------------------------------------

    def send_binary(self, payload: Union[bytes, bytearray, memoryview]) -> None:
        """Sends one binary message as one masked frame."""
        self._send_frame(OP_BINARY, payload)

    def send_binary_parts(self, parts: Sequence[Any]) -> None:
        """Sends one binary message whose payload is the parts one after
        another (bytes-like objects, or C-contiguous numpy arrays: their
        bytes), as one frame, without joining them (with the zero key; else
        joined and masked): the tensors go from the caller's arrays to the
        socket in one gather write."""
        if not self.zero_mask or not self._can_sendmsg:
            self._send_frame(OP_BINARY, b"".join(memoryview(p).cast("B") for p in parts))
            return
        if self._closed is not None:
            raise self._closed
        n = 0
        for p in parts:
            n += len(p) if isinstance(p, (bytes, bytearray)) else p.nbytes  # an array's len is its rows
        head = frame_header(OP_BINARY, n) + _ZERO_KEY
        try:
            sent = self.sock.sendmsg([head, *parts] if len(parts) < IOV_MAX else [head])
            if sent < len(head) + n:
                send_rest(self.sock, [memoryview(head), *(memoryview(p).cast("B") for p in parts)], sent)
        except OSError as e:
            e = timed_out(e)
            self._fail(ConnectionClosed(1006, f"send failed: {e}"))
            raise self._closed from e

    def send_framed(self, parts: List[Any], nbytes: int) -> None:
        """Sends parts that are a whole frame, header (zero key) first, `nbytes` in all (kvrecall.lean's plans)."""
        if self._closed is not None:
            raise self._closed
        try:
            sent = self.sock.sendmsg(parts)
            if sent < nbytes:
                send_rest(self.sock, [memoryview(p).cast("B") for p in parts], sent)
        except OSError as e:
            e = timed_out(e)
            self._fail(ConnectionClosed(1006, f"send failed: {e}"))
            raise self._closed from e

    def send_text(self, text: str) -> None:
        self._send_frame(OP_TEXT, text.encode("utf-8"))

    def send_fragments(self, parts: List[Union[bytes, bytearray, memoryview]], opcode: int = OP_BINARY) -> None:
        """Sends one message as len(parts) frames: the first with `opcode`,
        the rest as continuations, FIN on the last."""
        if not parts:
            raise ValueError("a message needs at least one part")
        for i, part in enumerate(parts):
            self._send_frame(opcode if i == 0 else OP_CONTINUATION, part, fin=i == len(parts) - 1)

    def ping(self, payload: bytes = b"") -> None:
        self._send_frame(OP_PING, payload)

    def ping_round_trip(self, payload: bytes = b"") -> None:
        """A ping, then frames read until its pong (the one carrying this
        payload; others are ignored, the peer's pings answered): the bare
        round trip on this connection. Only with no request in flight: a data
        message meanwhile is a protocol error."""
        self._send_frame(OP_PING, payload)

        def until_pong() -> None:
            while True:
                _, op, data = self._read_frame()
                if op == OP_PONG and bytes(data) == payload:
                    return
                if op < 0x8:
                    raise WebSocketError("a data message while awaiting a pong")
                self._control(op, bytes(data))

        self._receiving(until_pong)

    def _send_frame(self, opcode: int, payload: Union[bytes, bytearray, memoryview], fin: bool = True) -> None:
        if self._closed is not None:
            raise self._closed
        if isinstance(payload, memoryview) and payload.nbytes != len(payload):
            # A view of wider items (a float32 array's): its len counts items, the frame's length is bytes.
            payload = payload.cast("B")
        if opcode >= 0x8 and len(payload) > 125:
            raise ValueError("a control frame's payload is at most 125 bytes")
        key = _ZERO_KEY if self.zero_mask else os.urandom(4)
        head = frame_header(opcode, len(payload), fin=fin) + key
        body = payload if self.zero_mask else mask(payload, key)
        try:
            if self._can_sendmsg:
                sent = self.sock.sendmsg([head, body])
                total = len(head) + len(body)
                if sent < total:  # a short write: the rest the ordinary way
                    self.sock.sendall((head + body)[sent:])
            else:
                self.sock.sendall(head + body)
        except OSError as e:
            e = timed_out(e)
            self._fail(ConnectionClosed(1006, f"send failed: {e}"))
            raise self._closed from e

    # receiving -------------------------------------------------------------

    def recv(self) -> Union[bytes, str]:
        """The next data message: bytes (binary) or str (text). Answers pings
        on the way; raises ConnectionClosed on a close frame or end of stream."""
        data = self.recv_view()
        return data if isinstance(data, str) else bytes(data)

    def recv_view(self) -> Union[memoryview, str]:
        """As recv, a binary message as a memoryview of the connection's
        receive buffer, without a copy: valid until the next call that
        receives (recv, recv_view, close with wait); copy what must outlive
        that. The buffer is written over in place by later reads, never
        resized while viewed (a message too large for it gets a new one)."""
        return self._receiving(self._recv_message)

    def _receiving(self, read: Callable[[], T]) -> T:
        """Runs a read of frames: a close or a lost connection ends the
        connection (ConnectionClosed), a broken protocol closes it with 1002."""
        if self._closed is not None:
            raise self._closed
        try:
            return read()
        except ConnectionClosed as e:
            self._fail(e)
            raise
        except WebSocketError as e:  # the peer broke the protocol: close with 1002
            self._close_with(1002, str(e)[:120])
            self._fail(ConnectionClosed(1002, str(e)))
            raise
        except OSError as e:
            e = timed_out(e)
            self._fail(ConnectionClosed(1006, str(e)))
            raise self._closed from e

    def _recv_message(self) -> Union[memoryview, str]:
        if self._pos == self._end:
            # Nothing buffered: one read at the buffer's start. The common answer (one whole final
            # binary frame, up to 64 KiB) is returned from here; anything else is parsed below.
            buf = self._rbuf
            got = spin_recv_into(self.sock, buf, self.spin) if self.spin else self.sock.recv_into(buf)
            if not got:
                raise ConnectionClosed(1006, "connection ended")
            self._pos, self._end = 0, got
            if got > 3 and buf[0] == 0x82 and buf[1] <= 126:  # FIN, binary, unmasked, a 7- or 16-bit length
                n, head = (buf[1], 2) if buf[1] < 126 else ((buf[2] << 8) | buf[3], 4)
                if head + n <= got and n <= self.max_message:
                    self._pos = head + n
                    return memoryview(buf)[head : head + n]
        opcode: Optional[int] = None
        fragments: List[bytes] = []
        size = 0
        while True:
            fin, op, payload = self._read_frame()
            if op >= 0x8:
                self._control(op, bytes(payload))
                continue
            if op == OP_CONTINUATION:
                if opcode is None:
                    raise WebSocketError("a continuation frame with no message to continue")
            elif op in (OP_TEXT, OP_BINARY):
                if opcode is not None:
                    raise WebSocketError("a new message began before the last one's final fragment")
                opcode = op
            else:
                raise WebSocketError(f"unknown opcode {op:#x}")
            size += len(payload)
            if size > self.max_message:
                raise WebSocketError(f"message over {self.max_message} bytes")
            if fin:
                data = payload if not fragments else memoryview(b"".join([*fragments, payload]))
                return str(data, "utf-8") if opcode == OP_TEXT else data
            # The next frame's read may write over this one's bytes.
            fragments.append(bytes(payload))

    def _control(self, op: int, payload: bytes) -> None:
        if op == OP_PING:
            self._send_frame(OP_PONG, payload)
        elif op == OP_PONG:
            pass
        elif op == OP_CLOSE:
            code, reason = 1005, ""
            if len(payload) >= 2:
                code = struct.unpack("!H", payload[:2])[0]
                reason = payload[2:].decode("utf-8", errors="replace")
            elif len(payload) == 1:
                raise WebSocketError("a close frame with a 1-byte payload")
            # Echo the close (the code only) unless we sent one already, then end.
            self._close_with(code if code not in (1005, 1006, 1015) else 1000, "")
            self._fail(ConnectionClosed(code, reason))
            raise self._closed
        else:
            raise WebSocketError(f"unknown control opcode {op:#x}")

    def _read_frame(self) -> Tuple[bool, int, memoryview]:
        """The next frame, parsed where it lies in the receive buffer: its
        payload a view of the buffer (or of a buffer of its own when larger
        than the buffer may grow)."""
        pos = self._pos
        if pos == self._end:  # all parsed (the views given out are spent): read from the buffer's start, in one read
            self._pos = self._end = pos = 0
        if self._end - pos < 14:  # the longest header: 2 + 8 + a 4-byte key
            self._fill(2)
            pos = self._pos
        buf = self._rbuf
        b0, b1 = buf[pos], buf[pos + 1]
        if b0 & 0x70:
            raise WebSocketError("reserved bits set (no extension was agreed)")
        fin, op = bool(b0 & 0x80), b0 & 0x0F
        masked, length = b1 & 0x80, b1 & 0x7F
        head = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if masked else 0)
        if self._end - pos < head:
            self._fill(head)
            pos, buf = self._pos, self._rbuf
        if length == 126:
            length = (buf[pos + 2] << 8) | buf[pos + 3]
        elif length == 127:
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length >> 63:
                raise WebSocketError("64-bit length with its top bit set")
        if op >= 0x8 and (length > 125 or not fin):
            raise WebSocketError("a control frame over 125 bytes or fragmented")
        if length > self.max_message:
            raise WebSocketError(f"frame over {self.max_message} bytes")
        key = bytes(buf[pos + head - 4 : pos + head]) if masked else None
        self._pos = pos + head
        payload = self._take(length)
        # Servers do not mask; unmask anyway if one does.
        return fin, op, (memoryview(bytes(mask(payload, key))) if key else payload)

    def _take(self, n: int) -> memoryview:
        """The next n bytes as a view: of the receive buffer (grown to hold
        them, up to _KEEP), else of a buffer of their own."""
        have = self._end - self._pos
        if have < n and n > _KEEP:
            out = bytearray(n)
            view = memoryview(out)
            view[:have] = memoryview(self._rbuf)[self._pos : self._end]
            self._pos = self._end = 0
            while have < n:
                got = self.sock.recv_into(view[have:])
                if not got:
                    raise ConnectionClosed(1006, "connection ended mid-frame")
                have += got
            return view
        if have < n:
            self._fill(n)
        at = self._pos
        self._pos = at + n
        return memoryview(self._rbuf)[at : at + n]

    def _fill(self, n: int) -> None:
        """Reads until n bytes past _pos are in the buffer: what is unparsed
        moves to the front when the room behind it is short, into a new
        buffer twice the size when the whole buffer is (the old one stays
        valid for views of it)."""
        buf, pos, end = self._rbuf, self._pos, self._end
        if pos + n > len(buf):
            if n > len(buf):
                bigger = bytearray(max(n, 2 * len(buf)))
                bigger[: end - pos] = buf[pos:end]
                self._rbuf = buf = bigger
            else:
                buf[: end - pos] = buf[pos:end]  # same length: in place, no resize
            self._pos, self._end = 0, end - pos
            pos, end = 0, end - pos
        view = memoryview(buf)
        while end - pos < n:
            got = self.sock.recv_into(view[end:])
            if not got:
                raise ConnectionClosed(1006, "connection ended" + (" mid-frame" if end > pos else ""))
            end += got
            self._end = end

    # closing ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self, code: int = 1000, reason: str = "", wait: float = 0.0) -> None:
        """Sends a close frame (once) and closes the socket. wait > 0: first
        waits up to that many seconds for the server's close frame, dropping
        any data messages that come before it."""
        if self._closed is None:
            self._close_with(code, reason)
            if wait > 0:
                try:
                    self.sock.settimeout(wait)
                    while True:
                        self._recv_message()
                except (OSError, WebSocketError):
                    pass
        self._fail(ConnectionClosed(code, reason))

    def _close_with(self, code: int, reason: str) -> None:
        if self._close_sent or self._closed is not None:
            return
        self._close_sent = True
        try:
            self._send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])
        except OSError:
            pass

    def _fail(self, e: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = e
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "WebSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answer_head(data: bytearray) -> Optional[Head]:
    """The upgrade answer's head (kvrecall.http_head), its faults as WebSocketError."""
    try:
        return answer_head(data, len(data), _MAX_HEADER)
    except HeadTooLong:
        raise WebSocketError("handshake answer headers too long") from None
    except BadStatusLine as e:
        raise WebSocketError(f"not an HTTP answer: {e.line[:80]!r}") from None
    except HeadError as e:
        raise WebSocketError(f"handshake answer: malformed header line {e.line!r}") from None


def _handshake(sock: socket.socket, host: str, port: int, path: str, headers: Dict[str, str]) -> bytes:
    """Sends the upgrade request and checks the answer; returns the bytes read past it."""
    key = base64.b64encode(os.urandom(16)).decode()
    host_header = host if ":" not in host else f"[{host}]"
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    data = bytearray()
    while (answer := _answer_head(data)) is None:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionClosed(1006, "connection ended during the handshake")
        data += chunk
    status, got, rest = answer.status, answer.headers, bytes(data[answer.body_at :])
    if status != 101:
        body = rest
        want = got.get("content-length")
        if want is not None and want.isdigit():
            while len(body) < int(want):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            body = body[: int(want)]
        raise HandshakeError(status, answer.reason, got, body)
    if got.get("upgrade", "").lower() != "websocket":
        raise WebSocketError("handshake answer lacks Upgrade: websocket")
    if "upgrade" not in [t.strip().lower() for t in got.get("connection", "").split(",")]:
        raise WebSocketError("handshake answer lacks Connection: Upgrade")
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
    if got.get("sec-websocket-accept") != accept:
        raise WebSocketError("handshake answer's Sec-WebSocket-Accept does not match the key")
    if got.get("sec-websocket-extensions") or got.get("sec-websocket-protocol"):
        raise WebSocketError("the server chose an extension or subprotocol that was not asked for")
    return rest
