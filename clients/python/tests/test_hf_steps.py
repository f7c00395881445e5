"""kvrecall.hf_steps, the transformers adapter's decode steps (no torch
needed), against a real server on 127.0.0.1 with its segments in /dev/shm:
a running batch's step sent stacked through the stream's segment answers
bit for bit as the byte batch the adapter sent before (and still sends
with stacked=False), f32, f16 and bf16 alike, q, k and v written in the
segment in place; the segment is sized by segment_bytes (the stacked
plan's exact layout) and attached anew when the batch grows; where the
segment is refused (the server's --shm-dir off, a directory that is not
there), nothing is sent and the caller sends the byte batch; a scale
other than the server's default goes in the stacked frame too; a lost connection resends the step once and
rows that went through the first time are asked again without their
token, never appended twice; a row's error raises.

    python3 -m unittest discover -s clients/python/tests -v
"""

import math
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import KvrecallError, from_bf16_bits, model_shape, to_bf16_bits  # noqa: E402
from kvrecall.client import attend_body  # noqa: E402
from kvrecall.hf_steps import DecodeSteps, segment_bytes, stacked_bytes  # noqa: E402
from kvrecall.shm import Segment  # noqa: E402
from kvrecall.stacked import StackedPlan  # noqa: E402

# Odd sizes: 6 q heads over 3 kv heads, head_dim 7 (a row of 14 bytes in 16 bits), 3 rows.
Q, KV, D, LAYERS, DOC, N = 6, 3, 7, 2, 40, 3
# The adapter's scale (transformers: head_dim ** -0.5), a double one ulp off the server's 1 / sqrt(d).
SCALE = D**-0.5
assert SCALE != 1 / math.sqrt(D)


