"""Offline (no server): why the block methods lose the pass key on kvrecall-code-13M.

The same trials as bench/model/run.py (same seed and length). Dense decode in numpy (float64 attention over the f16
K/V); at each step that predicts a pass-key digit, for every (layer, kv head) that pays the five planted digits at
least --min-mass of its attention (mean over the GQA group), the rank of the plant's 64-token block among the
document's blocks under three block scores (max over the group's query heads):
- mean: q . mean(block keys) -- what nosa and topk-blocks score (index/block-select.ts);
- max: max over the block's keys of q . k (the exact best key; needs every key);
- quest: sum over channels of max(q_c min_c, q_c max_c) -- Quest's per-channel bound from a per-block min/max
  summary (an upper bound of the max; not built in kvrecall).
At the default 2.5% budget a block method attends about budget/64 blocks beyond sinks and window.

    python3 bench/model/block_rank.py [--length 8192] [--trials 4] [--steps 32] [--out bench/results/model-block-rank-vm.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import heldout
import kvdecode
from model import Model

BLOCK = 64
LINE_DIGITS = len(b"\x1fpass key: ")  # offset of the first digit in the plant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-mass", type=float, default=0.05)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    t0 = time.time()
    model = Model()
    text = heldout.corpus(a.seed)
    rng = np.random.default_rng(a.seed + a.length)  # as run.py draws its trials
    G = model.cfg.n_heads // model.cfg.n_kv_heads
    rows = []
    ranks = {"mean": [], "max": [], "quest": []}
    for ti in range(a.trials):
        tr = kvdecode.make_trial(model, text, a.length, a.steps, rng)
        held = kvdecode.Held(model, tr, a.steps + kvdecode.PASS_KEY_DIGITS)
        qs: dict = {}

        def attend(li, q, k, v):
            qs.setdefault(li, []).append(np.asarray(q, np.float64))
            return held.dense_attend(li, q, k, v)

        d = kvdecode.decode(model, tr, attend)
        digits = np.arange(tr.at + LINE_DIGITS, tr.at + LINE_DIGITS + kvdecode.PASS_KEY_DIGITS)
        nb = tr.n_doc // BLOCK
        for li in range(model.cfg.n_layers):
            K = held.k[li][:, :nb * BLOCK]
            for g in range(K.shape[0]):
                kb = K[g].reshape(nb, BLOCK, -1)
                mean, lo, hi = kb.mean(axis=1), kb.min(axis=1), kb.max(axis=1)
                for s in range(kvdecode.PASS_KEY_DIGITS):
                    step = a.steps - 1 + s
                    q = qs[li][step][g * G:(g + 1) * G]
                    sc = q @ held.k[li][g, :held.n[li] - (kvdecode.PASS_KEY_DIGITS - 1 - s)].T * model.scale
                    p = np.exp(sc - sc.max(axis=1, keepdims=True))
                    p /= p.sum(axis=1, keepdims=True)
                    mass = float(p[:, digits].sum(axis=1).mean())
                    b = digits[s] // BLOCK  # the block of the digit being predicted
                    if mass < a.min_mass or b >= nb:
                        continue
                    scores = {
                        "mean": (q @ mean.T).max(axis=0),
                        "max": (q @ K[g].T).max(axis=0).reshape(nb, BLOCK).max(axis=1),
                        "quest": np.maximum(q[:, None, :] * lo[None], q[:, None, :] * hi[None]).sum(axis=2).max(axis=0),
                    }
                    r = {k: int((v > v[b]).sum()) for k, v in scores.items()}
                    for k in ranks:
                        ranks[k].append(r[k])
                    rows.append(f"| {ti} | {tr.key.decode()} | {d.answer.decode('latin-1')} | {s + 1} | L{li} kv{g} | "
                                f"{mass:.2f} | {r['mean']} | {r['max']} | {r['quest']} |")
        print(f"trial {ti} done ({time.time() - t0:.0f} s)", flush=True)
    budget_blocks = 0.025 * a.length / BLOCK
    summary = [f"{k}: median rank {np.median(v):.0f}, within the {budget_blocks:.1f} blocks of a 2.5% budget "
               f"{np.mean(np.asarray(v) < budget_blocks):.0%}" for k, v in ranks.items()]
    md = "\n".join([
        "# Where the plant's block ranks under block scores (kvrecall-code-13M)", "",
        "Written by `bench/model/block_rank.py` (offline, numpy; the trials of `bench/model/run.py` at the same seed). "
        "Rank 0 = the best block. `mean` is nosa's and topk-blocks' score (q . mean key); `max` the exact best key "
        "of the block; `quest` Quest's per-channel min/max bound.", "",
        f"- {a.length} bytes, {a.trials} trials, {nb} blocks of {BLOCK}; rows: each (layer, kv head) paying the "
        f"five digits >= {a.min_mass:.2f} of its attention at a step that predicts a digit; {time.time() - t0:.0f} s",
        *[f"- {s}" for s in summary], "",
        "| trial | key | dense answer | digit | head | mass on digits | rank by mean | rank by max | rank by quest |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        *rows, ""])
    print(md)
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
