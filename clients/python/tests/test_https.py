"""The client over https: and the stream over TLS, against a real server
behind a TLS-terminating proxy on 127.0.0.1 (this file's: Python's ssl
module, a self-signed certificate for 127.0.0.1 made with `openssl req` in a
temp folder; the kvrecall server speaks plain HTTP). Health, a document, a
session, attends (single, batch, stream) give the same answers over https as
over http, bit for bit; the https calls keep one connection alive
(Client's ssl_context trusts the test's certificate), and one the server
closed while idle is replaced; a client
that does not trust the certificate is refused (no silent fallback to an
unverified connection).

Needs openssl on PATH (skipped without it) and a server (serve.py).

    python3 -m unittest discover -s clients/python/tests -v
"""

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import serve  # noqa: E402
from loopback import accept_each, host_port, pipe, shut_down  # noqa: E402
from kvrecall import Client, KvrecallError, model_shape  # noqa: E402


class TLSProxy:
    """Accepts TLS on 127.0.0.1 and relays the plain bytes to `upstream` (host, port), one upstream connection per client connection."""

    def __init__(self, upstream, cert, key):
        self.upstream = upstream
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._open = []
        accept_each(self.sock, self._serve)

    def _serve(self, raw):
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # a client that refused the certificate
            return
        self.connections += 1
        plain = socket.create_connection(self.upstream)
        self._open += [tls, plain]
        pipe(tls, plain)

    def drop(self):
        """Ends every relayed connection, as a server closes idle kept-alive ones."""
        shut_down(*self._open)
        for s in self._open:
            s.close()
        self._open = []

    def close(self):
        self.sock.close()
        self.drop()


def _certificate(folder):
    """A self-signed certificate for 127.0.0.1 (its IP in subjectAltName, which hostname checks read); (cert, key) paths."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    return cert, key


def _bits(r):
    return r.out.tobytes(), r.lse.tobytes()


@unittest.skipIf(shutil.which("openssl") is None, "openssl not found (it makes the test's certificate)")
@serve.needs_server
class OverHTTPS(unittest.TestCase):
    Q, KV, D = 8, 2, 64

    @classmethod
    def setUpClass(cls):
        cls.server = serve.Target()
        cls.folder = tempfile.mkdtemp(prefix="kvrecall-tls-")
        cls.cert, key = _certificate(cls.folder)
        cls.proxy = TLSProxy(host_port(cls.server.url), cls.cert, key)
        cls.trust = ssl.create_default_context(cafile=cls.cert)
        cls.http = Client(cls.server.url, token=cls.server.token, timeout=60)
        cls.https = Client(f"https://127.0.0.1:{cls.proxy.port}", token=cls.server.token, timeout=60, ssl_context=cls.trust)
        cls.model = model_shape(2, cls.Q, cls.KV, cls.D, dtype="f16")
        cls.rng = np.random.default_rng(int(os.environ.get("KVRECALL_TEST_SEED", "5")))
        cls.doc = "py-https-" + uuid.uuid4().hex[:8]

    @classmethod
    def tearDownClass(cls):
        for c in (cls.http, cls.https):
            c.close()
        cls.proxy.close()
        cls.server.stop()
        shutil.rmtree(cls.folder, ignore_errors=True)

    def test_health_document_session_and_attends_match_http(self):
        # Health: the same server's answer either way.
        a, b = self.http.health(), self.https.health()
        for key in ("ok", "version", "backend", "threads"):
            self.assertEqual(b[key], a[key])
        connections = self.proxy.connections
        # A document pushed over https (its uploads over the stream, TLS too) and sealed; read back over both.
        k = [self.rng.standard_normal((self.KV, 333, self.D)).astype(np.float16) for _ in range(2)]
        v = [self.rng.standard_normal((self.KV, 333, self.D)).astype(np.float16) for _ in range(2)]
        self.https.push_document(self.doc, self.model, k, v)
        try:
            self.assertEqual(self.https.get_document(self.doc), self.http.get_document(self.doc))
            self.assertEqual(self.https.get_document(self.doc)["status"], "ready")
            self.assertIn(self.doc, [d["id"] for d in self.https.list_documents()])
            # A session made over https, stepped over both: the same steps answer bit for bit the same.
            sid = self.https.create_session(self.model, documents=[self.doc])["id"]
            self.assertEqual(self.https.get_session(sid), self.http.get_session(sid))
            for layer in (0, 1):
                q = self.rng.standard_normal((self.Q, self.D)).astype(np.float32)
                over_http = self.http.attend(sid, layer, q)
                self.assertEqual(_bits(self.https.attend(sid, layer, q)), _bits(over_http))
                batch = self.https.attend_batch(layer, [{"session": sid, "q": q}, {"session": sid, "q": q, "q_dtype": "f32"}])
                self.assertEqual([_bits(r) for r in batch], [_bits(over_http)] * 2)
                with self.https.open_stream() as stream:
                    self.assertEqual(_bits(stream.attend(sid, layer, q)), _bits(over_http))
            # An append over https lands once: the next position is refused over http as a repeat.
            tok = {name: self.rng.standard_normal((self.KV, self.D)).astype(np.float16) for name in ("k", "v")}
            self.https.attend(sid, 0, self.rng.standard_normal((self.Q, self.D)).astype(np.float32), **tok, position=0)
            with self.assertRaises(KvrecallError) as refused:
                self.http.attend(sid, 0, self.rng.standard_normal((self.Q, self.D)).astype(np.float32), **tok, position=0)
            self.assertEqual(refused.exception.status, 409)
            self.https.delete_session(sid)
        finally:
            self.https.delete_document(self.doc)
        self.assertNotIn(self.doc, [d["id"] for d in self.http.list_documents()])
        # Every https call went over the connection health opened; push_document's stream (its uploads) and the two
        # attend streams each had their own.
        self.assertEqual(self.proxy.connections - connections, 3)

    def test_calls_keep_one_connection_alive(self):
        fresh = Client(f"https://127.0.0.1:{self.proxy.port}", token=self.server.token, timeout=60, ssl_context=self.trust)
        try:
            before = self.proxy.connections
            for _ in range(5):
                fresh.health()
            self.assertEqual(self.proxy.connections - before, 1)
        finally:
            fresh.close()

    def test_a_connection_closed_while_idle_is_replaced(self):
        fresh = Client(f"https://127.0.0.1:{self.proxy.port}", token=self.server.token, timeout=60, ssl_context=self.trust)
        try:
            self.assertTrue(fresh.health()["ok"])
            before = self.proxy.connections
            self.proxy.drop()
            self.assertTrue(fresh.health()["ok"])
            self.assertEqual(self.proxy.connections - before, 1)
        finally:
            fresh.close()

    def test_an_untrusted_certificate_is_refused(self):
        untrusting = Client(f"https://127.0.0.1:{self.proxy.port}", timeout=10)
        try:
            with self.assertRaises(ssl.SSLCertVerificationError):
                untrusting.health()
            with self.assertRaises(ssl.SSLCertVerificationError):
                untrusting.open_stream()
        finally:
            untrusting.close()


if __name__ == "__main__":
    unittest.main()
