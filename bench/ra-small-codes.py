#!/usr/bin/env python3
# python3 bench/ra-small-codes.py [--tokens 1048576] [--broad] [--tag T]
#
# Issue #15's code scan reads every key's 4-bit code (1/4 of the f16 key's
# bytes); with the 3% scored exactly that is 0.66-0.79 of the bytes hnsw
# reads at its best ef at 1M keys, where the issue asks <= 1/3. This is the
# simulation that chose a smaller first pass (native/indexes/ra_pq_codes.h,
# RaSearchOptions::scanKeep): for candidate codes of ~1/16 of the key's bytes
# it ranks every key by ρ = max_h (x̂_h − c0_h) (x̂ the code's logit in float
# arithmetic, c0 the rows' log-partitions from the strided sample, as the scan
# takes them) and reports
#   1. one pass: the share of the group's exact top 1% in the best 3% (the
#      scan's cap less the sample) and the codes' logits' correlation with the
#      exact ones (step 0, row 0);
#   2. two passes: the best `keep` by the small code, optionally with the
#      outliers (a channel past 5σ) added, then the best 3% of those by the
#      4-bit code (ra_key_codes.h's levels, float weights): recall, the
#      attention mass of the top 1% it misses (mean and worst over steps) and
#      the key bytes read (codes + the 4-bit codes kept + 3% exact).
# It leaves out the graph's entry points and seeds, which the native scan
# scores first: its recall is below the native scan's (the 4-bit row's
# against bench/ra-code-scan.ts's 0.993 / 0.995 at 1M).
#
# Input: bench/ra-search-data.ts's cache (the OS temp directory's
# kvrecall-ra-search/s7-<tokens>-8[-broad].{keys,q,topk}); run
# bench/ra-code-scan.ts at the same size first. Writes
# bench/results/ra-small-codes-<tokens>[-broad]-vm[-<tag>].md and .json.
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

argv = sys.argv[1:]
get = lambda name, dflt: argv[argv.index(f'--{name}') + 1] if f'--{name}' in argv else dflt
N = int(get('tokens', '1048576'))
broad = '--broad' in argv
tag = get('tag', '')
D, G, STEPS, SINKS, WINDOW = 128, 4, 8, 16, 256
t0 = time.time()
log = lambda msg: print(f'[ra-small-codes] [{time.time() - t0:.0f} s] {msg}', file=sys.stderr, flush=True)

