"""How much of `wave`'s retrieval zone a device cache of clusters would have to
copy per step (float64, numpy, no server): issue #13's memory target (device
memory for a layer <= 20% of its K/V) means the device cannot hold the layer's
keys for rescoring, only the clusters a step reads; its transfer target
(<= 2 MiB host->device per step after the first 16 steps) means those
clusters must mostly be resident already. Whether they are depends on how the
zone moves from one decode step to the next, which a generator drawing each
step's query afresh cannot tell: a real model's consecutive positions can.

One held-out context of --ctx bytes (Debian python3 dist-packages code, a
planted pass key) through kvrecall-code-13M, one float32 prefill; for the
last --steps positions (teacher-forced: a decode step's q is the prefill's
q at that position) and every (layer, kv head): the clusters wave reads
(clusters of --size tokens in 8K-token segments over keys 0..n_idx-1,
ranked by centroid score + 0.5 |q| radius, max over the GQA group), taken
whole until they hold `budget` tokens (probe 1), or `probe` x budget
tokens (the candidates a rescoring step reads keys of). An LRU cache of
clusters per (layer, kv head) holding `cap` x the zone's tokens; a miss
copies the cluster's tokens. Reported per layer, after the first 16 steps:
tokens copied per step as a share of the zone, the zone's overlap with the
previous step's, and what that is at 1M tokens (budget 2%, 8 kv heads,
d=128, f16 K and V: 512 bytes a token) against the 2 MiB target.

    python3 bench/model/cluster_cache_study.py [--ctx 16384] [--steps 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from machine import cpu_name
from model import Model
from wave_index import build_index, study_context

WARMUP = 16
CAPS = (1.0, 1.5, 2.0, 4.0)
BYTES_PER_TOKEN_1M = 8 * 128 * 2 * 2  # 8 kv heads, d=128, K and V in f16
BUDGET_1M = int(0.02 * 2**20)


def zone(idx, q: np.ndarray, tokens: int) -> np.ndarray:
    """Clusters taken whole, best first, until they hold `tokens` tokens."""
    score = (q @ idx.cent.T + 0.5 * np.linalg.norm(q, axis=1)[:, None] * idx.radius[None, :]).max(axis=0)
    order = np.argsort(-score, kind="stable")
    return order[:np.searchsorted(np.cumsum(idx.count[order]), tokens) + 1]


class Lru:
    def __init__(self, capacity: float):
        self.capacity = capacity
        self.held: OrderedDict[int, float] = OrderedDict()
        self.tokens = 0.0

    def read(self, clusters: np.ndarray, count: np.ndarray) -> float:
        """Makes the clusters resident; returns the tokens copied."""
        copied = 0.0
        for c in clusters.tolist():
            if c in self.held:
                self.held.move_to_end(c)
                continue
            copied += count[c]
            self.held[c] = count[c]
            self.tokens += count[c]
        # The step's own clusters are the most recent: evict only older ones.
        while self.tokens > self.capacity and len(self.held) > len(clusters):
            _, n = self.held.popitem(last=False)
            self.tokens -= n
        return copied


def study(Q, K, group: int, n_idx: int, ctx: int, steps: int, size: int, budget: int, probe: int, seed: int):
    L, n_kv = len(K), K[0].shape[0]
    tokens = budget * probe
    copied = np.zeros((L, len(CAPS)))
    overlap = np.zeros(L)
    zone_tokens = np.zeros(L)
    counted = steps - WARMUP
    for li in range(L):
        for g in range(n_kv):
            idx = build_index(K[li][g], K[li][g], n_idx, 8192, size, 10, np.random.default_rng(seed + 1000 * li + g))
            caches = [Lru(cap * tokens) for cap in CAPS]
            prev = None
            for s, t in enumerate(range(ctx - steps, ctx)):
                z = zone(idx, Q[li][g * group:(g + 1) * group, t], tokens)
                held = idx.count[z].sum()
                for i, c in enumerate(caches):
                    got = c.read(z, idx.count)
                    if s >= WARMUP:
                        copied[li, i] += got / held
                if s >= WARMUP:
                    zone_tokens[li] += held
                    overlap[li] += idx.count[np.intersect1d(z, prev)].sum() / held
                prev = z
    norm = counted * n_kv
    return copied / norm, overlap / norm, zone_tokens / norm


def markdown(rows) -> str:
    head = ("| clusters of | zone | layer | zone tokens | overlap with the last step | "
            + " | ".join(f"copied, cache {c:g}x" for c in CAPS)
            + f" | MiB/step at 1M, cache {CAPS[-2]:g}x |")
    lines = [head, "|" + "---:|" * (6 + len(CAPS))]
    for r in rows:
        mib = r["copied"][-2] * r["probe"] * BUDGET_1M * BYTES_PER_TOKEN_1M / 2**20
        lines.append(f"| {r['size']} | {r['probe']}x budget | {r['layer']} | {r['tokens']:.0f} | {r['overlap']:.3f} | "
                     + " | ".join(f"{x:.3f}" for x in r["copied"]) + f" | {mib:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.025)
    ap.add_argument("--sizes", type=str, default="8,16")
    ap.add_argument("--probes", type=str, default="1,2,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default="")
    a = ap.parse_args()
    t0 = time.time()
    model = Model()
    sc = study_context(model, a.ctx, a.seed, logits="none")
    Q, K, at = sc.Q, sc.K, sc.at
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    n_idx = (a.ctx - a.steps) // 64 * 64
    budget = int(round(a.budget * a.ctx))
    print(f"prefill {time.time() - t0:.1f}s", flush=True)
    rows = []
    for size in (int(x) for x in a.sizes.split(",")):
        for probe in (int(x) for x in a.probes.split(",")):
            t1 = time.time()
            copied, overlap, tokens = study(Q, K, group, n_idx, a.ctx, a.steps, size, budget, probe, a.seed)
            for li in range(len(K)):
                rows.append(dict(size=size, probe=probe, layer=li, tokens=tokens[li], overlap=overlap[li],
                                 copied=copied[li]))
            rows.append(dict(size=size, probe=probe, layer="mean", tokens=tokens.mean(), overlap=overlap.mean(),
                             copied=copied.mean(axis=0)))
            print(f"clusters of {size}, {probe}x budget: {time.time() - t1:.1f}s, copied "
                  + ", ".join(f"{c:g}x {x:.3f}" for c, x in zip(CAPS, copied.mean(axis=0))), flush=True)
    meta = (f"machine: {os.cpu_count()}-core {platform.machine()} ({cpu_name()}), numpy {np.__version__}, "
            f"load {os.getloadavg()[0]:.1f}\n"
            f"context {a.ctx} bytes (held-out dist-packages code, pass key at byte {at}), last {a.steps} positions, "
            f"keys 0..{n_idx - 1} clustered, budget {budget} tokens ({100 * a.budget:.1f}%), seed {a.seed}, "
            f"first {WARMUP} steps not counted; total {time.time() - t0:.0f}s")
    table = markdown(rows)
    print(meta)
    print(table)
    if a.out:
        Path(a.out).write_text("# A device cache of wave's clusters on kvrecall-code-13M: what a step copies\n\n"
                               f"Written by `bench/model/cluster_cache_study.py` (its docstring says what is measured)."
                               f"\n\n```\n{meta}\n```\n\n{table}\n")


if __name__ == "__main__":
    main()
