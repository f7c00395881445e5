"""kvrecall.lean, the stream attend's common case: its request frames carry
the same request as kvrecall.wire's packing (tensors' data at multiples of
4), its answer layouts read exactly what msgpack decodes and nothing of
another form, and over a real server its answers are bit-identical to
HTTP's across forms, id widths and error answers.

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import struct
import sys
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import Client, KvrecallError, model_shape  # noqa: E402
from kvrecall.client import attend_result  # noqa: E402
from kvrecall.lean import Layout, Plan, plan_key  # noqa: E402
from kvrecall.wire import attend_fields, attend_parts  # noqa: E402
from test_tensor_alignment import _data_offsets, _join  # noqa: E402


def _payload(frame):
    """A client frame's payload, its header checked: FIN, binary, the zero key, the length right."""
    assert frame[0] == 0x82 and frame[1] & 0x80, frame[:2]
    n, at = frame[1] & 0x7F, 2
    if n == 126:
        n, at = struct.unpack("!H", frame[2:4])[0], 4
    elif n == 127:
        n, at = struct.unpack("!Q", frame[2:10])[0], 10
    assert frame[at : at + 4] == b"\0\0\0\0"
    assert len(frame) == at + 4 + n, (len(frame), at, n)
    return frame[at + 4 :]


class PlanFrames(unittest.TestCase):
    def test_frames_carry_the_general_packings_request(self):
        rng = np.random.default_rng(5)
        packer = msgpack.Packer(use_bin_type=True)
        cases = 0
        for q_heads, kv_heads, d, q_dtype in [(32, 8, 128, np.float32), (32, 8, 128, np.float16), (3, 1, 5, np.float32), (6, 3, 7, np.float16), (1, 1, 1, np.float32)]:
            for layer in (0, 5, 200, 70000):
                for session in ("s", "ab" * 9, str(uuid.uuid4())):
                    for extra in ({}, {"scale": 0.125}, {"position": 3}, {"position": 0, "scale": 2.5, "out_dtype": "f16"}, {"out_dtype": "f32"}):
                        q = rng.standard_normal((q_heads, d)).astype(q_dtype)
                        with_kv = "position" in extra or layer % 2 == 0
                        k = rng.standard_normal((kv_heads, d)).astype(np.float16 if layer % 3 else np.float32) if with_kv else None
                        v = rng.standard_normal((kv_heads, d)).astype(np.float16) if with_kv else None
                        scale, position, out_dtype = extra.get("scale"), extra.get("position"), extra.get("out_dtype")
                        key = plan_key(session, layer, q, k, v, scale, position, out_dtype)
                        self.assertIsNotNone(key)
                        plan = Plan(packer, session, layer, q, k, v, scale, position, out_dtype)
                        for id_, pos in ((1, 0), (200, 70_000), (70_000, 5), (0xFFFFFFFF, 0xFFFFFFFF)):
                            pos = pos if position is not None else None
                            sc = None if scale is None else scale * id_
                            frame = _join(plan.parts(id_, q, k, v, sc, pos))
                            self.assertEqual(len(frame), plan.nbytes)
                            body = _payload(frame)
                            want = _join(attend_parts(packer, id_, session, layer, attend_fields(q, k, v, sc, pos, None, None, None, out_dtype)))
                            self.assertEqual(msgpack.unpackb(body, raw=False), msgpack.unpackb(want, raw=False))
                            offsets = _data_offsets(body)
                            self.assertEqual(len(offsets), 3 if with_kv else 1)
                            self.assertEqual([o % 4 for o in offsets], [0] * len(offsets))
                            cases += 1
        self.assertEqual(cases, 5 * 4 * 3 * 5 * 4)

    def test_what_takes_the_general_path(self):
        q = np.zeros((4, 8), np.float32)
        kv = np.zeros((2, 8), np.float16)
        self.assertIsNotNone(plan_key("s", 0, q, kv, kv, None, 7, None))
        for args in [
            ("s", 0, q.astype(np.float64), kv, kv, None, 7, None),  # q to convert
            ("s", 0, np.zeros((8, 4), np.float32).T, kv, kv, None, 7, None),  # q not contiguous
            ("s", 0, q.astype(">f4"), kv, kv, None, 7, None),  # big-endian q
            ("s", 0, q, kv, None, None, 7, None),  # k without v: general's error
            ("s", 0, q, None, None, None, 7, None),  # position without k: general's error
            ("s", 0, q, kv.astype(np.float64), kv, None, 7, None),  # k to convert
            ("s", 0, q, kv, kv, None, -1, None),  # a position uint32 cannot hold
            ("s", 0, q, kv, kv, None, 1 << 32, None),
            ("s", 0, q, kv, kv, None, np.int64(7), None),  # packed by the general path as int
            ("s", 0, q.tolist(), None, None, None, None, None),
            (7, 0, q, None, None, None, None, None),  # session not a str
            ("s", np.int32(0), q, None, None, None, None, None),
        ]:
            self.assertIsNone(plan_key(*args), args)


