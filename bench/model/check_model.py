"""Check the numpy kvrecall-code-13M against its SOURCE.md: pass key with
dense attention (greedy, five digits exact) and bits per byte on held-out code.

    python3 bench/model/check_model.py [--ctx 8192] [--trials 40] [--bpb-samples 4] [--bpb-ctx 32768]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import heldout
from model import Model, greedy


def bits_per_byte(model: Model, seq: bytes) -> float:
    ids = np.frombuffer(seq, np.uint8)
    lg = model.prefill(ids, keep_qkv=False, logits="all").logits[:-1].astype(np.float64)
    lg -= lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean() / np.log(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--bpb-samples", type=int, default=4)
    ap.add_argument("--bpb-ctx", type=int, default=0, help="context for bits per byte (default --ctx)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = Model()
    text = heldout.corpus()
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    bpb_ctx = a.bpb_ctx or a.ctx
    bpbs = [bits_per_byte(model, heldout.window(text, bpb_ctx, rng)) for _ in range(a.bpb_samples)]
    print(f"bits per byte at {bpb_ctx}: {np.mean(bpbs):.4f} ({', '.join(f'{b:.4f}' for b in bpbs)}); {time.time() - t0:.1f}s")
    if not a.trials:
        return
    ok = 0
    t0 = time.time()
    for i in range(a.trials):
        seq, key, at = heldout.plant(text, a.ctx, rng)
        got = greedy(model, np.frombuffer(seq, np.uint8), 5)
        ok += got == key
        print(f"trial {i:2d}: plant at {at:5d} key {key.decode()} got {got!r} {'ok' if got == key else 'MISS'}", flush=True)
    print(f"pass key at {a.ctx}: {ok}/{a.trials} = {ok / a.trials:.3f} (SOURCE.md: 0.975 at 8K); {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
