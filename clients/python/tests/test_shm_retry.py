"""A refused shared-memory attach is not for the stream's whole life
(kvrecall.shm.AttachRetry, Stream.want_shm), against a real server on
127.0.0.1 whose --shm-total-bytes holds one stream's segment: a second
stream's attach is refused while the first holds it, and its calls go in
bytes, trying the attach again now and then (not at every call) and
refused again; once the first stream closes (the server's
kvrecall_shm_mapped_bytes back to 0) a later call attaches the segment and
goes through it (its out a view of the segment, where the byte path's is
an array of its own), answering bit for bit as the byte path. The
transformers adapter's steps (kvrecall.hf_steps) ask at once when the
batch grows past the size refused, and go stacked again once the cap has
room.

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import re
import sys
import time
import unittest
import urllib.request
import uuid
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import Client, model_shape  # noqa: E402
from kvrecall.hf_steps import DecodeSteps, segment_bytes  # noqa: E402
from kvrecall.shm import AttachRetry  # noqa: E402
from kvrecall.stream import Stream  # noqa: E402

Q, KV, D, DOC, N = 8, 2, 32, 300, 3
MODEL = model_shape(1, Q, KV, D, dtype="f16")
SEGMENT = 64 << 10


def bits(out, lse):
    return out.tobytes(), lse.tobytes()


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
@unittest.skipIf(serve.available(), "no node or no built server")
class RefusedAttach(unittest.TestCase):
    def start(self, cap):
        """A server whose caps (a stream's and all streams') are `cap` bytes, and a client of it."""
        self.server = serve.Server(extra=["--shm-stream-bytes", str(cap), "--shm-total-bytes", str(cap)])
        self.addCleanup(self.server.stop)
        self.kv = Client(self.server.url, timeout=60)
        self.addCleanup(self.kv.close)
        self.rng = np.random.default_rng(int(os.environ.get("KVRECALL_TEST_SEED", "31")))

    def mapped(self):
        """The server's kvrecall_shm_mapped_bytes."""
        with urllib.request.urlopen(self.server.url + "/metrics", timeout=10) as r:
            return int(re.search(r"^kvrecall_shm_mapped_bytes (\d+)$", r.read().decode(), re.M).group(1))

    def until_mapped(self, n):
        """Until the server maps `n` bytes of segments (a closed stream's goes once the server has seen it close), at most 10 s."""
        deadline = time.monotonic() + 10
        while self.mapped() != n and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.mapped(), n)

    def test_a_stream_tries_again_and_gets_its_segment_once_the_cap_has_room(self):
        self.start(SEGMENT)
        doc = "py-retry-" + uuid.uuid4().hex[:8]
        k = [self.rng.standard_normal((KV, DOC, D)).astype(np.float16)]
        self.kv.push_document(doc, MODEL, k, [self.rng.standard_normal((KV, DOC, D)).astype(np.float16)])
        names = [self.kv.create_session(MODEL, documents=[doc])["id"] for _ in range(N)]
        # q alone: nothing is appended, so every call has the same answer; single HTTP attends are the reference.
        q = (self.rng.standard_normal((N, Q, D)) * 1.5).astype(np.float32)
        single = [self.kv.attend(s, 0, q[i]) for i, s in enumerate(names)]
        want = bits(np.stack([r.out for r in single]), np.stack([r.lse for r in single]))

        first = self.kv.open_stream(shm=SEGMENT)
        self.addCleanup(first.close)
        self.assertIsNotNone(first.shm, first.shm_refused)
        self.assertEqual(self.mapped(), SEGMENT)
        with self.kv.open_stream(shm=SEGMENT) as second:
            self.assertIsNone(second.shm)
            self.assertRegex(second.shm_refused, r"--shm-total-bytes")
            with mock.patch.object(second, "attach_shm", wraps=second.attach_shm) as tries:
                # While the first holds the cap: every call in bytes, the attach tried only now and then, refused.
                calls = 4 * AttachRetry.FIRST
                for i in range(calls):
                    got = second.attend_stacked(0, names, q)
                    self.assertEqual(bits(got.out, got.lse), want, i)
                    self.assertIsNone(second.shm)
                self.assertGreaterEqual(tries.call_count, 1)
                self.assertLessEqual(tries.call_count, calls // AttachRetry.FIRST - 1)
                self.assertRegex(second.shm_refused, r"--shm-total-bytes")

                first.close()
                self.until_mapped(0)
                tries.reset_mock()
                for n in range(AttachRetry.LAST + 1):
                    got = second.attend_stacked(0, names, q)
                    self.assertEqual(bits(got.out, got.lse), want, n)
                    if second.shm is not None:
                        break
                # Attached by that call, which went through the segment: its out and lse are views of it.
                self.assertEqual(tries.call_count, 1)
                self.assertEqual(second.shm.nbytes, SEGMENT)
                self.assertIsNone(second.shm_refused)
                self.assertTrue(np.shares_memory(got.out, second.shm.u8) and np.shares_memory(got.lse, second.shm.u8))
                self.assertEqual(self.mapped(), SEGMENT)
                # And stays: the next calls through the segment without another attach; a batch too.
                got = second.attend_stacked(0, names, q)
                self.assertTrue(np.shares_memory(got.out, second.shm.u8))
                self.assertEqual(bits(got.out, got.lse), want)
                rs = second.attend_batch(0, [{"session": s, "q": q[i]} for i, s in enumerate(names)])
                self.assertEqual(bits(np.stack([r.out for r in rs]), np.stack([r.lse for r in rs])), want)
                self.assertEqual(tries.call_count, 1)

    def test_the_adapters_steps_ask_again_when_the_batch_grows_and_go_stacked_once_the_cap_has_room(self):
        shapes = ((Q, D), np.float32, (KV, D), np.float16, None)
        # Sizes: 3 rows take a segment of 64 KiB, 20 rows 128 KiB, 40 rows 192 KiB; the cap holds 256 KiB.
        small, grown, larger = (segment_bytes(n, *shapes) for n in (3, 20, 40))
        self.assertEqual((small, grown, larger), (64 << 10, 128 << 10, 192 << 10))
        cap = 256 << 10
        self.start(cap)
        made = {}

        def sessions(n):
            """n sessions fed by the adapter's steps and n fed the same steps as the byte batch over HTTP."""
            pair = ([self.kv.create_session(MODEL)["id"] for _ in range(n)], [self.kv.create_session(MODEL)["id"] for _ in range(n)])
            made[n] = pair
            return pair

        def step(steps, n, pos):
            """One step of n rows at `pos`: the adapter's out (stacked, or the byte batch it falls back to) and whether it went stacked; checked against the reference sessions' byte batch."""
            sids, refs = made[n]
            q = (self.rng.standard_normal((n, Q, D)) * 1.5).astype(np.float32)
            k, v = (self.rng.standard_normal((n, KV, D)).astype(np.float16) for _ in range(2))

            def fill(qa, ka, va, kv_, qkv):
                qa[:], ka[:], va[:] = q, k, v

            out = steps.attend_stacked(0, sids, [pos] * n, fill, (Q, D), np.float32, (KV, D), np.float16)
            stacked = out is not None
            rows = lambda ss: [{"session": s, "q": q[i], "k": k[i], "v": v[i], "position": pos} for i, s in enumerate(ss)]
            if not stacked:  # as the adapter does (hf.py): the byte batch
                out = np.stack([r.out for r in steps.attend_batch(0, rows(sids))])
            want = np.stack([serve.ok(r).out for r in self.kv.attend_batch(0, rows(refs))])
            self.assertEqual(out.tobytes(), want.tobytes(), (n, pos))
            return stacked

        for n in (3, 20, 40):
            sessions(n)
        holder = self.kv.open_stream(shm=cap)
        self.addCleanup(holder.close)
        self.assertIsNotNone(holder.shm, holder.shm_refused)
        steps = DecodeSteps(self.kv)
        self.addCleanup(steps.close)
        real = Stream.attach_shm
        with mock.patch.object(Stream, "attach_shm", autospec=True, side_effect=real) as tries:
            # Refused (the holder has the cap) and not asked again at every step: in bytes.
            for pos in range(2 * AttachRetry.FIRST):
                self.assertFalse(step(steps, 3, pos))
            self.assertRegex(steps.shm_refused, r"--shm-total-bytes")
            self.assertLessEqual(tries.call_count, 2)
            # The batch grows past the size refused: asked at once (refused again).
            before = tries.call_count
            self.assertFalse(step(steps, 20, 0))
            self.assertEqual(tries.call_count, before + 1)
            self.assertEqual(tries.call_args.args[1], grown)
            # The holder goes: the next growth attaches at once and goes stacked through the segment.
            holder.close()
            self.until_mapped(0)
            before = tries.call_count
            self.assertTrue(step(steps, 40, 0))
            self.assertEqual(tries.call_count, before + 1)
            self.assertEqual(steps.stream.shm.nbytes, larger)
            self.assertIsNone(steps.shm_refused)
            # The small batch too, on the same segment, with no other attach.
            self.assertTrue(step(steps, 3, 2 * AttachRetry.FIRST))
            self.assertTrue(step(steps, 20, 1))
            self.assertEqual(tries.call_count, before + 1)
        for sids, refs in made.values():
            for s, r in zip(sids, refs):
                self.assertEqual(self.kv.get_session(s)["ownTokens"], self.kv.get_session(r)["ownTokens"])


if __name__ == "__main__":
    unittest.main()
