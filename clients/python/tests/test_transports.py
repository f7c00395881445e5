"""The decode transports against a real server on 127.0.0.1: the single
route (`attend`), the batch route (`attend_batch`, POST /v1/attend) and the
WebSocket stream (`open_stream`) give bit-identical answers for the same
steps; a bad step or frame fails only itself and changes nothing; appends
out of order are refused; a client that closes the stream mid-request
leaves its session usable; a server with a token refuses a stream without
it (401).

The server: KVRECALL_URL (and KVRECALL_TOKEN) when set, else this
checkout's (tests/serve.py: node dist/cli/cli.js serve), else skipped. The
token test always starts its own server with --token.

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import AttendResult, Client, KvrecallError, model_shape  # noqa: E402
from kvrecall.client import attend_body  # noqa: E402


Q, KV, D, LAYERS, DOC = 8, 2, 32, 2, 700
MODEL = model_shape(LAYERS, Q, KV, D, dtype="f16")


def bits(r):
    return r.out.tobytes(), r.lse.tobytes()


@serve.needs_server
class Transports(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(7)
        cls.doc = cls.document("py-transports-", MODEL, KV, DOC, D, LAYERS, methods=["topk-blocks"])
        cls.steps = [
            (
                (cls.rng.standard_normal((Q, D)) * 1.5).astype(np.float32),
                cls.rng.standard_normal((KV, D)).astype(np.float16),
                cls.rng.standard_normal((KV, D)).astype(np.float16),
            )
            for _ in range(4)
        ]

    def session(self, method="exact"):
        opts = {"budget": 128} if method != "exact" else {}
        sid = self.kv.create_session(MODEL, documents=[self.doc], method=method, **opts)["id"]
        self.sessions.append(sid)
        return sid

    def step(self, s, position=None):
        q, k, v = self.steps[s]
        return {"q": q, "k": k, "v": v, "position": s if position is None else position}

    def test_single_batch_and_stream_are_bit_identical(self):
        for method in ("exact", "topk-blocks"):
            with self.subTest(method=method), self.kv.open_stream() as stream:
                a, b, c, d, e, f = (self.session(method) for _ in range(6))
                for s in range(len(self.steps)):
                    for layer in range(LAYERS):
                        body = self.step(s)
                        single = self.kv.attend(a, layer, **body)
                        batched, other = map(serve.ok, self.kv.attend_batch(layer, [{"session": b, **body}, {"session": d, **body}]))
                        streamed = stream.attend(c, layer, **body)
                        via_stream_batch = list(map(serve.ok, stream.attend_batch(layer, [{"session": e, **body}, {"session": f, **body}])))
                        self.assertIsInstance(single, AttendResult)
                        self.assertEqual(single.stats["tokens"], DOC + s + 1)
                        for r in (batched, other, streamed, *via_stream_batch):
                            self.assertEqual(bits(r), bits(single))
                            self.assertEqual((r.out.dtype, r.out.shape, r.lse.shape), (np.float32, (Q, D), (Q,)))
                            self.assertEqual(r.stats["tokens"], single.stats["tokens"])
                        self.assertTrue(serve.owned(streamed.out) and serve.owned(single.out))
                # What the sessions hold agrees too: every step appended once per layer.
                for sid in (a, b, c, d, e, f):
                    self.assertEqual(self.kv.get_session(sid)["ownTokens"], [len(self.steps)] * LAYERS)
                # Returned kv and selection travel the same way (a 64-bit-length frame: ~180 KB).
                want = self.kv.attend(a, 0, self.steps[0][0], returns=["out", "kv", "selection"])
                got = stream.attend(c, 0, self.steps[0][0], returns=["out", "kv", "selection"])
                self.assertEqual(bits(got), bits(want))
                for h in range(KV):
                    np.testing.assert_array_equal(got.selection[h], want.selection[h])
                    np.testing.assert_array_equal(got.kv["k"][h], want.kv["k"][h])
                    np.testing.assert_array_equal(got.kv["v"][h], want.kv["v"][h])
                self.assertEqual(got.kv["k"][0].dtype, np.float16)

    def check_bad_steps(self, attend_batch):
        a, b = self.session(), self.session()
        body = self.step(0)
        results = attend_batch(
            0,
            [
                {"session": a, **body},
                {"session": "no-such-session", **body},
                {"session": b, **body, "q": self.steps[0][0][: Q - 1]},  # wrong q shape
                {"session": b, **self.step(0, position=3)},  # wrong position
            ],
        )
        self.assertEqual(len(results), 4)
        self.assertIsInstance(results[0], AttendResult)
        self.assertEqual(results[0].stats["tokens"], DOC + 1)
        errors = results[1:]
        self.assertTrue(all(isinstance(r, KvrecallError) for r in errors), errors)
        self.assertEqual([(r.status, r.code) for r in errors], [(404, "not_found"), (422, "invalid"), (409, "conflict")])
        self.assertTrue(all(r.message for r in errors))
        # Session b appended nothing: its first append is still position 0.
        self.assertEqual(self.kv.attend(b, 0, **body).stats["tokens"], DOC + 1)
        # A batch that is wrong as a whole raises.
        with self.assertRaises(KvrecallError) as cm:
            attend_batch(0, [])
        self.assertEqual((cm.exception.status, cm.exception.code), (422, "invalid"))
        with self.assertRaises(KvrecallError) as cm:
            attend_batch(-1, [{"session": a, "q": body["q"]}])
        self.assertEqual(cm.exception.status, 422)
        # A layer the model lacks fails each step alone.
        (r,) = attend_batch(LAYERS + 5, [{"session": a, "q": body["q"]}])
        self.assertEqual((r.status, r.code), (422, "invalid"))

    def test_batch_with_bad_steps_answers_the_good_ones(self):
        self.check_bad_steps(self.kv.attend_batch)

    def test_stream_batch_with_bad_steps_answers_the_good_ones(self):
        with self.kv.open_stream() as stream:
            self.check_bad_steps(stream.attend_batch)
            self.assertFalse(stream.closed)

    def test_position_repeat_or_skip_is_a_conflict(self):
        a = self.session()
        self.kv.attend(a, 0, **self.step(0, position=0))
        for position in (0, 2):
            with self.assertRaises(KvrecallError) as cm:
                self.kv.attend(a, 0, **self.step(1, position=position))
            self.assertEqual((cm.exception.status, cm.exception.code), (409, "conflict"))
        with self.kv.open_stream() as stream:
            with self.assertRaises(KvrecallError) as cm:
                stream.attend(a, 0, **self.step(1, position=5))
            self.assertEqual(cm.exception.status, 409)
            self.assertEqual(stream.attend(a, 0, **self.step(1, position=1)).stats["tokens"], DOC + 2)
        with self.assertRaises(ValueError):  # position names an appended token: k and v go with it
            self.kv.attend(a, 0, self.steps[0][0], position=2)

    def test_stream_survives_bad_frames(self):
        a = self.session()
        with self.kv.open_stream() as stream:
            ws = stream.ws
            for raw, text in ((b"\xc1", False), (msgpack.packb([1, 2, 3]), False), ("{}", True), (msgpack.packb({"id": 77, "layer": 0}), False)):
                if text:
                    ws.send_text(raw)
                else:
                    ws.send_binary(raw)
                answer = msgpack.unpackb(ws.recv(), raw=False)
                self.assertIn("error", answer, answer)
                self.assertEqual(answer["error"]["code"], "malformed")
                self.assertTrue(answer["error"]["message"])
            self.assertEqual(answer["id"], 77)  # a frame that parsed keeps its id
            # Garbage sent past the client, its error not read: answers come in
            # order, so the oldest awaited request takes that id-less error (a
            # request the server could not decode must not wait forever); the
            # next ones get their own answers.
            ws.send_binary(b"\xc1")
            with self.assertRaises(KvrecallError) as cm:
                stream.attend(a, 0, self.steps[0][0])
            self.assertEqual((cm.exception.status, cm.exception.code), (400, "malformed"))
            with self.assertRaises(KvrecallError) as cm:
                stream.attend("nope", 0, self.steps[0][0])
            self.assertEqual(cm.exception.status, 404)
            with self.assertRaises(KvrecallError) as cm:
                stream.attend(a, LAYERS + 3, self.steps[0][0])
            self.assertEqual(cm.exception.status, 422)
            # A request sent in fragments (continuation frames) is one message.
            frame = msgpack.packb({"id": 1000, "session": a, "layer": 0, **attend_body(self.steps[0][0])}, use_bin_type=True)
            ws.send_fragments([frame[:5], frame[5:300], frame[300:]])
            answer = msgpack.unpackb(ws.recv(), raw=False)
            self.assertEqual((answer["id"], answer["stats"]["tokens"]), (1000, DOC))
            r = stream.attend(a, 0, **self.step(0))
            self.assertEqual(r.stats["tokens"], DOC + 1)
            self.assertEqual(bits(r), bits(self.kv.attend(self.session(), 0, **self.step(0))))

    def test_stream_ping_between_attends(self):
        a = self.session()
        with self.kv.open_stream() as stream:
            stream.ping()
            r = stream.attend(a, 0, **self.step(0))
            stream.ping()
            stream.ping()
            self.assertEqual(stream.attend(a, 0, **self.step(1)).stats["tokens"], r.stats["tokens"] + 1)
            stream.close()
            with self.assertRaises(ConnectionError):
                stream.ping()

    def test_close_mid_request_leaves_the_session_usable(self):
        a = self.session()
        stream = self.kv.open_stream()
        stream.ws.send_binary(msgpack.packb({"id": 1, "session": a, "layer": 0, **attend_body(**self.step(0))}, use_bin_type=True))
        stream.close()
        self.assertTrue(stream.closed)
        with self.assertRaises(ConnectionError):
            stream.attend(a, 0, self.steps[1][0])
        # Whether or not that step ran before the close, the session answers and counts right.
        time.sleep(0.05)
        held = self.kv.get_session(a)["ownTokens"][0]
        self.assertIn(held, (0, 1))
        r = self.kv.attend(a, 0, **self.step(1, position=held))
        self.assertEqual(r.stats["tokens"], DOC + held + 1)
        # A stream closed from another thread while a request waits: that request raises.
        b = self.session()
        with self.kv.open_stream() as stream:
            stream.attend(b, 0, **self.step(0))
            threading.Timer(0.02, stream.close).start()
            with self.assertRaises(ConnectionError):
                for _ in range(100_000):
                    stream.attend(b, 1, self.steps[0][0])  # q only: changes nothing
        self.assertEqual(self.kv.attend(b, 0, **self.step(1)).stats["tokens"], DOC + 2)


    def test_adapter_decode_transports_and_reconnect(self):
        """kvrecall.hf's decode path (no torch needed for it): one batch per
        layer on the stream or over HTTP, the same answers; a lost stream
        is reopened and the step resent, and a step that went through before
        the loss is not appended twice."""
        from kvrecall.hf import KvrecallAttention

        ref = self.session()
        want = [self.kv.attend(ref, 0, **self.step(s)) for s in range(4)]
        for transport in ("stream", "http"):
            with self.subTest(transport=transport):
                adapter = KvrecallAttention(self.kv, transport=transport)
                adapter.sessions = [self.session(), self.session()]
                for s in range(2):
                    steps = [{"session": sid, **self.step(s), "dtype": "f16"} for sid in adapter.sessions]
                    for r in adapter._attend(0, steps):
                        self.assertEqual(bits(r), bits(want[s]))
                bad = [{"session": adapter.sessions[0], **self.step(2, position=7)}]
                with self.assertRaises(KvrecallError) as cm:
                    adapter._attend(0, bad)
                self.assertEqual(cm.exception.code, "conflict")
                self.assertEqual(adapter._stream is not None, transport == "stream")
                adapter.close()
                self.assertIsNone(adapter._stream)
        adapter = KvrecallAttention(self.kv)
        adapter.sessions = [self.session()]
        sid = adapter.sessions[0]
        adapter._attend(0, [{"session": sid, **self.step(0)}])
        # Step 1 reaches the server, then the connection is lost before its answer is read.
        adapter._stream.ws.send_binary(msgpack.packb({"id": 99, "session": sid, "layer": 0, **attend_body(**self.step(1))}, use_bin_type=True))
        adapter._stream.ws.recv()
        adapter._stream.ws.sock.shutdown(2)
        (r,) = adapter._attend(0, [{"session": sid, **self.step(1)}])
        self.assertEqual(bits(r), bits(want[1]))
        # Lost before step 2 was sent: resent as it is.
        adapter._stream.ws.sock.shutdown(2)
        (r,) = adapter._attend(0, [{"session": sid, **self.step(2)}])
        self.assertEqual(bits(r), bits(want[2]))
        self.assertEqual(self.kv.get_session(sid)["ownTokens"][0], 3)
        adapter.close()


@unittest.skipIf(serve.available(), f"cannot start a server: {serve.available()}")
class StreamToken(unittest.TestCase):
    def test_stream_without_the_token_is_refused(self):
        server = serve.start(token="s3cret")
        try:
            with self.assertRaises(KvrecallError) as cm:
                Client(server.url).open_stream()
            self.assertEqual((cm.exception.status, cm.exception.code), (401, "unauthorized"))
            with self.assertRaises(KvrecallError) as cm:
                Client(server.url, token="wrong").open_stream()
            self.assertEqual(cm.exception.status, 401)
            with self.assertRaises(KvrecallError) as cm:
                Client(server.url).attend_batch(0, [{"session": "x", "q": np.zeros((Q, D), np.float32)}])
            self.assertEqual(cm.exception.status, 401)
            kv = Client(server.url, token="s3cret")
            sid = kv.create_session(MODEL)["id"]
            with kv.open_stream() as stream:
                r = stream.attend(sid, 0, np.ones((Q, D), np.float32), k=np.ones((KV, D), np.float16), v=np.ones((KV, D), np.float16), position=0)
                self.assertEqual(r.stats["tokens"], 1)
                np.testing.assert_array_equal(r.out, np.ones((Q, D), np.float32))
            kv.close()
        finally:
            server.stop()


if __name__ == "__main__":
    unittest.main()