def as_stored(x, kv):
    """float32 values as a `kv` ("f16"/"bf16") session stores them, as float32."""
    return from_bf16_bits(to_bf16_bits(x)) if kv == "bf16" else x.astype(np.float16).astype(np.float32)


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
class SegmentSize(unittest.TestCase):
    def test_stacked_bytes_is_the_stacked_plans_layout(self):
        """A segment of exactly stacked_bytes holds the plan; 4 bytes fewer do not."""
        f32, f16 = np.dtype("<f4"), np.dtype("<f2")
        cases = 0
        for n in (1, 3, 8, 33):
            for qs, ks in (((3, 5), (1, 5)), ((6, 10), (3, 10)), ((32, 128), (8, 128))):
                for qd, kd, od in ((f32, f16, None), (f16, f16, "f16"), (f32, f32, "bf16"), (f32, f32, None)):
                    need = stacked_bytes(n, qs, qd, ks, kd, od)
                    self.assertEqual(need % 4, 0)
                    for size, fits in ((need, True), (need - 4, False)):
                        seg = Segment(size)
                        try:
                            plan = StackedPlan(seg, 0, tuple(f"s{i}" for i in range(n)), qd, qs, kd, ks, True, od)
                            self.assertEqual(plan.fits, fits, (n, qs, qd, kd, od, size))
                        finally:
                            seg.close()
                    # The segment attached: room for the next power of 2 rows, at least 8, in whole 64 KiB.
                    size = segment_bytes(n, qs, qd, ks, kd, od)
                    rows = max(8, 1 << (n - 1).bit_length())
                    self.assertEqual(size % (1 << 16), 0)
                    self.assertGreaterEqual(size, stacked_bytes(rows, qs, qd, ks, kd, od))
                    self.assertLess(size - stacked_bytes(rows, qs, qd, ks, kd, od), 1 << 16)
                    cases += 1
        self.assertEqual(cases, 48)


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
@serve.needs_server
class HfSteps(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(21)
        cls.models = {kv: model_shape(LAYERS, Q, KV, D, dtype=kv) for kv in ("f16", "bf16")}
        cls.doc = {kv: cls.document("py-hf-steps-", cls.models[kv], KV, DOC, D, LAYERS, dtype=kv) for kv in ("f16", "bf16")}

    def open(self, kv="f16", n=N):
        sids = [self.kv.create_session(self.models[kv], documents=[self.doc[kv]])["id"] for _ in range(n)]
        self.sessions.extend(sids)
        return sids

    def batch(self, n=N, kv="f16"):
        """A step's q [n, Q, D] and new k, v [n, KV, D] as float32 values the session stores exactly."""
        q = (self.rng.standard_normal((n, Q, D)) * 1.5).astype(np.float32)
        k = as_stored(self.rng.standard_normal((n, KV, D)).astype(np.float32), kv)
        v = as_stored(self.rng.standard_normal((n, KV, D)).astype(np.float32), kv)
        return q, k, v

    def stacked(self, steps, layer, sids, positions, q, k, v, kv, half, scale=SCALE):
        """One step through DecodeSteps.attend_stacked as the adapter sends it: out (a copy) or None.
        `half`: q and out in the session's 16-bit dtype (f16: float16 arrays; bf16: q as float32, out bf16 bits)."""
        q_dt = np.float16 if half and kv == "f16" else np.float32
        kv_dt = np.float16 if kv == "f16" else np.float32
        written = []

        def fill(qa, ka, va, kv_, qkv):
            # Through the joined arrays where given (as the adapter's one device-to-host copy does).
            if qkv is not None:
                qkv[:] = np.concatenate([q.astype(qkv.dtype).ravel(), k.astype(qkv.dtype).ravel(), v.astype(qkv.dtype).ravel()])
            elif kv_ is not None:
                qa[:] = q
                kv_[:] = np.concatenate([k.astype(kv_.dtype).ravel(), v.astype(kv_.dtype).ravel()])
            else:
                qa[:], ka[:], va[:] = q, k, v
            written.append((qa, ka, va))
            self.joined = (kv_ is not None, qkv is not None)

        out = steps.attend_stacked(layer, sids, positions, fill, (Q, D), q_dt, (KV, D), kv_dt, kv if half else None, scale)
        self.written = written
        return None if out is None else out.copy()

    def batched(self, steps, layer, sids, positions, q, k, v, kv, half, scale=SCALE):
        """The same step as the adapter's byte batch (hf.py _step_batch): out [n, Q, D]."""
        bits = (lambda x: to_bf16_bits(x)) if kv == "bf16" else (lambda x: x.astype(np.float16))
        wire = {"q_dtype": kv, "out_dtype": kv} if half else {}
        qw = bits(q) if half else q
        rs = steps.attend_batch(layer, [
            {"session": s, "q": qw[i], "k": bits(k)[i], "v": bits(v)[i], "scale": scale, "position": positions[i], "dtype": kv, **wire}
            for i, s in enumerate(sids)
        ])
        return np.stack([r.out for r in rs])

    def test_stacked_answers_as_the_byte_batch(self):
        # Whether k and v, and q, k and v lie end to end (one copy fills them): 3 rows of f16 k are 126 bytes
        # (padded to 128), 4 rows 168; q in float32 is of another dtype than f16 k and v.
        joined = {(3, "f16", False): (False, False), (3, "f16", True): (False, False), (4, "f16", False): (True, False), (4, "f16", True): (True, True)}
        for n in (N, N + 1):
            for kv in ("f16", "bf16"):
                for half in (False, True):
                    with self.subTest(n=n, kv=kv, half=half):
                        a, b = self.open(kv, n), self.open(kv, n)
                        stacked, plain = DecodeSteps(self.kv), DecodeSteps(self.kv, stacked=False)
                        try:
                            for pos in range(3):
                                for layer in range(LAYERS):
                                    q, k, v = self.batch(n, kv)
                                    if half:  # q as the model holds it, in its 16-bit dtype
                                        q = as_stored(q, kv)
                                    got = self.stacked(stacked, layer, a, [pos] * n, q, k, v, kv, half)
                                    self.assertIsNotNone(got, stacked.shm_refused)
                                    self.assertEqual(self.joined, joined.get((n, kv, half), (True, True)))
                                    # Written in the segment in place: the stacked call copied none of them in.
                                    for arr in self.written[0]:
                                        self.assertTrue(np.shares_memory(arr, stacked.stream.shm.u8))
                                    self.assertIsNone(self.stacked(plain, layer, b, [pos] * n, q, k, v, kv, half))
                                    want = self.batched(plain, layer, b, [pos] * n, q, k, v, kv, half)
                                    self.assertEqual(got.dtype, want.dtype)
                                    self.assertEqual(got.tobytes(), want.tobytes(), (pos, layer))
                            self.assertIsNone(plain.stream.shm)
                            for x, y in zip(a, b):
                                self.assertEqual(self.kv.get_session(x)["ownTokens"], [3, 3])
                                self.assertEqual(self.kv.get_session(y)["ownTokens"], [3, 3])
                                # What the server counted for the session is the same either way (hf.py's sync_stats reads it).
                                sx, sy = self.kv.get_session(x)["stats"], self.kv.get_session(y)["stats"]
                                self.assertEqual((sx["steps"], sx["selected"], sx["scanned"]), (sy["steps"], sy["selected"], sy["scanned"]))
                        finally:
                            stacked.close()
                            plain.close()

    def test_the_segment_grows_with_the_batch(self):
        steps = DecodeSteps(self.kv)
        try:
            # 2 rows: a segment for 8 (64 KiB); 200 rows (~90 KB) need a larger one.
            small, large, refs = self.open(n=2), self.open(n=200), self.open(n=2)

            def small_step(pos):
                q, k, v = self.batch(2)
                got = self.stacked(steps, 0, small, [pos, pos], q, k, v, "f16", False)
                self.assertTrue(np.shares_memory(self.written[0][0], steps.stream.shm.u8))
                for i in range(2):
                    want = self.kv.attend(refs[i], 0, q[i], k=k[i].astype(np.float16), v=v[i].astype(np.float16), scale=SCALE, position=pos)
                    self.assertEqual(got[i].tobytes(), want.out.tobytes(), (pos, i))

            small_step(0)
            stream, before = steps.stream, steps.stream.shm.nbytes
            self.assertEqual(before, segment_bytes(2, (Q, D), np.float32, (KV, D), np.float16, None))
            self.assertGreater(stacked_bytes(200, (Q, D), np.float32, (KV, D), np.float16, None), before)
            q, k, v = self.batch(200)
            got = self.stacked(steps, 0, large, [0] * 200, q, k, v, "f16", False)
            self.assertIsNotNone(got)
            self.assertIs(steps.stream, stream)  # attached anew on the same stream
            self.assertEqual(stream.shm.nbytes, segment_bytes(200, (Q, D), np.float32, (KV, D), np.float16, None))
            self.assertGreater(stream.shm.nbytes, before)
            ref = self.open(n=1)[0]
            want = self.kv.attend(ref, 0, q[199], k=k[199].astype(np.float16), v=v[199].astype(np.float16), scale=SCALE, position=0)
            self.assertEqual(got[199].tobytes(), want.out.tobytes())
            # The small batch again: written in the new segment, not the old one (which the server no longer reads).
            small_step(1)
            small_step(2)
        finally:
            steps.close()

    def test_another_scale_goes_stacked(self):
        # Not the server's default 1/sqrt(d): the stacked frame carries it (before, such a step went as bytes).
        sids = [self.kv.create_session(self.models["f16"])["id"] for _ in range(3 * N)]
        stacked, batched, default = sids[:N], sids[N : 2 * N], sids[2 * N :]
        steps = DecodeSteps(self.kv)
        try:
            for pos in range(2):  # at the second step each row attends two tokens: the scale tells
                q, k, v = self.batch(N)
                got = self.stacked(steps, 0, stacked, [pos] * N, q, k, v, "f16", False, 0.25)
                self.assertIsNotNone(got)
                self.assertIsNotNone(steps.stream.shm)
                want = self.batched(steps, 0, batched, [pos] * N, q, k, v, "f16", False, 0.25)
                self.assertEqual(got.tobytes(), want.tobytes())
                other = self.batched(steps, 0, default, [pos] * N, q, k, v, "f16", False)
            self.assertNotEqual(other.tobytes(), want.tobytes())  # the scale sent is the one used
        finally:
            steps.close()
            for sid in sids:
                self.kv.delete_session(sid)

    def test_no_segment_sends_nothing(self):
        cases = [("a directory that is not there", dict(shm_dir="/nonexistent-kvrecall-dir"), SCALE, "cannot make a shared-memory file")]
        server = None
        if not serve.available():
            server = serve.Server(extra=["--shm-dir", "off"])
        try:
            for why, opts, scale, refused in cases + ([("--shm-dir off", {"server": server}, SCALE, "shared memory is off")] if server else []):
                with self.subTest(why):
                    from kvrecall import Client

                    kv = Client(server.url) if "server" in opts else self.kv
                    sid = kv.create_session(self.models["f16"])["id"]
                    steps = DecodeSteps(kv, shm_dir=opts.get("shm_dir", "/dev/shm"))
                    try:
                        q, k, v = self.batch(1)
                        self.assertIsNone(self.stacked(steps, 0, [sid], [0], q, k, v, "f16", False, scale))
                        self.assertEqual(kv.get_session(sid)["ownTokens"], [0, 0])  # nothing sent
                        if refused:
                            self.assertRegex(steps.shm_refused, refused)
                        else:
                            self.assertIsNone(steps.stream)  # not even opened
                        # The byte batch goes on the same stream.
                        out = self.batched(steps, 0, [sid], [0], q, k, v, "f16", False)
                        self.assertEqual(kv.get_session(sid)["ownTokens"], [1, 0])
                        self.assertEqual(out.shape, (1, Q, D))
                    finally:
                        steps.close()
                        kv.delete_session(sid)
                        if kv is not self.kv:
                            kv.close()
        finally:
            if server:
                server.stop()

    def test_lost_connection_resends_once_and_appends_no_token_twice(self):
        sids, refs = self.open(), self.open()
        steps = DecodeSteps(self.kv)
        try:
            want = []
            for pos in range(4):
                q, k, v = self.batch()
                want.append((q, k, v, np.stack([self.kv.attend(r, 0, q[i], k=k[i].astype(np.float16), v=v[i].astype(np.float16), scale=SCALE, position=pos).out for i, r in enumerate(refs)])))

            def step(pos):
                q, k, v, out = want[pos]
                got = self.stacked(steps, 0, sids, [pos] * N, q, k, v, "f16", False)
                self.assertEqual(got.tobytes(), out.tobytes(), pos)

            step(0)
            # Step 1 of row 1 reaches the server, then the connection is lost before the batch is sent.
            q, k, v, _ = want[1]
            ws = steps.stream.ws
            ws.send_binary(msgpack.packb({"id": 99, "session": sids[1], "layer": 0, **attend_body(q[1], k=k[1].astype(np.float16), v=v[1].astype(np.float16), scale=SCALE, position=1)}, use_bin_type=True))
            ws.recv()
            ws.sock.shutdown(2)
            step(1)  # resent: rows 0 and 2 appended now, row 1 asked again without its token
            self.assertIsNot(steps.stream.ws, ws)
            # The whole batch went through and its answer was lost.
            stream = steps.stream
            real = stream.attend_stacked

            def lost(*args, **kw):
                real(*args, **kw)
                stream.ws.sock.shutdown(2)
                raise ConnectionError("answer lost")

            stream.attend_stacked = lost
            step(2)
            self.assertIsNot(steps.stream, stream)
            # Lost before anything was sent: resent as it is.
            steps.stream.ws.sock.shutdown(2)
            step(3)
            for sid in sids:
                self.assertEqual(self.kv.get_session(sid)["ownTokens"], [4, 0])
            # A row whose step fails raises its error; the others are answered (and appended).
            q, k, v = self.batch()
            with self.assertRaises(KvrecallError) as cm:
                self.stacked(steps, 0, sids, [4, 6, 4], q, k, v, "f16", False)
            self.assertEqual((cm.exception.status, cm.exception.code), (409, "conflict"))
            self.assertEqual([self.kv.get_session(s)["ownTokens"][0] for s in sids], [5, 4, 5])
        finally:
            steps.close()


if __name__ == "__main__":
    unittest.main()
