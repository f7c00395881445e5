"""bench:model's trials (bench/model/run.py): the configurations, one pass-key trial through every configuration,
and the worker loop that runs trials until its share of the time is spent.

A worker has its own kvrecall server (or the run's --url), model (numpy, or torch / transformers on a GPU) and
float64 reference (numpy, or torch on the GPU); several workers run trials in parallel on a many-core machine,
where one trial leaves most cores idle (hnsw's index build at seal runs on the server's event loop). Trial i of a
length draws from its own random stream (kvdecode.trial_rng), so the trials do not depend on the worker count.
After every trial a worker writes its state (per length: every configuration's Meter, the local dense meter,
timings, log) to <work>/w<id>.json, so a run cut short still reports what it finished (run.py --merge).
"""

from __future__ import annotations

import os
import json
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

import kvdecode
from kvdecode import REPO, Held, SessionAttend, decode, make_trial, push_document, trial_rng
from meter import Meter, kl_mean


@dataclass
class Config:
    label: str
    method: str
    estimate: Optional[bool]  # None: the server's default (on for every method but exact over a document with wave)
    # A per-layer policy: (method, estimate, budget) per layer (None: the session's default / --budget). One session
    # per method in the plan, its per-layer overrides in the session's `layers`; method and estimate above unused.
    plan: Optional[List[Tuple[str, Optional[bool], Optional[float]]]] = None
    # The sessions' `ef` (search effort) instead of --ef: one run compares efforts on the same trials and prefill.
    ef: Optional[int] = None

    def layer_plan(self, layers: int) -> List[Tuple[str, Optional[bool], Optional[float]]]:
        return self.plan or [(self.method, self.estimate, None)] * layers


def parse_policy(spec: str, layers: int) -> Config:
    """`label:0-1=wave,2-5=retrieval-attention+est@0.05` (ranges of layers = method, `+est`/`-est` for estimate
    on/off, `@budget` for that layer's budget instead of --budget; layers not named use `exact`), optionally
    `label#ef:...` for every session's `ef` instead of --ef."""
    label, _, body = spec.rpartition(":")
    if not body or not label:
        raise SystemExit(f"--policy {spec!r}: expected label:layers=method,...")
    label, _, ef_s = label.partition("#")
    ef = int(ef_s) if ef_s else None
    plan: List[Tuple[str, Optional[bool], Optional[float]]] = [("exact", None, None)] * layers
    for part in body.split(","):
        rng, _, meth = part.partition("=")
        meth, _, bud = meth.partition("@")
        budget = None if not bud else (int(float(bud)) if float(bud) >= 1 else float(bud))
        a, _, b = rng.partition("-")
        est: Optional[bool] = None
        for suffix, val in (("+est", True), ("-est", False)):
            if meth.endswith(suffix):
                meth, est = meth[:-len(suffix)], val
        for li in range(int(a), int(b or a) + 1):
            if not 0 <= li < layers:
                raise SystemExit(f"--policy {spec!r}: layer {li} is not one of the model's {layers}")
            plan[li] = (meth.strip(), est, budget)
    return Config(label.strip(), "policy", None, plan, ef)


def plan_sessions(plan: List[Tuple[str, Optional[bool], Optional[float]]]) -> Dict[str, List[Dict[str, object]]]:
    """Per method in a plan, the `layers` policy of its one session: the plan's budget and estimate in the layers
    it answers ({} elsewhere: the session's own, unused)."""
    out: Dict[str, List[Dict[str, object]]] = {}
    for li, (method, est, budget) in enumerate(plan):
        layers = out.setdefault(method, [{} for _ in plan])
        if budget is not None:
            layers[li]["budget"] = budget
        if est is not None:
            layers[li]["estimate"] = est
    return out


def configs_for(methods: List[str], estimate_off: bool) -> List[Config]:
    out = [Config("exact", "exact", None)]
    for m in methods:
        if m == "exact":
            continue
        out.append(Config(m, m, None))
        if estimate_off:
            out.append(Config(f"{m} -estimate", m, False))
    return out


def new_length_state(configs: List[Config], layers: int) -> Dict[str, object]:
    return dict(meters={c.label: Meter(layers) for c in configs}, local=Meter(layers), trial_s=[], loads=[],
                timing=dict(prefill_s=0.0, push_s=0.0, decode_s={c.label: 0.0 for c in configs}, local_dense_s=0.0))