def _answer(id_, out, lse, stats, pad_keys=True, **more):
    """An attend answer packed as the server does: {id, out, lse, stats}, out's data key padded (when asked)
    so that its data starts at a multiple of 4 after any id width."""
    def t(a, dtype):
        return {"dtype": dtype, "shape": list(a.shape), "data": a.tobytes()}

    body = msgpack.packb({"id": id_, "out": t(out, "f16" if out.dtype == np.float16 else "f32"), "lse": t(lse, "f32"), **more, "stats": stats}, use_bin_type=True)
    if pad_keys:
        at = body.index(b"\xa4data")
        pad = -(at + 5 + {0xC4: 2, 0xC5: 3, 0xC6: 5}[body[at + 5]]) % 4
        body = body[:at] + [b"\xa4", b"\xd9\x04", b"\xda\x00\x04", b"\xdb\x00\x00\x00\x04"][pad] + body[at + 1 :]
    return body


def _id_end(data):
    t = data[4]
    return 5 if t < 0x80 else {0xCC: 6, 0xCD: 7, 0xCE: 9}[t]


class LayoutReads(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(9)

    def answer(self, id_, half=False, **kw):
        out = self.rng.standard_normal((4, 6)).astype(np.float16 if half else np.float32)
        lse = self.rng.standard_normal(4).astype(np.float32)
        stats = {"tokens": int(self.rng.integers(0, 1 << 20)), "ms": float(self.rng.random()), "backend": "cpu"}
        return memoryview(bytearray(_answer(id_, out, lse, stats, **kw)))

    def learn(self, data):
        return Layout.learn(data, _id_end(data), msgpack.unpackb(data, raw=False, strict_map_key=False))

    def test_reads_what_msgpack_decodes(self):
        for id_ in (1, 127, 200, 300, 70_000):
            for half in (False, True):
                lay = self.learn(self.answer(id_, half))
                self.assertIsNotNone(lay)
                for _ in range(20):
                    data = self.answer(id_ + 0, half)
                    got = lay.read(data, _id_end(data))
                    want = attend_result(msgpack.unpackb(data, raw=False, strict_map_key=False))
                    self.assertEqual((got.out.dtype, got.out.shape, got.out.tobytes()), (want.out.dtype, want.out.shape, want.out.tobytes()))
                    self.assertEqual((got.lse.dtype, got.lse.tobytes()), (want.lse.dtype, want.lse.tobytes()))
                    self.assertEqual(got.stats, want.stats)
                    # The caller's own arrays: the buffer written over leaves them as they were.
                    self.assertTrue(serve.owned(got.out) and serve.owned(got.lse))
                    before = got.out.tobytes()
                    data[:] = b"\0" * len(data)
                    self.assertEqual(got.out.tobytes(), before)

    def test_any_other_form_is_not_read(self):
        data = self.answer(300)
        lay = self.learn(data)
        end, n = _id_end(data), len(data)
        payload = set(range(lay.out_at, lay.out_at + lay.out_n)) | set(range(lay.lse_at, lay.lse_at + lay.lse_n)) | set(range(lay.stats_at, n))
        for i in range(end, n):
            if i in payload:
                continue
            changed = bytearray(data)
            changed[i] ^= 0x01
            self.assertIsNone(lay.read(memoryview(changed), end), f"byte {i}")
        self.assertIsNone(lay.read(memoryview(bytearray(data) + b"\xc0"), end))  # a byte past stats' map
        self.assertIsNone(lay.read(data[:-1], end))  # stats cut short
        other = self.answer(300, half=True)  # out in another dtype
        self.assertIsNone(lay.read(other, _id_end(other)))
        error = memoryview(msgpack.packb({"id": 300, "error": {"code": "invalid", "message": "x" * 200}}))
        self.assertIsNone(lay.read(error, 5 + 2))

    def test_forms_not_learned(self):
        self.assertIsNone(self.learn(self.answer(3, selection=[{"dtype": "i32", "shape": [1], "data": b"\0" * 4}])))
        self.assertIsNone(self.learn(memoryview(msgpack.packb({"id": 3, "error": {"code": "invalid", "message": "m"}}))))
        data = memoryview(msgpack.packb({"id": 3, "out": {"dtype": "f32", "shape": [1], "data": b"\0" * 4}, "lse": {"dtype": "f32", "shape": [1], "data": b"\0" * 4}, "stats": 5}))
        self.assertIsNone(self.learn(data))  # stats not a map


@serve.needs_server
class LeanStream(unittest.TestCase):
    Q, KV, D, DOC = 8, 2, 64, 40

    @classmethod
    def setUpClass(cls):
        cls.server = serve.Target()
        cls.kv = Client(cls.server.url, token=cls.server.token, timeout=60)
        cls.model = model_shape(1, cls.Q, cls.KV, cls.D, dtype="f16")
        cls.rng = np.random.default_rng(21)
        cls.doc = "py-lean-" + uuid.uuid4().hex[:8]
        k = [cls.rng.standard_normal((cls.KV, cls.DOC, cls.D)).astype(np.float16)]
        cls.kv.push_document(cls.doc, cls.model, k, [k[0][:, ::-1].copy()])
        cls.sessions = []

    @classmethod
    def tearDownClass(cls):
        for sid in cls.sessions:
            cls.kv.delete_session(sid)
        cls.kv.delete_document(cls.doc)
        cls.kv.close()
        cls.server.stop()

    def session(self):
        sid = self.kv.create_session(self.model, documents=[self.doc])["id"]
        self.sessions.append(sid)
        return sid

    def test_bit_identical_to_http_across_forms_id_widths_and_errors(self):
        a, b = self.session(), self.session()
        with self.kv.open_stream() as s:
            # Ids from 120: answers' ids of 1, 2 and 3 bytes (each width its own layout), then past 65535 (5).
            s._next_id = 120
            for i in range(24):
                if i == 16:
                    s._next_id = 65_530
                q = self.rng.standard_normal((self.Q, self.D)).astype(np.float16 if i % 3 == 1 else np.float32)
                step = {"q": q, "k": self.rng.standard_normal((self.KV, self.D)).astype(np.float16), "v": self.rng.standard_normal((self.KV, self.D)).astype(np.float16), "position": i}
                if i % 3 == 1:
                    step["out_dtype"] = "f16"
                if i % 4 == 2:
                    step["scale"] = 0.05 + i / 100
                got = s.attend(b, 0, **step)
                want = self.kv.attend(a, 0, **step)
                self.assertEqual((got.out.dtype, got.out.tobytes(), got.lse.tobytes()), (want.out.dtype, want.out.tobytes(), want.lse.tobytes()), i)
                self.assertEqual(got.stats["tokens"], self.DOC + 1 + i)
                self.assertTrue(serve.owned(got.out) and serve.owned(got.lse))
                # q alone (no append), and error answers between: typed, the stream goes on.
                q_only = s.attend(b, 0, step["q"])
                self.assertEqual(q_only.out.tobytes(), self.kv.attend(a, 0, step["q"]).out.tobytes())
                if i % 5 == 4:
                    with self.assertRaises(KvrecallError) as e:
                        s.attend(b, 0, **{**step, "position": 0})  # already held
                    self.assertEqual((e.exception.status, e.exception.code), (409, "conflict"))
                    with self.assertRaises(KvrecallError) as e:
                        s.attend("no-such-session", 0, step["q"])
                    self.assertEqual(e.exception.status, 404)
            self.assertFalse(s.closed)
            # The lean path did the steps: plans made and answer layouts learned for each id width met.
            learned = {w for plan in s._plans.values() for w, lay in enumerate(plan.answers) if lay}
            self.assertEqual(learned, {5, 6, 7, 9})


if __name__ == "__main__":
    unittest.main()
