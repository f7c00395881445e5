"""The client's connections: its own HTTP/1.1 on a plain socket for http:
(_RawHTTPConnection), http.client for https: (TCP_NODELAY, and a request
with a body written in one sendmsg). kvrecall.transport drives them."""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Any, Dict, Optional, Sequence

from .http_head import BadStatusLine, HeadError, HeadTooLong, answer_head
from .socket_io import IOV_MAX, kernel_timeouts, send_rest

_MAX_HEAD = 1 << 20  # an answer's status line and headers


class AnswerCut(ConnectionResetError):
    """The connection ended after part of the answer: the server had the
    request and acted on it, so it must not be sent again (unlike a kept-alive
    connection found closed before any answer)."""


class _OneWrite:
    """http.client sends a request's head and its body in two writes: with
    TCP_NODELAY two packets, and the server woken twice (a decode step's
    overhead on the 2-core VM). Here a bytes body leaves with the head in one
    sendmsg (no copy), the rest of a short write with sendall."""

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if not isinstance(message_body, (bytes, bytearray, memoryview)) or encode_chunked or not hasattr(socket.socket, "sendmsg"):
            return super()._send_output(message_body, encode_chunked)  # type: ignore[misc]
        self._buffer.extend((b"", b""))  # type: ignore[attr-defined]
        head = b"\r\n".join(self._buffer)  # type: ignore[attr-defined]
        del self._buffer[:]  # type: ignore[attr-defined]
        if self.sock is None:  # type: ignore[attr-defined]
            self.connect()  # type: ignore[attr-defined]
        sock = self.sock  # type: ignore[attr-defined]
        if isinstance(sock, ssl.SSLSocket):
            sock.sendall(head + bytes(message_body))
            return
        sent = sock.sendmsg([head, message_body])
        if sent < len(head):
            sock.sendall(head[sent:])
            sock.sendall(message_body)
        elif sent < len(head) + len(message_body):
            sock.sendall(memoryview(message_body)[sent - len(head) :])


