"""Shared-memory tensors on the stream (kvrecall.shm) against a real server
on 127.0.0.1 with real files in /dev/shm: attends, batches (with a bad
step) and document uploads through a segment answer bit for bit as the
byte form does; the segment's file is gone once attached; a request that
does not fit the segment goes as bytes; a refused segment (the server's
--shm-dir off, or a file the server cannot see: another host) leaves the
stream on bytes with `shm_refused` saying why.

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import sys
import tempfile
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import Client, KvrecallError, model_shape  # noqa: E402
from kvrecall import shm as shm_module  # noqa: E402
from kvrecall import shm_plan  # noqa: E402

Q, KV, D, LAYERS, DOC = 8, 2, 32, 2, 300
MODEL = model_shape(LAYERS, Q, KV, D, dtype="f16")


def bits(r):
    return r.out.dtype.str, r.out.tobytes(), r.lse.tobytes()


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
@serve.needs_server
class SharedMemory(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(11)
        cls.doc = cls.document("py-shm-", MODEL, KV, DOC, D, LAYERS)

    def session(self):
        sid = self.kv.create_session(MODEL, documents=[self.doc])["id"]
        self.sessions.append(sid)
        return sid

    def step(self):
        q = (self.rng.standard_normal((Q, D)) * 1.5).astype(np.float32)
        return q, self.rng.standard_normal((KV, D)).astype(np.float16), self.rng.standard_normal((KV, D)).astype(np.float16)

    def test_attend_matches_the_byte_form_and_the_file_is_gone(self):
        a, b = self.session(), self.session()
        with self.kv.open_stream() as plain, self.kv.open_stream(shm=1 << 20) as shared:
            self.assertIsNotNone(shared.shm, shared.shm_refused)
            self.assertFalse(os.path.exists(shared.shm.path))
            for pos in range(3):
                for layer in range(LAYERS):
                    q, k, v = self.step()
                    for kw in ({}, {"out_dtype": "f16"}, {"q_dtype": "f16", "out_dtype": "f16"}):
                        append = {"k": k, "v": v, "position": pos} if not kw else {}
                        want = plain.attend(a, layer, q, **append, **kw)
                        shared.shm_attend = True  # through the segment (by default a single attend goes as lean bytes)
                        got = shared.attend(b, layer, q, **append, **kw)
                        self.assertEqual(bits(got), bits(want), (pos, layer, kw))
                        shared.shm_attend = False
                        self.assertEqual(bits(shared.attend(b, layer, q, **kw)), bits(plain.attend(a, layer, q, **kw)))
                        self.assertEqual(got.stats["tokens"], want.stats["tokens"])
            self.assertTrue(shared._shm_attend_plans)  # the common form went by a plan (kvrecall.shm_plan)
            # The results are the caller's: the next call does not change them.
            kept = bits(got)
            shared.shm_attend = True
            shared.attend(b, 0, self.step()[0])
            self.assertEqual(bits(got), kept)
        self.assertEqual(self.kv.get_session(a)["ownTokens"], self.kv.get_session(b)["ownTokens"])

    def test_batch_with_a_bad_step_matches_the_byte_form(self):
        n = 6
        plain_s = [self.session() for _ in range(n)]
        shm_s = [self.session() for _ in range(n)]
        steps = [self.step() for _ in range(n)]

        def batch(sessions):
            # Step 3 skips a position (409): it fails alone and changes nothing.
            return [{"session": s, "q": q, "k": k, "v": v, "position": 1 if i == 3 else 0, "out_dtype": "f16" if i % 2 else None} for i, (s, (q, k, v)) in enumerate(zip(sessions, steps))]

        with self.kv.open_stream() as plain, self.kv.open_stream(shm=1 << 20) as shared:
            self.assertIsNotNone(shared.shm, shared.shm_refused)
            want = plain.attend_batch(1, batch(plain_s))
            got = shared.attend_batch(1, batch(shm_s))
        self.assertIsNotNone(got.ms)
        for i in range(n):
            if i == 3:
                self.assertIsInstance(got[i], KvrecallError)
                self.assertEqual((got[i].status, got[i].code), (want[i].status, want[i].code))
            else:
                self.assertEqual(bits(serve.ok(got[i])), bits(serve.ok(want[i])), i)
        self.assertEqual(self.kv.get_session(shm_s[3])["ownTokens"], [0, 0])
        # One shape and dtype throughout (the steps' q, k, v written side by side, a field at a time): the same
        # answers, as rows of one array per field.
        with self.kv.open_stream() as plain, self.kv.open_stream(shm=1 << 20) as shared:
            for half in (False, True):
                for layer in range(LAYERS):
                    pos = self.kv.get_session(plain_s[0])["ownTokens"][layer]
                    batch = lambda sessions: [{"session": s, "q": q.astype(np.float16) if half else q, "k": k, "v": v, "position": pos, "out_dtype": "f16" if half else None} for s, (q, k, v) in zip(sessions, steps) if s not in (plain_s[3], shm_s[3])]
                    self.assertIsNotNone(shm_module._uniform(batch(shm_s)))  # the stacked path
                    want, got = plain.attend_batch(layer, batch(plain_s)), shared.attend_batch(layer, batch(shm_s))
                    self.assertEqual([bits(serve.ok(r)) for r in got], [bits(serve.ok(r)) for r in want])
            rs = shared.attend_batch(0, [{"session": s, "q": q} for s, (q, _, _) in zip(shm_s, steps)])
            self.assertIs(rs[0].out.base, rs[1].out.base)
            # Views of the segment when asked: the same values, valid until the next request.
            shared.shm_views = True
            viewed = shared.attend_batch(0, [{"session": s, "q": q} for s, (q, _, _) in zip(shm_s, steps)])
            self.assertEqual([bits(r) for r in viewed], [bits(r) for r in rs])
            self.assertFalse(viewed[0].out.flags.owndata or viewed[0].out.base.flags.owndata)
            self.assertTrue(rs[0].out.flags.writeable and rs[0].out.base.flags.owndata)  # a copy, not a view of the segment

    def test_upload_matches_the_byte_form(self):
        docs = ["py-shm-up-" + uuid.uuid4().hex[:8] for _ in range(2)]
        self.docs.extend(docs)
        chunks = [(layer, start, self.rng.standard_normal((KV, 50, D)).astype(np.float16), self.rng.standard_normal((KV, 50, D)).astype(np.float16), None) for layer in range(LAYERS) for start in (0, 50, 100)]
        for doc in docs:
            self.kv.create_document(doc, MODEL)
        with self.kv.open_stream() as plain, self.kv.open_stream(shm=64 << 10) as shared:
            self.assertIsNotNone(shared.shm, shared.shm_refused)
            plain.upload_document(docs[0], chunks, window=2)
            answers = shared.upload_document(docs[1], chunks, window=2)
        self.assertEqual([a["tokens"] for a in answers], [50, 100, 150] * LAYERS)
        q = (self.rng.standard_normal((Q, D))).astype(np.float32)
        got = []
        for doc in docs:
            self.kv.seal_document(doc)
            sid = self.kv.create_session(MODEL, documents=[doc])["id"]
            self.sessions.append(sid)
            got.append(bits(self.kv.attend(sid, 1, q)))
        self.assertEqual(got[1], got[0])

    def test_a_request_that_does_not_fit_goes_as_bytes(self):
        a, b = self.session(), self.session()
        q, k, v = self.step()
        with self.kv.open_stream(shm=4096) as shared:
            self.assertIsNotNone(shared.shm)
            want = self.kv.attend(a, 0, q, k=k, v=v, position=0)
            got = shared.attend(b, 0, q, k=k, v=v, position=0)  # q alone is 1 KB; q, k, v and the answer 2.3 KB: fits
            self.assertEqual(bits(got), bits(want))
            rs = shared.attend_batch(0, [{"session": s, "q": q} for s in (a, b, a)])  # 3 x (1 KB + 1 KB + 32 B): does not
            self.assertEqual(bits(serve.ok(rs[1])), bits(self.kv.attend(b, 0, q)))

    def test_a_segment_the_server_cannot_see_leaves_the_stream_on_bytes(self):
        a = self.session()
        q = self.step()[0]
        with tempfile.TemporaryDirectory() as elsewhere:
            with self.kv.open_stream(shm=1 << 16, shm_dir=elsewhere) as s:
                self.assertIsNone(s.shm)
                self.assertRegex(s.shm_refused, "does not exist")
                self.assertEqual(os.listdir(elsewhere), [])
                self.assertEqual(bits(s.attend(a, 0, q)), bits(self.kv.attend(a, 0, q)))


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
@unittest.skipIf(serve.available(), "no node or no built server")
class SharedMemoryOff(unittest.TestCase):
    def test_a_server_with_shm_off_refuses_and_the_stream_sends_bytes(self):
        server = serve.Server(extra=["--shm-dir", "off"])
        try:
            kv = Client(server.url, timeout=30)
            sid = kv.create_session(MODEL)["id"]
            q = np.ones((Q, D), np.float32)
            with kv.open_stream(shm=1 << 16) as s:
                self.assertIsNone(s.shm)
                self.assertRegex(s.shm_refused, "shared memory is off")
                self.assertEqual(bits(s.attend(sid, 0, q)), bits(kv.attend(sid, 0, q)))
            kv.close()
        finally:
            server.stop()



class FirstAsIsStep(unittest.TestCase):
    """The screen that the side-by-side batch (shm._uniform) and the planned batch (shm_plan.batch_key)
    share: the first step a dict whose q is a 2-D array of a dtype sent as it is (no server needed)."""

    def test_both_batch_forms_refuse_the_same_first_steps(self):
        q, kv = np.zeros((Q, D), np.float32), np.zeros((KV, D), np.float16)
        good = {"session": "s", "q": q, "k": kv, "v": kv}
        self.assertIsNotNone(shm_module._uniform([good, good]))
        self.assertIsNotNone(shm_plan.batch_key(0, [good, good]))
        bad = {
            "no steps": [],
            "a dict subclass": [type("Step", (dict,), {})(good)],
            "a tuple": [("s", q, kv, kv)],
            "no q": [{"session": "s"}],
            "q a list": [{**good, "q": q.tolist()}],
            "q f64": [{**good, "q": q.astype(np.float64)}],
            "q 3-D": [{**good, "q": q[None]}],
            "q 1-D": [{**good, "q": q[0]}],
        }
        for why, steps in bad.items():
            with self.subTest(why):
                self.assertIsNone(shm_module.first_as_is_step(steps))
                self.assertIsNone(shm_module._uniform(steps))
                self.assertIsNone(shm_plan.batch_key(0, steps))


if __name__ == "__main__":
    unittest.main()
