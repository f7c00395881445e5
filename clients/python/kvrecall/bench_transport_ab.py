"""The Python client's decode-call overhead, this checkout's client against
an older copy of it, in one process against one server, alternated call by
call (the side that goes first swapped every call), so that the load of a
shared machine hits both alike.

    git archive 520e0b0 clients/python/kvrecall | tar -x -C /tmp/base
    python3 -m kvrecall.bench_transport_ab --serve --before /tmp/base/clients/python/kvrecall --out ab.json

Rows per side (overhead = client wall - the server's stats.ms; p50 in us):
- health (http.client): a bare GET /v1/health on a kept-alive http.client
  connection with TCP_NODELAY (bench_transport's floor, the same code both sides);
- health (client): `Client.health()`, the same connection as the side's HTTP attends;
- ping (stream): a WebSocket ping answered by the server's pong on the
  side's stream, the bare round trip of its connection;
- http attend, stream attend: a decode step (q f32, the new token's k, v f16
  with its position) on its own session; stream attend f16: q and out f16;
- stream batch(32) f16: one `Stream.attend_batch` of 32 sessions' steps
  (q and out f16; the transformers adapter's decode call), each session
  over a document of 256 tokens (so that the server's part stays short);
  its overhead is the wall time less the batch's server ms.
Client CPU rows: the calling thread's CPU time over the call (time.thread_time).
--phases: instead, where a stream attend's time goes on each side
(perf_counter_ns marks: pack, send, wait + read, msgpack decode, arrays);
--phases http: where an HTTP attend's and a Client.health()'s go (pack,
exchange, msgpack decode, arrays; the before side's client must have
Client._connection and _headers, as 520e0b0..this change's did).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import msgpack
import numpy as np

from .bench_server import add_server_args, server, write_json
from .bench_transport import _Health

ROWS = ["health (http.client)", "health (client)", "ping (stream)", "http attend", "stream attend", "stream attend f16", "stream batch(32) f16"]
BATCH, BATCH_TOKENS = 32, 256


def load_copy(path: str, name: str) -> Any:
    """The kvrecall package at `path` imported as `name` (its relative imports follow)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _ping(ws: Any) -> None:
    ws.ping(b"p")
    while ws._read_frame()[1] != 0xA:  # the frame reader of both versions: (fin, opcode, payload)
        pass


class Side:
    def __init__(self, pkg: Any, url: str, token: Optional[str], tokens: int, shape: tuple, rng: np.random.Generator, name: str):
        q_heads, kv_heads, d = shape
        self.kv = pkg.Client(url, token=token, timeout=60)
        model = pkg.model_shape(1, q_heads, kv_heads, d, dtype="f16")
        self.doc = f"ab-{name}-{os.getpid()}"
        k = rng.standard_normal((kv_heads, tokens, d)).astype(np.float16)
        self.kv.push_document(self.doc, model, [k], [k.copy()])
        self.sid = {row: self.kv.create_session(model, documents=[self.doc])["id"] for row in ("http", "stream", "stream16", "phases")}
        self.kv.push_document(self.doc + "-short", model, [k[:, :BATCH_TOKENS].copy()], [k[:, :BATCH_TOKENS].copy()])
        self.batch = [self.kv.create_session(model, documents=[self.doc + "-short"])["id"] for _ in range(BATCH)]
        self.stream = self.kv.open_stream()
        self.health = _Health(url, token)
        self.pkg = pkg

    def close(self) -> None:
        self.stream.close()
        self.health.conn.close()
        for sid in [*self.sid.values(), *self.batch]:
            self.kv.delete_session(sid)
        self.kv.delete_document(self.doc)
        self.kv.delete_document(self.doc + "-short")
        self.kv.close()


