"""bench:model -- kvrecall-code-13M decoded end to end through kvrecall, with every retrieval method.

Per trial: a held-out context (Debian python3 dist-packages code, not the training corpus) of `length` bytes with a
planted pass key, ending with the question `\\x1fpass key? `. The model (numpy; on a GPU, transformers through
kvrecall's adapter: bench/model/torch_model.py) prefills the document part (all but the last --steps bytes); its
per-layer post-RoPE K/V (f16) and prefill queries (kept at stride 4) are pushed as one kvrecall document sealed
with the methods the run asks for and `wave` (its clusters are what `estimate` reads, on by default for every
method but exact over such a document). Then, per configuration (a method at the server's default
`estimate`, optionally also without it, or a per-layer policy), a session over the document decodes the last --steps
positions teacher-forced and then greedily the five pass-key digits: every layer's attention at the decode
position is the session's answer (the stream transport, one frame per layer, with the position's q, k, v and
`position`); the rest of the model runs in numpy (or torch).

Trials run in --workers processes (each its own server; bench/model/trials.py): trial i of a length is the same
context whichever worker runs it and however many there are. Where a trial's time goes (16K bytes, 2-core VM):
numpy prefill 44 s; seal wave 9.9 s, retrieval-attention 12.7, hnsw 21.5 (then on the server's event loop, one core; now in worker threads),
ivf 3.8, topk-blocks 1.6, nosa 1.4, infiniretri 16.6; per configuration 216 attends of ~3 ms plus the float64
reference and oracle, 3.9 ms a call in numpy. On the GPU machine the prefill (~0.3 s) and the reference move to
the GPU and the seals run side by side in the workers' servers.

Measured, per configuration and per layer (means over trials, decode steps and query heads):
- attention output error |o - o_ref| / |o_ref|, o_ref = float64 dense attention over what the session holds
  (the document's f16 K/V and every appended token's f16 k/v, mirrored locally);
- the exact top-k oracle's error at the same exact count (per kv head the session's selection size; the tokens of
  highest mean probability over the GQA group; computed locally), and both attention recalls (mass covered);
- exact share (stats.attended / stats.tokens), estimated share (stats.estimated / tokens), scanned share;
- next-byte top-1 agreement with dense (dense = the same decode through `exact`) over the teacher-forced
  positions, and the mean KL(dense || method) of the next-byte distributions;
- pass-key accuracy (greedy, five digits exact), and keys lost where dense found them;
- per-step latency: the server's stats.ms and the client's round trip per layer, and per token (all layers).

    python3 bench/model/run.py                      # defaults: 8K bytes, 4 trials, 32 positions (the VM)
    python3 bench/model/run.py --lengths 8192,16384,32768 --trials 100
    python3 bench/model/run.py --url http://127.0.0.1:8700 --methods exact,wave,ivf
    python3 bench/model/run.py --session-defaults --tag vm-defaults   # every method at the server's default budgets
    python3 bench/model/run.py --methods wave --policy 'wide L1-2:0=wave@64,1-2=wave@0.04,3-5=wave@0.02'
    python3 bench/model/run.py --lengths 16384,32768 --trials 200 --workers 8 --minutes 6.5 --shares 0.6,0.4
    python3 bench/model/run.py --merge /tmp/wA,/tmp/wB --tag h200  # the report from worker states (runs merged)
    python3 bench/model/run.py --merge /tmp/wA,/tmp/wB --merge-lengths 32768 --machine-from bench/results/model-h200.json \
        --tag h200-32k-merged      # merged elsewhere: the machine as the runs' results name it; runs may differ in methods
    python3 bench/model/tally.py                                  # trials of other machines' results summed per length
    bash bench/model/device.sh                                    # on the lent GPU machine (see its top)

Writes bench/results/model-<tag>.json and .md (tag: --tag, else `vm` on a CPU server, else the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional


def _python_with_deps() -> None:
    """`python3` may be one without numpy and msgpack (a pyenv shim before Debian's): run again under
    KVRECALL_PYTHON or /usr/bin/python3, as test/integration/python-client.test.ts looks for one."""
    try:
        import msgpack  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        if not os.environ.get("KVRECALL_BENCH_REEXEC"):
            for py in (os.environ.get("KVRECALL_PYTHON"), "/usr/bin/python3"):
                if py and os.path.exists(py) and os.path.realpath(py) != os.path.realpath(sys.executable):
                    os.environ["KVRECALL_BENCH_REEXEC"] = "1"
                    os.execv(py, [py, *sys.argv])
        raise


_python_with_deps()

import numpy as np  # noqa: E402

import kvdecode  # noqa: E402
from kvdecode import REPO  # noqa: E402
import heldout  # noqa: E402
from machine import cpu_name  # noqa: E402
from meter import Meter  # noqa: E402
from report import markdown  # noqa: E402
from trials import configs_for, parse_policy, state_from_plain, worker  # noqa: E402

# The order of the tables; a method the server does not know is left out.
METHOD_ORDER = ["exact", "wave", "hnsw", "ivf", "retrieval-attention", "squeezed", "squeezed-2l", "infiniretri",
                "nosa", "topk-blocks"]


def machine(health: Dict[str, object], workers: int) -> Dict[str, object]:
    gpu = health.get("gpu") or {}
    gpu_name = gpu.get("name") if isinstance(gpu, dict) else None
    return dict(cpu=cpu_name(), cores=os.cpu_count(), arch=platform.machine(), python=platform.python_version(),
                numpy=np.__version__, backend=health.get("backend"), threads=health.get("threads"),
                gpu=gpu_name, server_version=health.get("version"), workers=workers)


def default_tag(m: Dict[str, object]) -> str:
    if m.get("backend") == "cpu" or not m.get("gpu"):
        return "vm"
    name = str(m["gpu"]).lower()
    for t in ("h200", "h100", "a100", "l40s", "l4"):
        if t in name:
            return t
    return "gpu"


def load_states(works: List[Path]) -> List[Dict[str, object]]:
    states = [state_from_plain(json.loads(p.read_text())) for w in works for p in sorted(w.glob("w*.json"))]
    if not states:
        raise SystemExit(f"no worker states in {', '.join(map(str, works))}")
    return states


# What makes two runs' trials the same experiment: merged runs must agree on these.
SAME_IN_MERGED_RUNS = ("budget", "sinks", "window", "ef", "steps", "query_stride", "seed", "session_defaults", "cluster_size")


def merge_states(states: List[Dict[str, object]]) -> Dict[str, object]:
    """Workers' states (of one run, or of runs with distinct --first-trial ranges) merged: per length, each
    configuration's meter (trials in index order). Runs may differ in their configurations (e.g. one of ivf alone):
    a configuration holds the trials of the runs that had it, and is compared with dense on those trials."""
    for st in states[1:]:
        a, b = states[0].get("args", {}), st.get("args", {})
        differ = [k for k in SAME_IN_MERGED_RUNS if a.get(k) != b.get(k)]
        if differ:
            raise SystemExit(f"runs differ in {', '.join(f'{k} ({a.get(k)} vs {b.get(k)})' for k in differ)}: "
                             "their trials do not merge")
    seen: Dict[int, set] = {}
    for st in states:
        for length, ls in st["lengths"].items():
            ids = set(ls["local"].trial_ids)
            if seen.setdefault(length, set()) & ids:
                raise SystemExit(f"trial ids {sorted(seen[length] & ids)[:5]} at {length} appear in two states: "
                                 "merge runs with distinct --first-trial ranges")
            seen[length] |= ids
    lengths: Dict[int, Dict[str, object]] = {}
    for st in states:
        for length, ls in st["lengths"].items():
            if not ls["trial_s"]:
                continue
            if length not in lengths:
                lengths[length] = ls
                continue
            acc = lengths[length]
            for label, m in ls["meters"].items():
                if label in acc["meters"]:
                    acc["meters"][label].merge(m)
                else:
                    acc["meters"][label] = m
            acc["local"].merge(ls["local"])
            acc["trial_s"] += ls["trial_s"]
            acc["loads"] += ls["loads"]
            for k, v in ls["timing"].items():
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        acc["timing"][k][kk] = acc["timing"][k].get(kk, 0.0) + vv
                else:
                    acc["timing"][k] += v
    # A run's workers share one span (first trial's start to last trial's end); the runs merged add theirs up.
    spans: Dict[int, Dict[float, List[float]]] = {}
    for st in states:
        for length, ls in st["lengths"].items():
            if ls["trial_s"] and "span" in ls:
                run = spans.setdefault(length, {}).setdefault(st.get("args", {}).get("run_start", 0.0), list(ls["span"]))
                run[:] = [min(run[0], ls["span"][0]), max(run[1], ls["span"][1])]
    for length, runs in spans.items():
        start = min(r[0] for r in runs.values())
        lengths[length]["span"] = [start, start + sum(r[1] - r[0] for r in runs.values())]
    for ls in lengths.values():
        for m in ls["meters"].values():
            m.in_trial_order()
        ls["local"].in_trial_order()
    return dict(lengths=lengths)


def length_result(a, length: int, ls: Dict[str, object], configs) -> Dict[str, object]:
    meters: Dict[str, Meter] = ls["meters"]
    dense, local = meters["exact"], ls["local"]
    configs = [c for c in configs if c.label in meters and meters[c.label].trial_ids]  # merged runs: at this length
    results = [dict(label=c.label, method=c.method, estimate=c.estimate,
                    **({"plan": [list(p) for p in c.plan]} if c.plan else {}), **({"ef": c.ef} if c.ef else {}),
                    **({"trial_ids": [int(i) for i in meters[c.label].trial_ids]}
                       if meters[c.label].trial_ids != dense.trial_ids else {}),
                    **meters[c.label].summary(dense))
               for c in configs]
    local_vs_exact = dict(
        agreement=float(np.mean(np.concatenate(local.tf_argmax) == np.concatenate(dense.tf_argmax))),
        pass_key_hits=int(sum(x == k for x, k in zip(local.answers, local.keys))),
        same_answers=int(sum(x == y for x, y in zip(local.answers, dense.answers))),
        max_logit_diff=float(max(local.logit_diff)))
    tm = ls["timing"]
    return dict(length=length, trials=len(ls["trial_s"]), steps=a.steps, document_tokens=length - a.steps,
                trial_ids=[int(i) for i in dense.trial_ids],
                span_s=round(ls["span"][1] - ls["span"][0], 1) if "span" in ls else None,
                configs=results, local_dense=local_vs_exact, trial_s=[round(x, 1) for x in ls["trial_s"]],
                load_per_trial=[round(x, 1) for x in ls["loads"]],
                timing={k: (round(v, 2) if isinstance(v, float) else {kk: round(vv, 2) for kk, vv in v.items()})
                        for k, v in tm.items()})


def run_workers(a, lengths: List[int], configs, doc_methods: List[str], work: Path, t_start: float) -> None:
    """a.workers processes (spawned: CUDA does not survive a fork), or this one; returns when all finished or
    --hard-minutes passed (stragglers are ended; their last saved state counts)."""
    shares = [float(x) for x in a.shares.split(",")] if a.shares else [1.0] * len(lengths)
    if len(shares) != len(lengths):
        raise SystemExit(f"--shares has {len(shares)} values for {len(lengths)} lengths")
    span = 60 * a.minutes if a.minutes > 0 else float("inf")
    cum = np.cumsum(shares) / sum(shares)
    deadlines = [t_start + span * float(c) for c in cum]
    if a.workers <= 1:
        import threading

        class Counter:
            value = 0

        worker(0, a, lengths, deadlines, [Counter() for _ in lengths], threading.Lock(), configs, doc_methods, str(work))
        return
    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    counters = [ctx.Value("i", 0, lock=False) for _ in lengths]
    procs = [ctx.Process(target=worker, args=(w, a, lengths, deadlines, counters, lock, configs, doc_methods, str(work)))
             for w in range(a.workers)]
    def end(why: str) -> None:
        for p in procs:
            if p.is_alive():
                print(f"worker pid {p.pid} still running {why}: ended with its server", flush=True)
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the worker made its own group (trials.worker)
                except ProcessLookupError:
                    pass
                p.join(5)

    def on_term(*_) -> None:  # `timeout` ended this run: the workers' groups are not this one's
        end("when the run was ended")
        sys.exit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for p in procs:
            p.start()
        hard = t_start + 60 * a.hard_minutes if a.hard_minutes > 0 else float("inf")
        for p in procs:
            p.join(max(0.0, hard - time.time()) if hard < float("inf") else None)
        end("at --hard-minutes")
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_wall(states: List[Dict[str, object]]) -> float:
    """Seconds from each run's start to its last worker's last save, summed over the runs merged."""
    ends: Dict[float, float] = {}
    for s in states:
        start = s["args"]["run_start"]
        ends[start] = max(ends.get(start, start), s.get("saved_at", start))
    return sum(end - start for start, end in ends.items())


def report(a, configs, doc_methods: List[str], states: List[Dict[str, object]], t_start: float,
           machines: Optional[List[Dict[str, object]]] = None, heldout_text: str = "") -> None:
    """machines: where the runs ran, when this process is not that machine (a merge elsewhere); the first is the
    result's `machine`, all of them its `machines`; heldout_text: the runs' held-out text, as their results say."""
    merged = merge_states(states)
    health = next((s["health"] for s in states if s.get("health")), {})
    mach = machines[0] if machines else machine(health, a.workers)
    lengths = [length_result(a, length, ls, configs) for length, ls in sorted(merged["lengths"].items())]
    errors = [f"w{s['worker']}: {e}" for s in states for e in ([s["error"]] if s.get("error") else []) + s.get("trial_errors", [])]
    res = dict(bench="model", machine=mach, **({"machines": machines} if machines and len(machines) > 1 else {}),
               params=dict(budget=a.budget, sinks=a.sinks, window=a.window, ef=a.ef, steps=a.steps,
                           session_defaults=a.session_defaults, query_stride=a.query_stride,
                           **({"cluster_size": a.cluster_size} if getattr(a, "cluster_size", None) else {}),
                           document_methods=doc_methods, seed=a.seed, workers=a.workers,
                           heldout=heldout_text or os.environ.get("KVRECALL_HELDOUT_PACK") and f"packed {heldout.DEFAULT_DIR} corpus"
                           or os.environ.get("KVRECALL_HELDOUT_DIR", heldout.DEFAULT_DIR),
                           model=next((s["model"] for s in states if s.get("model")), ""),
                           reference=next((s["held"] for s in states if s.get("held")), "")),
               lengths=lengths, errors=errors, wall_s=run_wall(states), runs=len({s["args"]["run_start"] for s in states}),
               # as the workers last saw them (a merge may run later, elsewhere)
               load_average=[max(s.get("load_at_save") or max((ls["loads"][-1] for ls in s["lengths"].values() if ls["loads"]),
                                                              default=0.0) for s in states)],
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(s.get("saved_at", time.time()) for s in states))))
    md = markdown(res)
    print(md)
    for e in errors:
        print(f"error: {e}", flush=True)
    if not a.no_write:
        tag = a.tag or default_tag(mach)
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"model-{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / f"model-{tag}.md").write_text(md)
        print(f"wrote {out / f'model-{tag}.json'} and .md", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="", help="a running kvrecall server for every worker (default: each starts this checkout's)")
    ap.add_argument("--token", default=os.environ.get("KVRECALL_TOKEN") or None)
    ap.add_argument("--lengths", default="8192", help="context bytes, comma-separated (full run: 8192,16384,32768)")
    ap.add_argument("--trials", type=int, default=4, help="pass-key trials per length (full run: 100)")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced decode positions at the end of the context")
    ap.add_argument("--budget", type=float, default=0.025, help="session budget: tokens, or a fraction (<1) of the context")
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--ef", type=int, default=0, help="search effort (0: each method's default)")
    ap.add_argument("--methods", default="", help="comma-separated (default: every method the server knows)")
    ap.add_argument("--estimate-off", action="store_true",
                    help="also run every method with estimate off (the default is the server's: on over a document with wave)")
    ap.add_argument("--session-defaults", action="store_true",
                    help="sessions at the server's default budget, sinks and window (ignores --budget, --sinks, --window)")
    ap.add_argument("--policy", action="append", default=[],
                    help="a per-layer policy, e.g. 'ra wide L0:0=retrieval-attention@0.05,1-5=retrieval-attention-est' "
                         "(repeatable; layers not named use exact; one session per method, per-layer budget and "
                         "estimate through the session's `layers`)")
    ap.add_argument("--query-stride", type=int, default=4)
    ap.add_argument("--cluster-size", type=int, default=None,
                    help="the document's clusterSize at PUT: wave's tokens per cluster (default: the server's)")
    ap.add_argument("--chunk", type=int, default=4096, help="upload chunk (tokens)")
    ap.add_argument("--minutes", type=float, default=0,
                    help="start no new trial after this many minutes of the run (0: run every trial); at least one per length")
    ap.add_argument("--shares", default="", help="the --minutes split over the lengths, e.g. 0.6,0.4 (default: equal)")
    ap.add_argument("--hard-minutes", type=float, default=0, help="end workers still running after this many minutes")
    ap.add_argument("--workers", type=int, default=1, help="trials in parallel, each worker with its own server")
    ap.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch", "transformers"],
                    help="the model: auto = transformers on a GPU when it loads, else torch on a GPU, else numpy")
    ap.add_argument("--held", default="auto", choices=["auto", "numpy", "torch"],
                    help="the float64 reference: auto = torch on the model's GPU when it has one")
    ap.add_argument("--work", default="", help="folder for the workers' states (default: a temporary one)")
    ap.add_argument("--merge", default="",
                    help="only report the worker states in these folders (comma-separated: a cut-short run's, or runs "
                         "with distinct --first-trial ranges); parameters and configurations are the runs' own")
    ap.add_argument("--merge-lengths", default="", help="with --merge: only these lengths (comma-separated)")
    ap.add_argument("--machine-from", default="",
                    help="with --merge: the machine(s) the runs ran on, from their committed result files "
                         "(comma-separated; the merging machine is not theirs)")
    ap.add_argument("--first-trial", type=int, default=0, help="the first trial index (runs to merge take distinct ranges)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="machine tag for the result files (default: vm on a CPU server)")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    a.budget = int(a.budget) if a.budget >= 1 else a.budget
    t_start = a.run_start = time.time()
    if a.merge:  # the runs' own parameters and configurations; this command's only say where to write
        states = load_states([Path(w) for w in a.merge.split(",")])
        if a.merge_lengths:
            keep = {int(x) for x in a.merge_lengths.split(",")}
            for st in states:
                st["lengths"] = {length: ls for length, ls in st["lengths"].items() if length in keep}
        configs: Dict[str, object] = {}  # every run's configurations, in the order they first appear
        for st in states:
            for c in st["configs"]:
                configs.setdefault(c.label, c)
        doc_methods = list(dict.fromkeys(m for st in states for m in st["doc_methods"]))
        machines, heldout_text = None, ""
        if a.machine_from:
            runs = [(Path(f).name, json.loads(Path(f).read_text())) for f in a.machine_from.split(",")]
            machines = [dict(r["machine"], source=name) for name, r in runs]
            heldout_text = "; ".join(dict.fromkeys(r["params"]["heldout"] for _, r in runs))
        workers = max(st["args"].get("workers", 1) for st in states)
        run_args = argparse.Namespace(**{**states[0]["args"], "workers": workers, "tag": a.tag, "out_dir": a.out_dir,
                                         "no_write": a.no_write})
        report(run_args, list(configs.values()), doc_methods, states, t_start, machines, heldout_text)
        return
    if a.workers > 1:  # each worker's numpy / torch on its share of the cores
        share = str(max(1, (os.cpu_count() or 1) // a.workers))
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, share)

    from kvrecall import Client

    server = None
    url = a.url
    if not url:
        sys.path.insert(0, str(REPO / "clients" / "python" / "tests"))
        import serve

        why = serve.available()
        if why:
            sys.exit(f"cannot start a server: {why}; pass --url")
        server = serve.start()
        url = server.url
        print(f"started {url} (data {server.data})", flush=True)
    try:
        known = kvdecode.session_methods(Client(url, token=a.token, timeout=60))
    finally:
        if server and a.workers > 1:
            server.stop()
            server = None
    try:
        if a.workers <= 1 and not a.url:
            a.url = url
        wanted = [m.strip() for m in a.methods.split(",") if m.strip()] or METHOD_ORDER + sorted(set(known) - set(METHOD_ORDER))
        unknown = [m for m in wanted if m not in known]
        if unknown:
            sys.exit(f"the server does not know {unknown}; it knows {known}")
        configs = configs_for([m for m in wanted if m in known], a.estimate_off)
        n_layers = int(json.loads((kvdecode.model_dir() / "config.json").read_text())["num_hidden_layers"])
        configs += [parse_policy(p, n_layers) for p in a.policy]
        for c in configs:
            for method, _, _ in c.layer_plan(n_layers):
                if method not in known:
                    sys.exit(f"{c.label}: the server does not know {method}; it knows {known}")
        if "wave" not in known:
            sys.exit("the server has no wave method; estimate needs it")
        # Sealed with what the configurations use and wave (estimate's clusters): every other method's index would
        # cost seal time for nothing (16K bytes on the 2-core VM: infiniretri 16 s, hnsw 21 s, wave 10 s, ...).
        used = {meth for c in configs for meth, _, _ in c.layer_plan(n_layers)} | {"wave"}
        doc_methods = [m for m in known if m in used and m != "exact"]
        print(f"{len(configs)} configurations: {', '.join(c.label for c in configs)}; {a.workers} worker(s)", flush=True)
        work = Path(a.work or tempfile.mkdtemp(prefix="kvrecall-bench-model-"))
        work.mkdir(parents=True, exist_ok=True)
        for old in work.glob("w*.json"):
            old.unlink()
        lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
        run_workers(a, lengths, configs, doc_methods, work, t_start)
        report(a, configs, doc_methods, load_states([work]), t_start)
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
