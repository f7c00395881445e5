"""Preload throughput from Python: a document's K/V uploaded over the stream
(or HTTP), then sealed; GB/s of K/V and where the server's time went.

    python3 -m kvrecall.bench_preload --serve --out preload.json     # from clients/python
    python3 -m kvrecall.bench_preload --url http://127.0.0.1:8700 --via http

Per round, a fresh document of --layers layers x --tokens tokens (8 kv
heads, d 128, f16; created with the tokens hint; methods: exact only),
uploaded in chunks of --chunk tokens: over the stream (Stream.upload_document,
--window uploads ahead of their answers, as Client.push_document) or over
HTTP (Client.upload_document_kv, one at a time). The chunks' K/V are 8
distinct random ones cycled (the source is not held whole). Reports the
upload's wall time, the client's CPU time, with --serve the server
process's CPU time (every thread), and the server's phases summed from the
answers' stats (as bench/preload.ts on the TypeScript side). Each round's
document is deleted after its seal, so a round after the first writes where
a deleted document's blocks were (bench/preload-rounds.ts runs this bench
beside the TypeScript client and the CLI against one server).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .bench_server import add_server_args, server, write_json
from .client import Client, model_shape

PHASES = ("readMs", "decodeMs", "queueMs", "checkMs", "appendMs", "writeMs")


def _server_cpu(pid: Optional[int]) -> float:
    """CPU seconds (user + system, every thread) of a local process, from /proc; 0 when unknown."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sources(kv_heads: int, chunk: int, d: int, count: int = 8) -> List[np.ndarray]:
    """Random finite f16 chunks [kvHeads, chunk, d] (the exponent's top bit clear)."""
    rng = np.random.default_rng(7)
    return [(rng.integers(0, 1 << 16, (kv_heads, chunk, d), dtype=np.uint16) & 0xBFFF).view(np.float16) for _ in range(count)]


def run_round(kv: Client, args: argparse.Namespace, sources: List[np.ndarray], pid: Optional[int]) -> Dict[str, Any]:
    model = model_shape(args.layers, 32, 8, 128, dtype="f16")
    doc = f"bench-preload-{uuid.uuid4().hex[:8]}"
    phases = {p: 0.0 for p in PHASES}

    def tally(answer: Dict[str, Any]) -> None:
        for p in PHASES:
            phases[p] += (answer.get("stats") or {}).get(p, 0.0) / 1000

    def chunks() -> Iterator[Tuple[int, int, Any, Any, Any]]:
        i = 0
        for layer in range(args.layers):
            for start in range(0, args.tokens, args.chunk):
                n = min(args.chunk, args.tokens - start)
                yield layer, start, sources[i % len(sources)][:, :n], sources[(i + 1) % len(sources)][:, :n], None
                i += 2

    c0, k0, t0 = _server_cpu(pid), time.process_time(), time.perf_counter()
    kv.create_document(doc, model, methods=["exact"], tokens=args.tokens)
    if args.via == "stream":
        with kv.open_stream() as s:
            s.upload_document(doc, chunks(), window=args.window, answered=tally)
    else:
        for layer, start, k, v, _ in chunks():
            tally(kv.upload_document_kv(doc, layer, start, k, v))
    t1, k1, c1 = time.perf_counter(), time.process_time(), _server_cpu(pid)
    kv.seal_document(doc)
    t2 = time.perf_counter()
    kv.delete_document(doc)
    return {"uploadS": t1 - t0, "sealS": t2 - t1, "clientCpuS": k1 - k0, "serverCpuS": c1 - c0 if pid else None, "phases": phases}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--via", choices=("stream", "http"), default="stream")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--server-pid", type=int, help="with --url: the local server's pid, for its CPU seconds")
    args = p.parse_args(argv)
    kv_bytes = args.layers * args.tokens * 8 * 128 * 2 * 2
    rounds = []
    with server(p, args) as (url, pid):
        pid = pid or args.server_pid
        kv = Client(url, token=args.token, timeout=120)
        sources = _sources(8, args.chunk, 128)
        for i in range(args.rounds):
            r = run_round(kv, args, sources, pid)
            rounds.append(r)
            cpu_note = f", server CPU {r['serverCpuS']:.2f} s" if r["serverCpuS"] is not None else ""
            print(f"round {i}: upload {r['uploadS']:.2f} s ({kv_bytes / r['uploadS'] / 1e9:.2f} GB/s), client CPU {r['clientCpuS']:.2f} s{cpu_note}, seal {r['sealS']:.2f} s; "
                  + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["phases"].items()), file=sys.stderr)
        kv.close()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__, "load": os.getloadavg()[0]},
        "config": {k: getattr(args, k) for k in ("tokens", "layers", "chunk", "window", "via", "rounds")},
        "kvBytes": kv_bytes,
        "rounds": rounds,
        "uploadGBps": [kv_bytes / r["uploadS"] / 1e9 for r in rounds],
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
