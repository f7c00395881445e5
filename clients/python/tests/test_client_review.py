"""Fixes from a review of the client's stream and batch paths: a failed
push_document leaves alone a document made again under its id meanwhile,
even just before its delete (real server; the delete names createdAt); an answer head past the raw HTTP connection's first buffer
is read (a scripted peer); a stacked batch decode refuses steps whose bytes
do not match their shape, as decode_tensor does; a kernel timeout under a
microsecond still times out; a memoryview of wider items (a float32
array's) is framed by its bytes, masked or not (a scripted peer); an
answer cut short on a kept-alive connection is not sent again; health's
byte counts past 2^32 arrive as ints (a server of this checkout).

The server: KVRECALL_URL, else this checkout's (tests/serve.py)."""

import os
import socket
import sys
import threading
import time
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import Client, KvrecallError, model_shape  # noqa: E402
from kvrecall._http import _RawHTTPConnection  # noqa: E402
from kvrecall.client import batch_results  # noqa: E402
from kvrecall.socket_io import kernel_timeouts  # noqa: E402
from kvrecall.websocket import WebSocket  # noqa: E402
from test_websocket import Scripted, read_client_frame  # noqa: E402


@serve.needs_server
class PushDocumentOwnership(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = serve.Target()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_failed_push_leaves_a_document_made_again_under_the_id(self):
        """After the first upload's answer, another client deletes the
        document and makes it again: the later uploads fail (409) and
        push_document must not delete that other document."""
        token = self.server.token
        kv = Client(self.server.url, token=token, timeout=30)
        other = Client(self.server.url, token=token, timeout=30)
        doc = "py-own-" + uuid.uuid4().hex[:6]
        model = model_shape(2, 4, 2, 16, dtype="f16")
        rng = np.random.default_rng(5)
        k = [rng.standard_normal((2, 300, 16)).astype(np.float16) for _ in range(2)]
        v = [rng.standard_normal((2, 300, 16)).astype(np.float16) for _ in range(2)]
        theirs = []
        real_open = kv.open_stream

        def open_stream(timeout=None):
            s = real_open(timeout)
            upload = s.upload_document

            def interfered(doc_, chunks, window=2, dtype=None, answered=None):
                def first(answer):
                    if not theirs:
                        time.sleep(0.003)  # a later createdAt (ms)
                        other.delete_document(doc_)
                        theirs.append(other.create_document(doc_, model))

                return upload(doc_, chunks, window=window, dtype=dtype, answered=first)

            s.upload_document = interfered
            return s

        kv.open_stream = open_stream
        try:
            with self.assertRaises(KvrecallError) as cm:
                kv.push_document(doc, model, k, v, chunk=100)
            self.assertEqual(cm.exception.status, 409)
            self.assertEqual(len(theirs), 1)
            now = other.get_document(doc)
            self.assertEqual(now["createdAt"], theirs[0]["createdAt"])
            self.assertEqual(now["status"], "loading")
        finally:
            try:
                other.delete_document(doc)
            except KvrecallError:
                pass
            kv.close()
            other.close()

    def test_failed_push_leaves_a_document_made_again_just_before_its_delete(self):
        """An upload fails (a NaN, 422) and push_document deletes its
        document; another client deletes it and makes it again after that
        decision, before the DELETE is served: the DELETE names our
        createdAt, so theirs stays (412, swallowed)."""
        token = self.server.token
        kv = Client(self.server.url, token=token, timeout=30)
        other = Client(self.server.url, token=token, timeout=30)
        doc = "py-late-" + uuid.uuid4().hex[:6]
        model = model_shape(1, 4, 2, 16, dtype="f16")
        rng = np.random.default_rng(6)
        k = [rng.standard_normal((2, 300, 16)).astype(np.float16)]
        v = [rng.standard_normal((2, 300, 16)).astype(np.float16)]
        k[0][1, 10, 3] = np.nan
        theirs = []
        real_call = kv._call

        def call(method, path, *args, **kwargs):
            if method == "DELETE" and path.startswith(f"/v1/documents/{doc}") and not theirs:
                time.sleep(0.003)  # a later createdAt (ms)
                other.delete_document(doc)
                theirs.append(other.create_document(doc, model))
            return real_call(method, path, *args, **kwargs)

        kv._call = call
        try:
            with self.assertRaises(KvrecallError) as cm:
                kv.push_document(doc, model, k, v, chunk=100)
            self.assertEqual(cm.exception.status, 422)
            self.assertEqual(len(theirs), 1)
            now = other.get_document(doc)
            self.assertEqual(now["createdAt"], theirs[0]["createdAt"])
            self.assertEqual(now["status"], "loading")
        finally:
            try:
                other.delete_document(doc)
            except KvrecallError:
                pass
            kv.close()
            other.close()

    def test_delete_document_naming_another_created_at(self):
        """delete_document(created_at=...) of a document created at another
        time: KvrecallError 412 precondition_failed, the document kept."""
        c = Client(self.server.url, token=self.server.token, timeout=30)
        doc = "py-cond-" + uuid.uuid4().hex[:6]
        try:
            made = c.create_document(doc, model_shape(1, 4, 2, 16, dtype="f16"))
            with self.assertRaises(KvrecallError) as cm:
                c.delete_document(doc, created_at="2000-01-01T00:00:00.000Z")
            self.assertEqual((cm.exception.status, cm.exception.code), (412, "precondition_failed"))
            self.assertEqual(c.get_document(doc)["createdAt"], made["createdAt"])
            self.assertEqual(c.delete_document(doc, created_at=made["createdAt"]), {"deleted": doc})
        finally:
            c.close()


@unittest.skipIf(serve.available(), f"no server of this checkout: {serve.available()}")
class HealthByteCounts(unittest.TestCase):
    def test_byte_counts_past_32_bits_are_ints(self):
        """A memory budget of 5 GiB + 1 (past 2^32, odd): health's memory
        arrives as the int it is, not a float (msgpackr wrote float64)."""
        server = serve.Server(extra=["--memory-budget", str(5 * 2**30 + 1)])
        c = Client(server.url, timeout=30)
        try:
            memory = c.health()["memory"]
            self.assertIs(type(memory["budget"]), int)
            self.assertEqual(memory["budget"], 5 * 2**30 + 1)
            self.assertIs(type(memory["used"]), int)
        finally:
            c.close()
            server.stop()

class RawHttpLongHead(unittest.TestCase):
    def test_answer_head_longer_than_the_first_buffer(self):
        """A 200 KB header (past the 64 KiB buffer, grown twice): the answer
        is read, not a BufferError from resizing a viewed bytearray."""
        big = "a" * 200_000
        listener = socket.create_server(("127.0.0.1", 0))

        def answer():
            conn, _ = listener.accept()
            with conn:
                got = b""
                while b"\r\n\r\n" not in got:
                    got += conn.recv(4096)
                conn.sendall(f"HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok".encode())

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        c = _RawHTTPConnection("127.0.0.1", listener.getsockname()[1], 10)
        try:
            r = c.request("GET", "/", None, {})
            self.assertEqual(r.status, 200)
            self.assertEqual(r.getheader("x-big"), big)
            self.assertEqual(bytes(r.data), b"ok")
        finally:
            c.close()
            listener.close()
            t.join(5)


class AnswerCutNotResent(unittest.TestCase):
    def test_a_request_whose_answer_was_cut_is_not_sent_again(self):
        """The second request on a kept-alive connection gets half its
        answer, then the connection ends: the server had it (an attend would
        have appended its token), so the client raises and does not resend
        it on a fresh connection (it did: the server saw it twice)."""
        listener = socket.create_server(("127.0.0.1", 0))
        seen = []
        body = msgpack.packb({"ok": True})

        stop = threading.Event()
        listener.settimeout(0.1)  # accept wakes to see `stop`

        def serve_all():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                with conn:
                    got = b""
                    while True:
                        while b"\r\n\r\n" not in got:
                            chunk = conn.recv(65536)
                            if not chunk:
                                break
                            got += chunk
                        if b"\r\n\r\n" not in got:
                            break
                        head, _, got = got.partition(b"\r\n\r\n")
                        n = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")][0])
                        while len(got) < n:
                            got += conn.recv(65536)
                        got = got[n:]
                        seen.append(head.split(b" ")[1])
                        answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n" % len(body) + body
                        if len(seen) == 2:
                            conn.sendall(answer[:-3])  # cut: the head and part of the body
                            break
                        conn.sendall(answer)

        t = threading.Thread(target=serve_all, daemon=True)
        t.start()
        kv = Client(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=10)
        try:
            self.assertEqual(kv._call("POST", "/first", {"x": 1}), {"ok": True})
            with self.assertRaises(ConnectionResetError):
                kv._call("POST", "/second", {"x": 2})
            time.sleep(0.2)  # a resend would have reached the server by now
            self.assertEqual(seen, [b"/first", b"/second"])
        finally:
            kv.close()
            stop.set()
            t.join(5)
            listener.close()


class StackedBatchLengths(unittest.TestCase):
    def test_steps_whose_bytes_do_not_match_their_shape_are_refused(self):
        """Two f32 [2, 4] outs of 36 and 28 bytes (64 in all, two rows' worth):
        joined they would reshape into shifted rows; decoded step by step the
        first is refused, as decode_tensor refuses it alone."""
        data = np.arange(16, dtype="<f4").tobytes()
        lse = {"dtype": "f32", "shape": [2], "data": bytes(8)}
        results = [
            {"out": {"dtype": "f32", "shape": [2, 4], "data": data[:36]}, "lse": lse, "stats": {}},
            {"out": {"dtype": "f32", "shape": [2, 4], "data": data[36:]}, "lse": lse, "stats": {}},
        ]
        with self.assertRaises(ValueError):
            batch_results(results)
        # Well-formed, the same steps decode as rows (the stacked path still taken).
        results[0]["out"]["data"], results[1]["out"]["data"] = data[:32], data[32:]
        rs = batch_results(results)
        np.testing.assert_array_equal(rs[1].out, np.arange(8, 16, dtype=np.float32).reshape(2, 4))
        self.assertIs(rs[0].out.base, rs[1].out.base)


class WideMemoryview(unittest.TestCase):
    def test_a_float32_view_is_sent_as_its_bytes(self):
        """send_binary(memoryview(float32 array)): len counts 300 items, the
        payload is 1200 bytes; the frame must say 1200 (masked: it raised
        OverflowError; zero key: a 300-byte header before 1200 bytes)."""
        a = np.arange(300, dtype=np.float32)
        for zero in (False, True):
            with self.subTest(zero_mask=zero):
                srv = Scripted(lambda sock: [read_client_frame(sock) for _ in range(2)])
                ws = WebSocket.connect(srv.url, timeout=5, zero_mask=zero)
                ws.send_binary(memoryview(a))
                ws.send_binary(b"next")
                frames = srv.join()
                ws.close()
                self.assertEqual([(f[1], f[3]) for f in frames], [(0x2, a.tobytes()), (0x2, b"next")])


@unittest.skipUnless(sys.platform.startswith("linux"), "kernel timeouts are used on Linux")
class KernelTimeoutUnderAMicrosecond(unittest.TestCase):
    def test_times_out(self):
        """timeout=1e-7: SO_RCVTIMEO of 0 s 0 us would be no timeout at all."""
        a, b = socket.socketpair()
        got = []

        def read():
            try:
                a.recv(1)
                got.append("data")
            except OSError as e:
                got.append(e)

        try:
            self.assertTrue(kernel_timeouts(a, 1e-7))
            t = threading.Thread(target=read, daemon=True)
            t.start()
            t.join(2)
            alive = t.is_alive()
            if alive:
                a.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv
                t.join(2)
            self.assertFalse(alive, "recv blocked past the timeout")
            self.assertIsInstance(got[0], BlockingIOError)
        finally:
            a.close()
            b.close()


if __name__ == "__main__":
    unittest.main()
