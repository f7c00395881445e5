"""Do the model's torch backends (bench/model/torch_model.py) give numpy's numbers? For the GPU machine, where
bench:model runs the model through transformers: one pass-key context per length, prefilled by numpy and by each
backend (post-RoPE Q, K and V per layer; K/V as stored, rounded to f16), then decoded teacher-forced and greedily
with dense float64 attention (kvdecode.Held) over each backend's own K/V; and the torch float64 reference
(torch_held.TorchHeld) against numpy's on the same inputs.

Tolerances (float32 in a different order; f16 rounding of K/V flips a last bit on ~0.5% of elements at 2K bytes):
- torch (numpy's arithmetic): Q within 1e-4 of its largest element, every teacher-forced logit within 0.02,
  next-byte argmax agreement >= 0.97, the same pass-key answer;
- transformers: its RoPE angles are float32 products (numpy's are float64), an angle error that grows with the
  position (~pos * 2^-24 rad in the fast dimensions: 2e-3 rad at 32K); emulated on the 2-core VM (numpy's
  arithmetic with float32 angles, 8K bytes): Q within 2.4e-4, logits within 0.004, agreement 1.0. Here: Q within
  5e-3, logits within 0.1, agreement >= 0.9, the same pass-key answer;
- TorchHeld vs Held: every measured quantity within 1e-9.

    python3 bench/model/check_backends.py [--lengths 2048,32768] [--out check.json]     # exit 1 when one is out
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import heldout
import kvdecode
from model import Model
import torch_model

TOL = {"torch": dict(q=1e-4, logits=0.02, agreement=0.97), "transformers": dict(q=5e-3, logits=0.1, agreement=0.9)}


def compare(ref_trial, ref_dec, model, text: bytes, length: int, steps: int, seed: int) -> dict:
    t0 = time.perf_counter()
    trial = kvdecode.make_trial(model, text, length, steps, kvdecode.trial_rng(seed, length, 0))
    prefill_s = time.perf_counter() - t0
    q_rel = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(ref_trial.q, trial.q))
    k_flip = max(float(np.mean(a != b)) for a, b in zip(ref_trial.k16, trial.k16))
    v_flip = max(float(np.mean(a != b)) for a, b in zip(ref_trial.v16, trial.v16))
    held = kvdecode.Held(model, trial, steps + kvdecode.PASS_KEY_DIGITS)
    t0 = time.perf_counter()
    dec = kvdecode.decode(model, trial, held.dense_attend)
    decode_s = time.perf_counter() - t0
    return dict(prefill_s=round(prefill_s, 3), decode_s=round(decode_s, 3), q_rel=q_rel, k16_flipped=k_flip,
                v16_flipped=v_flip, logits_max_abs=float(np.abs(ref_dec.logits - dec.logits).max()),
                agreement=float(np.mean(ref_dec.logits.argmax(1) == dec.logits.argmax(1))),
                answer=dec.answer.decode("latin-1"), numpy_answer=ref_dec.answer.decode("latin-1"),
                key=trial.key.decode())


def check_held(model, trial, device: str) -> float:
    from torch_held import TorchHeld

    extra = 8
    a, b = kvdecode.Held(model, trial, extra), TorchHeld(model, trial, extra, device=device)
    rng = np.random.default_rng(1)
    worst = 0.0
    for li in range(model.cfg.n_layers):
        k = rng.standard_normal((model.cfg.n_kv_heads, model.cfg.head_dim)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        a.append(li, k, v), b.append(li, k, v)
        q = trial.q[li][:, -1]
        out = a.reference(li, q)[0] + 0.01 * rng.standard_normal((model.cfg.n_heads, model.cfg.head_dim))
        sel = [rng.choice(a.n[li], 64, replace=False) for _ in range(model.cfg.n_kv_heads)]
        worst = max([worst] + [float(np.abs(x - y).max()) for x, y in zip(a.measure(li, q, out, sel), b.measure(li, q, out, sel))])
    return worst


def markdown(res: dict, models: dict) -> str:
    from machine import cpu_name

    out = ["# bench:model backends: numpy vs torch vs transformers (bench/model/check_backends.py)", "",
           f"One pass-key context per length (seed 0, trial 0), prefilled by each backend and decoded teacher-forced "
           f"and greedily with dense float64 attention over its own f16 K/V; against numpy's. Device {res['device']} "
           f"({cpu_name()}); " + "; ".join(f"{n}: {m.name}" for n, m in models.items() if m is not None) + ".", "",
           "| length | backend | prefill s | Q max rel. diff | K f16 flipped | logits max abs diff | argmax agreement "
           "| pass key (numpy's) |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for length, row in res["lengths"].items():
        out.append(f"| {length} | numpy | {row['numpy_prefill_s']:.2f} | | | | | |")
        for name in models:
            c = row.get(name)
            if c:
                out.append(f"| {length} | {name} | {c['prefill_s']:.2f} | {c['q_rel']:.1e} | {100 * c['k16_flipped']:.2f}% | "
                           f"{c['logits_max_abs']:.4f} | {c['agreement']:.3f} | {c['answer']} ({c['numpy_answer']}) |")
        out.append(f"| {length} | torch float64 reference vs numpy's | | | | {row['held_max_diff']:.1e} | | |")
    out += ["", "Failures: " + ("; ".join(res["failures"]) or "none"), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,16384")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="torch,transformers")
    ap.add_argument("--device", default="")
    ap.add_argument("--out", default="", help="JSON results")
    ap.add_argument("--md", default="", help="a markdown table of the results")
    a = ap.parse_args()
    device = a.device or torch_model.default_device()
    text = heldout.corpus(a.seed)
    ref = Model()
    models = {}
    for name in a.backends.split(","):
        try:
            models[name] = (torch_model.TorchModel if name == "torch" else torch_model.HfModel)(device=device)
            print(f"{name}: {models[name].name}", flush=True)
        except Exception as e:  # reported, and a failure of the check
            print(f"{name}: cannot load ({type(e).__name__}: {e})", flush=True)
            models[name] = None
    res = dict(device=device, lengths={}, failures=[])
    for length in [int(x) for x in a.lengths.split(",")]:
        t0 = time.perf_counter()
        trial = kvdecode.make_trial(ref, text, length, a.steps, kvdecode.trial_rng(a.seed, length, 0))
        np_prefill = time.perf_counter() - t0
        held = kvdecode.Held(ref, trial, a.steps + kvdecode.PASS_KEY_DIGITS)
        dec = kvdecode.decode(ref, trial, held.dense_attend)
        row = dict(numpy_prefill_s=round(np_prefill, 2), held_max_diff=check_held(ref, trial, device))
        if row["held_max_diff"] > 1e-9:
            res["failures"].append(f"{length}: TorchHeld differs from Held by {row['held_max_diff']:.2e}")
        for name, m in models.items():
            if m is None:
                res["failures"].append(f"{name}: not loaded")
                continue
            c = compare(trial, dec, m, text, length, a.steps, a.seed)
            row[name] = c
            tol = TOL[name]
            bad = [f"q {c['q_rel']:.2e} > {tol['q']}" for _ in [0] if c["q_rel"] > tol["q"]]
            bad += [f"logits {c['logits_max_abs']:.3f} > {tol['logits']}" for _ in [0] if c["logits_max_abs"] > tol["logits"]]
            bad += [f"agreement {c['agreement']:.3f} < {tol['agreement']}" for _ in [0] if c["agreement"] < tol["agreement"]]
            bad += [f"answer {c['answer']!r} != numpy's {c['numpy_answer']!r}" for _ in [0] if c["answer"] != c["numpy_answer"]]
            res["failures"] += [f"{length} {name}: {b}" for b in bad]
        res["lengths"][length] = row
        print(json.dumps({length: row}), flush=True)
    print("failures: " + ("; ".join(res["failures"]) or "none"), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(res, models))
    sys.exit(1 if res["failures"] else 0)


if __name__ == "__main__":
    main()
