"""kvrecall.http_head.answer_head, the one parser of an HTTP/1.1 answer's
head that kvrecall._http and kvrecall.websocket share: a head at every
split, the blank line it needs, the bound on its length, malformed status
and header lines; then each caller's own exceptions for the same faults,
over a socket pair (no server needed).

    python3 -m unittest discover -s clients/python/tests -v
"""

import http.client
import os
import socket
import sys
import threading
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvrecall._http import AnswerCut, _RawHTTPConnection  # noqa: E402
from kvrecall.http_head import BadHeaderLine, BadStatusLine, HeadTooLong, answer_head  # noqa: E402
from kvrecall.websocket import _MAX_HEADER, ConnectionClosed, HandshakeError, WebSocketError, _handshake  # noqa: E402

ANSWER = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n X-Spaced :  a b \r\nx-twice: 1\r\nX-Twice: 2\r\nContent-Length: 4\r\n\r\nnope"
BAD_STATUS = (
    b"HTTP/2 200 OK",  # not HTTP/1.x
    b"ICY 200 OK",
    b"HTTP/1.1",  # no status
    b"HTTP/1.1 20 OK",  # not three digits
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 \xb200 OK",  # a latin-1 superscript two: str.isdigit passes it, int() does not
    b"HTTP/1.1 abc OK",
    b"",
)
BAD_HEADER = (b"NoColonHere", b": no name", b"   : blank name")


class AnswerHead(unittest.TestCase):
    def test_a_head_at_every_split(self):
        """None until the blank line's last byte is in, then the same head, whatever follows it."""
        end = ANSWER.index(b"\r\n\r\n") + 4
        for have in range(len(ANSWER) + 1):
            head = answer_head(ANSWER, have, 1 << 16)
            if have < end:
                self.assertIsNone(head, have)
                continue
            self.assertEqual((head.version, head.status, head.reason, head.body_at), ("HTTP/1.1", 404, "Not Found", end))
            self.assertEqual(head.headers, {"content-type": "text/plain", "x-spaced": "a b", "x-twice": "2", "content-length": "4"})

    def test_status_line_without_a_reason(self):
        head = answer_head(b"HTTP/1.0 204\r\n\r\n", 16, 64)
        self.assertEqual((head.version, head.status, head.reason, head.headers), ("HTTP/1.0", 204, "", {}))

    def test_bare_newlines_do_not_end_a_head(self):
        for raw in (b"HTTP/1.1 200 OK\n\n", b"HTTP/1.1 200 OK\r\nA: b\r\n", b"HTTP/1.1 200 OK\r\n\n\r\n"):
            self.assertIsNone(answer_head(raw, len(raw), 1 << 16), raw)

    def test_the_head_must_end_within_the_limit(self):
        """The blank line ending at byte `limit` is read; one byte later is too long once `limit` bytes
        are in, however many came in the last read."""
        pad = lambda n: b"HTTP/1.1 200 OK\r\nX: " + b"a" * (n - 24) + b"\r\n\r\n"  # noqa: E731
        limit = 200
        fits, over = pad(limit), pad(limit + 1)
        self.assertEqual((len(fits), len(over)), (limit, limit + 1))
        self.assertEqual(answer_head(fits, len(fits), limit).body_at, limit)
        self.assertIsNone(answer_head(over, limit - 1, limit))
        for have in (limit, limit + 1):
            with self.assertRaises(HeadTooLong):
                answer_head(over, have, limit)
        with self.assertRaises(HeadTooLong):
            answer_head(b"x" * 500, 500, limit)

    def test_malformed_status_lines(self):
        for line in BAD_STATUS:
            with self.subTest(line=line), self.assertRaises(BadStatusLine) as cm:
                answer_head(line + b"\r\nA: b\r\n\r\n", len(line) + 10, 1 << 16)
            self.assertEqual(cm.exception.line, line.decode("latin-1"))

    def test_malformed_header_lines(self):
        for line in BAD_HEADER:
            raw = b"HTTP/1.1 200 OK\r\nA: b\r\n" + line + b"\r\n\r\n"
            with self.subTest(line=line), self.assertRaises(BadHeaderLine) as cm:
                answer_head(raw, len(raw), 1 << 16)
            self.assertEqual(cm.exception.line, line.decode("latin-1"))


