"""Per-call overhead of the decode transports from Python: client wall time
minus the server's own step time (`stats.ms`), p50/p90/p99 over N calls.

    python3 -m kvrecall.bench_transport --serve --out transport.json     # from clients/python
    python3 -m kvrecall.bench_transport --url http://127.0.0.1:8700 --out transport.json

Rows (interleaved call by call, every row once a round in a fresh random order, so drift and the call before hit
all alike):
- health: a bare `GET /v1/health` on one kept-alive http.client connection
  (TCP_NODELAY), the floor of an HTTP round trip; no server step, so its
  overhead is its whole wall time. "health, alone" is the same, N calls
  back to back before the interleaved rounds (no attends between them);
- health, after a wait: the same health call, after the client slept as
  long as the last HTTP attend's server step (not timed): an attend's
  client waits that long idle, and on a VM an idle process is slow to wake
  (bench/results/transport-python-wait-vm.md), so this is the bare request
  an attend's overhead compares with;
- stream ping, stream ping after a wait: a WebSocket ping on the stream's
  connection, returned from on its pong (`Stream.ping`): the bare round
  trip on the same connection as the stream's attends, no request handled;
  "after a wait" as for health;
- http attend: `Client.attend` (`POST /v1/sessions/:sid/attend`);
- http batch(1): `Client.attend_batch` with one step (`POST /v1/attend`);
- stream attend: `Stream.attend` (one WebSocket frame each way);
- stream batch(1): `Stream.attend_batch` with one step;
- stream attend (spin), stream attend f16 (spin): as stream attend on a
  third stream opened with spin_us=--spin-us (kvrecall.spin: each wait
  polls the socket that long before it sleeps);
- http attend f16, stream attend f16: as above with q sent as float16 and
  out asked for in f16 (`out_dtype`), as the transformers adapter does for
  a 16-bit model: half the tensor bytes;
- stream batch(32) f16: one `Stream.attend_batch` of 32 sessions' steps
  (q and out in f16), the overhead of the whole call (wall - the batch's
  server ms); stream batch(32): the same in f32 (q and out);
- (shm) rows: the same calls on a second stream with a shared-memory
  segment attached (`open_stream(shm=--shm)`, kvrecall.shm; single attends
  with shm_attend): q, k, v and the answers go through the segment, the
  frames carry no tensor bytes; (shm views): out and lse left in the
  segment as views (shm_views), not copied out.
  (shm stacked): the same batch as one `Stream.attend_stacked` of whole
  arrays (kvrecall.stacked: q [32, qHeads, d], k, v [32, kvHeads, d],
  32 positions; out and lse views of the segment); (shm stacked into):
  copied into the caller's out and lse arrays; (shm stacked in place): q, k,
  v and positions written straight into the segment's arrays
  (`Stream.stacked_inputs`), so the call copies none of them (f16: q and
  out in f16, as the other f16 rows). Their inputs
  are filled before the call (untimed), as an LLM server has its batch's q
  stacked (or, in place, writes it into the segment).
  Left out when the server refuses the segment (not on this host, or
  --shm-dir off) or --shm 0.

Ratios (in the JSON and after the table): each batch row's overhead p50
over one call's, the stream attend of the same dtype in the same form
(issue #14's batch target: <= 2), and for the shm rows over the byte
stream's attend too.

Client CPU: the calling thread's CPU time over the call (time.thread_time:
the client's own Python and its syscalls, not the wait), what of the
overhead is the client's own work.

Each attend is a decode step as the transformers adapter sends it: q
[qHeads, d] f32 and the new token's k, v [kvHeads, d] f16 with its
position, on its own session over one document of --tokens tokens (model:
1 layer, 32 q / 8 kv heads, d 128 by default; method exact). Prints a table
and writes JSON (--out): the configuration, the machine, and per row the
overhead, wall and server-ms percentiles in microseconds.

--serve starts this checkout's server (node dist/cli/cli.js serve; node
from KVRECALL_NODE or PATH) on 127.0.0.1 with a temporary data folder.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import socket
import sys
import time
import urllib.parse
import uuid
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .bench_server import add_server_args, server, write_json
from .client import Client, model_shape



def percentiles(xs: List[float]) -> Dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


class _Health:
    """GET /v1/health on one kept-alive connection with TCP_NODELAY."""

    def __init__(self, url: str, token: Optional[str]):
        u = urllib.parse.urlsplit(url)
        self.path = u.path.rstrip("/") + "/v1/health"
        self.conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=30)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = {"accept": "application/msgpack", **({"authorization": f"Bearer {token}"} if token else {})}
        self.sock = self.conn.sock

    def __call__(self) -> None:
        self.conn.request("GET", self.path, headers=self.headers)
        res = self.conn.getresponse()
        res.read()
        if res.status != 200:
            raise RuntimeError(f"health: {res.status}")
        if self.conn.sock is not self.sock:
            raise RuntimeError("health: the connection was not kept alive")


def run(
    url: str,
    token: Optional[str] = None,
    calls: int = 500,
    warmup: int = 50,
    tokens: int = 4096,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    method: str = "exact",
    seed: int = 1,
    log: Callable[[str], None] = print,
    shm: int = 64 << 20,
    only: Optional[List[str]] = None,
    spin_us: int = 0,
) -> Dict[str, Any]:
    kv = Client(url, token=token, timeout=120)
    model = model_shape(1, q_heads, kv_heads, head_dim, dtype="f16")
    rng = np.random.default_rng(seed)
    doc = f"bench-transport-{uuid.uuid4().hex[:8]}"
    k = rng.standard_normal((kv_heads, tokens, head_dim)).astype(np.float16)
    v = rng.standard_normal((kv_heads, tokens, head_dim)).astype(np.float16)
    log(f"preloading {tokens} tokens ...")
    kv.push_document(doc, model, [k], [v], methods=[method] if method != "exact" else None)
    n = warmup + calls
    qs = (rng.standard_normal((n, q_heads, head_dim))).astype(np.float32)
    ks = rng.standard_normal((n, kv_heads, head_dim)).astype(np.float16)
    vs = rng.standard_normal((n, kv_heads, head_dim)).astype(np.float16)

    names = ["health", "http attend", "http batch(1)", "stream attend", "stream batch(1)", "http attend f16", "stream attend f16", "health, after a wait", "stream ping", "stream ping, after a wait", "stream batch(32) f16", "stream batch(32)"]
    if spin_us:
        names += ["stream attend (spin)", "stream attend f16 (spin)"]
    shared = kv.open_stream(shm=shm) if shm else None
    if shared is not None and shared.shm is None:
        log(f"no shm rows: {shared.shm_refused}")
    if shared is not None and shared.shm is not None:
        shared.shm_attend = True
        names += ["stream attend (shm)", "stream attend f16 (shm)", "stream batch(32) (shm)", "stream batch(32) f16 (shm)", "stream batch(32) (shm views)"]
        names += ["stream batch(32) (shm stacked)", "stream batch(32) f16 (shm stacked)", "stream batch(32) (shm stacked into)", "stream batch(32) (shm stacked in place)", "stream batch(32) f16 (shm stacked in place)"]
    if only:
        missing = set(only) - set(names)
        if missing:
            raise SystemExit(f"--rows: no such row {sorted(missing)} (rows: {names})")
        names = [name for name in names if name in only]
    bare = ("health", "stream ping")
    sessions = {name: kv.create_session(model, documents=[doc], method=method)["id"] for name in names if not name.startswith(bare) and "(32)" not in name}
    batches = {name: [kv.create_session(model, documents=[doc], method=method)["id"] for _ in range(32)] for name in names if "(32)" in name}
    q16s = qs.astype(np.float16)
    health = _Health(url, token)
    stream = kv.open_stream()
    spun = kv.open_stream(spin_us=spin_us) if spin_us else None
    wall: Dict[str, List[float]] = {name: [] for name in names}
    server: Dict[str, List[float]] = {name: [] for name in names}
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    alone: List[float] = []

    def step(i: int) -> Dict[str, Any]:
        return {"q": qs[i], "k": ks[i], "v": vs[i], "position": i}

    # A stacked row's inputs (32 rows), filled before its call; the caller's arrays for "into".
    st_q = {np.float32: np.empty((32, q_heads, head_dim), np.float32), np.float16: np.empty((32, q_heads, head_dim), np.float16)}
    st_k, st_v = np.empty((32, kv_heads, head_dim), np.float16), np.empty((32, kv_heads, head_dim), np.float16)
    st_pos = np.empty(32, np.int32)
    st_out, st_lse = np.empty((32, q_heads, head_dim), np.float32), np.empty((32, q_heads), np.float32)

    inplace: Dict[str, Any] = {}

    def prep(name: str, i: int) -> None:
        if name.endswith("in place)"):
            half = "f16" in name
            qi, ki, vi, pi = shared.stacked_inputs(0, batches[name], (q_heads, head_dim), np.float16 if half else np.float32, (kv_heads, head_dim), np.float16, positions=True, out_dtype="f16" if half else None)
            qi[:], ki[:], vi[:], pi[:] = q16s[i] if half else qs[i], ks[i], vs[i], i
            inplace.update(q=qi, k=ki, v=vi, pos=pi)
        elif "stacked" in name:
            st_q[np.float16 if "f16" in name else np.float32][:] = q16s[i] if "f16" in name else qs[i]
            st_k[:], st_v[:], st_pos[:] = ks[i], vs[i], i

    def one(name: str, i: int) -> float:
        """The call's server ms (0 for health)."""
        if name.endswith("in place)"):
            r = shared.attend_stacked(0, batches[name], inplace["q"], inplace["k"], inplace["v"], inplace["pos"], "f16" if "f16" in name else None)
            if r.errors:
                raise RuntimeError(f"{name}: {r.errors}")
            return r.ms
        if "stacked" in name:
            half = "f16" in name
            into = name.endswith("into)")
            r = shared.attend_stacked(0, batches[name], st_q[np.float16 if half else np.float32], st_k, st_v, st_pos, "f16" if half else None, st_out if into else None, st_lse if into else None)
            if r.errors:
                raise RuntimeError(f"{name}: {r.errors}")
            return r.ms
        if name.startswith("health"):
            health()
            return 0.0
        if name.startswith("stream ping"):
            stream.ping()
            return 0.0
        if "(32)" in name:
            half = "f16" in name
            q = q16s[i] if half else qs[i]
            on = shared if "(shm" in name else stream
            on.shm_views = name.endswith("views)")
            rs = on.attend_batch(0, [{"session": b, "q": q, "k": ks[i], "v": vs[i], "position": i, "out_dtype": "f16" if half else None} for b in batches[name]])
            for r in rs:
                if not hasattr(r, "stats"):
                    raise r
            return rs.ms
        sid = sessions[name]
        if name == "stream attend (shm)":
            return shared.attend(sid, 0, **step(i)).stats["ms"]
        if name == "stream attend f16 (shm)":
            return shared.attend(sid, 0, q16s[i], k=ks[i], v=vs[i], position=i, out_dtype="f16").stats["ms"]
        if name == "http attend f16":
            return kv.attend(sid, 0, q16s[i], k=ks[i], v=vs[i], position=i, out_dtype="f16").stats["ms"]
        if name == "stream attend f16":
            return stream.attend(sid, 0, q16s[i], k=ks[i], v=vs[i], position=i, out_dtype="f16").stats["ms"]
        if name == "http attend":
            return kv.attend(sid, 0, **step(i)).stats["ms"]
        if name == "stream attend":
            return stream.attend(sid, 0, **step(i)).stats["ms"]
        if name == "stream attend (spin)":
            return spun.attend(sid, 0, **step(i)).stats["ms"]
        if name == "stream attend f16 (spin)":
            return spun.attend(sid, 0, q16s[i], k=ks[i], v=vs[i], position=i, out_dtype="f16").stats["ms"]
        fn = kv.attend_batch if name == "http batch(1)" else stream.attend_batch
        (r,) = fn(0, [{"session": sid, **step(i)}])
        if not hasattr(r, "stats"):
            raise r
        return r.stats["ms"]

    log(f"{warmup} warm-up + {calls} calls per row, interleaved ...")
    try:
        # The floor first, alone: health calls back to back, no attends between them.
        for i in range(n):
            t0 = time.perf_counter_ns()
            health()
            if i >= warmup:
                alone.append((time.perf_counter_ns() - t0) / 1e3)
        last_ms = 0.0
        order = list(names)
        for i in range(n):
            # Every row once a round, in a fresh order: in a fixed one a row always came right after the same
            # row (a 5 ms batch left the next call cold on the H100 host: its p90 ten times its p50).
            rng.shuffle(order)
            for name in order:
                if name.endswith("after a wait"):
                    # As long as the last HTTP attend's server step (untimed): the client idle as it is during an attend.
                    time.sleep(last_ms / 1e3)
                prep(name, i)
                c0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                ms = one(name, i)
                t1 = time.perf_counter_ns()
                c1 = time.thread_time_ns()
                if name == "http attend":
                    last_ms = ms
                if i >= warmup:
                    wall[name].append((t1 - t0) / 1e3)
                    server[name].append(ms * 1e3)
                    cpu[name].append((c1 - c0) / 1e3)
        info = kv.health()
    finally:
        stream.close()
        if spun is not None:
            spun.close()
        if shared is not None:
            shared.close()
        health.conn.close()
        for sid in [*sessions.values(), *(b for bs in batches.values() for b in bs)]:
            kv.delete_session(sid)
        kv.delete_document(doc)
        kv.close()

    rows = [{"transport": "health, alone", "calls": len(alone), "overhead_us": percentiles(alone), "wall_us": percentiles(alone), "server_us": percentiles([0.0] * len(alone))}]
    for name in names:
        over = [w - s for w, s in zip(wall[name], server[name])]
        rows.append({"transport": name, "calls": len(over), "overhead_us": percentiles(over), "wall_us": percentiles(wall[name]), "server_us": percentiles(server[name]), "client_cpu_us": percentiles(cpu[name])})
    p50 = {r["transport"]: r["overhead_us"]["p50"] for r in rows}
    ratios = {}
    for name in p50:
        if "(32)" in name:
            one = "stream attend" + (" f16" if "f16" in name else "")
            if "(shm" in name and one + " (shm)" in p50:
                ratios[f"{name} / {one} (shm)"] = p50[name] / p50[one + " (shm)"]
            if one in p50:
                ratios[f"{name} / {one}"] = p50[name] / p50[one]
    return {
        "what": "per-call overhead = client wall time - server stats.ms (health, stream ping: no server step, overhead = wall); client_cpu_us: the calling thread's CPU time over the call; ratios: overhead p50 over overhead p50",
        "ratios": ratios,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"rows": only or "all", "shm": shm, "spinUs": spin_us, "tokens": tokens, "layers": 1, "qHeads": q_heads, "kvHeads": kv_heads, "headDim": head_dim, "dtype": "f16", "method": method, "calls": calls, "warmup": warmup, "step": "q f32 + k, v f16 + position"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__, "server": {k: info.get(k) for k in ("version", "backend", "threads")}},
        "rows": rows,
    }


