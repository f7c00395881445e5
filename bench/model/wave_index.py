"""Cluster indexes and approximate attention for the wave studies (float64, numpy).

`study_context` is the context both studies read: held-out code with a
planted pass key, prefilled once, Q/K/V in float64.

A `ClusterIndex` covers one kv head's keys 0..n_idx-1: k-means (L2) inside
segments (8192 tokens for "wave-8K", 64 for "wave-block"), per cluster the
centroid (mean key), value sum, count and radius (max distance of a member
to the centroid), plus the 64-token block means for block retrieval.

`attend_one` answers one position's attention for one GQA group given a
`Variant`: the exact set (sinks + window + the retrieved zone) attended
exactly, and, with estimation, every cluster that still has non-exact
members contributing count * exp(s q.c) with its (exact-members-removed)
mean value, all merged in one log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

import heldout

BLOCK = 64
SINKS = 16
WINDOW = 64


@dataclass(frozen=True)
class Variant:
    name: str
    retrieval: str  # 'oracle' | 'cluster' | 'block-opt' | 'block-mean'
    estimate: bool
    segment: int = 8192  # k-means segment length (tokens)
    size: int = 8  # tokens per cluster
    budget: float = 0.025  # retrieved-zone share of the context

    @property
    def index_key(self) -> Tuple[int, int]:
        return (self.segment, self.size)


@dataclass
class ClusterIndex:
    n_idx: int
    labels: np.ndarray  # [n_idx] cluster of each token
    cent: np.ndarray  # [nc, d]
    vsum: np.ndarray  # [nc, d]
    count: np.ndarray  # [nc] float
    radius: np.ndarray  # [nc]
    block: np.ndarray  # [nc] 64-token block of the cluster, -1 if it straddles blocks
    block_mean: np.ndarray  # [n_idx // 64, d]


def kmeans_batched(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """x [B, m, d] -> labels [B, m] in 0..k-1; init: k distinct random points per segment."""
    B, m, d = x.shape
    pick = np.argsort(rng.random((B, m)), axis=1)[:, :k]
    c = np.take_along_axis(x, pick[:, :, None], axis=1)  # [B, k, d]
    x2 = np.einsum("bmd,bmd->bm", x, x)
    lab = np.zeros((B, m), np.int64)
    for _ in range(iters + 1):
        d2 = x2[:, :, None] - 2.0 * (x @ c.transpose(0, 2, 1)) + np.einsum("bkd,bkd->bk", c, c)[:, None, :]
        lab = d2.argmin(axis=2)
        flat = (lab + np.arange(B)[:, None] * k).reshape(-1)
        cnt = np.bincount(flat, minlength=B * k).reshape(B, k).astype(x.dtype)
        sums = np.zeros((B * k, d))
        np.add.at(sums, flat, x.reshape(-1, d))
        sums = sums.reshape(B, k, d)
        c = np.where(cnt[:, :, None] > 0, sums / np.maximum(cnt, 1)[:, :, None], c)  # empty: keep old centroid
    return lab


def build_index(keys: np.ndarray, vals: np.ndarray, n_idx: int, segment: int, size: int, iters: int,
                rng: np.random.Generator) -> ClusterIndex:
    """keys, vals [n, d] float64; clusters of ~size tokens inside segments over keys 0..n_idx-1."""
    x, v = keys[:n_idx], vals[:n_idx]
    labels = np.empty(n_idx, np.int64)
    offset = 0
    starts = list(range(0, n_idx, segment))
    full = [s for s in starts if s + segment <= n_idx]
    if full:
        m = segment
        k = -(-m // size)
        lab = kmeans_batched(x[full[0]:full[-1] + m].reshape(len(full), m, -1), k, iters, rng)
        labels[full[0]:full[-1] + m] = (lab + np.arange(len(full))[:, None] * k).reshape(-1)
        offset = len(full) * k
    for s in starts[len(full):]:  # a ragged last segment
        m = n_idx - s
        k = -(-m // size)
        labels[s:] = kmeans_batched(x[None, s:], k, iters, rng)[0] + offset
        offset += k
    _, labels = np.unique(labels, return_inverse=True)  # drop empty clusters
    nc = labels.max() + 1
    count = np.bincount(labels, minlength=nc).astype(np.float64)
    cent = np.zeros((nc, x.shape[1]))
    np.add.at(cent, labels, x)
    cent /= count[:, None]
    vsum = np.zeros_like(cent)
    np.add.at(vsum, labels, v)
    radius = np.zeros(nc)
    np.maximum.at(radius, labels, np.linalg.norm(x - cent[labels], axis=1))
    blk = np.arange(n_idx) // BLOCK
    bmin = np.full(nc, np.iinfo(np.int64).max)
    bmax = np.full(nc, -1)
    np.minimum.at(bmin, labels, blk)
    np.maximum.at(bmax, labels, blk)
    block = np.where(bmin == bmax, bmax, -1)
    nb = n_idx // BLOCK
    block_mean = x[:nb * BLOCK].reshape(nb, BLOCK, -1).mean(axis=1)
    return ClusterIndex(n_idx, labels, cent, vsum, count, radius, block, block_mean)


def static_mask(t: int, n_idx: int) -> np.ndarray:
    """Tokens 0..t always exact: sinks, the window, and anything not indexed."""
    e = np.zeros(t + 1, bool)
    e[:SINKS] = True
    e[max(0, t + 1 - WINDOW):] = True
    e[n_idx:] = True
    return e


def select(var: Variant, idx: ClusterIndex, q: np.ndarray, t: int, budget: int) -> np.ndarray:
    """The retrieved zone (tokens of 0..n_idx-1) for one GQA group's queries q [G, d]."""
    zone = np.zeros(idx.n_idx, bool)
    if var.retrieval == "cluster":
        score = (q @ idx.cent.T + 0.5 * np.linalg.norm(q, axis=1)[:, None] * idx.radius[None, :]).max(axis=0)
        order = np.argsort(-score)
        take = order[:np.searchsorted(np.cumsum(idx.count[order]), budget) + 1]
        chosen = np.zeros(len(idx.count), bool)
        chosen[take] = True
        return chosen[idx.labels]
    nb = idx.block_mean.shape[0]
    if var.retrieval == "block-opt":
        cs = (q @ idx.cent.T + 0.5 * np.linalg.norm(q, axis=1)[:, None] * idx.radius[None, :]).max(axis=0)
        bscore = np.full(nb, -np.inf)
        ok = idx.block >= 0
        np.maximum.at(bscore, idx.block[ok], cs[ok])
    elif var.retrieval == "block-mean":
        bscore = (q @ idx.block_mean.T).max(axis=0)
    else:
        raise ValueError(f"variant {var.name}: unknown retrieval {var.retrieval!r}")
    take = np.argsort(-bscore)[:-(-budget // BLOCK)]
    zone[:nb * BLOCK].reshape(nb, BLOCK)[take] = True
    return zone


def merged_softmax(q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float, c_logit: np.ndarray | None = None,
                   c_val: np.ndarray | None = None) -> np.ndarray:
    """Attention of q [G, d] over exact keys K/V plus optional estimated terms (logit [G, m] incl. log count,
    value [m, d]), one log-sum-exp."""
    s = scale * (q @ K.T)
    vals = V
    if c_logit is not None and c_logit.shape[1]:
        s = np.concatenate([s, c_logit], axis=1)
        vals = np.concatenate([V, c_val], axis=0)
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return (p @ vals) / p.sum(axis=1, keepdims=True)


def attend_one(var: Variant, idx: ClusterIndex | None, q: np.ndarray, K: np.ndarray, V: np.ndarray, t: int,
               scale: float, budget: int) -> Tuple[np.ndarray, np.ndarray]:
    """q [G, d]; K, V [t+1, d] (keys 0..t). Returns (output [G, d], exact mask per query head [G, t+1])."""
    n_idx = idx.n_idx if idx is not None else max(0, t + 1 - WINDOW)
    stat = static_mask(t, n_idx)
    G = q.shape[0]
    if var.retrieval == "oracle":
        masks = np.repeat(stat[None], G, axis=0)
        s = q @ K.T
        s[:, stat] = -np.inf
        top = np.argpartition(-s, budget, axis=1)[:, :budget]
        np.put_along_axis(masks, top, True, axis=1)
        out = np.stack([merged_softmax(q[g:g + 1], K[masks[g]], V[masks[g]], scale)[0] for g in range(G)])
        return out, masks
    exact = stat.copy()
    exact[:idx.n_idx] |= select(var, idx, q, t, budget)
    masks = np.repeat(exact[None], G, axis=0)
    if not var.estimate:
        return merged_softmax(q, K[exact], V[exact], scale), masks
    ex_in = np.flatnonzero(exact[:idx.n_idx])
    cnt = idx.count.copy()
    vsum = idx.vsum.copy()
    np.subtract.at(cnt, idx.labels[ex_in], 1.0)
    np.subtract.at(vsum, idx.labels[ex_in], V[ex_in])
    live = cnt > 0.5
    c_logit = scale * (q @ idx.cent[live].T) + np.log(cnt[live])[None, :]
    return merged_softmax(q, K[exact], V[exact], scale, c_logit, vsum[live] / cnt[live][:, None]), masks


def build_indexes(variants, keys: np.ndarray, vals: np.ndarray, n_idx: int, iters: int,
                  seed: int) -> Dict[Tuple[int, int], ClusterIndex]:
    """One index per (segment, size) the variants need, for one kv head."""
    out: Dict[Tuple[int, int], ClusterIndex] = {}
    for var in variants:
        if var.retrieval != "oracle" and var.index_key not in out:
            out[var.index_key] = build_index(keys, vals, n_idx, var.segment, var.size, iters,
                                             np.random.default_rng(seed))
    return out


@dataclass
class StudyContext:
    ids: np.ndarray  # [ctx] bytes, the pass key's digits last
    key: bytes
    at: int  # byte offset of the plant
    prefill: object  # model.Prefill (logits as asked)
    Q: List[np.ndarray]  # per layer [n_heads, ctx, d], float64
    K: List[np.ndarray]  # per layer [n_kv_heads, ctx, d]
    V: List[np.ndarray]


def study_context(model, ctx: int, seed: int, logits: str = "all") -> StudyContext:
    """ctx bytes of held-out code ending in the pass-key question and its answer, prefilled once (float32)."""
    seq, key, at = heldout.plant(heldout.corpus(), ctx - 5, np.random.default_rng(seed))
    ids = np.frombuffer(seq + key, np.uint8)
    pre = model.prefill(ids, keep_qkv=True, logits=logits)
    f64 = lambda xs: [x.astype(np.float64) for x in xs]  # noqa: E731
    return StudyContext(ids, key, at, pre, f64(pre.q), f64(pre.k), f64(pre.v))
