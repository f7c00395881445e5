"""kvrecall.spin: a read polls before it sleeps, and still sleeps past its
window. Told apart by the process's CPU time over a wait for data sent
later by another thread: polling burns the wait, sleeping does not. And a
stream opened with spin_us answers as one without it, bit for bit (a real
server: KVRECALL_URL, else this checkout's, tests/serve.py)."""

import os
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import serve  # noqa: E402
from kvrecall import model_shape  # noqa: E402
from kvrecall.spin import spin_recv_into  # noqa: E402

Q, KV, D, DOC = 8, 2, 32, 200

DELAY = 0.15  # seconds before the other end sends


def timed_read(spin_s, timeout=None):
    """(bytes read, CPU seconds of this process) for one read of data sent DELAY after it starts."""
    a, b = socket.socketpair()
    try:
        a.settimeout(timeout)
        sender = threading.Timer(DELAY, lambda: b.sendall(b"answer"))
        buf = bytearray(64)
        cpu0 = time.process_time()
        sender.start()
        n = spin_recv_into(a, buf, spin_s)
        cpu = time.process_time() - cpu0
        sender.join()
        return bytes(buf[:n]), cpu
    finally:
        a.close()
        b.close()


class SpinTest(unittest.TestCase):
    def test_polls_within_its_window(self):
        got, cpu = timed_read(5.0)
        self.assertEqual(got, b"answer")
        # The whole wait is spent polling: well over a third of it even on a loaded 2-core host.
        self.assertGreater(cpu, DELAY / 3)

    def test_sleeps_without_a_window(self):
        got, cpu = timed_read(0.0)
        self.assertEqual(got, b"answer")
        self.assertLess(cpu, DELAY / 3)

    def test_sleeps_past_its_window(self):
        got, cpu = timed_read(0.01)
        self.assertEqual(got, b"answer")
        self.assertLess(cpu, DELAY / 3)

    def test_python_timeout_reads_at_once(self):
        # A socket with Python's own timeout polls in select() before every read: no spin there.
        got, cpu = timed_read(5.0, timeout=10.0)
        self.assertEqual(got, b"answer")
        self.assertLess(cpu, DELAY / 3)

    def test_ready_data_is_read_at_once(self):
        a, b = socket.socketpair()
        try:
            b.sendall(b"ready")
            buf = bytearray(16)
            self.assertEqual(bytes(buf[: spin_recv_into(a, buf, 5.0)]), b"ready")
        finally:
            a.close()
            b.close()


@serve.needs_server
class SpinStream(serve.ServedCase):
    @classmethod
    def setUpClass(cls):
        cls.served(23)
        cls.doc = cls.document("py-spin-", model_shape(1, Q, KV, D), KV, DOC, D, 1)

    def test_spinning_stream_answers_as_a_sleeping_one(self):
        sids = []
        for _ in range(2):
            sids.append(self.kv.create_session(model_shape(1, Q, KV, D), documents=[self.doc], method="exact")["id"])
            self.sessions.append(sids[-1])
        with self.kv.open_stream() as sleeping, self.kv.open_stream(spin_us=2000) as spinning:
            self.assertEqual((sleeping.ws.spin, spinning.ws.spin), (0.0, 0.002))
            for s in range(4):
                q = self.rng.standard_normal((Q, D)).astype(np.float32)
                kv = {"k": self.rng.standard_normal((KV, D)).astype(np.float32), "v": self.rng.standard_normal((KV, D)).astype(np.float32), "position": s}
                a = sleeping.attend(sids[0], 0, q, **kv)
                b = spinning.attend(sids[1], 0, q, **kv)
                self.assertEqual((a.out.tobytes(), a.lse.tobytes()), (b.out.tobytes(), b.lse.tobytes()))


if __name__ == "__main__":
    unittest.main()