def run_trial(a, client, model, text: bytes, length: int, trial_i: int, configs: List[Config], doc_methods: List[str],
              held_cls, state: Dict[str, object], log, tag: str) -> None:
    """One pass-key trial at `length` through every configuration; adds it to `state` only once every configuration
    finished (a trial that fails leaves the state as it was)."""
    L = model.cfg.n_layers
    extra = a.steps + kvdecode.PASS_KEY_DIGITS
    t_trial = time.perf_counter()
    trial = make_trial(model, text, length, a.steps, trial_rng(a.seed, length, trial_i))
    doc = f"model-{length}-{trial_i}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    push_document(client, doc, model, trial, doc_methods, query_stride=a.query_stride, chunk=a.chunk,
                  cluster_size=getattr(a, "cluster_size", None))
    push_s = time.perf_counter() - t0
    meters = {c.label: Meter(L) for c in configs}
    local = Meter(L)
    decode_s = {c.label: 0.0 for c in configs}
    try:
        t0 = time.perf_counter()
        held = held_cls(model, trial, extra)
        d = decode(model, trial, held.dense_attend)
        local.tf_argmax.append(d.logits.argmax(axis=1))
        logits = {"local": d.logits}
        local.answers.append(d.answer), local.keys.append(trial.key), local.trial_ids.append(trial_i)
        local_s = time.perf_counter() - t0
        line = [f"{tag}[{length}] trial {trial_i}: plant at {trial.at}, key {trial.key.decode()}, prefill "
                f"{trial.prefill_s:.1f}s, push+seal {push_s:.1f}s, local dense {d.answer.decode('latin-1')!r}"]
        with client.open_stream() as stream:
            for c in configs:
                m = meters[c.label]
                t0 = time.perf_counter()
                plan = c.layer_plan(L)
                sessions: Dict[str, str] = {}
                try:
                    for method, layers in plan_sessions(plan).items():
                        params: Dict[str, object] = {} if a.session_defaults else dict(budget=a.budget, sinks=a.sinks, window=a.window)
                        if c.plan:
                            params["layers"] = layers
                        elif c.estimate is not None:
                            params["estimate"] = c.estimate
                        ef = c.ef if c.ef is not None else a.ef
                        if ef:
                            params["ef"] = ef
                        sessions[method] = client.create_session(kvdecode.model_spec(model), documents=[doc],
                                                                 method=method, **params)["id"]
                    m.setup_ms.append((time.perf_counter() - t0) * 1e3)
                    held = held_cls(model, trial, extra)
                    att = SessionAttend(stream, [sessions[p[0]] for p in plan], L, returns=("out", "selection"),
                                        observe=lambda li, q, k, v, r, rtt, m=m, held=held: m.observe(held, li, q, k, v, r, rtt))
                    t0 = time.perf_counter()
                    d = decode(model, trial, att)
                    decode_s[c.label] += time.perf_counter() - t0
                    m.token_ms.extend(np.asarray(m.rtt_ms).reshape(-1, L).sum(axis=1).tolist())
                finally:
                    for sid in sessions.values():
                        client.delete_session(sid)
                m.tf_argmax.append(d.logits.argmax(axis=1))
                logits[c.label] = d.logits
                m.answers.append(d.answer), m.keys.append(trial.key), m.trial_ids.append(trial_i)
                line.append(f"{c.label} {d.answer.decode('latin-1')!r}")
    finally:
        client.delete_document(doc)
    dense = logits["exact"]
    local.kl.append(kl_mean(dense, logits["local"]))
    local.logit_diff.append(float(np.abs(logits["local"] - dense).max()))
    for c in configs:
        meters[c.label].kl.append(kl_mean(dense, logits[c.label]))
    for c in configs:
        state["meters"][c.label].merge(meters[c.label])
        state["timing"]["decode_s"][c.label] += decode_s[c.label]
    state["local"].merge(local)
    state["timing"]["prefill_s"] += trial.prefill_s
    state["timing"]["push_s"] += push_s
    state["timing"]["local_dense_s"] += local_s
    state["trial_s"].append(time.perf_counter() - t_trial)
    now = time.time()  # wall clock, comparable across workers: the span of a length's trials
    state["span"] = [min(state.get("span", [now])[0], now - state["trial_s"][-1]), now]
    state["loads"].append(os.getloadavg()[0])
    line.append(f"trial {state['trial_s'][-1]:.0f}s, load {state['loads'][-1]:.1f}")
    log("; ".join(line))


def state_to_plain(state: Dict[str, object]) -> Dict[str, object]:
    """A worker's state as JSON values (numpy-free: it is read back on machines with other numpy versions)."""
    out = {k: v for k, v in state.items() if k not in ("lengths", "configs")}
    out["configs"] = [asdict(c) for c in state["configs"]]
    out["lengths"] = {str(length): {**{k: v for k, v in ls.items() if k not in ("meters", "local")},
                                    "meters": {label: m.to_plain() for label, m in ls["meters"].items()},
                                    "local": ls["local"].to_plain()}
                      for length, ls in state["lengths"].items()}
    return out


