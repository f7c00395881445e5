"""Stream.attend_stacked (kvrecall.stacked) against a real server on
127.0.0.1 with its segment in /dev/shm: a running batch's step given as
whole arrays answers bit for bit as attend_batch's steps and as single
attends on sessions fed the same steps (appends included, f32 and f16
out); a bad step is named in `errors` (its rows NaN) and the others are
answered, the bad one changing nothing; arrays of the wrong shape or dtype
are refused before anything is sent or appended; out and lse are views of
the segment valid until the next request, or the caller's arrays; without
a segment (or one too small) the same call goes as steps in bytes with the
same answers.

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import sys
import unittest
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import KvrecallError, Stacked, model_shape  # noqa: E402
from kvrecall import stacked as stacked_module  # noqa: E402

Q, KV, D, LAYERS, DOC, N = 8, 2, 32, 2, 200, 5
MODEL = model_shape(LAYERS, Q, KV, D, dtype="f16")


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
@serve.needs_server
class Stacked_(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(13)
        cls.doc = cls.document("py-stacked-", MODEL, KV, DOC, D, LAYERS)

    def arrays(self, n=N, half=False):
        q = (self.rng.standard_normal((n, Q, D)) * 1.5).astype(np.float16 if half else np.float32)
        k = self.rng.standard_normal((n, KV, D)).astype(np.float16)
        v = self.rng.standard_normal((n, KV, D)).astype(np.float16)
        return q, k, v

    def test_answers_match_attend_batch_and_single_attends(self):
        stacked, batched, single = self.open(N), self.open(N), self.open(N)
        with self.kv.open_stream(shm=1 << 20) as s, self.kv.open_stream() as plain:
            self.assertIsNotNone(s.shm, s.shm_refused)
            for pos in range(3):
                for layer in range(LAYERS):
                    for half in (False, True):  # f32: the new token appended; f16 out: an attend alone
                        q, k, v = self.arrays(half=half)
                        od = "f16" if half else None
                        append = not half
                        kw = {"k": k, "v": v, "positions": np.full(N, pos)} if append else {}
                        got = s.attend_stacked(layer, stacked, q, out_dtype=od, **kw)
                        self.assertEqual(got.errors, [])
                        self.assertIsInstance(got.ms, float)
                        out, lse = got.out.copy(), got.lse.copy()
                        steps = [{"session": b, "q": q[i], "out_dtype": od, **({"k": k[i], "v": v[i], "position": pos} if append else {})} for i, b in enumerate(batched)]
                        want = s.attend_batch(layer, steps)
                        for i in range(N):
                            r = serve.ok(want[i])
                            one = plain.attend(single[i], layer, q[i], out_dtype=od, **({"k": k[i], "v": v[i], "position": pos} if append else {}))
                            self.assertEqual(out[i].tobytes(), r.out.tobytes(), (pos, layer, half, i))
                            self.assertEqual(lse[i].tobytes(), r.lse.tobytes())
                            self.assertEqual(out[i].tobytes(), one.out.tobytes())
                            self.assertEqual(lse[i].tobytes(), one.lse.tobytes())
                            self.assertEqual(out.dtype, one.out.dtype)
            self.assertTrue(s._stacked_plans)
            # Every later answer of the form was read by its learned bytes.
            self.assertTrue(any(a for p in s._stacked_plans.values() for a in p.answers))
        for a, b, c in zip(stacked, batched, single):
            self.assertEqual(self.kv.get_session(a)["ownTokens"], self.kv.get_session(c)["ownTokens"])
            self.assertEqual(self.kv.get_session(b)["ownTokens"], [3, 3])

    def test_a_bad_step_is_named_and_the_others_answered(self):
        good, ref = self.open(N), self.open(N)
        q, k, v = self.arrays()
        pos = np.zeros(N, np.int64)
        pos[2] = 1  # skips a token: 409, that step alone
        names = list(good)
        names[4] = "no-such-session"
        with self.kv.open_stream(shm=1 << 20) as s:
            for _ in range(2):  # the second answer, with errors, is not of the learned form: decoded by msgpack
                got = s.attend_stacked(0, names, q, k, v, pos)
                self.assertEqual([(i, c) for i, c, _ in got.errors], [(2, "conflict"), (4, "not_found")])
                self.assertRegex(got.errors[1][2], "no-such-session")
                self.assertTrue(np.isnan(got.out[2]).all() and np.isnan(got.lse[4]).all())
                want = [self.kv.attend(ref[i], 0, q[i], k=k[i], v=v[i], position=int(pos[i])) for i in (0, 1, 3)]
                for i, r in zip((0, 1, 3), want):
                    self.assertEqual(got.out[i].tobytes(), r.out.tobytes())
                    self.assertEqual(got.lse[i].tobytes(), r.lse.tobytes())
                pos[[0, 1, 3]] += 1
        self.assertEqual(self.kv.get_session(good[2])["ownTokens"], [0, 0])
        self.assertEqual(self.kv.get_session(good[0])["ownTokens"], [2, 0])
        # A layer the model has not: every step is named.
        with self.kv.open_stream(shm=1 << 20) as s:
            got = s.attend_stacked(LAYERS + 5, good, q)
        self.assertEqual([(i, c) for i, c, _ in got.errors], [(i, "invalid") for i in range(N)])

    def test_a_batch_refused_whole_raises_and_the_stream_goes_on(self):
        (sid,) = self.open(1)
        n = 4097  # one more step than a batch may carry (engine/sessions.ts MAX_BATCH): the server refuses the frame
        q = np.zeros((n, Q, D), np.float32)
        with self.kv.open_stream(shm=16 << 20) as s:
            with self.assertRaises(KvrecallError) as cm:
                s.attend_stacked(0, [sid] * n, q)
            self.assertEqual(cm.exception.code, "invalid")
            self.assertRegex(cm.exception.message, "sessions must be a list of 1 to 4096")
            got = s.attend_stacked(0, [sid], q[:1])
            self.assertEqual(got.out.tobytes(), self.kv.attend(sid, 0, q[0]).out.tobytes())

    def test_bad_arrays_are_refused_before_anything_is_sent(self):
        names = self.open(3)
        q, k, v = self.arrays(3)
        bad = [
            dict(q=q[:2]),  # a row short
            dict(q=q.astype(np.float64)),
            dict(q=q[0]),  # not stacked
            dict(q=q, k=k),  # k without v
            dict(q=q, k=k, v=v.astype(np.float32)),
            dict(q=q, k=k[:, :1], v=v),
            dict(q=q, k=k, v=v, positions=[0, 0]),
            dict(q=q, k=k, v=v, positions=[0, -1, 0]),
            dict(q=q, k=k, v=v, positions=np.array([0, 2**31, 0], np.int64)),
            dict(q=q, k=k, v=v, positions=[0.0, 0.0, 0.0]),
            dict(q=q, positions=[0, 0, 0]),  # positions without k, v
            dict(q=q, k=k, v=v, positions=[0, 0, 0], out_dtype="f64"),
            dict(q=q, out=np.empty((3, Q, D), np.float16), lse=np.empty((3, Q), np.float32)),  # out not in the out dtype
            dict(q=q, out=np.empty((3, Q, D), np.float32)),  # out without lse
            dict(q=q, scale=float("nan")),
            dict(q=q, scale=-0.5),
            dict(q=q, scale=0),
            dict(q=q, scale="0.25"),
            dict(q=q, scale=True),
        ]
        with self.kv.open_stream(shm=1 << 20) as s:
            sent = s._next_id
            for kw in bad:
                with self.assertRaises((ValueError, TypeError), msg=str({a: getattr(b, "shape", b) for a, b in kw.items()})):
                    s.attend_stacked(0, names, **kw)
            with self.assertRaises(TypeError):
                s.attend_stacked(0, [names[0], 7, names[2]], q)
            self.assertEqual(s._next_id, sent)  # no request made
            # Nothing was appended: position 0 is still the next.
            got = s.attend_stacked(0, names, q, k, v, [0, 0, 0])
            self.assertEqual(got.errors, [])
        for sid in names:
            self.assertEqual(self.kv.get_session(sid)["ownTokens"], [1, 0])

    def test_views_live_until_the_next_request_or_go_into_the_callers_arrays(self):
        names = self.open(3)
        q1, q2 = self.arrays(3)[0], self.arrays(3)[0]
        with self.kv.open_stream(shm=1 << 20) as s:
            a = s.attend_stacked(0, names, q1)
            self.assertFalse(a.out.flags.owndata)  # a view of the segment
            first = a.out.copy()
            b = s.attend_stacked(0, names, q2)
            self.assertFalse(np.array_equal(a.out, first))  # written over by the next request
            self.assertTrue(np.shares_memory(a.out, b.out))
            out, lse = np.empty((3, Q, D), np.float32), np.empty((3, Q), np.float32)
            c = s.attend_stacked(0, names, q1, out=out, lse=lse)
            self.assertIs(c.out, out)
            self.assertIs(c.lse, lse)
            s.attend_stacked(0, names, q2)
            self.assertEqual(out.tobytes(), first.tobytes())  # the caller's, kept
            got_out, got_lse = c  # unpacks as (out, lse)
            self.assertIs(got_out, out)

    def test_inputs_written_in_the_segment_go_without_a_copy(self):
        names, twins = self.open(3), self.open(3)
        q, k, v = self.arrays(3)
        with self.kv.open_stream(shm=1 << 20) as s:
            qi, ki, vi, pi = s.stacked_inputs(0, names, (Q, D), np.float32, (KV, D), np.float16, positions=True)
            for a in (qi, ki, vi, pi):
                self.assertTrue(np.shares_memory(a, s.shm.u8))
            self.assertEqual((qi.shape, ki.shape, pi.dtype), ((3, Q, D), (3, KV, D), np.int32))
            qi[:], ki[:], vi[:], pi[:] = q, k, v, 0
            with mock.patch.object(stacked_module.np, "copyto", wraps=np.copyto) as copies:
                got = s.attend_stacked(0, names, qi, ki, vi, pi)
                self.assertEqual(copies.call_count, 0)
                got = (got.out.copy(), got.lse.copy())
                want = s.attend_stacked(0, twins, q, k, v, [0, 0, 0])  # from the caller's arrays: copied in
                self.assertEqual(copies.call_count, 4)
            self.assertEqual((got[0].tobytes(), got[1].tobytes()), (want.out.tobytes(), want.lse.tobytes()))
            # A later request writes over them (its q from the segment's start).
            s.attend_stacked(0, twins, q + 1)
            self.assertTrue(np.array_equal(qi, q + 1))
        for sid in names:
            self.assertEqual(self.kv.get_session(sid)["ownTokens"], [1, 0])
        with self.kv.open_stream() as s:  # no segment: fresh arrays, sent as bytes
            qi, ki, vi, pi = s.stacked_inputs(0, names, (Q, D), np.float32)
            self.assertTrue(qi.flags.owndata)
            self.assertIsNone(ki)
            self.assertIsNone(pi)

    def test_without_a_segment_or_room_the_same_answers_go_as_bytes(self):
        names = self.open(3)
        q = self.arrays(3)[0]
        with self.kv.open_stream(shm=1 << 20) as s:
            want = s.attend_stacked(0, names, q)
            want = (want.out.copy(), want.lse.copy())
        for opts in ({}, {"shm": 4096}):  # no segment; a segment too small for 3 x (1 KB q + 1 KB out)
            with self.kv.open_stream(**opts) as s:
                got = s.attend_stacked(0, names, q)
                self.assertIsInstance(got, Stacked)
                self.assertEqual((got.out.tobytes(), got.lse.tobytes()), (want[0].tobytes(), want[1].tobytes()), opts)
                self.assertTrue(got.out.flags.owndata or got.out.base is not None)
                self.assertIsInstance(got.ms, float)

    def open(self, n):
        made = [self.kv.create_session(MODEL, documents=[self.doc])["id"] for _ in range(n)]
        type(self).sessions.extend(made)
        return made


if __name__ == "__main__":
    unittest.main()
