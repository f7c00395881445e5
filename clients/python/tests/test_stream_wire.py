"""The stream's receive buffer and request packing (kvrecall.websocket's
warm buffer parsed in place, kvrecall.wire's attend parts) against a real
server: answers bit-identical to HTTP's for the same steps (f32 and f16,
several shapes, 40 requests in flight, results kept across later reads), a
frame split over reads of 1-3 bytes (a socket that reads that little, and a
TCP proxy that forwards that little), answers larger than the receive
buffer (it grows; past _KEEP a buffer of their own), and the kernel's
timeout. Frames of every length class against a scripted peer need no
server.

The server: KVRECALL_URL, else this checkout's (tests/serve.py)."""

import os
import random
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import serve  # noqa: E402
from loopback import accept_each, host_port, pipe  # noqa: E402
from kvrecall import Client, model_shape  # noqa: E402
from kvrecall import websocket as wsmod  # noqa: E402
from kvrecall.client import attend_body, attend_result, batch_results, step_body, to_bf16_bits  # noqa: E402
from kvrecall.stream import Stream  # noqa: E402
from kvrecall.websocket import ConnectionClosed, WebSocket  # noqa: E402
from kvrecall.wire import attend_fields, attend_parts, batch_parts, http_attend_parts  # noqa: E402
from test_websocket import Scripted, server_frame  # noqa: E402

SHAPES = [(8, 2, 32), (4, 4, 16), (16, 2, 64)]  # q heads, kv heads, head dim
DOC = 48


def bits(r):
    return r.out.dtype.str, r.out.shape, r.out.tobytes(), r.lse.tobytes()


