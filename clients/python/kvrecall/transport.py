"""The client's HTTP transport: one keep-alive connection per thread (the
client's own HTTP/1.1 for http:, http.client for https:; kvrecall._http),
msgpack bodies, answers decoded, error answers raised as KvrecallError.

A decode call (`call_parts`) sends its body as parts, msgpack bytes and the
arrays themselves (kvrecall.wire), in one sendmsg behind a head made from
bytes prepared once, and decodes the answer where it lies in the
connection's receive buffer (msgpack copies out what it returns). Packed
as a dict and read into bytes of its own, an HTTP attend's client work was
what put its overhead above a bare GET /v1/health's on the 2-core VM
(bench/results/transport-vm-python-http.md).
"""

from __future__ import annotations

import http.client
import json
import select
import ssl
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import msgpack

from ._http import AnswerCut, _HTTPSConnection, _RawHTTPConnection
from .errors import KvrecallError

__all__ = ["HTTPTransport"]

MSGPACK = "application/msgpack"
Connection = Union[_RawHTTPConnection, http.client.HTTPConnection]


class HTTPTransport:
    """Requests to one server, one keep-alive connection and msgpack packer per thread."""

    def __init__(self, host: str, port: int, https: bool, prefix: str, timeout: float, token: Optional[str], ssl_context: Optional[ssl.SSLContext] = None):
        self._host, self._port, self._https, self._prefix, self._timeout = host, port, https, prefix, timeout
        self._ssl_context = ssl_context
        self.headers = {"content-type": MSGPACK, "accept": MSGPACK}
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        # The raw connection's head but its request line and content-length, made once.
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in {"host": f"{host}:{port}", **self.headers}.items()).encode("latin-1")
        self._local = threading.local()

    def call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        """`body` packed by msgpack; the decoded answer (raw: its bytes)."""
        payload = None if body is None else msgpack.packb(body, use_bin_type=True)
        return self._call(method, path, None if payload is None else [payload], raw)

    def call_parts(self, method: str, path: str, make: Callable[[msgpack.Packer], List[Any]]) -> Any:
        """A request whose body is make(this thread's packer): parts (bytes,
        C-contiguous arrays) whose bytes one after another are its msgpack,
        written to the socket as they are. The decoded answer."""
        return self._call(method, path, make(self.packer()), False)

    def packer(self) -> msgpack.Packer:
        packer = getattr(self._local, "packer", None)
        if packer is None:
            packer = self._local.packer = msgpack.Packer(use_bin_type=True)
        return packer

    def head(self, method: str, path: str, nbytes: Optional[int]) -> bytes:
        """A request's head on the raw connection (path with the prefix; nbytes: the body's, None for none)."""
        length = b"" if nbytes is None else b"content-length: %d\r\n" % nbytes
        return b"%s %s HTTP/1.1\r\n%s%s\r\n" % (method.encode("latin-1"), path.encode("latin-1"), self._fixed, length)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def connection(self) -> Tuple[Connection, bool]:
        """This thread's connection, and whether it was used before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            conn.close()
            conn = None
        if conn is None:
            if self._https:
                conn = _HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ssl_context)
            else:
                conn = _RawHTTPConnection(self._host, self._port, self._timeout)
            self._local.conn = conn
            return conn, False
        return conn, conn.sock is not None

    def _call(self, method: str, path: str, parts: Optional[Sequence[Any]], raw: bool) -> Any:
        path = self._prefix + path
        nbytes = 0
        for p in parts or ():
            nbytes += len(p) if isinstance(p, (bytes, bytearray)) else p.nbytes  # an array's len is its rows
        for attempt in (0, 1):
            conn, reused = self.connection()
            try:
                if isinstance(conn, _RawHTTPConnection):
                    res = conn.exchange(method, self.head(method, path, None if parts is None else nbytes), parts or (), nbytes, view=not raw)
                    data = res.data
                else:
                    headers = dict(self.headers)
                    body = None if parts is None else b"".join(p if isinstance(p, bytes) else memoryview(p).cast("B") for p in parts)
                    if body is not None:
                        headers["content-length"] = str(len(body))
                    conn.request(method, path, body=body, headers=headers)
                    res = conn.getresponse()
                    data = res.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
                conn.close()
                self._local.conn = None
                # A kept-alive connection the server closed while idle: send
                # once more on a fresh one. A fresh connection failing is real,
                # and so is an answer cut short (the request went through: an
                # attend sent again would append its token twice).
                if reused and attempt == 0 and not isinstance(e, AnswerCut):
                    continue
                raise
            except BaseException:
                conn.close()
                self._local.conn = None
                raise
            if res.getheader("connection", "").lower() == "close":
                conn.close()
                self._local.conn = None
            break
        # `data` may be a view of the connection's buffer: decoded before the next request reads into it.
        ctype = res.getheader("content-type", "") or ""
        if res.status >= 400:
            err = _decode(data, ctype)
            e = err.get("error", {}) if isinstance(err, dict) else {}
            raise KvrecallError(res.status, e.get("code", "unknown"), e.get("message", res.reason or ""))
        if raw:
            return bytes(data)
        return _decode(data, ctype)


def _decode(data: Any, ctype: str) -> Any:
    if not data:
        return {}
    if "msgpack" in ctype:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    if "json" in ctype:
        return json.loads(bytes(data))
    return {"error": {"code": "unknown", "message": bytes(data[:200]).decode(errors="replace")}}


def _dropped(sock: Any) -> bool:
    """True when the peer closed an idle kept-alive socket (readable at EOF)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