class _HTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    """With TCP_NODELAY: a small request or answer goes out at once."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Response:
    """An answer read by _RawHTTPConnection: status, reason, headers
    (lower-case names), body (bytes-like: a bytes, a bytearray, or a view of
    the connection's buffer, as `exchange` says)."""

    __slots__ = ("status", "reason", "headers", "data")

    def __init__(self, status: int, reason: str, headers: Dict[str, str], data: Any) -> None:
        self.status, self.reason, self.headers, self.data = status, reason, headers, data

    def getheader(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


def _head_error(e: HeadError) -> http.client.HTTPException:
    """A head kvrecall.http_head refused, as http.client would say it."""
    if isinstance(e, HeadTooLong):
        return http.client.HTTPException("answer head longer than 1 MiB")
    if isinstance(e, BadStatusLine):
        return http.client.BadStatusLine(e.line)
    return http.client.HTTPException(f"malformed header line {e.line!r}")


class _RawHTTPConnection:
    """HTTP/1.1 on a plain socket for an http: server, for the client's
    calls: the request's head and body leave in one sendmsg (the body as
    parts: bytes and C-contiguous arrays, never joined), the answer is read
    with recv_into into a warm buffer (or one of its content-length, or its
    chunks) and its head parsed here. http.client's response object (its
    header parsing alone is email.parser) cost a decode step ~0.3 ms on the
    2-core VM, about as much as the rest of the call."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: Optional[socket.socket] = None
        self._buf = bytearray(1 << 16)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, path: str, body: Optional[bytes], headers: Dict[str, str]) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"] + [f"{k}: {v}" for k, v in headers.items()]
        if body is not None and "content-length" not in headers:
            lines.append(f"content-length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return self.exchange(method, head, [body] if body else [], len(body) if body else 0)

    def exchange(self, method: str, head: bytes, parts: Sequence[Any], nbytes: int, view: bool = False) -> Response:
        """Sends a request (its head, then the parts' bytes: `nbytes` in
        all, which the head's content-length says) and reads its answer.
        view: the answer's body is a memoryview of the connection's warm
        buffer where it fits there, valid until the next request (read it
        before); else it is bytes of its own."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kernel_timeouts(self.sock, self.timeout)  # no poll before each send and read
        try:
            sock = self.sock
            if not parts:
                sock.sendall(head)
            elif len(parts) < IOV_MAX:
                sent = sock.sendmsg([head, *parts])
                if sent < len(head) + nbytes:
                    send_rest(sock, [memoryview(head), *(memoryview(p).cast("B") for p in parts)], sent)
            else:
                send_rest(sock, [memoryview(head), *(memoryview(p).cast("B") for p in parts)], 0)
            return self._read(method, view)
        except BlockingIOError as e:  # the kernel's timeout: as Python's would be
            raise TimeoutError("timed out") from e

    def _read(self, method: str, keep: bool) -> Response:
        sock, buf = self.sock, self._buf
        assert sock is not None
        view = memoryview(buf)
        have = 0
        while True:
            n = sock.recv_into(view[have:])
            if n == 0:
                if have == 0:
                    raise http.client.RemoteDisconnected("the server closed the connection without an answer")
                raise AnswerCut("the server closed the connection mid-answer")
            have += n
            try:
                head = answer_head(buf, have, _MAX_HEAD)
            except HeadError as e:
                raise _head_error(e) from None
            if head is not None:
                break
            if have == len(buf):
                # A new buffer, not buf.extend: a bytearray viewed (`view`) cannot be resized (BufferError).
                bigger = bytearray(2 * len(buf))
                bigger[:have] = view[:have]
                view.release()
                self._buf = buf = bigger
                view = memoryview(buf)
        status, headers, start = head.status, head.headers, head.body_at
        data: Any
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            data = self._chunked(bytearray(view[start:have]))
        elif "content-length" in headers:
            data = self._exactly(int(headers["content-length"]), view, start, have, keep)
        else:
            data = self._to_eof(bytearray(view[start:have]))
            headers["connection"] = "close"
        if head.version == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
            headers["connection"] = "close"
        return Response(status, head.reason, headers, data)

    def _exactly(self, length: int, view: memoryview, start: int, have: int, keep: bool) -> Any:
        """The body of `length` bytes that starts at `start` in the buffer,
        `have - start` of them read: with `keep`, a view of the buffer where
        it fits there (the rest read into its place); else bytes of its own."""
        got = have - start
        if got > length:
            raise http.client.HTTPException("answer longer than its content-length")
        if keep and start + length <= len(view):
            into = view[start : start + length]
        elif got == length:
            return bytes(view[start:have])
        else:
            out = bytearray(length)  # a bytearray: msgpack and json read it as bytes
            out[:got] = view[start:have]
            into = memoryview(out)
        assert self.sock is not None
        while got < length:
            n = self.sock.recv_into(into[got:])
            if n == 0:
                raise AnswerCut("the server closed the connection mid-answer")
            got += n
        return into if keep else into.obj

    def _more(self, into: bytearray) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise AnswerCut("the server closed the connection mid-answer")
        into += chunk

    def _chunked(self, pending: bytearray) -> bytes:
        out = bytearray()
        while True:
            while (line := pending.find(b"\r\n")) < 0:
                self._more(pending)
            size = int(bytes(pending[:line]).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while pending.find(b"\r\n\r\n", line) < 0:
                    self._more(pending)
                return bytes(out)
            while len(pending) < line + 2 + size + 2:
                self._more(pending)
            out += pending[line + 2 : line + 2 + size]
            del pending[: line + 2 + size + 2]

    def _to_eof(self, pending: bytearray) -> bytes:
        assert self.sock is not None
        while chunk := self.sock.recv(1 << 16):
            pending += chunk
        return bytes(pending)
