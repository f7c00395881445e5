"""A session's per-layer policy through the Python client against a running kvrecall server (env KVRECALL_URL):
a layer whose budget covers every token is exact against float64, a layer with a small budget attends fewer, and
a policy of the wrong length is refused (422) without creating a session."""

import os
import sys
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from kvrecall import Client, KvrecallError, model_shape  # noqa: E402

URL = os.environ.get("KVRECALL_URL")
TOKEN = os.environ.get("KVRECALL_TOKEN") or None


def reference(q, k, v):
    """Dense float64 attention: q [qHeads, d], k, v [kvHeads, n, d]."""
    group = q.shape[0] // k.shape[0]
    out = np.empty(q.shape)
    for h in range(q.shape[0]):
        s = k[h // group] @ q[h] / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[h // group]
    return out


@unittest.skipUnless(URL, "set KVRECALL_URL to a running kvrecall server")
class LayerPolicy(unittest.TestCase):
    Q, KV, D, LAYERS, N = 8, 2, 32, 2, 600

    def test_full_budget_layer_is_exact_and_small_layer_reads_fewer(self):
        kv = Client(URL, token=TOKEN, timeout=60)
        rng = np.random.default_rng(int(os.environ.get("KVRECALL_TEST_SEED", "7")))
        model = model_shape(self.LAYERS, self.Q, self.KV, self.D)
        doc = "py-layers-" + uuid.uuid4().hex[:8]
        k = [rng.standard_normal((self.KV, self.N, self.D)).astype(np.float16) for _ in range(self.LAYERS)]
        v = [rng.standard_normal((self.KV, self.N, self.D)).astype(np.float16) for _ in range(self.LAYERS)]
        kv.push_document(doc, model, k, v, methods=["hnsw"])
        try:
            sid = kv.create_session(model, documents=[doc], method="hnsw", budget=16, sinks=4, window=8,
                                    layers=[{"budget": self.N}, {}])["id"]
            self.assertEqual(kv.get_session(sid)["layers"], [{"budget": self.N, "estimate": False},
                                                              {"budget": 16, "estimate": False}])
            q = (0.6 * rng.standard_normal((self.Q, self.D))).astype(np.float32)
            full = kv.attend(sid, 0, q, returns=["out", "selection"])
            small = kv.attend(sid, 1, q, returns=["out", "selection"])
            ref = reference(q.astype(np.float64), k[0].astype(np.float64), v[0].astype(np.float64))
            err = np.linalg.norm(full.out - ref, axis=1) / np.linalg.norm(ref, axis=1)
            self.assertLess(float(err.max()), 1e-5)  # float32 accumulation of f16 K/V against float64
            self.assertEqual([len(s) for s in full.selection], [self.N, self.N])
            self.assertTrue(all(len(s) <= 4 + 8 + 16 for s in small.selection))
            kv.delete_session(sid)
            before = kv.health()["sessions"]
            with self.assertRaises(KvrecallError) as cm:
                kv.create_session(model, documents=[doc], method="hnsw", layers=[{"budget": 8}])
            self.assertEqual(cm.exception.status, 422)
            self.assertIn("list of 2 maps", cm.exception.message)
            self.assertEqual(kv.health()["sessions"], before)
        finally:
            kv.delete_document(doc)
            kv.close()


if __name__ == "__main__":
    unittest.main()
