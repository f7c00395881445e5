"""http.client connections for the client: TCP_NODELAY, and a request with
a body written in one sendmsg."""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Any


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


class _HTTPConnection(_OneWrite, http.client.HTTPConnection):
    """With TCP_NODELAY: a small request or answer goes out at once."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
