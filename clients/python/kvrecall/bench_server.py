"""The server a client bench (bench_transport, bench_preload) talks to:
--url's, or this checkout's started for the run with --serve and ended
after it (a fresh data folder, removed). Not part of the client API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running server (else --serve)")
    p.add_argument("--serve", action="store_true", help="start this checkout's server for the run")
    p.add_argument("--token", default=os.environ.get("KVRECALL_TOKEN"))
    p.add_argument("--poll-us", type=int, default=None, help="with --serve: the server's --poll-us (its loop polls this long after each stream answer; unset: the server's default, 1000 on a GPU host of 8 cores or more, else 0)")


def _start(token: Optional[str], poll_us: Optional[int] = None) -> Tuple[subprocess.Popen, str, str]:
    node = os.environ.get("KVRECALL_NODE") or shutil.which("node")
    cli = os.path.join(ROOT, "dist", "cli", "cli.js")
    if not node or not os.path.exists(cli):
        sys.exit(f"--serve needs node and {cli} (npx tsc -p tsconfig.json)")
    data = tempfile.mkdtemp(prefix="kvrecall-bench-")
    cmd = [node, cli, "serve", "--host", "127.0.0.1", "--port", "0", "--data", data] + (["--token", token] if token else []) + ([] if poll_us is None else ["--poll-us", str(poll_us)])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if "listening on " in line:
            # Keep reading its output, so that a full pipe never stalls it.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split("listening on ", 1)[1].split()[0], data
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit("the server did not start")


@contextmanager
def server(p: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[Tuple[str, Optional[int]]]:
    """(url, the started server's pid or None) for the run."""
    if bool(args.url) == bool(args.serve):
        p.error("give --url or --serve")
    if not args.serve:
        yield args.url, None
        return
    proc, url, data = _start(args.token, getattr(args, "poll_us", None))
    try:
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)


def write_json(path: Optional[str], result: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
