"""Offline float64 study (no server): clusters over the whole 8K context ("wave-8K")
versus clusters inside 64-token blocks with block retrieval ("wave-block"), on
kvrecall-code-13M's own Q/K/V.

One held-out context (Debian python3 dist-packages code) of --ctx bytes with a
planted pass key, ending `\\x1fpass key? NNNNN` (the answer teacher-forced, so
the last steps include reading the key back). One float32 prefill; Q/K/V go
to float64. For the last --steps positions t (keys 0..t, teacher forced) and
every layer: attention output error |o_approx - o_exact| / |o_exact|, mean
over query heads and steps, per variant (see VARIANTS). Keys before
n_idx = the last whole 64-token block ending before the steps are indexed;
later keys are always inside the 64-token window.

Next-byte agreement: each step re-run layer by layer (Model.decode_step) with
every layer's attention at the decode position replaced by the variant, the
rest of the layer run as usual; argmax compared with the dense prefill's.

    python3 bench/model/wave_study.py [--ctx 8192] [--steps 48] [--out bench/results/wave-study-code13m.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from machine import cpu_name
from model import Model
from wave_index import BLOCK, Variant, attend_one, build_indexes, merged_softmax, static_mask, study_context

VARIANTS: List[Variant] = [
    Variant("(a) oracle top-k", "oracle", False, budget=0.025),
    Variant("(a) oracle top-k 1.5%", "oracle", False, budget=0.015),
    Variant("(b) wave-8K s8", "cluster", True, 8192, 8, 0.025),
    Variant("(b) wave-8K s8 1.5%", "cluster", True, 8192, 8, 0.015),
    Variant("(b) wave-8K s8 @256 tok", "cluster", True, 8192, 8, 256 / 8192),
    Variant("(b) wave-8K s8 no-est", "cluster", False, 8192, 8, 0.025),
    Variant("(c) wave-block s8", "block-opt", True, 64, 8, 0.025),
    Variant("(c) wave-block s4", "block-opt", True, 64, 4, 0.025),
    Variant("(c) wave-block s16", "block-opt", True, 64, 16, 0.025),
    Variant("(c) wave-block s8 1.5%", "block-opt", True, 64, 8, 0.015),
    Variant("(c) wave-block s8 no-est", "block-opt", False, 64, 8, 0.025),
    Variant("(d) blocks + mean", "block-mean", False, 64, 8, 0.025),
    Variant("(e) blocks + mean + est s8", "block-mean", True, 64, 8, 0.025),
]


def budget_tokens(var: Variant, ctx: int) -> int:
    return int(round(var.budget * ctx))


def error_table(model: Model, Q, K, V, indexes, ctx: int, steps: int, n_idx: int):
    """Per variant: relative error [layers], exact-mass recall, retrieved tokens beyond sinks + window
    (means over query heads and steps; mass and tokens also over layers)."""
    L, G = len(Q), model.cfg.n_heads // model.cfg.n_kv_heads
    n_kv = K[0].shape[0]
    nv = len(VARIANTS)
    err = np.zeros((nv, L))
    mass = np.zeros(nv)
    retrieved = np.zeros(nv)
    for t in range(ctx - steps, ctx):
        n_static = static_mask(t, n_idx).sum()
        for li in range(L):
            for g in range(n_kv):
                q = Q[li][g * G:(g + 1) * G, t]
                Kt, Vt = K[li][g, :t + 1], V[li][g, :t + 1]
                s = model.scale * (q @ Kt.T)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                o_ex = p @ Vt
                ref = np.linalg.norm(o_ex, axis=1)
                for i, var in enumerate(VARIANTS):
                    o, masks = attend_one(var, indexes[li][g].get(var.index_key), q, Kt, Vt, t, model.scale,
                                          budget_tokens(var, ctx))
                    err[i, li] += np.mean(np.linalg.norm(o - o_ex, axis=1) / ref)
                    mass[i] += np.mean((p * masks).sum(axis=1))
                    retrieved[i] += masks.sum(axis=1).mean() - n_static
    return err / (steps * n_kv), mass / (steps * L * n_kv), retrieved / (steps * L * n_kv)


def decode_agreement(model: Model, ids: np.ndarray, K, V, indexes, ctx: int, steps: int, var: Variant | None):
    """Greedy next bytes for the last steps with every layer's decode-position attention replaced by var
    (None: dense). Returns the argmax bytes."""
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    out = []
    for t in range(ctx - steps, ctx):
        def attend(li, q, k, v):
            q = q.astype(np.float64)
            res = np.empty_like(q)
            for g in range(K[li].shape[0]):
                Kt, Vt = K[li][g, :t + 1], V[li][g, :t + 1]
                saved = Kt[t].copy(), Vt[t].copy()
                Kt[t], Vt[t] = k[g], v[g]  # the live key/value of this position
                qg = q[g * group:(g + 1) * group]
                if var is None:
                    res[g * group:(g + 1) * group] = merged_softmax(qg, Kt, Vt, model.scale)
                else:
                    res[g * group:(g + 1) * group] = attend_one(var, indexes[li][g].get(var.index_key), qg, Kt, Vt,
                                                                t, model.scale, budget_tokens(var, ctx))[0]
                Kt[t], Vt[t] = saved
            return res.astype(np.float32)
        out.append(int(np.argmax(model.decode_step(int(ids[t]), t, attend))))
    return np.array(out)


def markdown(rows, steps: int) -> str:
    L = len(rows[0]["err"])
    head = ("| variant | budget | retrieved tok | mass recall | mean err | " + " | ".join(f"L{i}" for i in range(L))
            + " | next byte = dense | pass-key digits |")
    sep = "|" + "---|" * (7 + L)
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['name']} | {r['budget']} | {r['retrieved']:.0f} | {r['mass']:.3f} | {r['err'].mean():.4f} | "
                     + " | ".join(f"{e:.4f}" for e in r["err"]) + f" | {r['agree']}/{steps} | {r['digits']}/5 |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default="")
    a = ap.parse_args()
    t_start = time.time()
    model = Model()
    sc = study_context(model, a.ctx, a.seed)
    ids, key, at, pre, Q, K, V = sc.ids, sc.key, sc.at, sc.prefill, sc.Q, sc.K, sc.V
    t_prefill = time.time() - t_start
    n_idx = (a.ctx - a.steps) // BLOCK * BLOCK
    t0 = time.time()
    indexes: List[List[Dict]] = [[build_indexes(VARIANTS, K[li][g], V[li][g], n_idx, a.iters, a.seed + 1000 * li + g)
                                  for g in range(K[li].shape[0])] for li in range(len(K))]
    t_index = time.time() - t0
    t0 = time.time()
    err, mass, retrieved = error_table(model, Q, K, V, indexes, a.ctx, a.steps, n_idx)
    t_err = time.time() - t0
    print(f"prefill {t_prefill:.1f}s, indexes {t_index:.1f}s, errors {t_err:.1f}s", flush=True)
    t0 = time.time()
    dense_pf = pre.logits[a.ctx - a.steps:].argmax(axis=1)
    dense_dec = decode_agreement(model, ids, K, V, indexes, a.ctx, a.steps, None)
    digit_steps = np.arange(a.ctx - 6, a.ctx - 1) - (a.ctx - a.steps)  # positions that predict the key's digits
    truth = ids[a.ctx - a.steps + 1:]
    rows = []
    for i, var in enumerate(VARIANTS):
        got = decode_agreement(model, ids, K, V, indexes, a.ctx, a.steps, var)
        rows.append(dict(name=var.name, budget=f"{budget_tokens(var, a.ctx)} tok ({100 * var.budget:.2f}%)",
                         retrieved=retrieved[i], mass=mass[i], err=err[i], agree=int((got == dense_pf).sum()),
                         digits=int((got[digit_steps] == truth[digit_steps]).sum())))
    t_agree = time.time() - t0
    total = time.time() - t_start
    table = markdown(rows, a.steps)
    meta = (f"machine: this VM, {os.cpu_count()}-core {platform.machine()} ({cpu_name()}), numpy {np.__version__}, "
            f"load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores)\n"
            f"context {a.ctx} bytes (held-out dist-packages code, pass key planted at byte {at}, key {key.decode()}, "
            f"answer teacher-forced), last {a.steps} positions, keys 0..{n_idx - 1} indexed "
            f"({n_idx // BLOCK} blocks), k-means {a.iters} iterations, seed {a.seed}\n"
            f"dense: decode-path argmax = prefill argmax on {int((dense_dec == dense_pf).sum())}/{a.steps} steps; "
            f"dense greedy = true next byte on {int((dense_pf[:-1] == truth).sum())}/{a.steps - 1} steps; "
            f"pass-key digits (dense) {int((dense_pf[digit_steps] == truth[digit_steps]).sum())}/5\n"
            f"time: prefill {t_prefill:.1f}s, k-means indexes {t_index:.1f}s, errors {t_err:.1f}s, "
            f"next-byte agreement {t_agree:.1f}s, total {total:.1f}s")
    print(meta)
    print(table)
    if a.out:
        Path(a.out).write_text(f"# Wave study: wave-8K vs wave-block on kvrecall-code-13M\n\n"
                               f"Written by `bench/model/wave_study.py`.\n\n```\n{meta}\n```\n\n{table}\n")


if __name__ == "__main__":
    main()