stem = os.path.join(tempfile.gettempdir(), 'kvrecall-ra-search', f's7-{N}-{STEPS}' + ('-broad' if broad else ''))
K = np.fromfile(stem + '.keys', dtype=np.float16).reshape(N, D).astype(np.float32)
Q = np.fromfile(stem + '.q', dtype=np.float32).reshape(STEPS, G, D)
want = round(N * 0.01)
top = np.fromfile(stem + '.topk', dtype=np.int32).reshape(STEPS, want)
scale = 1 / np.sqrt(D)
# The strided sample as ra_graph_attention.cc takes it.
stride = max(1, N // min(N, 4096, max(64, N // 512)))
sample = np.arange(stride // 2, N, stride)
m = len(sample)
free = np.zeros(N, bool)
free[:SINKS] = True
free[N - WINDOW:] = True
exact, c0s, probs = [], [], []
for s in range(STEPS):
    x = K @ Q[s].T * scale
    xs = x[sample]
    mx = xs.max(0)
    c0s.append(mx + np.log(np.exp(xs - mx).sum(0)) + np.log(N / m))
    p = np.exp(x - x.max(0))
    probs.append((p / p.sum(0)).mean(1))
    exact.append(x)
log('workload read')

mu = K.mean(0)
Kc = K - mu
sd = K.std(0)


def uniform(X, bits, sig=3.0):
    """ra_key_codes.h's levels: 2^bits over mean ± sig·σ a channel, clamped."""
    m_, s_ = X.mean(0), X.std(0) + 1e-12
    L = 2 ** bits
    low, step = m_ - sig * s_, 2 * sig * s_ / L
    return low + (np.clip(np.floor((X - low) / step), 0, L - 1) + 0.5) * step


def lloyd(X, bits):
    """Per-channel Lloyd-Max levels (from the data's quantiles, 10 iterations)."""
    out = np.empty_like(X)
    L = 2 ** bits
    for j in range(X.shape[1]):
        x = X[:, j]
        lv = np.quantile(x[::16], (np.arange(L) + 0.5) / L)
        for _ in range(10):
            a = np.searchsorted((lv[1:] + lv[:-1]) / 2, x)
            lv = np.array([x[a == i].mean() if (a == i).any() else lv[i] for i in range(L)])
        out[:, j] = lv[np.searchsorted((lv[1:] + lv[:-1]) / 2, x)]
    return out


def kmeans(X, k, it=15, seed=0):
    rng = np.random.default_rng(seed)
    C = X[rng.choice(len(X), k, replace=False)].copy()
    for _ in range(it):
        a = ((X ** 2).sum(1)[:, None] - 2 * X @ C.T + (C ** 2).sum(1)[None]).argmin(1)
        for j in range(k):
            if (a == j).any():
                C[j] = X[a == j].mean(0)
    return C


def pq(X, sub, k):
    """Product quantization: subspaces of `sub` channels, k centroids each (trained on 32K strided keys)."""
    tr = X[:: max(1, len(X) // 32768)]
    out = np.zeros_like(X)
    for s0 in range(0, X.shape[1], sub):
        C = kmeans(tr[:, s0:s0 + sub], k)
        blk = X[:, s0:s0 + sub]
        for i in range(0, len(blk), 65536):
            b = blk[i:i + 65536]
            out[i:i + 65536, s0:s0 + sub] = C[((b ** 2).sum(1)[:, None] - 2 * b @ C.T + (C ** 2).sum(1)[None]).argmin(1)]
    return out


# PCA of the keys (on 64K strided keys).
ev, V = np.linalg.eigh(np.cov(Kc[:: max(1, N // 65536)].T))
order = np.argsort(-ev)
ev, V = ev[order], V[:, order]
P = Kc @ V


def pca_alloc(B):
    """Transform coding: B bits over the principal components, greedily to the largest remaining distortion."""
    bits = np.zeros(D, int)
    for _ in range(B):
        j = np.argmax(ev / 4.0 ** bits * (bits < 8))
        bits[j] += 1
    X = np.zeros_like(P)
    for j in range(D):
        X[:, j] = uniform(P[:, j:j + 1], bits[j])[:, 0] if bits[j] > 0 else P[:, j].mean()
    return X @ V.T


def rabitq():
    """A random rotation, the sign a channel, rescaled by the key's norm over <x̄, o> (RaBitQ's estimator)."""
    R, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((D, D)))
    Y = Kc @ R
    nrm = np.linalg.norm(Y, axis=1, keepdims=True)
    Sg = np.where(Y >= 0, 1.0, -1.0)
    return (Sg / np.sqrt(D) * nrm / (np.abs(Y).sum(1, keepdims=True) / np.sqrt(D) / nrm)) @ R.T


def rho_of(X, s, centred=True):
    xa = (X + (mu if centred else 0)) @ (Q[s] * scale).T
    return (xa - c0s[s]).max(1)


K4 = uniform(K, 4)
outliers = np.nonzero((np.abs(Kc) / (sd + 1e-12)).max(1) > 5)[0]
outliers = outliers[~free[outliers]]
M = int(round(0.03 * N)) - m
codes = [
    ('4-bit a channel, ±3σ (the scan\'s codes)', 64, lambda: K4 - mu),
    ('2-bit a channel, Lloyd', 32, lambda: lloyd(Kc, 2)),
    ('1-bit a channel, Lloyd', 16, lambda: lloyd(Kc, 1)),
    ('PCA, top 32 components x 4 bits', 16, lambda: uniform(P[:, :32], 4) @ V[:, :32].T),
    ('PCA, 128 bits allocated', 16, lambda: pca_alloc(128)),
    ('PCA, 160 bits allocated', 20, lambda: pca_alloc(160)),
    ('random rotation, 1 bit a channel + norm (RaBitQ)', 20, rabitq),
    ('PQ, 32 subspaces x 16 centroids (4 bits)', 16, lambda: pq(Kc, 4, 16)),
    ('PQ, 16 subspaces x 256 centroids (8 bits)', 16, lambda: pq(Kc, 8, 256)),
]
one, two = [], []
for name, nbytes, make in codes:
    X = make()
    recall3 = []
    rhos = []
    for s in range(STEPS):
        rho = rho_of(X, s)
        rhos.append(rho)
        r = rho.copy()
        r[free] = -np.inf
        r[sample] = -np.inf
        sel = np.zeros(N, bool)
        sel[np.argpartition(-r, M)[:M]] = True
        sel[sample] = True
        sel[free] = True
        recall3.append(sel[top[s]].mean())
    xa = (X + mu) @ (Q[0, 0] * scale)
    one.append({'code': name, 'bytes': nbytes, 'recall3': float(np.mean(recall3)), 'corr': float(np.corrcoef(xa, exact[0][:, 0])[0, 1])})
    log(f'{name}: recall at 3% {one[-1]["recall3"]:.3f}, corr {one[-1]["corr"]:.3f}')
    if name.startswith('4-bit') or 'PQ, 32' in name or '1-bit a channel' in name:
        for keep in ([1.0] if name.startswith('4-bit') else [0.06, 0.08, 0.10]):
            for with_out in ([False] if name.startswith('4-bit') else [False, True]):
                rs, ms, worst = [], [], []
                for s in range(STEPS):
                    r1 = rhos[s].copy()
                    r1[free] = -np.inf
                    r1[sample] = -np.inf
                    kept = np.arange(N)[~free & ~np.isin(np.arange(N), sample)] if keep >= 1 else np.argpartition(-r1, int(keep * N))[:int(keep * N)]
                    if with_out:
                        kept = np.union1d(kept, outliers)
                    r2 = (K4[kept] @ (Q[s] * scale).T - c0s[s]).max(1)
                    sel = np.zeros(N, bool)
                    sel[kept[np.argpartition(-r2, M)[:M]]] = True
                    sel[sample] = True
                    sel[free] = True
                    miss = top[s][~sel[top[s]]]
                    rs.append(sel[top[s]].mean())
                    ms.append(float(probs[s][miss].sum()))
                    worst.append(float(probs[s][miss].max()) if len(miss) else 0.0)
                two.append({'code': name, 'keep': keep, 'outliers': with_out, 'recall': float(np.mean(rs)), 'missedMass': float(np.mean(ms)),
                            'worstStepMass': float(np.max(ms)), 'heaviestMissed': float(np.max(worst)),
                            'keyBytes': (nbytes / 256 if keep < 1 else 0) + min(keep, 1) * 0.25 + 0.03})
                log(f'  keep {keep} outliers {with_out}: recall {two[-1]["recall"]:.3f} missed mass {two[-1]["missedMass"]:.4f}')

keepText = lambda keep: 'all' if keep >= 1 else f'{100 * keep:.0f}%'
machine = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
md = [
    f'### Smaller key codes for the code scan\'s first pass, simulated, at {N:,} keys, {"broad" if broad else "default"} configuration (bench/ra-small-codes.py)',
    '',
    f'{machine}; {datetime.now(timezone.utc).isoformat()}. bench/ra-search-data.ts\'s workload (seed 7, one kv head, GQA 4, d = 128, f16), {STEPS} decode steps; '
    f'recall: of the group\'s exact top 1%, by sinks + window + the strided sample ({m} keys) + the best {M} by ρ (3% less the sample); '
    'the graph\'s entry points and seeds left out (the native scan scores them first, and recalls more). Outliers: keys with a channel more than 5σ from its mean '
    f'({len(outliers)} here, {100 * len(outliers) / N:.2f}%).',
    '',
    '1. One pass: each code ranks every key.',
    '',
    '| code | bytes a key | top-1% recall at 3% | logits\' correlation (step 0, row 0) |',
    '| --- | ---: | ---: | ---: |',
    *[f'| {r["code"]} | {r["bytes"]} | {r["recall3"]:.3f} | {r["corr"]:.3f} |' for r in one],
    '',
    '2. Two passes: the best `keep` by the small code (with the outliers or not), then the best 3% of those by the 4-bit code; key bytes read = the small codes + the 4-bit codes kept + 3% exact, over the f16 keys\' bytes (the outliers\' 4-bit codes left out of it: 0.4% of a quarter).',
    '',
    '| first pass | keep | outliers kept | top-1% recall | missed attention mass (mean, worst step) | heaviest key missed | key bytes read |',
    '| --- | ---: | --- | ---: | ---: | ---: | ---: |',
    *[f'| {r["code"]} | {keepText(r["keep"])} | {"yes" if r["outliers"] else "no"} | {r["recall"]:.3f} | {r["missedMass"]:.4f}, {r["worstStepMass"]:.4f} | {r["heaviestMissed"]:.4f} | {100 * r["keyBytes"]:.2f}% |' for r in two],
    '',
]
name = f'ra-small-codes-{N}{"-broad" if broad else ""}-vm{"-" + tag if tag else ""}'
os.makedirs('bench/results', exist_ok=True)
with open(f'bench/results/{name}.md', 'w') as f:
    f.write('\n'.join(md))
with open(f'bench/results/{name}.json', 'w') as f:
    json.dump({'machine': machine, 'date': datetime.now(timezone.utc).isoformat(), 'tokens': N, 'broad': broad, 'steps': STEPS,
               'sample': m, 'exact': M, 'outliers': int(len(outliers)), 'onePass': one, 'twoPasses': two}, f, indent=2)
    f.write('\n')
print('\n'.join(md))
log(f'wrote bench/results/{name}.md and .json')
