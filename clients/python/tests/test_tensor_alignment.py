"""Tensor data at 4-byte aligned offsets: the attend bodies the client
packs (HTTP single and batch, stream frames) put every tensor's data at an
offset of the message that is a multiple of 4, for any shape, layer,
session id and optional field; and a real server reads their f32 q in place
(its /metrics counter kvrecall_f32_unaligned_copies_total does not move),
while the same attend sent as a plain msgpack dict (q's data at offset 41)
is copied and counted.

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import re
import sys
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import Client, model_shape  # noqa: E402
from kvrecall.client import attend_body  # noqa: E402
from kvrecall.wire import attend_fields, attend_parts, batch_parts, http_attend_parts  # noqa: E402


def _join(parts):
    return b"".join(p if isinstance(p, (bytes, bytearray)) else memoryview(p).cast("B").tobytes() for p in parts)


def _data_offsets(body):
    """Where each tensor's data starts in a msgpack body, found by walking it (not by the packer's arithmetic)."""
    found = []

    def walk(at):
        tag = body[at]
        if tag <= 0x7F or tag >= 0xE0 or tag in (0xC0, 0xC2, 0xC3):
            return at + 1
        if 0x80 <= tag <= 0x8F or tag in (0xDE, 0xDF):
            n, at = (tag & 0x0F, at + 1) if tag <= 0x8F else (int.from_bytes(body[at + 1 : at + (3 if tag == 0xDE else 5)], "big"), at + (3 if tag == 0xDE else 5))
            for _ in range(n):
                key_at = at
                at = walk(at)
                key = msgpack.unpackb(body[key_at:at])
                if key == "data" and body[at] in (0xC4, 0xC5, 0xC6):
                    found.append(at + {0xC4: 2, 0xC5: 3, 0xC6: 5}[body[at]])
                at = walk(at)
            return at
        if 0x90 <= tag <= 0x9F or tag in (0xDC, 0xDD):
            n, at = (tag & 0x0F, at + 1) if tag <= 0x9F else (int.from_bytes(body[at + 1 : at + (3 if tag == 0xDC else 5)], "big"), at + (3 if tag == 0xDC else 5))
            for _ in range(n):
                at = walk(at)
            return at
        if 0xA0 <= tag <= 0xBF:
            return at + 1 + (tag & 0x1F)
        sizes = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
        if tag in sizes:
            w = sizes[tag]
            return at + 1 + w + int.from_bytes(body[at + 1 : at + 1 + w], "big")
        fixed = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
        return at + 1 + fixed[tag]

    assert walk(0) == len(body)
    return found


class BodyOffsets(unittest.TestCase):
    """No server: the bodies' own bytes, walked."""

    def test_every_tensor_starts_at_a_multiple_of_4(self):
        rng = np.random.default_rng(3)
        packer = msgpack.Packer(use_bin_type=True)
        cases = 0
        for q_heads, kv_heads, d in [(32, 8, 128), (3, 1, 5), (6, 3, 7), (16, 16, 64), (1, 1, 1), (40, 8, 300)]:
            for layer in (0, 5, 200, 70000):
                for extra in ({}, {"scale": 0.5}, {"position": 3, "returns": ["out", "kv"]}, {"out_dtype": "f16"}):
                    q = rng.standard_normal((q_heads, d)).astype(np.float32)
                    k = rng.standard_normal((kv_heads, d)).astype(np.float16)
                    v = rng.standard_normal((kv_heads, d)).astype(np.float16)
                    with_kv = {"k": k, "v": v} if "position" in extra or layer % 2 == 0 else {}
                    fields = attend_fields(q, **with_kv, **extra)
                    bodies = [
                        _join(http_attend_parts(packer, layer, fields)),
                        _join(attend_parts(packer, 7 + layer, "s" * (1 + layer % 13), layer, fields)),
                    ]
                    steps = [{"session": "x" * n, "q": q, **with_kv, **extra} for n in (1, 2, 3, 4)]
                    bodies += [_join(batch_parts(packer, None, layer, steps)), _join(batch_parts(packer, 300 + layer, layer, steps))]
                    # bf16 and f16 q sent as another dtype: the converted data is aligned too.
                    bodies.append(_join(http_attend_parts(packer, layer, attend_fields(q, q_dtype="bf16"))))
                    for body in bodies:
                        offsets = _data_offsets(body)
                        self.assertGreater(len(offsets), 0)
                        self.assertEqual([o % 4 for o in offsets], [0] * len(offsets), f"shape {q_heads}x{d}, layer {layer}, {extra}")
                        cases += 1
                    # The bodies still decode to the same request: q's values where they belong.
                    self.assertEqual(msgpack.unpackb(bodies[0])["q"]["data"], q.tobytes())
        self.assertEqual(cases, 6 * 4 * 4 * 5)


