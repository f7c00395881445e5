"""Offline (no server): what holds the block methods back on kvrecall-code-13M, per layer (issue #16).

The trials of bench/model/run.py (same seed and length); dense decode in numpy (float64 attention over the f16 K/V).
At every decode step, layer and kv head, the attention mass (mean over the GQA group) that each way of spending the
same exact budget (N = ceil(budget x document tokens), beyond sinks and window) covers, sinks and window left out:
- token oracle: the N tokens of most mass (what an ideal token method attends);
- block oracle S: the floor(N / S) blocks of S tokens of most mass (S = 64 is the pool block; the granularity loss);
- scored 64: the floor(N / 64) blocks the block methods' score ranks first (km4+n with share a: max over the group
  and the block's 4 k-means sub-centroids of q . c + a |q| r + ln(n) / scale; what index/block-summary.ts stores);
- sub-clusters: the N / 16 sub-clusters (a block's members nearest one sub-centroid, 16 tokens on average) that the
  same row score ranks first, their members attended (exact rows of partly useful blocks traded for the estimate).
So granularity loss = token oracle - block oracle 64, ranking loss = block oracle 64 - scored 64.

    python3 bench/model/block_recall.py [--length 8192] [--trials 2] [--budget 0.024] [--share 0.5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import heldout
import kvdecode
from block_rank import representatives
from model import Model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--first-trial", type=int, default=0)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.024)
    ap.add_argument("--share", type=float, default=0.5, help="radius share a of the row score")
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    a = ap.parse_args()
    t0 = time.time()
    model = Model()
    text = heldout.corpus(a.seed)
    G = model.cfg.n_heads // model.cfg.n_kv_heads
    L = model.cfg.n_layers
    names = ["token oracle", "block oracle 16", "block oracle 32", "block oracle 64", "scored 64", "sub-clusters",
             "sink block rest", "pre-window 64", "pre-window 128", "rem recent + scored", "rem+64 recent + scored",
             "rem+128 recent + scored", "rem+192 recent + scored", "rem+256 recent + scored",
             "rem+384 recent + scored", "rem+512 recent + scored"]
    acc = {k: [[] for _ in range(L)] for k in names}
    for ti in range(a.first_trial, a.first_trial + a.trials):
        tr = kvdecode.make_trial(model, text, a.length, a.steps, kvdecode.trial_rng(a.seed, a.length, ti))
        held = kvdecode.Held(model, tr, a.steps + kvdecode.PASS_KEY_DIGITS)
        qs: dict = {}

        def attend(li, q, k, v):
            qs.setdefault(li, []).append(np.asarray(q, np.float64))
            return held.dense_attend(li, q, k, v)

        kvdecode.decode(model, tr, attend)
        N = int(np.ceil(a.budget * tr.n_doc))
        nb = tr.n_doc // 64
        for li in range(L):
            for g in range(held.k[li].shape[0]):
                kb = held.k[li][g, :nb * 64].reshape(nb, 64, -1)
                mean16 = kb.mean(axis=1).astype(np.float16).astype(np.float64)
                c, r, _, cnt = representatives(kb, mean16, f"km4@{a.share}+n")
                # Each token's sub-cluster (nearest centroid), as the radii were measured.
                own = np.sqrt(((kb[:, :, None, :] - c[:, None, :, :]) ** 2).sum(axis=3)).argmin(axis=2)  # [nb, 64]
                for step, q in enumerate(qs[li]):
                    q = q[g * G:(g + 1) * G]
                    n = held.n[li] - (len(qs[li]) - 1 - step)
                    sc = q @ held.k[li][g, :n].T * model.scale
                    p = np.exp(sc - sc.max(axis=1, keepdims=True))
                    p /= p.sum(axis=1, keepdims=True)
                    mass = p.mean(axis=0)
                    free = np.ones(n, bool)  # document tokens outside sinks and window
                    free[:a.sinks] = False
                    free[max(0, n - a.window):] = False
                    free[tr.n_doc:] = False
                    m = np.where(free, mass, 0.0)
                    acc["token oracle"][li].append(np.sort(m)[::-1][:N].sum())
                    acc["sink block rest"][li].append(m[:64].sum())
                    w0 = max(0, n - a.window)
                    acc["pre-window 64"][li].append(m[max(0, w0 - 64):w0].sum())
                    acc["pre-window 128"][li].append(m[max(0, w0 - 128):w0].sum())
                    for S in (16, 32, 64):
                        bm = m[:tr.n_doc // S * S].reshape(-1, S).sum(axis=1)
                        acc[f"block oracle {S}"][li].append(np.sort(bm)[::-1][:N // S].sum())
                    qn = np.linalg.norm(q, axis=1)[:, None, None]
                    rows = (np.einsum("gd,brd->gbr", q, c) + a.share * qn * r[None]
                            + np.log(np.maximum(cnt, 1e-30))[None] / model.scale).max(axis=0)  # [nb, 4]
                    bm = m[:nb * 64].reshape(nb, 64)
                    top = np.argsort(-rows.max(axis=1), kind="stable")[:N // 64]
                    acc["scored 64"][li].append(bm[top].sum())
                    # The window extended back by R tokens, then the best-scored blocks that touch neither it nor the
                    # sinks, R + 64 k <= N (the budget's remainder mod 64, and 0-2 blocks more, spent on recency).
                    order = np.argsort(-rows.max(axis=1), kind="stable")
                    for extra, name in ((0, "rem"), (64, "rem+64"), (128, "rem+128"), (192, "rem+192"), (256, "rem+256"), (384, "rem+384"),
                                        (512, "rem+512")):
                        if N % 64 + extra > N:
                            acc[f"{name} recent + scored"][li].append(np.nan)
                            continue
                        R = N % 64 + extra
                        lo = max(0, n - a.window - R)
                        got = m[lo:n].sum()
                        k = (N - R) // 64
                        ok = [b for b in order if b * 64 >= a.sinks and (b + 1) * 64 <= lo][:k]
                        acc[f"{name} recent + scored"][li].append(got + bm[ok].sum())
                    flat = np.argsort(-rows.ravel(), kind="stable")
                    got, budget = 0.0, N
                    for i in flat:
                        b, rr = divmod(int(i), 4)
                        sel = own[b] == rr
                        k = int(sel.sum())
                        if k == 0:
                            continue
                        if k > budget:
                            break
                        got += bm[b][sel].sum()
                        budget -= k
                    acc["sub-clusters"][li].append(got)
        print(f"trial {ti} done ({time.time() - t0:.0f} s)", flush=True)
    print(f"\n{a.length} bytes, {a.trials} trials, budget {a.budget} (N = {N} tokens beyond sinks {a.sinks} and window "
          f"{a.window}), share {a.share}; attention mass covered, mean over steps and kv heads; {time.time() - t0:.0f} s\n")
    print("| way | " + " | ".join(f"L{i}" for i in range(L)) + " |")
    print("| --- |" + " ---: |" * L)
    for k in names:
        print(f"| {k} | " + " | ".join(f"{np.mean(acc[k][i]):.3f}" for i in range(L)) + " |")


if __name__ == "__main__":
    main()
