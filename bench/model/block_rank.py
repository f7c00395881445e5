"""Offline (no server): why the block methods lose the pass key on kvrecall-code-13M.

The same trials as bench/model/run.py (same seed and length). Dense decode in numpy (float64 attention over the f16
K/V); at each step that predicts a pass-key digit, for every (layer, kv head) that pays the five planted digits at
least --min-mass of its attention (mean over the GQA group), the rank of the plant's 64-token block among the
document's blocks under these block scores (max over the group's query heads):
- mean: q . mean(block keys), the mean rounded to f16 as stored -- what nosa and topk-blocks scored before issue #16;
- max: max over the block's keys of q . k (the exact best key; needs every key);
- quest: sum over channels of max(q_c min_c, q_c max_c) -- Quest's per-channel bound from a per-block min/max
  summary (an upper bound of the max; not built in kvrecall);
- opt a (one per --alphas): q . mean + a |q| r, r = the largest |k - mean| over the block's keys -- the optimistic
  score nosa and topk-blocks rank by since issue #16 (index/block-summary.ts; mean and r rounded to f16 as stored;
  there each (layer, kv head) calibrated its own a at seal); a = 0 is the plain mean, a = 1 bounds every key's q . k;
- fpR / kmR / lseR (one per --reps): R representatives per block, the block scored as its best, max over them of
  q . c + a |q| r (with @a; r the radius of its members, nearest-representative assignment) [+ ln(n)/scale with +n,
  n its members: the log of its share of the block's mass, in q . k units]. fpR: the mean and R-1 keys picked
  farthest-first; kmR: k-means (8 Lloyd rounds) from that start, centroids in f16 (what index/block-summary.ts
  stores since version 4: km4+n, with the calibrated a); lseR: the log of the sub-clusters' estimated mass,
  sum of n exp(scale q . c) (not a dot product: not buildable as one row per representative).
At the default 2.5% budget a block method attends about budget/64 blocks beyond sinks and window.

Besides the plant, what a score costs everywhere else: at every decode step, layer and kv head, the attention mass
(mean over the GQA group, of dense attention over everything held) that the top --recall-blocks document blocks
under each score cover, blocks 0 and the last document block left out (sinks and window cover them); beside the
oracle (the blocks of most mass).

    python3 bench/model/block_rank.py [--length 8192] [--trials 4] [--first-trial 0] [--steps 32]
        [--alphas 0.1,0.25,0.5,1] [--reps km4+n,km4@0.25+n,lse4] [--out bench/results/model-block-reps-vm.md]

Trial i is run.py's trial i at the same seed and length (kvdecode.trial_rng).
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


def representatives(kb: np.ndarray, mean16: np.ndarray, spec: str):
    """A block's representatives under `spec` (see --reps): (rows [nb, R, d], radii [nb, R], share a), rows and
    radii rounded to f16 as a summary would store them. fpR: the stored mean, then R-1 of the block's keys, each the
    key farthest from those picked so far (a lone outlier key is picked first); kmR: Lloyd's k-means (8 rounds)
    from the same farthest-first start, each member assigned to its nearest centroid. The radius of a
    representative is the largest distance of a key assigned to it (nearest representative)."""
    kind, _, share = spec.split("+")[0].partition("@")
    R = int(kind[2:] if kind[:2] in ("fp", "km") else kind[3:])
    nb, n, d = kb.shape
    c = np.empty((nb, R, d))
    c[:, 0] = mean16
    near = ((kb - mean16[:, None]) ** 2).sum(axis=2)
    for r in range(1, R):
        far = near.argmax(axis=1)
        c[:, r] = kb[np.arange(nb), far]
        near = np.minimum(near, ((kb - c[:, r][:, None]) ** 2).sum(axis=2))
    if not kind.startswith("fp"):
        for _ in range(8):
            dist = ((kb[:, :, None, :] - c[:, None, :, :]) ** 2).sum(axis=3)  # [nb, n, R]
            own = dist.argmin(axis=2)
            for r in range(R):
                m = (own == r)[:, :, None]
                cnt = m.sum(axis=1)
                upd = (kb * m).sum(axis=1) / np.maximum(cnt, 1)
                c[:, r] = np.where(cnt > 0, upd, c[:, r])
        c = c.astype(np.float16).astype(np.float64)
    dist = np.sqrt(((kb[:, :, None, :] - c[:, None, :, :]) ** 2).sum(axis=3))
    own = dist.argmin(axis=2)
    rad = np.zeros((nb, R))
    for r in range(R):
        rad[:, r] = np.where(own == r, dist[:, :, r], 0).max(axis=1)
    rad = rad.astype(np.float16).astype(np.float64)
    counts = np.stack([(own == r).sum(axis=1) for r in range(R)], axis=1)
    return c, rad, float(share or 0), counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-trial", type=int, default=0, help="trial index of the first trial (run.py's numbering)")
    ap.add_argument("--min-mass", type=float, default=0.05)
    ap.add_argument("--alphas", default="", help="optimistic-score shares to rank by, comma-separated (none: the "
                    "three original scores only)")
    ap.add_argument("--reps", default="", help="block scores by several representatives per block, comma-separated: "
                    "fpR (the mean and R-1 keys picked farthest-first), kmR (R sub-centroids, k-means), either with "
                    "@a (each representative + a |q| r, r its members' radius), e.g. fp4,km4,km4@0.5")
    ap.add_argument("--recall-blocks", type=int, default=0, help="blocks per kv head for the recall table (0: the "
                    "blocks of a 2.5%% budget, as topk-blocks rounds it)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    alphas = [float(x) for x in a.alphas.split(",") if x.strip()]
    reps = [x.strip() for x in a.reps.split(",") if x.strip()]
    names = ["mean", "max", "quest"] + [f"opt {x:g}" for x in alphas] + reps
    B = a.recall_blocks or int(np.ceil(np.ceil(0.025 * a.length) / BLOCK))
    t0 = time.time()
    model = Model()
    text = heldout.corpus(a.seed)
    G = model.cfg.n_heads // model.cfg.n_kv_heads
    rows = []
    ranks = {k: [] for k in names}
    recall = {k: [] for k in names + ["oracle"]}
    for ti in range(a.first_trial, a.first_trial + a.trials):
        tr = kvdecode.make_trial(model, text, a.length, a.steps, kvdecode.trial_rng(a.seed, a.length, ti))  # as run.py
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
                # As index/block-summary.ts stores them: the mean in f16, the radius from that mean, in f16.
                mean16 = mean.astype(np.float16).astype(np.float64)
                radius = np.linalg.norm(kb - mean16[:, None, :], axis=2).max(axis=1).astype(np.float16).astype(np.float64)

                made = {spec: representatives(kb, mean16, spec) for spec in reps}

                def block_scores(q):
                    qn = np.linalg.norm(q, axis=1)[:, None]
                    out = {
                        "mean": (q @ mean16.T).max(axis=0),
                        "max": (q @ K[g].T).max(axis=0).reshape(nb, BLOCK).max(axis=1),
                        "quest": np.maximum(q[:, None, :] * lo[None], q[:, None, :] * hi[None]).sum(axis=2).max(axis=0),
                    }
                    base = q @ mean16.T
                    for x in alphas:
                        out[f"opt {x:g}"] = (base + x * qn * radius[None]).max(axis=0)
                    for spec, (c, r, share, cnt) in made.items():
                        # [G, nb, R] -> max over representatives and the group
                        s = np.einsum("gd,brd->gbr", q, c) + share * qn[:, :, None] * r[None]
                        logn = np.log(np.maximum(cnt, 1e-30))[None] / model.scale
                        if spec.startswith("lse"):  # the block's mass as its sub-clusters estimate it
                            z = s + logn
                            top = z.max(axis=2, keepdims=True)
                            out[spec] = (top[..., 0] + np.log(np.exp((z - top) * model.scale).sum(axis=2)) / model.scale).max(axis=0)
                        elif spec.endswith("+n"):
                            out[spec] = (s + logn).max(axis=(0, 2))
                        else:
                            out[spec] = s.max(axis=(0, 2))
                    return out

                # Recall of the top B blocks (blocks 0 and nb-1 are static) at every decode step.
                for step, q in enumerate(qs[li]):
                    q = q[g * G:(g + 1) * G]
                    n = held.n[li] - (len(qs[li]) - 1 - step)  # what the session held at that step
                    sc = q @ held.k[li][g, :n].T * model.scale
                    p = np.exp(sc - sc.max(axis=1, keepdims=True))
                    p /= p.sum(axis=1, keepdims=True)
                    mass = p.mean(axis=0)[:nb * BLOCK].reshape(nb, BLOCK).sum(axis=1)
                    inner = np.arange(1, nb - 1)
                    for k, v in list(block_scores(q).items()) + [("oracle", mass)]:
                        top = inner[np.argsort(-v[inner], kind="stable")[:B]]
                        recall[k].append(float(mass[top].sum()))
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
                    scores = block_scores(q)
                    r = {k: int((v > v[b]).sum()) for k, v in scores.items()}
                    for k in ranks:
                        ranks[k].append(r[k])
                    rows.append(f"| {ti} | {tr.key.decode()} | {d.answer.decode('latin-1')} | {s + 1} | L{li} kv{g} | "
                                f"{mass:.2f} | " + " | ".join(str(r[k]) for k in names) + " |")
        print(f"trial {ti} done ({time.time() - t0:.0f} s)", flush=True)
    budget_blocks = 0.025 * a.length / BLOCK
    summary = [f"{k}: median rank {np.median(v):.0f}, within the {budget_blocks:.1f} blocks of a 2.5% budget "
               f"{np.mean(np.asarray(v) < budget_blocks):.0%}, within {B} blocks {np.mean(np.asarray(v) < B):.0%}"
               for k, v in ranks.items()]
    recall_rows = [f"| {k} | {np.mean(v):.3f} | {np.median(v):.3f} | {np.mean(v) / max(np.mean(recall['oracle']), 1e-12):.3f} |"
                   for k, v in recall.items()]
    md = "\n".join([
        "# Where the plant's block ranks under block scores (kvrecall-code-13M)", "",
        "Written by `bench/model/block_rank.py` (offline, numpy; the trials of `bench/model/run.py` at the same seed). "
        "Rank 0 = the best block. `mean` is the plain block-mean score (q . mean key; nosa's and topk-blocks' before "
        "issue #16); `max` the exact best key "
        "of the block; `quest` Quest's per-channel min/max bound; `opt a` the optimistic score q . mean + a |q| r "
        "(r: the block's radius around its mean); `kmR`/`fpR`/`lseR` R representatives per block (the script's "
        "docstring: k-means sub-centroids / farthest-first keys / their estimated log mass; `@a` adds a |q| r, `+n` "
        "ln(members)/scale).", "",
        f"- {a.length} bytes, {a.trials} trials, {nb} blocks of {BLOCK}; rows: each (layer, kv head) paying the "
        f"five digits >= {a.min_mass:.2f} of its attention at a step that predicts a digit; {time.time() - t0:.0f} s",
        *[f"- {s}" for s in summary], "",
        f"Attention mass of the top {B} document blocks by each score (blocks 0 and {nb - 1} left out: static), "
        f"every decode step x layer x kv head ({len(recall['oracle'])} rows):", "",
        "| score | mean mass | median | / oracle |", "| --- | ---: | ---: | ---: |",
        *recall_rows, "",
        "| trial | key | dense answer | digit | head | mass on digits | " + " | ".join(f"rank by {k}" for k in names) + " |",
        "| ---: | ---: | ---: | ---: | --- | ---: |" + " ---: |" * len(names),
        *rows, ""])
    print(md)
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