def run(url: str, token: Optional[str], before: Any, after: Any, calls: int, warmup: int, tokens: int, phases: Optional[str]) -> Dict[str, Any]:
    shape = (32, 8, 128)
    rng = np.random.default_rng(1)
    n = warmup + calls
    qs = rng.standard_normal((n, shape[0], shape[2])).astype(np.float32)
    q16 = qs.astype(np.float16)
    ks = rng.standard_normal((n, shape[1], shape[2])).astype(np.float16)
    vs = rng.standard_normal((n, shape[1], shape[2])).astype(np.float16)
    sides = {"before": Side(before, url, token, tokens, shape, rng, "before"), "after": Side(after, url, token, tokens, shape, rng, "after")}
    load = [os.getloadavg()]

    def call(s: Side, row: str, i: int) -> float:
        if row == "health (http.client)":
            s.health()
            return 0.0
        if row == "health (client)":
            s.kv.health()
            return 0.0
        if row == "ping (stream)":
            _ping(s.stream.ws)
            return 0.0
        if row == "http attend":
            return s.kv.attend(s.sid["http"], 0, qs[i], k=ks[i], v=vs[i], position=i).stats["ms"]
        if row == "stream attend":
            return s.stream.attend(s.sid["stream"], 0, qs[i], k=ks[i], v=vs[i], position=i).stats["ms"]
        if row == "stream attend f16":
            return s.stream.attend(s.sid["stream16"], 0, q16[i], k=ks[i], v=vs[i], position=i, out_dtype="f16").stats["ms"]
        rs = s.stream.attend_batch(0, [{"session": b, "q": q16[i], "k": ks[i], "v": vs[i], "position": i, "out_dtype": "f16"} for b in s.batch])
        for r in rs:
            if isinstance(r, Exception):
                raise r
        return rs.ms

    names = (PHASES_HTTP if phases == "http" else PHASES_STREAM) if phases else ROWS
    samples: Dict[str, Dict[str, List[float]]] = {side: {row: [] for row in names} for side in sides}
    server_ms: Dict[str, Dict[str, List[float]]] = {side: {} for side in sides}
    cpu: Dict[str, Dict[str, List[float]]] = {side: {} for side in sides}
    wall: Dict[str, Dict[str, List[float]]] = {side: {} for side in sides}
    try:
        for i in range(n):
            for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                s = sides[side]
                if phases:
                    cut = (_phases_http if phases == "http" else _phases)(s, side, qs[i], ks[i], vs[i], i)
                    if i >= warmup:
                        for row, us in cut.items():
                            samples[side][row].append(us)
                    continue
                for row in names:
                    c0 = time.thread_time_ns()
                    t0 = time.perf_counter_ns()
                    ms = call(s, row, i)
                    t1 = time.perf_counter_ns()
                    c1 = time.thread_time_ns()
                    if i >= warmup:
                        samples[side][row].append((t1 - t0) / 1e3 - ms * 1e3)
                        cpu[side].setdefault(row, []).append((c1 - c0) / 1e3)
                        wall[side].setdefault(row, []).append((t1 - t0) / 1e3)
                        if ms:
                            server_ms[side].setdefault(row, []).append(ms * 1e3)
        load.append(os.getloadavg())
    finally:
        for s in sides.values():
            s.close()
    rows = {row: {side: _pcts(samples[side][row]) for side in sides} for row in names}
    # The server's own stats.ms per attend row (its request's parse included: where a copy of q would show).
    server = {row: {side: _pcts(server_ms[side][row]) for side in sides} for row in server_ms["after"] if all(row in server_ms[side] for side in sides)}
    # The calling thread's CPU time over each call (the client's own work and its syscalls, not the wait).
    client_cpu = {row: {side: _pcts(cpu[side][row]) for side in sides} for row in cpu["after"]}
    wall_us = {row: {side: _pcts(wall[side][row]) for side in sides} for row in wall["after"]}
    return {"what": "p50/p90 in us; overhead = client wall - server stats.ms; client_cpu_us: the calling thread's CPU time over the call", "calls": calls, "warmup": warmup, "tokens": tokens, "shape": shape, "load": load, "phases": phases, "rows": rows, "server_us": server, "client_cpu_us": client_cpu, "wall_us": wall_us}


PHASES_STREAM = ["pack", "send", "wait + read", "msgpack decode", "arrays", "overhead"]
PHASES_HTTP = ["attend: pack", "attend: exchange - server ms", "attend: msgpack decode", "attend: arrays", "attend: overhead", "health: exchange", "health: msgpack decode", "health: overhead"]