def _unaligned_copies(kv):
    m = re.search(r"^kvrecall_f32_unaligned_copies_total (\d+)$", kv.metrics(), re.M)
    assert m, "the server's /metrics has no kvrecall_f32_unaligned_copies_total"
    return int(m.group(1))


@serve.needs_server
class ServerReadsInPlace(unittest.TestCase):
    Q, KV, D = 8, 2, 128  # q [8, 128]: msgpack's own packing (and the old client's) put its data at offset 41

    @classmethod
    def setUpClass(cls):
        cls.server = serve.Target()
        cls.kv = Client(cls.server.url, token=cls.server.token, timeout=60)
        cls.model = model_shape(1, cls.Q, cls.KV, cls.D, dtype="f16")
        cls.rng = np.random.default_rng(11)
        cls.doc = "py-align-" + uuid.uuid4().hex[:8]
        k = [cls.rng.standard_normal((cls.KV, 300, cls.D)).astype(np.float16)]
        v = [cls.rng.standard_normal((cls.KV, 300, cls.D)).astype(np.float16)]
        cls.kv.push_document(cls.doc, cls.model, k, v)
        cls.sid = cls.kv.create_session(cls.model, documents=[cls.doc])["id"]

    @classmethod
    def tearDownClass(cls):
        cls.kv.delete_session(cls.sid)
        cls.kv.delete_document(cls.doc)
        cls.kv.close()
        cls.server.stop()

    def q(self):
        return self.rng.standard_normal((self.Q, self.D)).astype(np.float32)

    def kv_token(self):
        return {name: self.rng.standard_normal((self.KV, self.D)).astype(np.float16) for name in ("k", "v")}

    def test_f32_q_is_read_in_place_over_http_and_the_stream(self):
        before = _unaligned_copies(self.kv)
        self.kv.attend(self.sid, 0, self.q())
        self.kv.attend(self.sid, 0, self.q(), **self.kv_token(), returns=["out", "kv"])
        self.kv.attend(self.sid, 0, self.q(), scale=0.3)
        self.assertEqual(len(self.kv.attend_batch(0, [{"session": self.sid, "q": self.q()} for _ in range(3)])), 3)
        self.assertEqual(_unaligned_copies(self.kv) - before, 0, "the server copied an f32 q sent over HTTP")
        with self.kv.open_stream() as stream:
            for i in range(3):
                stream.attend(self.sid, 0, self.q(), scale=0.1 * (i + 1))
            self.assertEqual(len(stream.attend_batch(0, [{"session": self.sid, "q": self.q()} for _ in range(3)])), 3)
        self.assertEqual(_unaligned_copies(self.kv) - before, 0, "the server copied an f32 q sent over the stream")

    def test_a_dict_body_is_copied_and_counted(self):
        # The counter sees the real thing: msgpack's own packing of the same attend leaves q's data unaligned.
        body = {"layer": 0, **attend_body(self.q(), None, None)}
        self.assertNotEqual(_data_offsets(msgpack.packb(body, use_bin_type=True))[0] % 4, 0)
        before = _unaligned_copies(self.kv)
        answer = self.kv._http.call("POST", f"/v1/sessions/{self.sid}/attend", body)
        self.assertIn("out", answer)
        self.assertEqual(_unaligned_copies(self.kv) - before, 1)


if __name__ == "__main__":
    unittest.main()