def _answering(raw):
    """A connected socket whose peer sends `raw` (from a thread: it may be larger than the pair's
    buffers), then ends its side; the peer's reads are drained meanwhile."""
    mine, peer = socket.socketpair()
    mine.settimeout(10)

    def serve():
        try:
            peer.sendall(raw)
            peer.shutdown(socket.SHUT_WR)
            while peer.recv(65536):
                pass
        except OSError:
            pass
        peer.close()

    threading.Thread(target=serve, daemon=True).start()
    return mine


class EachCallersErrors(unittest.TestCase):
    """The same faults through each caller: kvrecall._http says them as http.client would,
    kvrecall.websocket as WebSocketError (a refusal: HandshakeError; the socket's end: ConnectionClosed)."""

    def http_read(self, raw):
        conn = _RawHTTPConnection("127.0.0.1", 1, 10)
        conn.sock = _answering(raw)
        try:
            return conn.exchange("GET", b"GET / HTTP/1.1\r\n\r\n", [], 0)
        finally:
            conn.close()

    def handshake(self, raw):
        sock = _answering(raw)
        try:
            return _handshake(sock, "127.0.0.1", 1, "/v1/stream", {})
        finally:
            sock.close()

    def test_http(self):
        answer = self.http_read(ANSWER)
        self.assertEqual((answer.status, answer.reason, bytes(answer.data), answer.getheader("X-Spaced")), (404, "Not Found", b"nope", "a b"))
        for line in BAD_STATUS:
            with self.subTest(line=line), self.assertRaises(http.client.BadStatusLine) as cm:
                self.http_read(line + b"\r\n\r\n")
            self.assertEqual(cm.exception.args, http.client.BadStatusLine(line.decode("latin-1")).args)
        for line in BAD_HEADER:
            with self.subTest(line=line), self.assertRaisesRegex(http.client.HTTPException, "^malformed header line "):
                self.http_read(b"HTTP/1.1 200 OK\r\n" + line + b"\r\n\r\n")
        with self.assertRaisesRegex(http.client.HTTPException, "^answer head longer than 1 MiB$"):
            self.http_read(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (1 << 20) + b"\r\n\r\n")
        with self.assertRaises(AnswerCut):  # the blank line never came
            self.http_read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")

    def test_websocket_handshake(self):
        with self.assertRaises(HandshakeError) as cm:
            self.handshake(ANSWER + b"and more")
        e = cm.exception
        self.assertEqual((e.status, e.reason, e.body, e.headers["x-spaced"]), (404, "Not Found", b"nope", "a b"))
        for line in BAD_STATUS:
            with self.subTest(line=line), self.assertRaisesRegex(WebSocketError, "^not an HTTP answer: ") as cm:
                self.handshake(line + b"\r\n\r\n")
            self.assertNotIsInstance(cm.exception, HandshakeError)
        for line in BAD_HEADER:
            with self.subTest(line=line), self.assertRaisesRegex(WebSocketError, "^handshake answer: malformed header line "):
                self.handshake(b"HTTP/1.1 101 Switching Protocols\r\n" + line + b"\r\n\r\n")
        with self.assertRaisesRegex(WebSocketError, "^handshake answer headers too long$"):
            self.handshake(b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"a" * _MAX_HEADER + b"\r\n\r\n")
        with self.assertRaises(ConnectionClosed) as cm:  # the blank line never came
            self.handshake(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n")
        self.assertEqual(cm.exception.code, 1006)


if __name__ == "__main__":
    unittest.main()