def _phases_http(s: Side, side: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, i: int) -> Dict[str, float]:
    """A Client.health() and an HTTP attend, each cut at its phases as each
    version's client does them: pack (the body), exchange (the head, the
    send, the wait and the answer read; for the attend less the server's
    step), msgpack decode, arrays (attend_result). before: a dict packed by
    msgpack, the answer read into bytes; after: kvrecall.wire's parts, the
    answer decoded where it lies in the connection's buffer."""
    pkg, kv, sid = s.pkg, s.kv, s.sid["http"]
    client = sys.modules[pkg.__name__ + ".client"]
    path = f"/v1/sessions/{sid}/attend"
    t = [time.perf_counter_ns()]
    if side == "before":
        conn, _ = kv._connection()
        res = conn.request("GET", "/v1/health", None, dict(kv._headers))
    else:
        conn, _ = kv._http.connection()
        res = conn.exchange("GET", kv._http.head("GET", "/v1/health", None), (), 0, view=True)
    t.append(time.perf_counter_ns())
    msgpack.unpackb(res.data, raw=False, strict_map_key=False)
    t.append(time.perf_counter_ns())
    if side == "before":
        body = client.attend_body(q, k, v, position=i)
        body["layer"] = 0
        payload = msgpack.packb(body, use_bin_type=True)
        t.append(time.perf_counter_ns())
        conn, _ = kv._connection()
        res = conn.request("POST", path, payload, {**kv._headers, "content-length": str(len(payload))})
    else:
        wire = sys.modules[pkg.__name__ + ".wire"]
        parts = wire.http_attend_parts(kv._http.packer(), 0, wire.attend_fields(q, k, v, position=i))
        t.append(time.perf_counter_ns())
        conn, _ = kv._http.connection()
        nbytes = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        res = conn.exchange("POST", kv._http.head("POST", path, nbytes), parts, nbytes, view=True)
    t.append(time.perf_counter_ns())
    frame = msgpack.unpackb(res.data, raw=False, strict_map_key=False)
    t.append(time.perf_counter_ns())
    ms = client.attend_result(frame).stats["ms"]
    t.append(time.perf_counter_ns())
    us = np.diff(t) / 1e3
    return {
        "health: exchange": us[0],
        "health: msgpack decode": us[1],
        "health: overhead": us[0] + us[1],
        "attend: pack": us[2],
        "attend: exchange - server ms": us[3] - ms * 1e3,
        "attend: msgpack decode": us[4],
        "attend: arrays": us[5],
        "attend: overhead": (t[-1] - t[2]) / 1e3 - ms * 1e3,
    }


def _phases(s: Side, side: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, i: int) -> Dict[str, float]:
    """One stream attend cut at its phases, as each version's Stream.attend does it."""
    st, pkg, sid = s.stream, s.pkg, s.sid["phases"]
    client = sys.modules[pkg.__name__ + ".client"]
    t = [time.perf_counter_ns()]
    id_ = st._next_id
    st._next_id += 1
    if side == "before":
        body = client.attend_body(q, k, v, position=i)
        body.update(session=sid, layer=0, id=id_)
        payload = st._packer.pack(body)
        t.append(time.perf_counter_ns())
        st.ws.send_binary(payload)
        t.append(time.perf_counter_ns())
        data = st.ws.recv()
    else:
        wire = sys.modules[pkg.__name__ + ".wire"]
        parts = wire.attend_parts(st._packer, id_, sid, 0, wire.attend_fields(q, k, v, position=i))
        t.append(time.perf_counter_ns())
        st.ws.send_binary_parts(parts)
        t.append(time.perf_counter_ns())
        data = st.ws.recv_view()
    t.append(time.perf_counter_ns())
    frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    t.append(time.perf_counter_ns())
    r = client.attend_result(frame)
    t.append(time.perf_counter_ns())
    ms = r.stats["ms"]
    cut = {row: float(us) for row, us in zip(PHASES_STREAM, np.diff(t) / 1e3)}
    cut["overhead"] = (t[-1] - t[0]) / 1e3 - ms * 1e3
    return cut


def _pcts(xs: List[float]) -> Dict[str, float]:
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}


def table(result: Dict[str, Any]) -> str:
    lines = ["| row | before p50 (us) | after p50 (us) | after / before |", "| --- | ---: | ---: | ---: |"]
    for row, r in result["rows"].items():
        b, a = r["before"]["p50"], r["after"]["p50"]
        lines.append(f"| {row} | {b:.1f} | {a:.1f} | {a / b:.3f} |")
    for row, r in result.get("wall_us", {}).items():
        b, a = r["before"]["p50"], r["after"]["p50"]
        lines.append(f"| {row}: wall | {b:.1f} | {a:.1f} | {a / b:.3f} |")
    for row, r in result.get("client_cpu_us", {}).items():
        b, a = r["before"]["p50"], r["after"]["p50"]
        lines.append(f"| {row}: client CPU | {b:.1f} | {a:.1f} | {a / b:.3f} |")
    for row, r in result.get("server_us", {}).items():
        b, a = r["before"]["p50"], r["after"]["p50"]
        lines.append(f"| {row}: server stats.ms | {b:.1f} | {a:.1f} | {a / b:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--before", required=True, help="a directory holding the older kvrecall package (git archive ... clients/python/kvrecall)")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--phases", nargs="?", const="stream", choices=["stream", "http"], help="where a stream attend's time goes (stream, the default) or an HTTP attend's and a health's (http)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    before = load_copy(os.path.abspath(args.before), "kvrecall_before")
    after = sys.modules[__package__]
    with server(p, args) as (url, _):
        result = run(url, args.token, before, after, args.calls, args.warmup, args.tokens, args.phases)
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__, "msgpack": ".".join(map(str, msgpack.version))}
    print(f"load {result['load'][0][0]:.2f} -> {result['load'][-1][0]:.2f}")
    print(table(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