def table(result: Dict[str, Any]) -> str:
    lines = [
        "| transport | overhead p50 (us) | p90 | p99 | wall p50 (us) | server ms p50 (us) | client CPU p50 (us) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        o, c = r["overhead_us"], r.get("client_cpu_us")
        cpu = f"{c['p50']:.0f}" if c else "-"
        lines.append(f"| {r['transport']} | {o['p50']:.0f} | {o['p90']:.0f} | {o['p99']:.0f} | {r['wall_us']['p50']:.0f} | {r['server_us']['p50']:.0f} | {cpu} |")
    if result.get("ratios"):
        lines += ["", "| overhead p50 ratio | |", "| --- | ---: |"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--method", default="exact")
    p.add_argument("--shm", type=int, default=64 << 20, help="bytes of the shm rows' segment (0: no shm rows)")
    p.add_argument("--spin-us", type=int, default=2000, help="the (spin) rows' stream: spin_us (0: no spin rows)")
    p.add_argument("--rows", help="only these rows, comma-separated (e.g. 'stream attend,stream batch(32) (shm),stream batch(32) (shm stacked)'); default all")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    with server(p, args) as (url, _):
        result = run(url, args.token, args.calls, args.warmup, args.tokens, args.q_heads, args.kv_heads, args.head_dim, args.method, log=lambda m: print(m, file=sys.stderr), shm=args.shm, only=args.rows.split(",") if args.rows else None, spin_us=args.spin_us)
    print(table(result))
    write_json(args.out, result)

if __name__ == "__main__":
    main()