def assert_same(test, got, want):
    """Lists of bytes-like items equal, item by item (unittest's diff of long bytes takes minutes)."""
    test.assertEqual(len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        test.assertTrue(g == w, f"item {i} differs")


def _pending(sock):
    """Bytes waiting in the socket's receive queue."""
    import fcntl
    import termios

    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


class _Trickle:
    """A socket whose reads return 1-3 bytes: every frame split everywhere."""

    def __init__(self, sock, seed):
        self._sock, self._rng, self.reads = sock, random.Random(seed), 0

    def recv_into(self, view, nbytes=0):
        self.reads += 1
        return self._sock.recv_into(view, min(len(view), self._rng.randint(1, 3)))

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Counting(_Trickle):
    def recv_into(self, view, nbytes=0):
        self.reads += 1
        return self._sock.recv_into(view, nbytes)


class _Proxy:
    """127.0.0.1 TCP proxy to `url`'s server: requests go through whole, the
    server's bytes come back 1-3 at a time, a pause after each write."""

    def __init__(self, url):
        self.upstream = host_port(url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        accept_each(self.listener, self._serve)

    def _serve(self, down):
        up = socket.create_connection(self.upstream)
        for s in (down, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe(down, up, _trickle(down))

    def close(self):
        self.listener.close()


def _trickle(dst):
    """A send that writes 1-3 bytes at a time with a pause after each."""
    rng = random.Random(5)

    def send(data):
        at = 0
        while at < len(data):
            n = rng.randint(1, 3)
            dst.sendall(data[at : at + n])
            at += n
            time.sleep(0.0002)

    return send


@serve.needs_server
class StreamWire(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(11)
        cls.shape_docs = {}
        for shape in SHAPES:
            q, kv, d = shape
            model = model_shape(1, q, kv, d, dtype="f16")
            cls.shape_docs[shape] = (cls.document(f"py-wire-{q}-{kv}-{d}-", model, kv, DOC, d, 1), model)

    def session(self, shape):
        doc, model = self.shape_docs[shape]
        sid = self.kv.create_session(model, documents=[doc])["id"]
        self.sessions.append(sid)
        return sid

    def steps(self, shape, n, half=False, kv_dtype=np.float16):
        q, kv, d = shape
        out = []
        for i in range(n):
            step = {
                "q": (self.rng.standard_normal((q, d)) * 1.5).astype(np.float16 if half else np.float32),
                "k": self.rng.standard_normal((kv, d)).astype(kv_dtype),
                "v": self.rng.standard_normal((kv, d)).astype(kv_dtype),
                "position": i,
            }
            if half:
                step["out_dtype"] = "f16"
            out.append(step)
        return out

    def stream(self, recv_buffer=1 << 16):
        url = self.server.url.rstrip("/") + "/v1/stream"
        headers = {"authorization": f"Bearer {self.server.token}"} if self.server.token else {}
        return Stream(WebSocket.connect(url, headers=headers, timeout=30, zero_mask=True, recv_buffer=recv_buffer))

    def test_bit_identical_to_http_f32_f16_shapes_kept_across_reads(self):
        """Each shape and wire form: the same steps on twin sessions over HTTP
        and the stream give the same bytes; the stream's results are checked
        only after every step, so arrays that were views of the receive
        buffer (written over by later answers) fail it."""
        for shape in SHAPES:
            for form in ("f32", "f16", "kv f32"):
                with self.subTest(shape=shape, form=form):
                    steps = self.steps(shape, 6, half=form == "f16", kv_dtype=np.float32 if form == "kv f32" else np.float16)
                    a, b = self.session(shape), self.session(shape)
                    with self.kv.open_stream() as s:
                        got = [s.attend(b, 0, **st) for st in steps]
                    want = [self.kv.attend(a, 0, **st) for st in steps]
                    assert_same(self, [bits(r) for r in got], [bits(r) for r in want])
                    self.assertEqual(got[0].out.dtype, np.float16 if form == "f16" else np.float32)
                    self.assertTrue(all(serve.owned(r.out) and serve.owned(r.lse) for r in got + want))
                    self.assertEqual([r.stats["tokens"] for r in got], list(range(DOC + 1, DOC + 7)))

    def test_forty_in_flight(self):
        """40 requests sent before any answer is read: the answers arrive
        together, several to a read, and are parsed one after another where
        they lie (the buffer's data moved to its front as it fills); each
        matches HTTP's for the same q (q only: the session stays as it is)."""
        shape = SHAPES[0]
        sid = self.session(shape)
        qs = [st["q"] for st in self.steps(shape, 40)]
        with self.stream(recv_buffer=4096) as s:
            ws = s.ws
            for i, q in enumerate(qs):
                ws.send_binary(msgpack.packb({"id": 500 + i, "session": sid, "layer": 0, **attend_body(q)}, use_bin_type=True))
            # Until the answers (1 KB of out each) wait in the socket together.
            deadline = time.monotonic() + 20
            while _pending(ws.sock) < 40 * 1024 and time.monotonic() < deadline:
                time.sleep(0.01)
            ws.sock = counting = _Counting(ws.sock, 0)
            got = []
            for i in range(40):
                frame = msgpack.unpackb(ws.recv_view(), raw=False)
                self.assertEqual(frame["id"], 500 + i)
                got.append(attend_result(frame))
        self.assertLess(counting.reads, 40)  # the answers did share reads
        assert_same(self, [bits(r) for r in got], [bits(self.kv.attend(sid, 0, q)) for q in qs])

    def test_frames_split_into_reads_of_one_to_three_bytes(self):
        shape = SHAPES[1]
        steps = self.steps(shape, 4) + self.steps(shape, 4, half=True)
        for st, position in zip(steps, [0, 1, 2, 3, 4, 5, 6, 7]):
            st["position"] = position
        a, b = self.session(shape), self.session(shape)
        want = [self.kv.attend(a, 0, **st) for st in steps]
        with self.stream() as s:
            s.ws.sock = trickle = _Trickle(s.ws.sock, 3)
            got = [s.attend(b, 0, **st) for st in steps]
            size = sum(r.out.nbytes + r.lse.nbytes for r in got)
            self.assertGreater(trickle.reads, size // 3)
        assert_same(self, [bits(r) for r in got], [bits(r) for r in want])

    def test_frames_split_by_a_trickling_proxy(self):
        shape = SHAPES[1]
        steps = self.steps(shape, 3)
        a, b = self.session(shape), self.session(shape)
        want = [self.kv.attend(a, 0, **st) for st in steps]
        proxy = _Proxy(self.server.url)
        try:
            kv = Client(proxy.url, token=self.server.token, timeout=30)
            with kv.open_stream() as s:
                s.ws.sock = counting = _Counting(s.ws.sock, 0)
                got = [s.attend(b, 0, **st) for st in steps]
            self.assertGreater(counting.reads, 3 * 50)  # each answer (~400 bytes) came in many reads
            assert_same(self, [bits(r) for r in got], [bits(r) for r in want])
        finally:
            proxy.close()

    def test_answers_larger_than_the_buffer(self):
        """A receive buffer of 256 bytes: a 16x64 f32 answer (4 KB) and a
        batch of 32 of them (130 KB) grow it and come whole; with _KEEP
        below their size they take a buffer of their own and the warm one
        stays as it was."""
        shape = SHAPES[2]
        steps = self.steps(shape, 3)
        a, b, c = self.session(shape), self.session(shape), self.session(shape)
        want = [self.kv.attend(a, 0, **st) for st in steps]
        batch_sids = [self.session(shape) for _ in range(32)]
        q = steps[0]["q"]
        # Single HTTP attends (q only: nothing changes), decoded step by step: the batch's rows are checked against them.
        want_batch = [self.kv.attend(sid, 0, q) for sid in batch_sids]
        with self.stream(recv_buffer=256) as s:
            self.assertEqual(len(s.ws._rbuf), 256)
            assert_same(self, [bits(s.attend(b, 0, **steps[0]))], [bits(want[0])])
            self.assertGreaterEqual(len(s.ws._rbuf), 4096)
            got = s.attend_batch(0, [{"session": sid, "q": q} for sid in batch_sids])
            self.assertGreaterEqual(len(s.ws._rbuf), 130_000)
            s.attend(b, 0, steps[1]["q"])  # a later read over the buffer (q only: changes nothing)
            assert_same(self, [bits(serve.ok(r)) for r in got], [bits(r) for r in want_batch])
            # Each result's arrays are its own rows, writable.
            got[0].out[:] = 0
            got[0].lse[:] = 0
            assert_same(self, [bits(r) for r in got[1:]], [bits(r) for r in want_batch[1:]])
        keep = wsmod._KEEP
        wsmod._KEEP = 1000
        try:
            with self.stream(recv_buffer=256) as s:
                got = [s.attend(c, 0, **st) for st in steps]
                self.assertEqual(len(s.ws._rbuf), 256)
        finally:
            wsmod._KEEP = keep
        assert_same(self, [bits(r) for r in got], [bits(r) for r in want])


def _join(parts):
    return b"".join(bytes(memoryview(p).cast("B")) if isinstance(p, np.ndarray) else bytes(p) for p in parts)


class Packing(unittest.TestCase):
    def test_parts_decode_as_the_packed_body(self):
        """attend_parts, http_attend_parts and batch_parts (with an id, a
        stream's; without, HTTP's) against msgpack's packing of the bodies
        as dicts (attend_body, step_body): the same values for random steps
        (f32, f16, float64, bf16 bits, big-endian and strided arrays, scale,
        position, returns, out dtype; 1, 15, 16 and 40 steps)."""
        rng = np.random.default_rng(4)
        packer = msgpack.Packer(use_bin_type=True)

        def array(shape):
            kind = rng.integers(6)
            a = rng.standard_normal(shape)
            if kind == 0:
                return a.astype(np.float32)
            if kind == 1:
                return a.astype(np.float16)
            if kind == 2:
                return a  # float64: sent as f32
            if kind == 3:
                return a.astype(">f4")
            if kind == 4:
                return np.ascontiguousarray(np.repeat(a.astype(np.float32), 2, axis=-1))[..., ::2]
            return to_bf16_bits(a)

        def step(i):
            heads, d = int(rng.integers(1, 5)), int(rng.integers(1, 9)) * 8
            st = {"session": f"s{i}-" + "x" * int(rng.integers(0, 40)), "q": array((heads * 2, d))}
            if rng.integers(2):
                st["k"], st["v"] = array((heads, d)), array((heads, d))
                st["dtype"] = ["f16", "f32", None, "bf16"][int(rng.integers(4))]
                if np.uint16 in (st["k"].dtype, st["v"].dtype):
                    st["dtype"] = "bf16"  # bit patterns say which 16-bit form they are
                if rng.integers(2):
                    st["position"] = int(rng.integers(0, 70_000))
            if st["q"].dtype == np.uint16:
                st["q_dtype"] = "bf16"
            elif rng.integers(3) == 0:
                st["q_dtype"] = ["f16", "f32", "bf16"][int(rng.integers(3))]
            if rng.integers(2):
                st["scale"] = float(rng.random())
            if rng.integers(3) == 0:
                st["returns" if rng.integers(2) else "return"] = ["out", "selection"]
            if rng.integers(2):
                st["out_dtype"] = "f16"
            if st.get("dtype") is None:
                st.pop("dtype", None)
            return st

        for n in (1, 15, 16, 40):
            steps = [step(i) for i in range(n)]
            want = msgpack.unpackb(msgpack.packb({"id": 7 + n, "layer": n, "steps": [step_body(s) for s in steps]}, use_bin_type=True))
            got = msgpack.unpackb(_join(batch_parts(packer, 7 + n, n, steps)))
            self.assertEqual(got, want)
            del want["id"]
            self.assertEqual(msgpack.unpackb(_join(batch_parts(packer, None, n, steps))), want)
            for i, st in enumerate(steps[:8]):
                fields = {k: v for k, v in st.items() if k != "session"}
                if "return" in fields:
                    fields["returns"] = fields.pop("return")
                body = attend_body(**fields)
                body.update(id=1000 + i, session=st["session"], layer=3)
                got = msgpack.unpackb(_join(attend_parts(packer, 1000 + i, st["session"], 3, attend_fields(**fields))))
                self.assertEqual(got, msgpack.unpackb(msgpack.packb(body, use_bin_type=True)))
                del body["id"], body["session"]
                got = msgpack.unpackb(_join(http_attend_parts(packer, 3, attend_fields(**fields))))
                self.assertEqual(got, msgpack.unpackb(msgpack.packb(body, use_bin_type=True)))
        with self.assertRaises(TypeError):
            batch_parts(packer, 1, 0, [{"q": np.zeros((2, 8), np.float32)}])  # no session
        with self.assertRaises(TypeError):
            batch_parts(packer, 1, 0, [{"session": "a", "q": np.zeros((2, 8), np.float32), "bogus": 1}])
        with self.assertRaises(ValueError):
            attend_fields(np.zeros((2, 8), np.float32), k=np.zeros((1, 8), np.float16))  # k without v


class BatchRows(unittest.TestCase):
    def test_rows_equal_each_step_decoded_alone(self):
        """batch_results' one-array-per-field decode against attend_result
        step by step: f32, f16 and bf16 outs, 1 and 33 steps; a batch with
        an error, a selection or a different shape in it is decoded step by
        step (and equal)."""
        rng = np.random.default_rng(8)

        def answer(wire, shape, extra=None, heads=None):
            o = rng.standard_normal(shape)
            data = {"f32": o.astype("<f4"), "f16": o.astype("<f2"), "bf16": to_bf16_bits(o)}[wire]
            r = {"out": {"dtype": wire, "shape": list(shape), "data": data.tobytes()}, "lse": {"dtype": "f32", "shape": [heads or shape[0]], "data": rng.standard_normal(heads or shape[0]).astype("<f4").tobytes()}, "stats": {"ms": float(rng.random()), "tokens": 9}}
            r.update(extra or {})
            return r

        cases = [[answer(w, (4, 8)) for _ in range(n)] for w in ("f32", "f16", "bf16") for n in (1, 33)]
        mixed = [answer("f32", (4, 8)) for _ in range(5)]
        cases += [mixed[:2] + [{"error": {"code": "not_found", "message": "x"}}] + mixed[2:], mixed[:3] + [answer("f32", (8, 4), heads=4)], mixed[:1] + [answer("f32", (4, 8), {"selection": [{"dtype": "i32", "shape": [2], "data": b"\0" * 8}]})]]
        for results in cases:
            wire = msgpack.unpackb(msgpack.packb({"results": results, "stats": {"ms": 1.5}}, use_bin_type=True), raw=False)
            got = batch_results(wire["results"], wire["stats"])
            self.assertEqual(got.ms, 1.5)
            for g, r in zip(got, wire["results"]):
                if "error" in r:
                    self.assertEqual((g.status, g.code), (404, "not_found"))
                    continue
                w = attend_result(r)
                self.assertEqual((g.out.dtype, g.out.shape, g.out.tobytes(), g.lse.tobytes(), g.stats), (w.out.dtype, w.out.shape, w.out.tobytes(), w.lse.tobytes(), w.stats))
                self.assertTrue(g.out.flags.writeable)
        self.assertEqual(list(batch_results([])), [])


class ReceiveBuffer(unittest.TestCase):
    def test_every_length_class_through_a_small_buffer(self):
        """Frames of 0 to 70,000 bytes (7-, 16- and 64-bit lengths, around
        the buffer's 64 bytes), a ping and a fragmented message between
        them, sent in one write and read by 1-3 bytes or as they come."""
        rng = random.Random(9)
        sizes = [0, 1, 50, 63, 64, 65, 125, 126, 127, 255, 256, 65535, 65536, 70_000, 3]
        payloads = [bytes(rng.getrandbits(8) for _ in range(n)) for n in sizes]
        wire = b"".join(server_frame(0x2, p) for p in payloads[:5])
        wire += server_frame(0x9, b"hi") + server_frame(0x2, b"frag", fin=False) + server_frame(0x0, b"ment")
        wire += b"".join(server_frame(0x2, p) for p in payloads[5:])
        for trickle in (False, True):
            with self.subTest(trickle=trickle):

                def script(sock):
                    sock.sendall(wire)
                    time.sleep(0.5)

                srv = Scripted(script)
                ws = WebSocket.connect(srv.url, timeout=5, recv_buffer=64, max_message=1 << 20)  # garbage lengths fail fast
                if trickle:
                    ws.sock = _Trickle(ws.sock, 1)
                got = [bytes(ws.recv_view()) for _ in range(len(payloads) + 1)]
                ws.close()
                assert_same(self, got, payloads[:5] + [b"fragment"] + payloads[5:])

    @unittest.skipUnless(sys.platform.startswith("linux"), "kernel timeouts are used on Linux")
    def test_kernel_timeout(self):
        """A peer that never answers: recv gives up after the timeout (the
        kernel's, the socket blocking underneath) with 'timed out'."""
        srv = Scripted(lambda sock: time.sleep(3))
        ws = WebSocket.connect(srv.url, timeout=0.3)
        self.assertIsNone(ws.sock.gettimeout())
        t0 = time.monotonic()
        with self.assertRaises(ConnectionClosed) as cm:
            ws.recv()
        self.assertLess(time.monotonic() - t0, 2.5)
        self.assertGreater(time.monotonic() - t0, 0.25)
        self.assertIn("timed out", str(cm.exception))
        self.assertTrue(ws.closed)

    @unittest.skipUnless(sys.platform.startswith("linux"), "kernel timeouts are used on Linux")
    def test_http_kernel_timeout(self):
        """The client's HTTP connection: a server that never answers gives
        TimeoutError after the timeout, as Python's own timeout did."""
        listener = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog, unanswered
        try:
            kv = Client(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
            t0 = time.monotonic()
            with self.assertRaises(TimeoutError):
                kv.health()
            self.assertLess(time.monotonic() - t0, 2.5)
            self.assertGreater(time.monotonic() - t0, 0.25)
        finally:
            listener.close()


if __name__ == "__main__":
    unittest.main()
