"""The Python client against a running kvrecall server (env KVRECALL_URL,
optional KVRECALL_TOKEN); skipped when KVRECALL_URL is not set.

    KVRECALL_URL=http://127.0.0.1:8700 python3 -m unittest discover -s clients/python/tests -v
"""

import os
import sys
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from kvrecall import (  # noqa: E402
    Client,
    KvrecallError,
    from_bf16_bits,
    model_shape,
    tensor,
    to_bf16_bits,
)

URL = os.environ.get("KVRECALL_URL")
TOKEN = os.environ.get("KVRECALL_TOKEN") or None
BLOCK_METHODS = {"nosa", "topk-blocks", "quest"}  # select (and attend) whole blocks of the document


def reference(q, k, v, scale=None):
    """Dense attention in float64. q [qHeads, d]; k, v per kv head [n, d]."""
    q = np.asarray(q, dtype=np.float64)
    q_heads, d = q.shape
    group = q_heads // len(k)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((q_heads, d))
    lse = np.zeros(q_heads)
    for h in range(q_heads):
        kh = np.asarray(k[h // group], dtype=np.float64)
        vh = np.asarray(v[h // group], dtype=np.float64)
        s = kh @ q[h] * scale
        m = s.max()
        p = np.exp(s - m)
        z = p.sum()
        out[h] = (p / z) @ vh
        lse[h] = m + np.log(z)
    return out, lse


def server_methods(client):
    """The server's retrieval method names, from the answer to an unknown one."""
    with unittest.TestCase().assertRaises(KvrecallError) as cm:
        client.create_session(model_shape(1, 1, 1, 8), method="no-such-method")
    return {m.strip() for m in cm.exception.message.split("one of:")[1].split(",")}


def rel_error(a, b):
    """max over heads of |a - b| / |b| (rows of 2-D arrays), or max elementwise relative error."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if b.ndim == 1:
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)))


class Bf16Helpers(unittest.TestCase):
    def test_round_to_nearest_even(self):
        x = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, -2.5, 0.0, np.inf, -np.inf], dtype=np.float32)
        bits = to_bf16_bits(x)
        self.assertEqual(bits.dtype, np.uint16)
        self.assertEqual([hex(b) for b in bits], [hex(b) for b in [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x0000, 0x7F80, 0xFF80]])
        self.assertTrue(np.isnan(from_bf16_bits(to_bf16_bits(np.float32(np.nan)))))
        # Largest finite float32 rounds up to infinity, as IEEE rounding does.
        self.assertEqual(int(to_bf16_bits(np.float32(3.4028235e38))), 0x7F80)

    def test_round_trip_is_exact_for_bf16_values(self):
        rng = np.random.default_rng(1)
        bits = to_bf16_bits(rng.standard_normal(1000).astype(np.float32))
        np.testing.assert_array_equal(to_bf16_bits(from_bf16_bits(bits)), bits)

    def test_tensor_layout(self):
        t = tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
        self.assertEqual((t["dtype"], t["shape"]), ("f32", [2, 3]))
        self.assertEqual(t["data"], np.arange(6, dtype="<f4").tobytes())
        t = tensor(np.ones((2, 2), dtype=np.float32), "bf16")
        self.assertEqual(t["data"], np.full(4, 0x3F80, dtype="<u2").tobytes())
        t = tensor(np.ones(3, dtype=np.float64), "f16")
        self.assertEqual((t["dtype"], t["data"]), ("f16", np.ones(3, dtype="<f2").tobytes()))
        # Big-endian input goes out little-endian.
        t = tensor(np.array([1.0, 2.0], dtype=">f4"))
        self.assertEqual(t["data"], np.array([1.0, 2.0], dtype="<f4").tobytes())


class PackParts(unittest.TestCase):
    """pack_parts (a stream upload's frame, its tensors as they are) packs
    exactly what msgpack packs for the same value with the bytes joined."""

    def test_same_bytes_as_msgpack(self):
        import msgpack

        from kvrecall.tensors import pack_parts

        rng = np.random.default_rng(3)
        big = rng.standard_normal((3, 40_001)).astype(np.float16)  # 240 KB: a part of its own
        small = rng.standard_normal((2, 5)).astype(np.float32)
        many = {f"key{i}": i for i in range(20)}  # a map16
        body = {"layer": 3, "start": 4096, "k": tensor(big, view=True), "v": tensor(small, view=True), "q": None, "nested": {"many": many, "s": "é"}, "id": 7}
        packer = msgpack.Packer(use_bin_type=True)
        parts = pack_parts(body, packer)
        self.assertTrue(any(isinstance(p, memoryview) and p.nbytes == big.nbytes for p in parts))
        plain = {**body, "k": tensor(big), "v": tensor(small)}
        self.assertEqual(b"".join(bytes(p) for p in parts), msgpack.packb(plain, use_bin_type=True))


class OneWriteRequests(unittest.TestCase):
    """A request with a body leaves as head and body in one sendmsg; what
    arrives is the whole request, for small bodies and for one larger than
    the socket buffers (a short write finished with sendall)."""

    def test_head_and_body_arrive_whole(self):
        import socket
        import threading
        import time

        import msgpack

        listener = socket.create_server(("127.0.0.1", 0))
        got = []

        def serve():
            conn, _ = listener.accept()
            with conn:
                buf = b""
                for _ in range(2):
                    while b"\r\n\r\n" not in buf:
                        buf += conn.recv(65536)
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
                    time.sleep(0.05)  # a slow reader: the client's sendmsg writes short
                    while len(buf) < length:
                        buf += conn.recv(1 << 20)
                    body, buf = buf[:length], buf[length:]
                    got.append((head.split(b"\r\n")[0], body))
                    answer = msgpack.packb({"n": len(body)})
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n" % len(answer) + answer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client = Client(f"http://127.0.0.1:{listener.getsockname()[1]}")
        small, large = {"q": os.urandom(300)}, {"q": os.urandom(12 << 20)}
        for body in (small, large):
            packed = msgpack.packb(body, use_bin_type=True)
            self.assertEqual(client._call("POST", "/v1/sessions/s/attend", body), {"n": len(packed)})
        t.join(10)
        listener.close()
        client.close()
        self.assertEqual([line for line, _ in got], [b"POST /v1/sessions/s/attend HTTP/1.1"] * 2)
        self.assertEqual([msgpack.unpackb(b) for _, b in got], [small, large])


@unittest.skipUnless(URL, "set KVRECALL_URL to a running kvrecall server")
class AgainstServer(unittest.TestCase):
    Q, KV, D, LAYERS = 8, 2, 32, 2

    @classmethod
    def setUpClass(cls):
        cls.kv = Client(URL, token=TOKEN, timeout=60)
        cls.prefix = "py-" + uuid.uuid4().hex[:8]
        cls.rng = np.random.default_rng(int(os.environ.get("KVRECALL_TEST_SEED", "7")))
        cls.created = []

    @classmethod
    def tearDownClass(cls):
        for doc in cls.created:
            try:
                cls.kv.delete_document(doc)
            except KvrecallError:
                pass
        cls.kv.close()

    def model(self, dtype):
        return model_shape(self.LAYERS, self.Q, self.KV, self.D, dtype=dtype, block_size=16)

    def random_kv(self, dtype, n):
        """K/V in storage dtype (as sent) and their exact values (float64), [kvHeads, n, d]."""
        x = self.rng.standard_normal((self.KV, n, self.D)).astype(np.float32)
        if dtype == "f16":
            sent = x.astype(np.float16)
            return sent, sent.astype(np.float64)
        bits = to_bf16_bits(x)
        return bits, from_bf16_bits(bits).astype(np.float64)

    def preload(self, dtype, chunks):
        """A sealed document; returns its id and, per layer, K and V values [kvHeads, n, d]."""
        doc = f"{self.prefix}-{dtype}-{len(self.created)}"
        self.created.append(doc)
        info = self.kv.create_document(doc, self.model(dtype))
        self.assertEqual(info["status"], "loading")
        ks, vs = [[] for _ in range(self.LAYERS)], [[] for _ in range(self.LAYERS)]
        for layer in range(self.LAYERS):
            start = 0
            for n in chunks:
                k_sent, k_val = self.random_kv(dtype, n)
                v_sent, v_val = self.random_kv(dtype, n)
                r = self.kv.upload_document_kv(doc, layer, start, k_sent, v_sent, dtype=dtype)
                start += n
                self.assertEqual(r["tokens"], start)
                ks[layer].append(k_val)
                vs[layer].append(v_val)
        sealed = self.kv.seal_document(doc)
        self.assertEqual((sealed["status"], sealed["tokens"]), ("ready", sum(chunks)))
        return doc, [np.concatenate(x, axis=1) for x in ks], [np.concatenate(x, axis=1) for x in vs]

    def test_health(self):
        h = self.kv.health()
        self.assertTrue(h["ok"])
        self.assertIn(h["backend"], ("cpu", "cuda"))

    def test_attend_matches_float64_reference(self):
        for dtype in ("f16", "bf16"):
            with self.subTest(dtype=dtype):
                doc, K, V = self.preload(dtype, [150, 77])
                got = self.kv.get_document(doc)
                self.assertEqual((got["status"], got["tokens"]), ("ready", 227))
                self.assertIn(doc, [d["id"] for d in self.kv.list_documents()])
                s = self.kv.create_session(self.model(dtype), documents=[doc], method="exact")
                sid = s["id"]
                self.assertEqual(s["documentTokens"], 227)
                # The session's own tokens (a question), then decode steps that append.
                for layer in range(self.LAYERS):
                    k_sent, k_val = self.random_kv(dtype, 9)
                    v_sent, v_val = self.random_kv(dtype, 9)
                    self.assertEqual(self.kv.upload_session_kv(sid, layer, 0, k_sent, v_sent, dtype=dtype)["tokens"], 9)
                    K[layer] = np.concatenate([K[layer], k_val], axis=1)
                    V[layer] = np.concatenate([V[layer], v_val], axis=1)
                for step in range(3):
                    for layer in range(self.LAYERS):
                        k_sent, k_val = self.random_kv(dtype, 1)
                        v_sent, v_val = self.random_kv(dtype, 1)
                        K[layer] = np.concatenate([K[layer], k_val], axis=1)
                        V[layer] = np.concatenate([V[layer], v_val], axis=1)
                        q = (self.rng.standard_normal((self.Q, self.D)) * 1.5).astype(np.float32)
                        r = self.kv.attend(sid, layer, q, k=k_sent[:, 0, :], v=v_sent[:, 0, :], dtype=dtype)
                        self.assertEqual(r.out.dtype, np.float32)
                        self.assertEqual(r.out.shape, (self.Q, self.D))
                        self.assertEqual(r.lse.shape, (self.Q,))
                        self.assertEqual(r.stats["tokens"], 227 + 9 + step + 1)
                        ref_out, ref_lse = reference(q, K[layer], V[layer])
                        self.assertLess(rel_error(r.out, ref_out), 1e-4)
                        self.assertLess(rel_error(r.lse, ref_lse), 1e-4)
                # An explicit scale.
                q = self.rng.standard_normal((self.Q, self.D)).astype(np.float32)
                r = self.kv.attend(sid, 0, q, scale=0.05)
                ref_out, ref_lse = reference(q, K[0], V[0], scale=0.05)
                self.assertLess(rel_error(r.out, ref_out), 1e-4)
                self.assertLess(rel_error(r.lse, ref_lse), 1e-4)
                self.assertEqual(self.kv.get_session(sid)["id"], sid)
                self.kv.delete_session(sid)

    def test_returns_kv_and_selection(self):
        doc, K, V = self.preload("bf16", [40])
        sid = self.kv.create_session(self.model("bf16"), documents=[doc])["id"]
        q = self.rng.standard_normal((self.Q, self.D)).astype(np.float32)
        r = self.kv.attend(sid, 1, q, returns=["out", "kv", "selection"])
        self.assertEqual(len(r.selection), self.KV)
        np.testing.assert_array_equal(r.selection[0], np.arange(40, dtype=np.int32))
        for h in range(self.KV):
            self.assertEqual(r.kv["k"][h].dtype, np.uint16)  # bf16 bit patterns
            np.testing.assert_array_equal(from_bf16_bits(r.kv["k"][h]), K[1][h].astype(np.float32))
            np.testing.assert_array_equal(from_bf16_bits(r.kv["v"][h]), V[1][h].astype(np.float32))
        self.kv.delete_session(sid)

    def test_f32_upload_is_stored_as_model_dtype(self):
        doc = f"{self.prefix}-f32in"
        self.created.append(doc)
        self.kv.create_document(doc, self.model("f16"))
        x = self.rng.standard_normal((self.KV, 20, self.D)).astype(np.float32)
        for layer in range(self.LAYERS):
            self.kv.upload_document_kv(doc, layer, 0, x, x)  # f32 on the wire
        self.kv.seal_document(doc)
        sid = self.kv.create_session(self.model("f16"), documents=[doc])["id"]
        r = self.kv.attend(sid, 0, np.zeros((self.Q, self.D), np.float32), returns=["kv"])
        np.testing.assert_array_equal(r.kv["k"][1], x[1].astype(np.float16))
        self.kv.delete_session(sid)

    def test_stream_uploads_in_flight_store_the_bytes_sent(self):
        """Uploads over the stream, three sent ahead of their answers, store
        exactly the K/V sent, answered in order (one of 40000 tokens, 10 MB:
        written in pieces from the arrays, read straight from the socket by
        the server); an error answer raises KvrecallError, changes nothing
        and leaves the stream usable."""
        doc = f"{self.prefix}-stream-up"
        self.created.append(doc)
        self.kv.create_document(doc, self.model("f16"))
        sizes = (37, 40_000, 5)
        chunks, ks, vs = [], [], []
        for layer in range(self.LAYERS):
            start = 0
            for n in sizes:
                k_sent, _ = self.random_kv("f16", n)
                v_sent, _ = self.random_kv("f16", n)
                chunks.append((layer, start, k_sent, v_sent, None))
                start += n
            ks.append(np.concatenate([c[2] for c in chunks[-len(sizes):]], axis=1))
            vs.append(np.concatenate([c[3] for c in chunks[-len(sizes):]], axis=1))
        seen = []
        with self.kv.open_stream() as s:
            self.assertError(409, "conflict", s.upload_document_kv, doc, 0, 7, chunks[0][2], chunks[0][3])
            # A bad chunk (k of the wrong shape) in a window of 3: the chunks sent with it are answered (the
            # one after it goes in: the bad one changed nothing), then the error is raised.
            bad = lambda start: (0, start, chunks[1][2][:1], chunks[1][3], None)  # noqa: E731
            self.assertError(422, "invalid", s.upload_document, doc, [chunks[0], bad(37), chunks[1]], window=3)
            # In a window of 1, nothing after the bad chunk is sent: chunks[2] then goes in at 40037 (else 409).
            self.assertError(422, "invalid", s.upload_document, doc, [bad(40_037), chunks[2]], window=1)
            s.upload_document(doc, chunks[2:], window=3, answered=lambda a: seen.append((a["layer"], a["tokens"])))
        self.assertEqual(seen, [(0, 40_042), (1, 37), (1, 40_037), (1, 40_042)])
        self.kv.seal_document(doc)
        sid = self.kv.create_session(self.model("f16"), documents=[doc])["id"]
        for layer in range(self.LAYERS):
            r = self.kv.attend(sid, layer, np.zeros((self.Q, self.D), np.float32), returns=["kv"])
            for h in range(self.KV):
                np.testing.assert_array_equal(r.kv["k"][h], ks[layer][h])
                np.testing.assert_array_equal(r.kv["v"][h], vs[layer][h])
        self.kv.delete_session(sid)

    def assertError(self, status, code, fn, *args, **kwargs):
        with self.assertRaises(KvrecallError) as cm:
            fn(*args, **kwargs)
        self.assertEqual((cm.exception.status, cm.exception.code), (status, code), str(cm.exception))
        self.assertTrue(cm.exception.message)
        return cm.exception

    def test_errors_map_to_status_and_code(self):
        doc, _, _ = self.preload("f16", [20])
        m = self.model("f16")
        self.assertError(404, "not_found", self.kv.get_document, f"{self.prefix}-missing")
        self.assertError(404, "not_found", self.kv.attend, "no-such-session", 0, np.zeros((self.Q, self.D), np.float32))
        self.assertError(404, "not_found", self.kv.create_session, m, documents=[f"{self.prefix}-missing"])
        sid = self.kv.create_session(m, documents=[doc])["id"]
        # Wrong q shape, layer out of range, NaN: 422.
        self.assertError(422, "invalid", self.kv.attend, sid, 0, np.zeros((self.Q + 1, self.D), np.float32))
        self.assertError(422, "invalid", self.kv.attend, sid, self.LAYERS, np.zeros((self.Q, self.D), np.float32))
        bad = np.zeros((self.Q, self.D), np.float32)
        bad[3, 4] = np.nan
        e = self.assertError(422, "invalid", self.kv.attend, sid, 0, bad)
        self.assertIn("NaN", e.message)
        self.assertError(422, "invalid", self.kv.create_document, "../escape", m)
        self.assertError(422, "invalid", self.kv.create_session, {**m, "qHeads": 7})
        # Kv after seal, out-of-order uploads: 409.
        k, _ = self.random_kv("f16", 3)
        self.assertError(409, "conflict", self.kv.upload_document_kv, doc, 0, 20, k, k)
        self.assertError(409, "conflict", self.kv.upload_session_kv, sid, 0, 5, k, k)
        self.assertError(409, "conflict", self.kv.create_document, doc, m)
        # Nothing above changed the session: an in-order upload still works.
        self.assertEqual(self.kv.upload_session_kv(sid, 0, 0, k, k)["tokens"], 3)
        self.kv.delete_session(sid)
        self.assertError(404, "not_found", self.kv.get_session, sid)
        self.kv.delete_document(doc)
        self.assertError(404, "not_found", self.kv.get_document, doc)

    def test_create_document_cluster_size(self):
        """cluster_size travels as the document's clusterSize; one out of range is a 422 that creates nothing."""
        m = self.model("f16")
        doc = f"{self.prefix}-clusters"
        self.created.append(doc)
        self.assertEqual(self.kv.create_document(doc, m, methods=["wave"], cluster_size=16).get("clusterSize"), 16)
        self.assertEqual(self.kv.get_document(doc).get("clusterSize"), 16)
        bad = f"{self.prefix}-clusters-bad"
        self.assertError(422, "invalid", self.kv.create_document, bad, m, methods=["wave"], cluster_size=0)
        self.assertError(404, "not_found", self.kv.get_document, bad)
        self.kv.delete_document(doc)

    def test_push_document_head_dim_8_every_method(self):
        """push_document (create, chunked kv with prefill q, seal, wait) at
        stories260K's shape (head_dim 8, GQA 2): exact attend over it equals
        float64; every method with a budget covering the document equals exact,
        and with a sparse budget attends a small part of it."""
        model = model_shape(2, 4, 2, 8, dtype="f16")
        n, kv_heads, d = 1000, 2, 8
        methods = server_methods(self.kv)
        self.assertIn("exact", methods)
        K = [self.rng.standard_normal((kv_heads, n, d)).astype(np.float16) for _ in range(2)]
        V = [self.rng.standard_normal((kv_heads, n, d)).astype(np.float16) for _ in range(2)]
        Q = [(self.rng.standard_normal((4, n, d)) * 1.5).astype(np.float32) for _ in range(2)]
        doc = f"{self.prefix}-d8"
        self.created.append(doc)
        info = self.kv.push_document(doc, model, K, V, q=Q, methods=sorted(methods), query_stride=1, chunk=128)
        self.assertEqual((info["status"], info["tokens"]), ("ready", n))
        self.assertEqual(self.kv.wait_document_ready(doc, timeout=5)["status"], "ready")

        q = (self.rng.standard_normal((4, d)) * 2).astype(np.float32)
        k_new = self.rng.standard_normal((kv_heads, d)).astype(np.float16)
        v_new = self.rng.standard_normal((kv_heads, d)).astype(np.float16)
        ref_out, ref_lse = reference(
            q,
            [np.concatenate([K[1][h], k_new[h : h + 1]]).astype(np.float64) for h in range(kv_heads)],
            [np.concatenate([V[1][h], v_new[h : h + 1]]).astype(np.float64) for h in range(kv_heads)],
        )
        answers = {}
        for method in sorted(methods):
            for label, params in (("full", dict(budget=n, ef=n)), ("sparse", dict(budget=16))):
                with self.subTest(method=method, budget=label):
                    sid = self.kv.create_session(model, documents=[doc], method=method, sinks=4, window=16, **params)["id"]
                    try:
                        r = self.kv.attend(sid, 1, q, k=k_new, v=v_new, returns=["out", "selection"])
                    finally:
                        self.kv.delete_session(sid)
                    self.assertEqual(r.stats["tokens"], n + 1)
                    self.assertTrue(np.isfinite(r.out).all())
                    answers[method, label] = r
                    if method == "exact" or label == "full":
                        # A budget covering the document: what exact attends (hnsw's graph search
                        # may miss a few keys; every other method must find them all).
                        attended = min(len(ids) for ids in r.selection)
                        if method != "hnsw":
                            self.assertEqual(attended, n + 1)
                        if attended == n + 1:
                            self.assertLess(rel_error(r.out, ref_out), 1e-4)
                            self.assertLess(rel_error(r.lse, ref_lse), 1e-4)
                    else:
                        # sinks 4 + window 16 + at most 16 retrieved + the new token; block methods
                        # attend whole 64-token blocks: the sinks' and the window's (up to 2) and one selected.
                        bound = 4 * 64 + 1 if method in BLOCK_METHODS else 4 + 16 + 16 + 1
                        self.assertLessEqual(max(len(ids) for ids in r.selection), bound)
                        self.assertLess(r.stats["attended"], n / 2)
        # The deleted document's sessions are gone; the document goes too.
        self.kv.delete_document(doc)
        self.created.remove(doc)
        self.assertError(404, "not_found", self.kv.get_document, doc)

    def test_push_document_cleans_up_on_error(self):
        model = model_shape(1, 2, 1, 8, dtype="f16")
        doc = f"{self.prefix}-bad"
        k = np.zeros((1, 5, 8), np.float16)
        bad = np.zeros((2, 5, 8), np.float16)  # wrong kv head count
        self.assertError(422, "invalid", self.kv.push_document, doc, model, [k], [bad])
        self.assertError(404, "not_found", self.kv.get_document, doc)

    def test_keep_alive_reuses_one_connection(self):
        self.kv.health()
        conn = self.kv._http._local.conn
        for _ in range(20):
            self.kv.health()
        self.assertIs(self.kv._http._local.conn, conn)
        # An error answer does not lose the connection either, nor does an
        # attend's (its answer read where it lies in the connection's buffer).
        with self.assertRaises(KvrecallError):
            self.kv.get_document(f"{self.prefix}-missing")
        self.assertError(404, "not_found", self.kv.attend, f"{self.prefix}-no-session", 0, np.zeros((self.Q, self.D), np.float32))
        self.kv.health()
        self.assertIs(self.kv._http._local.conn, conn)
        self.assertIs(self.kv._http._local.conn.sock, conn.sock)


if __name__ == "__main__":
    unittest.main()
