"""16-bit q and out (`q_dtype`, `out_dtype`) against a real server on
127.0.0.1: a q sent in 16 bits answers exactly as the float32 q holding the
same values; out in the model's dtype is the float32 answer rounded to
nearest even (numpy's float16 cast, the client's own bf16 rounding), the
same over attend, attend_batch and the stream; a wrong out dtype is refused
(422) and changes nothing.

The server: KVRECALL_URL (and KVRECALL_TOKEN) when set, else this
checkout's (tests/serve.py), else skipped.
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import KvrecallError, from_bf16_bits, model_shape, to_bf16_bits  # noqa: E402


Q, KV, D, LAYERS, DOC = 8, 2, 32, 2, 300


@serve.needs_server
class HalfWire(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(11)
        cls.half_docs = {dt: cls.document(f"py-half-{dt}-", model_shape(LAYERS, Q, KV, D, dtype=dt), KV, DOC, D, LAYERS, array_dtype=np.float32, dtype=dt) for dt in ("f16", "bf16")}

    def session(self, dt):
        sid = self.kv.create_session(model_shape(LAYERS, Q, KV, D, dtype=dt), documents=[self.half_docs[dt]], method="exact")["id"]
        self.sessions.append(sid)
        return sid

    def step(self, dt, s):
        """q rounded to dt (its wire form and the same values as float32) and one token's k, v."""
        raw = (self.rng.standard_normal((Q, D)) * 1.5).astype(np.float32)
        if dt == "f16":
            q16 = raw.astype(np.float16)
            q32 = q16.astype(np.float32)
        else:
            q16 = to_bf16_bits(raw)
            q32 = from_bf16_bits(q16)
        k = self.rng.standard_normal((KV, D)).astype(np.float32)
        v = self.rng.standard_normal((KV, D)).astype(np.float32)
        return q16, q32, {"k": k, "v": v, "dtype": dt, "position": s}

    def rounded(self, out, dt):
        return out.astype(np.float16) if dt == "f16" else to_bf16_bits(out)

    def test_half_q_and_out_over_every_route(self):
        for dt in ("f16", "bf16"):
            with self.subTest(dtype=dt), self.kv.open_stream() as stream:
                wide, half_q, single, batched, streamed, stream_batched = (self.session(dt) for _ in range(6))
                for s in range(3):
                    q16, q32, kv = self.step(dt, s)
                    ref = self.kv.attend(wide, 0, q32, **kv)
                    # q in 16 bits: exactly the float32 q of the same values.
                    r = self.kv.attend(half_q, 0, q16, q_dtype=dt, **kv)
                    self.assertEqual((r.out.tobytes(), r.lse.tobytes()), (ref.out.tobytes(), ref.lse.tobytes()))
                    # out in 16 bits: the float32 answer rounded, the same on every route.
                    half = {"q_dtype": dt, "out_dtype": dt, **kv}
                    answers = [
                        self.kv.attend(single, 0, q16, **half),
                        serve.ok(self.kv.attend_batch(0, [{"session": batched, "q": q16, **half}])[0]),
                        stream.attend(streamed, 0, q16, **half),
                        serve.ok(stream.attend_batch(0, [{"session": stream_batched, "q": q16, **half}])[0]),
                    ]
                    # A batch's list carries the server's time for the whole batch.
                    batch_lists = [self.kv.attend_batch(0, [{"session": half_q, "q": q16, "q_dtype": dt}]), stream.attend_batch(0, [{"session": half_q, "q": q16, "q_dtype": dt}])]
                    for rs in batch_lists:
                        self.assertIsInstance(rs.ms, float)
                        self.assertGreaterEqual(rs.ms, serve.ok(rs[0]).stats["ms"])
                    expected = self.rounded(ref.out, dt)
                    for a in answers:
                        self.assertEqual(a.out.dtype, np.float16 if dt == "f16" else np.uint16)
                        self.assertEqual(a.out.shape, (Q, D))
                        np.testing.assert_array_equal(a.out.view(np.uint16), expected.view(np.uint16))
                        self.assertEqual(a.lse.tobytes(), ref.lse.tobytes())

    def test_wrong_out_dtype_is_refused_and_changes_nothing(self):
        a = self.session("f16")
        q16, _, kv = self.step("f16", 0)
        for bad in ("bf16", "f64", "float16"):
            with self.assertRaises(KvrecallError) as cm:
                self.kv.attend(a, 0, q16, out_dtype=bad, **kv)
            self.assertEqual((cm.exception.status, cm.exception.code), (422, "invalid"))
            with self.kv.open_stream() as stream:
                with self.assertRaises(KvrecallError) as cm:
                    stream.attend(a, 0, q16, out_dtype=bad, **kv)
                self.assertEqual(cm.exception.status, 422)
            (r,) = self.kv.attend_batch(0, [{"session": a, "q": q16, "out_dtype": bad, **kv}])
            self.assertEqual((r.status, r.code), (422, "invalid"))
        # Nothing was appended: position 0 is still the next.
        self.assertEqual(self.kv.attend(a, 0, q16, out_dtype="f16", **kv).stats["tokens"], DOC + 1)


if __name__ == "__main__":
    unittest.main()
