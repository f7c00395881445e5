"""The client's own HTTP/1.1 (kvrecall._http._RawHTTPConnection) against a
scripted server on 127.0.0.1: the request's head and body arrive whole; an
answer is read right when framed by content-length in any split, by
chunks, or by the connection's end; a connection the server closed while
idle is noticed (RemoteDisconnected, which the client retries once), and
the client's keep-alive connection is reused.

    python3 -m unittest discover -s clients/python/tests -v
"""

import hashlib
import http.client
import os
import socket
import sys
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvrecall._http import _RawHTTPConnection  # noqa: E402
from loopback import accept_each  # noqa: E402


class Scripted:
    """A server that reads each request whole and answers with `answer(method, path, headers, body)`:
    a list of byte strings written one by one (a short pause between them; an empty one closes the
    connection there), or None to close without answering."""

    def __init__(self, answer):
        self.answer = answer
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        accept_each(self.sock, self._serve)

    def _serve(self, conn):
        self.connections += 1
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                head, _, pending = pending.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
                n = int(headers.get("content-length", "0"))
                while len(pending) < n:
                    pending += conn.recv(65536)
                body, pending = pending[:n], pending[n:]
                pieces = self.answer(method, path, headers, body)
                if pieces is None:
                    return
                for p in pieces:
                    if not p:
                        return  # an empty piece: the answer ends with the connection
                    conn.sendall(p)
                    time.sleep(0.001)

    def close(self):
        self.sock.close()


def split(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)]


class RawHTTP(unittest.TestCase):
    def assertEcho(self, data, body):
        """The echo server's answer: the body's sha256 in hex, then the body."""
        self.assertEqual(bytes(data[:64]), hashlib.sha256(body).hexdigest().encode())
        self.assertEqual(bytes(data[64:]), body)

    def test_bodies_both_ways_in_any_split(self):
        def answer(method, path, headers, body):
            digest = hashlib.sha256(body).hexdigest().encode()
            whole = b"HTTP/1.1 201 Made\r\ncontent-type: text/x\r\ncontent-length: %d\r\n\r\n" % (len(body) + 64) + digest + body
            return split(whole, int(headers["x-piece"]))

        server = Scripted(answer)
        conn = _RawHTTPConnection("127.0.0.1", server.port, 10)
        try:
            for piece, n in ((1, 300), (7, 3000), (4096, 200_000), (1 << 30, 3 << 20)):
                body = os.urandom(n)
                res = conn.request("POST", "/echo", body, {"x-piece": str(piece)})
                self.assertEqual((res.status, res.reason, res.getheader("content-type")), (201, "Made", "text/x"))
                self.assertEcho(res.data, body)
            self.assertEqual(server.connections, 1)
        finally:
            conn.close()
            server.close()

    def test_parts_sent_in_order_and_answers_read_in_place(self):
        """exchange(): a body given as parts (bytes, a float32 array, a
        memoryview; one 12 MiB array, past the socket buffers: a short
        write finished part by part) arrives as their bytes one after
        another, also when every write is short; with view=True the answer
        is read into the connection's warm buffer where it fits (a
        memoryview of it), in any split, else into a buffer of its own;
        either way its bytes are the ones sent."""

        def answer(method, path, headers, body):
            digest = hashlib.sha256(body).hexdigest().encode()
            whole = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(body) + 64) + digest + body
            return split(whole, int(headers["x-piece"]))

        class ShortWrites:
            """The connection's socket, writing at most 1000 bytes a sendmsg (short writes, every time)."""

            def __init__(self, sock):
                self.sock, self.sent = sock, 0

            def sendmsg(self, buffers):
                self.sent += 1000
                if self.sent > 1 << 20:  # the request is 39 KB: a writer that does not advance
                    raise AssertionError("sent far more than the request")
                return self.sock.send(b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:1000])

            def __getattr__(self, name):
                return getattr(self.sock, name)

        server = Scripted(answer)
        conn = _RawHTTPConnection("127.0.0.1", server.port, 10)
        rng = np.random.default_rng(5)
        try:
            for piece, rows in ((1, 3), (5, 40), (4096, 100), (1 << 30, 30), (1 << 30, 300), (1 << 30, 100_000), (4096, 300)):
                if rows == 300 and piece == 4096:
                    conn.sock = ShortWrites(conn.sock)
                array = rng.standard_normal((rows, 32)).astype(np.float32)
                parts = [os.urandom(17), array, memoryview(os.urandom(301)), b""]
                body = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
                head = b"POST /echo HTTP/1.1\r\nx-piece: %d\r\ncontent-length: %d\r\n\r\n" % (piece, len(body))
                res = conn.exchange("POST", head, parts, len(body), view=True)
                fits = 64 + len(body) + 100 < len(conn._buf)
                self.assertEqual(isinstance(res.data, memoryview) and res.data.obj is conn._buf, fits, (piece, rows))
                self.assertEcho(res.data, body)
            self.assertEqual(server.connections, 1)
        finally:
            conn.close()
            server.close()

    def test_chunked_empty_and_closing_answers(self):
        def answer(method, path, headers, body):
            if path == "/chunked":
                return [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\none,\r\n", b"11170\r\n" + b"x" * 0x11170 + b"\r\n", b"6\r\n,three\r\n0\r\n\r\n"]
            if path == "/empty":
                return [b"HTTP/1.1 204 No Content\r\n\r\n"]
            if path == "/eof":
                return [b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", b"to the end", b""]
            return [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

        server = Scripted(answer)
        conn = _RawHTTPConnection("127.0.0.1", server.port, 10)
        try:
            self.assertEqual(bytes(conn.request("GET", "/chunked", None, {}).data), b"one," + b"x" * 0x11170 + b",three")
            self.assertEqual(conn.request("GET", "/empty", None, {}).status, 204)
            self.assertEqual(bytes(conn.request("GET", "/", None, {}).data), b"ok")
            self.assertEqual(server.connections, 1)
            res = conn.request("GET", "/eof", None, {})
            self.assertEqual((bytes(res.data), res.getheader("connection")), (b"to the end", "close"))
        finally:
            conn.close()
            server.close()

    def test_a_connection_closed_while_idle_is_noticed(self):
        closing = {"now": False}

        def answer(method, path, headers, body):
            if closing["now"]:
                closing["now"] = False
                return None  # closes without answering
            return [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine"]

        server = Scripted(answer)
        conn = _RawHTTPConnection("127.0.0.1", server.port, 10)
        try:
            self.assertEqual(bytes(conn.request("GET", "/", None, {}).data), b"fine")
            closing["now"] = True
            with self.assertRaises(http.client.RemoteDisconnected):
                conn.request("GET", "/", None, {})
            conn.close()
            self.assertEqual(bytes(conn.request("GET", "/", None, {}).data), b"fine")
            self.assertEqual(server.connections, 2)
        finally:
            conn.close()
            server.close()

    def test_a_malformed_answer_raises(self):
        server = Scripted(lambda *a: [b"HTTP/1.1 200 OK\r\nno-colon-here\r\n\r\n"])
        conn = _RawHTTPConnection("127.0.0.1", server.port, 10)
        try:
            with self.assertRaises(http.client.HTTPException):
                conn.request("GET", "/", None, {})
        finally:
            conn.close()
            server.close()


if __name__ == "__main__":
    unittest.main()
