"""kvrecall.websocket against a scripted RFC 6455 server in a thread on
127.0.0.1 (no kvrecall server needed): the handshake and its checks, masked
client frames, 7/16/64-bit lengths, fragmented messages with a ping between
the fragments (answered with a pong), a ping's round trip ended by its own
pong, close frames both ways, and protocol errors."""

import base64
import hashlib
import os
import socket
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from kvrecall.websocket import ConnectionClosed, HandshakeError, WebSocket, WebSocketError  # noqa: E402
from kvrecall.ws_frame import mask  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def server_frame(opcode, payload, fin=True, rsv=0):
    """An unmasked frame, as a server sends it."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def read_client_frame(sock):
    """(fin, opcode, masked, unmasked payload) of the client's next frame."""
    b0, b1 = read_exact(sock, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", read_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read_exact(sock, 8))[0]
    key = read_exact(sock, 4) if b1 & 0x80 else b"\0\0\0\0"
    payload = bytes(b ^ key[i % 4] for i, b in enumerate(read_exact(sock, n)))
    return bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), payload


class Scripted:
    """Accepts one connection, answers the handshake (`answer(key) -> bytes`,
    default a correct 101), then runs `script(sock)`; what the script
    returns or raises is kept in `.result` / `.error`."""

    def __init__(self, script, answer=None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/v1/stream"
        self.request = b""
        self.result = self.error = None
        self.thread = threading.Thread(target=self.run, args=(script, answer or self.switch), daemon=True)
        self.thread.start()

    @staticmethod
    def switch(key):
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"

    def run(self, script, answer):
        conn, _ = self.listener.accept()
        try:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            key = [line.split(b":", 1)[1].strip() for line in self.request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:")][0]
            conn.sendall(answer(key))
            self.result = script(conn)
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = e
        finally:
            conn.close()
            self.listener.close()

    def join(self):
        self.thread.join(10)
        if self.error:
            raise self.error
        return self.result


class _CountingSocket:
    """A socket whose sendmsg calls are counted (short writes make several)."""

    def __init__(self, sock, calls):
        self._sock, self._calls = sock, calls

    def sendmsg(self, buffers):
        self._calls.append(1)
        return self._sock.sendmsg(buffers)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Reads:
    """A connected socket whose reads each return at most the next of
    `chunks` (what is left of it when the buffer is short), counted."""

    def __init__(self, chunks):
        self.chunks, self.reads = list(chunks), 0

    def recv_into(self, view, nbytes=0):
        self.reads += 1
        if not self.chunks:
            return 0
        chunk = self.chunks[0]
        n = min(len(chunk), len(view) if not nbytes else nbytes)
        view[:n] = chunk[:n]
        self.chunks[0] = chunk[n:]
        if not self.chunks[0]:
            self.chunks.pop(0)
        return n

    def sendmsg(self, buffers):
        return sum(memoryview(b).nbytes for b in buffers)

    def shutdown(self, how):
        pass

    def close(self):
        pass


class WebSocketProtocol(unittest.TestCase):
    def test_handshake_and_masked_frames_of_every_length_form(self):
        sizes = [0, 5, 125, 126, 1000, 65535, 65536, 200_000]

        def script(sock):
            seen = []
            for _ in sizes:
                fin, op, masked, payload = read_client_frame(sock)
                seen.append((fin, op, masked, len(payload)))
                sock.sendall(server_frame(0x2, payload))  # echo
            return seen

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, headers={"authorization": "Bearer t"}, timeout=10)
        payloads = [os.urandom(n) for n in sizes]
        for p in payloads:
            ws.send_binary(p)
            self.assertEqual(bytes(ws.recv()), p)
        ws.close()
        self.assertEqual(srv.join(), [(True, 0x2, True, n) for n in sizes])
        head = srv.request.decode()
        for line in ("GET /v1/stream HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13", "authorization: Bearer t"):
            self.assertIn(line, head)
        self.assertEqual(ws.sock.fileno(), -1)

    def test_zero_mask_sends_payloads_as_they_are(self):
        sizes = [0, 5, 126, 70_000]

        def script(sock):
            seen = []
            for _ in sizes:
                b0, b1 = read_exact(sock, 2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", read_exact(sock, 2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", read_exact(sock, 8))[0]
                key = read_exact(sock, 4) if b1 & 0x80 else None
                seen.append((bool(b1 & 0x80), key, read_exact(sock, n)))
            return seen

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, timeout=10, zero_mask=True)
        payloads = [os.urandom(n) for n in sizes]
        for p in payloads:
            ws.send_binary(p)
        seen = srv.join()
        ws.close()
        # Masked frames (the bit set, as RFC 6455 asks of a client) whose key is 0: the bytes on the wire are the payload.
        self.assertEqual(seen, [(True, b"\0\0\0\0", p) for p in payloads])

    def test_parts_go_as_one_frame_through_short_writes(self):
        """send_binary_parts: one frame whose payload is the parts in order,
        with the zero key or a random one, through many short writes (a
        small send buffer and a server that reads slowly)."""
        parts = [b"head", memoryview(np.arange(2_000_000, dtype=np.uint16)).cast("B"), b"", bytearray(b"mid"), memoryview(os.urandom(1_500_000)), np.arange(6, dtype=np.float32).reshape(2, 3), b"tail"]
        whole = b"".join(p.tobytes() if isinstance(p, np.ndarray) else bytes(p) for p in parts)

        def script(sock):
            time.sleep(0.2)  # let the client's buffer fill
            return [read_client_frame(sock) for _ in range(2)]

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, timeout=10, zero_mask=True)
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        # Python's own timeout (the socket non-blocking underneath, as for
        # TLS or off Linux) lets a write go short; the kernel's
        # (kernel_timeouts) blocks until all is written.
        ws.sock.settimeout(10)
        calls = []
        ws.sock = _CountingSocket(ws.sock, calls)
        ws.send_binary_parts(parts)
        ws.zero_mask = False
        ws.send_binary_parts(parts)
        frames = srv.join()
        self.assertEqual([(fin, op, masked, payload == whole) for fin, op, masked, payload in frames], [(True, 0x2, True, True)] * 2)
        self.assertGreater(len(calls), 2)

    def test_fragments_with_a_ping_between_are_one_message(self):
        def script(sock):
            sock.sendall(server_frame(0x2, b"abc", fin=False) + server_frame(0x9, b"are you there"))
            pong = read_client_frame(sock)
            sock.sendall(server_frame(0x0, b"def", fin=False) + server_frame(0xA, b"unasked pong") + server_frame(0x0, b"g" * 70_000))
            sock.sendall(server_frame(0x1, "héllo".encode(), fin=False) + server_frame(0x0, b"!"))
            return pong

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, timeout=10)
        self.assertEqual(ws.recv(), b"abcdef" + b"g" * 70_000)
        self.assertEqual(ws.recv(), "héllo!")  # a text message comes back as str
        self.assertEqual(srv.join(), (True, 0xA, True, b"are you there"))
        ws.close()

    def test_ping_round_trip_waits_for_its_own_pong(self):
        def script(sock):
            ping = read_client_frame(sock)
            # An unasked pong and one for another payload are ignored; the server's own ping is answered.
            sock.sendall(server_frame(0xA, b"unasked") + server_frame(0xA, b"other") + server_frame(0x9, b"yours?"))
            answered = read_client_frame(sock)
            time.sleep(0.05)
            sock.sendall(server_frame(0xA, ping[3]))
            second = read_client_frame(sock)
            sock.sendall(server_frame(0x2, b"not a pong"))
            return ping, answered, second

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, timeout=10)
        t0 = time.perf_counter()
        ws.ping_round_trip(b"\0\0\0\1")
        self.assertGreaterEqual(time.perf_counter() - t0, 0.05)  # returned on its own pong, not the others
        with self.assertRaises(WebSocketError):
            ws.ping_round_trip(b"\0\0\0\2")  # a data message instead: a protocol error, the connection closed
        self.assertTrue(ws.closed)
        ping, answered, second = srv.join()
        self.assertEqual(ping[:3], (True, 0x9, True))
        self.assertEqual(ping[3], b"\0\0\0\1")
        self.assertEqual(answered[1:], (0xA, True, b"yours?"))
        self.assertEqual(second[1], 0x9)

    def test_server_close_is_answered_and_ends_the_connection(self):
        def script(sock):
            sock.sendall(server_frame(0x2, b"last") + server_frame(0x8, struct.pack("!H", 1001) + b"going away"))
            return read_client_frame(sock)

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, timeout=10)
        self.assertEqual(ws.recv(), b"last")
        with self.assertRaises(ConnectionClosed) as cm:
            ws.recv()
        self.assertEqual((cm.exception.code, cm.exception.reason), (1001, "going away"))
        self.assertEqual(srv.join()[:2], (True, 0x8))  # the close was echoed
        self.assertEqual(srv.result[3][:2], struct.pack("!H", 1001))
        self.assertTrue(ws.closed)
        with self.assertRaises(ConnectionClosed):
            ws.send_binary(b"x")

    def test_client_close_sends_a_close_frame(self):
        def script(sock):
            frame = read_client_frame(sock)
            sock.sendall(server_frame(0x8, frame[3]))
            return frame

        srv = Scripted(script)
        ws = WebSocket.connect(srv.url, timeout=10)
        ws.close(1000, "bye", wait=5)
        self.assertEqual(srv.join(), (True, 0x8, True, struct.pack("!H", 1000) + b"bye"))

    def test_end_of_stream_mid_frame(self):
        srv = Scripted(lambda sock: sock.sendall(server_frame(0x2, b"0123456789")[:6]))
        ws = WebSocket.connect(srv.url, timeout=10)
        srv.join()
        with self.assertRaises(ConnectionClosed) as cm:
            ws.recv()
        self.assertEqual(cm.exception.code, 1006)
        self.assertTrue(ws.closed)

    def test_protocol_errors_close_with_1002(self):
        for bad in (
            server_frame(0x2, b"x", rsv=0x40),  # reserved bit without an extension
            server_frame(0x0, b"x"),  # continuation of nothing
            server_frame(0x9, b"p" * 126),  # control frame over 125 bytes
            server_frame(0x2, b"a", fin=False) + server_frame(0x2, b"b"),  # new message mid-message
            server_frame(0x3, b"x"),  # reserved opcode
        ):
            with self.subTest(frame=bad[:4]):
                srv = Scripted(lambda sock, bad=bad: (sock.sendall(bad), read_client_frame(sock))[1])
                ws = WebSocket.connect(srv.url, timeout=10)
                with self.assertRaises(WebSocketError):
                    ws.recv()
                fin, op, _, payload = srv.join()
                self.assertEqual((op, payload[:2]), (0x8, struct.pack("!H", 1002)))
                self.assertTrue(ws.closed)

    def test_handshake_refusals(self):
        srv = Scripted(lambda sock: None, answer=lambda key: b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope")
        with self.assertRaises(HandshakeError) as cm:
            WebSocket.connect(srv.url, timeout=10)
        self.assertEqual((cm.exception.status, cm.exception.body), (401, b"nope"))
        srv.join()
        wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n"
        srv = Scripted(lambda sock: None, answer=lambda key: wrong)
        with self.assertRaisesRegex(WebSocketError, "Accept"):
            WebSocket.connect(srv.url, timeout=10)
        srv.join()
        ext = lambda key: Scripted.switch(key)[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"  # noqa: E731
        srv = Scripted(lambda sock: None, answer=ext)
        with self.assertRaisesRegex(WebSocketError, "extension"):
            WebSocket.connect(srv.url, timeout=10)
        srv.join()

    def test_frames_right_after_the_handshake_are_kept(self):
        srv = Scripted(lambda sock: None, answer=lambda key: Scripted.switch(key) + server_frame(0x2, b"early"))
        ws = WebSocket.connect(srv.url, timeout=10)
        self.assertEqual(ws.recv(), b"early")
        srv.join()
        ws.close()

    def test_one_read_per_answer_when_each_comes_alone(self):
        """Answers of 20 KB that come one per read (as a decode step's do):
        each is read in one recv_into, at the drained buffer's start (read
        where the last one ended, every third would take two reads of a
        64 KiB buffer); then frames that come together, split, or with a
        64-bit length, parsed as before."""
        rng = np.random.default_rng(4)
        payloads = [rng.bytes(20_000 + i) for i in range(12)]
        alone = _Reads([server_frame(0x2, p) for p in payloads])
        ws = WebSocket(alone, zero_mask=True, recv_buffer=1 << 16)
        got = [bytes(ws.recv_view()) for _ in payloads]
        self.assertEqual(got, payloads)
        self.assertEqual(alone.reads, len(payloads))
        big, small = rng.bytes(70_000), rng.bytes(10)
        mixed = [server_frame(0x2, small) + server_frame(0x2, small), server_frame(0x2, big)[:3], server_frame(0x2, big)[3:], server_frame(0x1, b"text"), server_frame(0x2, small)[:2], server_frame(0x2, small)[2:]]
        ws = WebSocket(_Reads(mixed), zero_mask=True, recv_buffer=1 << 16)
        self.assertEqual([ws.recv() for _ in range(5)], [small, small, big, "text", small])

    def test_mask_is_an_involution_at_every_size(self):
        key = os.urandom(4)
        for n in (0, 1, 3, 4, 5, 1023, 1024, 1027, 65537):
            p = os.urandom(n)
            m = bytes(mask(p, key))
            self.assertEqual(m, bytes(b ^ key[i % 4] for i, b in enumerate(p)))
            self.assertEqual(bytes(mask(m, key)), p)


if __name__ == "__main__":
    unittest.main()
