"""The server a test talks to (not a test module).

`Target()` is KVRECALL_URL's server (with KVRECALL_TOKEN) when set, else one
this checkout starts; `why_not()` says why there is none and `needs_server`
skips a test class then; `ok(r)` fails a test on a step's error result; `owned(a)` says an array is the caller's own. `start(token=None)` runs `node dist/cli/cli.js serve --port 0` on 127.0.0.1
with a fresh data folder and returns a `Server` (its url; stop() ends it and
removes the folder). `available()` says why not when it cannot: the server
must be built (npx tsc -p tsconfig.json; build/Release/kvrecall.node) and
node found (env KVRECALL_NODE, else node on PATH).
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
from typing import Optional, Sequence

URL = os.environ.get("KVRECALL_URL")
TOKEN = os.environ.get("KVRECALL_TOKEN") or None
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CLI = os.environ.get("KVRECALL_CLI") or os.path.join(ROOT, "dist", "cli", "cli.js")


def node() -> Optional[str]:
    return os.environ.get("KVRECALL_NODE") or shutil.which("node")


def available() -> Optional[str]:
    """None when a server can be started here, else why not."""
    if not node():
        return "node not found (KVRECALL_NODE)"
    if not os.path.exists(CLI):
        return f"{CLI} not built (npx tsc -p tsconfig.json)"
    return None


def why_not() -> Optional[str]:
    """None when a test has a server: KVRECALL_URL's, or one started here."""
    return None if URL else available()


def needs_server(cls):
    """Skips the test class when there is no server to talk to."""
    why = why_not()
    return unittest.skipIf(why, f"no server: set KVRECALL_URL or build this checkout's ({why})")(cls)


def owned(a) -> bool:
    """An array the caller owns: writable, its memory its own or a bytearray
    of exactly its bytes (decode_tensor's copy), never a view of a
    connection's receive buffer."""
    return bool(a.flags.writeable) and (bool(a.flags.owndata) or (type(a.base) is bytearray and len(a.base) == a.nbytes))


def ok(r):
    """A batch's or stream's step result, or the test fails with its error."""
    if isinstance(r, Exception):
        raise AssertionError(f"step failed: {r}")
    return r


class Server:
    def __init__(self, token: Optional[str] = None, timeout: float = 20.0, extra: Sequence[str] = ()):
        """`extra`: more `serve` flags (e.g. ["--memory-budget", "5368709121"])."""
        self.data = tempfile.mkdtemp(prefix="kvrecall-pytest-")
        args = [node(), CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--data", self.data, *extra]
        if token:
            args += ["--token", token]
        env = {k: v for k, v in os.environ.items() if k != "KVRECALL_TOKEN"}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = ""
        self.log = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.log.append(line)
                if not self.url and "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]
                    found.set()
            found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise RuntimeError("kvrecall server did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout and not self._reader.is_alive():
            self.proc.stdout.close()
        shutil.rmtree(self.data, ignore_errors=True)


def start(token: Optional[str] = None) -> Server:
    return Server(token)


class Target:
    """KVRECALL_URL's server when set, else this checkout's, started now; stop() ends only the latter."""

    def __init__(self):
        self.server = None if URL else start()
        self.url = URL or self.server.url
        self.token = TOKEN if URL else None

    def stop(self) -> None:
        if self.server:
            self.server.stop()


class ServedCase(unittest.TestCase):
    """A test class against Target's server: `served()` (from setUpClass)
    makes `server`, a Client `kv` and a seeded `rng` (KVRECALL_TEST_SEED,
    else `seed`); `document()` pushes a random one; `session()` opens one
    over `doc`. Sessions and documents made so go in tearDownClass."""

    @classmethod
    def served(cls, seed: int) -> None:
        import numpy as np
        from kvrecall import Client

        cls.server = Target()
        cls.kv = Client(cls.server.url, token=cls.server.token, timeout=60)
        cls.rng = np.random.default_rng(int(os.environ.get("KVRECALL_TEST_SEED", str(seed))))
        cls.sessions, cls.docs = [], []

    @classmethod
    def document(cls, prefix: str, model, kv_heads: int, tokens: int, head_dim: int, layers: int, array_dtype=None, **push) -> str:
        """A document of random K/V (kv_heads x tokens x head_dim a layer; arrays
        in `array_dtype`, default float16), pushed with `push` (e.g. methods, dtype)."""
        import uuid

        import numpy as np

        doc = prefix + uuid.uuid4().hex[:8]
        dt = array_dtype or np.float16
        k = [cls.rng.standard_normal((kv_heads, tokens, head_dim)).astype(dt) for _ in range(layers)]
        v = [cls.rng.standard_normal((kv_heads, tokens, head_dim)).astype(dt) for _ in range(layers)]
        cls.kv.push_document(doc, model, k, v, **push)
        cls.docs.append(doc)
        return doc

    @classmethod
    def tearDownClass(cls):
        from kvrecall import KvrecallError

        for sid in cls.sessions:
            try:
                cls.kv.delete_session(sid)
            except (KvrecallError, OSError):
                pass
        for doc in cls.docs:
            try:
                cls.kv.delete_document(doc)
            except (KvrecallError, OSError):
                pass
        cls.kv.close()
        cls.server.stop()