def state_from_plain(d: Dict[str, object]) -> Dict[str, object]:
    state = {k: v for k, v in d.items() if k not in ("lengths", "configs")}
    state["configs"] = [Config(c["label"], c["method"], c["estimate"], [tuple(p) for p in c["plan"]] if c["plan"] else None,
                               c.get("ef")) for c in d["configs"]]
    state["lengths"] = {int(length): {**{k: v for k, v in ls.items() if k not in ("meters", "local")},
                                      "meters": {label: Meter.from_plain(m) for label, m in ls["meters"].items()},
                                      "local": Meter.from_plain(ls["local"])}
                        for length, ls in d["lengths"].items()}
    return state


def held_class(model, which: str):
    """The float64 reference: numpy's Held, or TorchHeld on the model's device when it has one."""
    device = getattr(model, "device", "cpu")
    if which == "numpy" or (which == "auto" and device == "cpu"):
        return Held
    from torch_held import TorchHeld

    return lambda m, trial, extra: TorchHeld(m, trial, extra, device=device)


def worker(wid: int, a, lengths: List[int], deadlines: List[float], counters, lock, configs: List[Config],
           doc_methods: List[str], work: str) -> None:
    """Runs trials (the next index of a length from the shared counters) until each length's trials are taken, its
    deadline passed or the next would not finish before --hard-minutes (its first trial always runs); writes its state to <work>/w<wid>.json after every trial."""
    import heldout
    import torch_model

    if a.workers > 1:
        # Its own process group, with its server: ended at --hard-minutes, the group is killed whole (a signal
        # handler would not run before the blocking call it interrupts returns: a seal can take a minute). The
        # state saved after the last finished trial stands.
        os.setpgrp()

    def log(s: str) -> None:
        print(s, flush=True)

    tag = f"w{wid} " if a.workers > 1 else ""
    out = Path(work) / f"w{wid}.json"
    state: Dict[str, object] = dict(worker=wid, lengths={}, error=None, model="", held="", args=vars(a),
                                    configs=configs, doc_methods=doc_methods)
    server = None

    def save() -> None:
        state["saved_at"] = time.time()
        state["load_at_save"] = os.getloadavg()[0]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(state_to_plain(state)))
        tmp.replace(out)

    try:
        url = a.url
        if not url:
            sys.path.insert(0, str(REPO / "clients" / "python" / "tests"))
            import serve

            server = serve.start()
            url = server.url
        from kvrecall import Client

        client = Client(url, token=a.token, timeout=600)
        torch_model.use_gpu_of_worker(wid)
        model = torch_model.load(a.backend, log=lambda s: log(tag + s))
        state["model"] = torch_model.model_name(model)
        held_cls = held_class(model, a.held)
        state["held"] = "numpy" if held_cls is Held else f"torch float64 on {model.device}"
        state["health"] = client.health()
        text = heldout.corpus(a.seed)
        hard = a.run_start + 60 * a.hard_minutes if a.hard_minutes > 0 else float("inf")
        prev = None  # (length, its last trial's seconds) of this worker: a first guess at the next length's
        for li, length in enumerate(lengths):
            st = state["lengths"].setdefault(length, new_length_state(configs, model.cfg.n_layers))
            while True:
                # A trial that could not finish before --hard-minutes (its length's last one here took that long,
                # with 10% to spare) is not started: ended there, its work would count for nothing.
                last = 1.1 * st["trial_s"][-1] if st["trial_s"] else (1.1 * prev[1] * length / prev[0] if prev else 0.0)
                late = time.time() > deadlines[li] or time.time() + last > hard
                with lock:
                    i = a.first_trial + counters[li].value
                    if i >= a.first_trial + a.trials or (i > a.first_trial and late):
                        break
                    counters[li].value += 1
                try:
                    run_trial(a, client, model, text, length, i, configs, doc_methods, held_cls, st, log, tag)
                except Exception as e:  # one trial's failure (a timeout, a server error): noted, the next goes on
                    errors = state.setdefault("trial_errors", [])
                    errors.append(f"[{length}] trial {i}: {type(e).__name__}: {e}")
                    log(f"{tag}{errors[-1]}")
                    if len(errors) >= 3:
                        raise
                save()
            if st["trial_s"]:
                prev = (length, st["trial_s"][-1])
    except BaseException as e:  # noqa: BLE001 -- reported in the results, the other workers go on
        state["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        log(f"{tag}failed: {state['error']}")
    finally:
        save()
        if server:
            server.stop()
