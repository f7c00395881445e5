// `squeezed` and `squeezed-2l`: Squeezed Attention (Hooper et al., 2024).
//
// At seal, per (layer, kv head): k-means of the head's keys into ≈ tokens/32
// clusters; each centroid is the mean of its keys, so q·c is the mean logit
// of the cluster and size·e^{q·c·scale} estimates (a Jensen lower bound of)
// the cluster's share of the softmax numerator. The estimated attention mass
// of a cluster is
//     mass_c = size_c · e^{s_c} / Σ_c' size_c' · e^{s_c'},  s_c = scale · max_g q_g·c
// with scale = 1/√headDim (GQA: the group's score is the max over its query
// heads, as topk scores). A threshold table, calibrated at seal on the
// prefill queries (or, when the LLM server sent none, on a sample of the
// keys used as pseudo-queries), maps a target kept fraction to the mass
// threshold at which the kept clusters hold that fraction of the tokens on
// average. Tables exist per GQA group size (1–8, 16): the prefill rows come
// as [token][group head], and blocks of 16 consecutive rows give groups of
// G consecutive rows; a search uses the table of the largest G ≤ its group.
//
// At decode the session budget sets the target: k/tokens, rounded up to the
// table's next fraction. Clusters with mass ≥ threshold are emitted in order
// of mass until k ids (fewer when the kept clusters hold fewer: attention is
// concentrated); the cluster that crosses k is cut by exact scores of its
// members. With k ≥ tokens every token is returned. `scanned` counts the
// centroids scored plus the member keys scored to cut that cluster.
//
// Two-level (`squeezed-2l`): the fine clusters are grouped into ≈ √C coarse
// groups (coarse centroid = mean of the group's keys, size = its tokens). A
// search scores the coarse centroids, expands the coarse groups whose coarse
// mass passes a calibrated coarse threshold (set so that they hold ≈
// `expand` × the target fraction), then more in order of mass until at
// least max(k, ef) tokens and `minExpanded` groups, and scores only the
// expanded groups' fine centroids. A fine cluster's mass is normalised by the
// fine terms of the expanded groups plus the coarse terms of the others; its
// threshold is calibrated through the same two-level pipeline.
//
// Clustering cost is bounded: up to `flatMaxClusters` clusters, one flat
// k-means; above, two stages — k-means into P ≈ √C partitions, then k-means
// of each partition into clusters in proportion to its size — about
// 2·n·√C·d per iteration instead of n·C·d (the partitions are then the
// coarse groups of the two-level index). Each k-means trains on a seeded
// sample of ≤ 64 keys per centroid (faiss's k-means, addon/faiss.ts) and then
// assigns every key; the size-weighted k-means of fine centroids into coarse
// groups (faiss has no weights) is a seeded Lloyd with the SIMD kernel of
// simd-dot.ts.
//
// Centroids are scored synchronously (HeadIndex.search is synchronous; the
// native kernels are async) with the WebAssembly SIMD kernel of simd-dot.ts,
// from f32 copies widened at load. Per-search scratch is shared by all heads.
//
// Artifact (little-endian): a 56-byte header — magic "KVSQ", version, levels,
// tokens, headDim, clusters C, coarse groups P, fractions F, tables T,
// centroid dtype (f16, or f32 when out of f16 range), calibration source and
// rows, an FNV-1a checksum of the whole artifact, its length, minExpanded —
// then 4-byte-aligned sections: fractions f32[F], table groups i32[T], fine
// thresholds f32[T·F] and (two levels) coarse thresholds f32[T·F] as log
// mass (−∞ keeps all), cluster offsets i32[C+1], members i32[n] (token ids
// grouped by cluster; a coarse group's clusters are contiguous), centroids
// [C, d], (two levels) coarse offsets i32[P+1] into clusters and coarse
// centroids [P, d]. Load checks lengths, checksum, offsets, that members are
// a permutation of the tokens, and finite centroids; it throws on anything else.
import { kmeans as faissKmeans, type KmeansArgs, type KmeansResult } from '../addon/faiss.js';
import { bytesOf, convert, firstNonFinite, type KvDtype } from '../addon/kernels.js';
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, SearchResult } from './method.js';
import { DotKernel, paddedStride } from './simd-dot.js';
import { staticPlusRetrieved } from './static-plus-retrieved.js';

/** Target kept fractions of the threshold table. The last must be 1. */
export const KEPT_FRACTIONS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1];
/** GQA group sizes a table is calibrated for; a search uses the largest ≤ its group. */
export const TABLE_GROUPS = [1, 2, 3, 4, 5, 6, 7, 8, 16];

export interface SqueezedOptions {
  levels: 1 | 2;
  /** Clusters ≈ tokens / tokensPerCluster (default 32). */
  tokensPerCluster?: number;
  /** Lloyd iterations (default 12). */
  iterations?: number;
  seed?: number;
  /** One flat k-means up to this many clusters, two stages above (default 256). */
  flatMaxClusters?: number;
  /** Two-level: expanded coarse groups hold ≈ expand × the target fraction (default 4). */
  expand?: number;
  /** Two-level: expand at least this many coarse groups (default 3). */
  minExpanded?: number;
  /** Calibration blocks of 16 query rows, at most (default 64; fewer for large C). */
  calibrationBlocks?: number;
}

export interface BuildInfo {
  ms: number;
  kmeansMs: number;
  calibrationMs: number;
  clusters: number;
  coarse: number;
  twoStage: boolean;
  calibration: 'queries' | 'keys' | 'none';
  calibrationRows: number;
}

export interface SearchStats {
  /** The table fraction used (1 = keep all clusters, by mass). */
  fraction: number;
  /** Centroids scored (coarse + fine). */
  centroids: number;
  /** Two-level: coarse groups expanded. */
  expanded: number;
  clustersKept: number;
  /** Tokens in the kept clusters (before truncation at k). */
  tokensKept: number;
  /** Member keys scored exactly to cut the last cluster. */
  keysScored: number;
  returned: number;
}

const MAGIC = 0x5153564b; // "KVSQ"
const VERSION = 1;
const HEADER = 56;
const MAX_CLUSTERS = (1 << 21) - 1; // sort keys pack a cluster id into 21 bits
const BLOCK_ROWS = 16;
const GROUPS_PER_BLOCK = 4; // calibration groups per block and table
const Q_CAP = 64; // query rows the kernel holds at once
const REFINE_ROWS = 512; // member keys the kernel scores at once when cutting a cluster
const LOG_MIN = -48; // calibration histogram over log-mass in [LOG_MIN, 0]
const BINS = 4096;
const TRAIN_PER_CENTROID = 64; // k-means training sample per centroid (then every key is assigned)
const F16_MAX = 65504;
const SRC = { none: 0, queries: 1, keys: 2 } as const;

// ---------- small helpers ----------

class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0 || 0x9e3779b9;
  }
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
}

/** m distinct values of [0, n), ascending. */
function sample(n: number, m: number, rng: Rng): Int32Array {
  const out = new Int32Array(m);
  if (m >= n) {
    for (let i = 0; i < n; i++) out[i] = i;
    return out;
  }
  const perm = new Int32Array(n);
  for (let i = 0; i < n; i++) perm[i] = i;
  for (let i = 0; i < m; i++) {
    const j = i + rng.int(n - i);
    const t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
    out[i] = perm[i];
  }
  return out.sort();
}

const tick = () => new Promise<void>((r) => setImmediate(r));

const luts: Partial<Record<KvDtype, Float32Array>> = {};
/** f32 value of every 16-bit code of a dtype. */
function lut(dtype: KvDtype): Float32Array {
  let t = luts[dtype];
  if (!t) {
    const codes = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) codes[i] = i;
    t = new Float32Array(65536);
    convert(bytesOf(codes), dtype, bytesOf(t), 'f32', 65536);
    luts[dtype] = t;
  }
  return t;
}

/** Rows `ids` of [*, d] 16-bit keys, as f32 [ids.length, d]. */
function gatherF32(keys: Uint16Array, d: number, dtype: KvDtype, ids: Int32Array): Float32Array {
  const words = gather16(keys, d, ids);
  const out = new Float32Array(words.length);
  if (words.length) convert(bytesOf(words), dtype, bytesOf(out), 'f32', words.length);
  return out;
}

function gather16(keys: Uint16Array, d: number, ids: Int32Array): Uint16Array {
  const out = new Uint16Array(ids.length * d);
  for (let i = 0; i < ids.length; i++) out.set(keys.subarray(ids[i] * d, ids[i] * d + d), i * d);
  return out;
}

// ---------- k-means ----------

type KmeansFn = (a: KmeansArgs) => Promise<KmeansResult>;

/**
 * Nearest centroid (L2) of each of n f32 rows: argmin |c|² − 2 x·c, with the
 * centroids in a kernel and the rows fed 4 at a time. Returns the best ids.
 */
class Assigner {
  private readonly s: number;
  private readonly kernel: DotKernel;
  private readonly qOff: number;
  private readonly outOff: number;
  private readonly norms: Float64Array;

  constructor(private readonly k: number, private readonly d: number) {
    this.s = paddedStride(d);
    this.qOff = (k + 1) * this.s;
    this.outOff = this.qOff + 4 * this.s;
    this.kernel = new DotKernel(this.outOff + 4 * (k + 2));
    this.norms = new Float64Array(k);
  }

  setCentroids(c: Float32Array): void {
    const { k, d, s, kernel } = this;
    for (let i = 0; i < k; i++) {
      kernel.f32.set(c.subarray(i * d, i * d + d), i * s);
      let nn = 0;
      for (let j = 0; j < d; j++) nn += c[i * d + j] * c[i * d + j];
      this.norms[i] = nn;
    }
  }

  /** Rows [i0, i0 + m) (m ≤ 4) of `x` as fed by `row(r, dst, at)`; writes assign[i0 + r] and returns Σ distances' proxy. */
  assign4(fill: (r: number, dst: Float32Array, at: number) => void, m: number, assign: Int32Array, i0: number): void {
    const { k, s, kernel, qOff, outOff, norms } = this;
    const f = kernel.f32;
    for (let r = 0; r < 4; r++) fill(Math.min(r, m - 1), f, qOff + r * s);
    kernel.dots4(0, k, s, qOff, outOff);
    for (let r = 0; r < m; r++) {
      let best = 0, bv = Infinity;
      for (let c = 0, o = outOff + r; c < k; c++, o += 4) {
        const v = norms[c] - 2 * f[o];
        if (v < bv) (bv = v), (best = c);
      }
      assign[i0 + r] = best;
    }
  }
}

/** Weighted Lloyd on f32 points [m, d]; returns the centroids [k, d]. */
async function lloyd(x: Float32Array, m: number, d: number, k: number, iterations: number, rng: Rng, w?: Float64Array): Promise<Float32Array> {
  const cent = new Float32Array(k * d);
  const init = sample(m, k, rng);
  for (let c = 0; c < k; c++) cent.set(x.subarray(init[c] * d, init[c] * d + d), c * d);
  const asg = new Assigner(k, d);
  const assign = new Int32Array(m);
  const sums = new Float64Array(k * d), wsum = new Float64Array(k);
  const fill = (base: number) => (r: number, dst: Float32Array, at: number) => dst.set(x.subarray((base + r) * d, (base + r + 1) * d), at);
  for (let it = 0; it < iterations; it++) {
    asg.setCentroids(cent);
    for (let i = 0; i < m; i += 4) asg.assign4(fill(i), Math.min(4, m - i), assign, i);
    sums.fill(0);
    wsum.fill(0);
    for (let i = 0; i < m; i++) {
      const c = assign[i], wi = w ? w[i] : 1;
      wsum[c] += wi;
      for (let j = 0, a = c * d, b = i * d; j < d; j++) sums[a + j] += wi * x[b + j];
    }
    for (let c = 0; c < k; c++) if (wsum[c] > 0) for (let j = 0; j < d; j++) cent[c * d + j] = sums[c * d + j] / wsum[c];
    // Empty clusters: split the heaviest one (as faiss does).
    for (let c = 0; c < k; c++) {
      if (wsum[c] > 0) continue;
      let big = 0;
      for (let b = 1; b < k; b++) if (wsum[b] > wsum[big]) big = b;
      if (wsum[big] <= 0) break;
      for (let j = 0; j < d; j++) {
        const v = cent[big * d + j], e = (j % 2 ? -1 : 1) / 1024;
        cent[c * d + j] = v * (1 + e) + (rng.next() - 0.5) * 1e-6;
        cent[big * d + j] = v * (1 - e);
      }
      wsum[c] = wsum[big] / 2;
      wsum[big] -= wsum[c];
    }
    if (it % 2 === 1) await tick();
  }
  return cent;
}

/** Nearest of k centroids (L2) for every row of 16-bit keys, with the SIMD kernel. */
async function assignAll(a: KmeansArgs, centroids: Float32Array): Promise<KmeansResult> {
  const { tokens: n, headDim: d, clusters: k } = a;
  const asg = new Assigner(k, d);
  asg.setCentroids(centroids);
  const assign = new Int32Array(n);
  const table = lut(a.dtype), keys = a.keys;
  for (let i = 0; i < n; i += 4) {
    asg.assign4(
      (r, dst, at) => {
        for (let j = 0, b = (i + r) * d; j < d; j++) dst[at + j] = table[keys[b + j]];
      },
      Math.min(4, n - i),
      assign,
      i,
    );
    if (i % 65536 === 65532) await tick();
  }
  const sizes = new Int32Array(k);
  for (let i = 0; i < n; i++) sizes[assign[i]]++;
  return { centroids, assign, sizes };
}

/**
 * k-means trained on a seeded sample of ≤ TRAIN_PER_CENTROID keys per centroid
 * (faiss's k-means trains on every key it is given), then every key assigned
 * to its nearest centroid.
 */
async function kmeansSampled(fn: KmeansFn, a: KmeansArgs): Promise<KmeansResult> {
  const cap = TRAIN_PER_CENTROID * a.clusters;
  if (a.tokens <= cap) return fn(a);
  const train = sample(a.tokens, cap, new Rng(a.seed ^ 0x6a09e667));
  const r = await fn({ ...a, keys: gather16(a.keys, a.headDim, train), tokens: cap });
  return assignAll(a, r.centroids);
}

// ---------- clustering ----------

interface Clustering {
  /** [C + 1] into members; clusters of one coarse group are contiguous. */
  offsets: Int32Array;
  /** [n] token ids grouped by cluster, ascending within one. */
  members: Int32Array;
  /** [C, d]: the mean of each cluster's keys. */
  centroids: Float32Array;
  /** Two-level: [P + 1] into clusters, and [P, d] means of each group's keys. */
  coarseOffsets?: Int32Array;
  coarseCentroids?: Float32Array;
  twoStage: boolean;
}

/** Groups ids by label (labels in [0, k)), dropping empty labels: CSR offsets and members. */
function groupBy(labels: Int32Array, k: number, ids?: Int32Array): { offsets: Int32Array; members: Int32Array; count: number } {
  const counts = new Int32Array(k + 1);
  for (let i = 0; i < labels.length; i++) counts[labels[i] + 1]++;
  for (let c = 0; c < k; c++) counts[c + 1] += counts[c];
  const members = new Int32Array(labels.length), at = counts.slice(0, k);
  for (let i = 0; i < labels.length; i++) members[at[labels[i]]++] = ids ? ids[i] : i;
  const offsets: number[] = [0];
  for (let c = 0; c < k; c++) if (counts[c + 1] > counts[c]) offsets.push(counts[c + 1]);
  return { offsets: Int32Array.from(offsets), members, count: offsets.length - 1 };
}

/** Means of clusters (CSR over token ids), in float64, from the 16-bit keys. */
function clusterMeans(keys: Uint16Array, d: number, dtype: KvDtype, offsets: Int32Array, members: Int32Array): Float32Array {
  const C = offsets.length - 1, out = new Float32Array(C * d), acc = new Float64Array(d), table = lut(dtype);
  for (let c = 0; c < C; c++) {
    acc.fill(0);
    for (let m = offsets[c]; m < offsets[c + 1]; m++) for (let j = 0, b = members[m] * d; j < d; j++) acc[j] += table[keys[b + j]];
    const size = offsets[c + 1] - offsets[c];
    for (let j = 0; j < d; j++) out[c * d + j] = acc[j] / size;
  }
  return out;
}

/** Size-weighted means of groups of clusters (offsets into clusters). */
function groupMeans(centroids: Float32Array, sizes: (c: number) => number, d: number, groupOffsets: Int32Array): Float32Array {
  const P = groupOffsets.length - 1, out = new Float32Array(P * d), acc = new Float64Array(d);
  for (let p = 0; p < P; p++) {
    acc.fill(0);
    let total = 0;
    for (let c = groupOffsets[p]; c < groupOffsets[p + 1]; c++) {
      const w = sizes(c);
      total += w;
      for (let j = 0; j < d; j++) acc[j] += w * centroids[c * d + j];
    }
    for (let j = 0; j < d; j++) out[p * d + j] = acc[j] / total;
  }
  return out;
}

async function cluster(input: HeadKeys, o: Required<SqueezedOptions>, kmeans: KmeansFn): Promise<Clustering> {
  const { tokens: n, headDim: d, dtype, keys } = input;
  const C = Math.max(1, Math.min(n, MAX_CLUSTERS, Math.round(n / o.tokensPerCluster)));
  const run = (k: Uint16Array, tokens: number, clusters: number, seed: number) =>
    clusters === 1
      ? Promise.resolve({ assign: new Int32Array(tokens), sizes: Int32Array.of(tokens), centroids: new Float32Array(d) })
      : kmeansSampled(kmeans, { keys: k, tokens, headDim: d, dtype, clusters, iterations: o.iterations, seed });

  if (C <= o.flatMaxClusters) {
    const r = await run(keys, n, C, o.seed);
    const { offsets, members } = groupBy(r.assign, C);
    const centroids = clusterMeans(keys, d, dtype, offsets, members);
    if (o.levels === 1) return { offsets, members, centroids, twoStage: false };
    // Coarse: size-weighted k-means of the fine centroids into ≈ √C groups.
    const Cf = offsets.length - 1, P = Math.max(1, Math.min(Cf, Math.round(Math.sqrt(Cf))));
    const w = Float64Array.from({ length: Cf }, (_, c) => offsets[c + 1] - offsets[c]);
    const rng = new Rng(o.seed ^ 0x2c1b3c6d);
    let labels = new Int32Array(Cf);
    if (P > 1) {
      const cc = await lloyd(centroids, Cf, d, P, Math.max(o.iterations, 20), rng, w);
      const asg = new Assigner(P, d);
      asg.setCentroids(cc);
      for (let i = 0; i < Cf; i += 4) asg.assign4((r, dst, at) => dst.set(centroids.subarray((i + r) * d, (i + r + 1) * d), at), Math.min(4, Cf - i), labels, i);
    }
    const g = groupBy(labels, P);
    // Reorder fine clusters so that each coarse group's are contiguous.
    const order = g.members;
    const offs = new Int32Array(Cf + 1), mem = new Int32Array(n), cen = new Float32Array(Cf * d);
    for (let i = 0; i < Cf; i++) {
      const c = order[i], a = offsets[c], b = offsets[c + 1];
      mem.set(members.subarray(a, b), offs[i]);
      offs[i + 1] = offs[i] + b - a;
      cen.set(centroids.subarray(c * d, c * d + d), i * d);
    }
    const coarseCentroids = groupMeans(cen, (c) => offs[c + 1] - offs[c], d, g.offsets);
    return { offsets: offs, members: mem, centroids: cen, coarseOffsets: g.offsets, coarseCentroids, twoStage: false };
  }

  // Two stages: partitions, then clusters within each in proportion to its size.
  const P = Math.max(2, Math.round(Math.sqrt(C)));
  const part = await run(keys, n, P, o.seed);
  const parts = groupBy(part.assign, P);
  const offsets: number[] = [0], coarse: number[] = [0];
  const members = new Int32Array(n);
  let at = 0;
  for (let p = 0; p < parts.count; p++) {
    const ids = parts.members.subarray(parts.offsets[p], parts.offsets[p + 1]);
    const np = ids.length, Cp = Math.max(1, Math.min(np, Math.round((C * np) / n)));
    const r = await run(gather16(keys, d, ids), np, Cp, (o.seed + 1 + p) >>> 0);
    const g = groupBy(r.assign, Cp, ids);
    members.set(g.members, at);
    for (let c = 0; c < g.count; c++) offsets.push(at + g.offsets[c + 1]);
    at += np;
    coarse.push(offsets.length - 1);
    await tick();
  }
  const offs = Int32Array.from(offsets);
  const centroids = clusterMeans(keys, d, dtype, offs, members);
  if (o.levels === 1) return { offsets: offs, members, centroids, twoStage: true };
  const coarseOffsets = Int32Array.from(coarse);
  const coarseCentroids = groupMeans(centroids, (c) => offs[c + 1] - offs[c], d, coarseOffsets);
  return { offsets: offs, members, centroids, coarseOffsets, coarseCentroids, twoStage: true };
}

// ---------- the artifact ----------

interface Parts {
  levels: 1 | 2;
  tokens: number;
  headDim: number;
  /** 0: f16, 2: f32 (when a centroid is out of f16 range). */
  centroidDtype: 0 | 2;
  source: number;
  calibrationRows: number;
  /** Two-level: coarse groups always expanded. */
  minExpanded: number;
  fractions: Float32Array;
  groups: Int32Array;
  /** [T, F] log-mass thresholds (−∞: keep all). */
  fineThr: Float32Array;
  coarseThr: Float32Array;
  offsets: Int32Array;
  members: Int32Array;
  /** 16-bit (f16) or f32 words, [C, d]. */
  centroids: Uint16Array | Float32Array;
  coarseOffsets: Int32Array;
  coarseCentroids: Uint16Array | Float32Array;
}

const pad4 = (n: number) => (n + 3) & ~3;

function checksum(words: Uint32Array): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < words.length; i++) h = Math.imul(h ^ words[i], 0x01000193);
  return h >>> 0;
}

function sections(p: Parts): ArrayBufferView[] {
  return [p.fractions, p.groups, p.fineThr, p.coarseThr, p.offsets, p.members, p.centroids, p.coarseOffsets, p.coarseCentroids];
}

function encode(p: Parts): Uint8Array {
  const parts = sections(p);
  const total = HEADER + parts.reduce((n, a) => n + pad4(a.byteLength), 0);
  const out = new Uint8Array(total);
  let at = HEADER;
  for (const a of parts) {
    out.set(bytesOf(a), at);
    at += pad4(a.byteLength);
  }
  const v = new DataView(out.buffer);
  v.setUint32(0, MAGIC, true);
  v.setUint16(4, VERSION, true);
  v.setUint16(6, p.levels, true);
  v.setUint32(8, p.tokens, true);
  v.setUint32(12, p.headDim, true);
  v.setUint32(16, p.offsets.length - 1, true);
  v.setUint32(20, Math.max(0, p.coarseOffsets.length - 1), true);
  v.setUint32(24, p.fractions.length, true);
  v.setUint32(28, p.groups.length, true);
  v.setUint16(32, p.centroidDtype, true);
  v.setUint16(34, p.source, true);
  v.setUint32(36, p.calibrationRows, true);
  v.setUint32(44, total, true);
  v.setUint32(48, p.minExpanded, true);
  v.setUint32(40, checksum(new Uint32Array(out.buffer, 0, total / 4)), true); // over everything, this word as 0
  return out;
}

function corrupt(why: string): never {
  throw new Error(`squeezed: corrupt index artifact: ${why}`);
}

function decode(bytes: Uint8Array, keys: HeadKeys): Parts {
  if (!(bytes instanceof Uint8Array) || bytes.byteLength < HEADER) corrupt(`${bytes?.byteLength ?? 0} bytes, shorter than the ${HEADER}-byte header`);
  bytes = new Uint8Array(bytes); // a copy (Buffer#slice would share): aligned for typed views, ours to keep
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (v.getUint32(0, true) !== MAGIC) corrupt('bad magic');
  if (v.getUint16(4, true) !== VERSION) corrupt(`version ${v.getUint16(4, true)}, expected ${VERSION}`);
  const levels = v.getUint16(6, true), n = v.getUint32(8, true), d = v.getUint32(12, true);
  const C = v.getUint32(16, true), P = v.getUint32(20, true), F = v.getUint32(24, true), T = v.getUint32(28, true);
  const centroidDtype = v.getUint16(32, true), source = v.getUint16(34, true), calibrationRows = v.getUint32(36, true);
  const minExpanded = v.getUint32(48, true);
  if (v.getUint32(52, true) !== 0) corrupt('reserved header word is not 0');
  if (levels !== 1 && levels !== 2) corrupt(`levels ${levels}`);
  if (n !== keys.tokens || d !== keys.headDim) corrupt(`built for ${n} tokens × ${d}, the keys have ${keys.tokens} × ${keys.headDim}`);
  if (n > 0 ? C < 1 || C > n : C !== 0) corrupt(`${C} clusters for ${n} tokens`);
  if (levels === 1 ? P !== 0 : n > 0 ? P < 1 || P > C : P !== 0) corrupt(`${P} coarse groups for ${C} clusters`);
  if (F < 1 || F > 64 || T < 1 || T > 64) corrupt(`table ${T} × ${F}`);
  if (centroidDtype !== 0 && centroidDtype !== 2) corrupt(`centroid dtype ${centroidDtype}`);
  const cw = centroidDtype === 0 ? 2 : 4;
  const lengths = [F * 4, T * 4, T * F * 4, levels === 2 ? T * F * 4 : 0, (C + 1) * 4, n * 4, C * d * cw, levels === 2 ? (P + 1) * 4 : 0, P * d * cw];
  const total = HEADER + lengths.reduce((s, l) => s + pad4(l), 0);
  if (v.getUint32(44, true) !== total || bytes.byteLength !== total) corrupt(`${bytes.byteLength} bytes, the header implies ${total}`);
  const sum = v.getUint32(40, true);
  v.setUint32(40, 0, true);
  if (checksum(new Uint32Array(bytes.buffer, bytes.byteOffset, total / 4)) !== sum) corrupt('checksum mismatch');
  let at = bytes.byteOffset + HEADER;
  const take = <A>(len: number, make: (buf: ArrayBuffer, off: number, count: number) => A, width: number): A => {
    const a = make(bytes.buffer as ArrayBuffer, at, len / width);
    at += pad4(len);
    return a;
  };
  const f32 = (b: ArrayBuffer, o: number, c: number) => new Float32Array(b, o, c);
  const i32 = (b: ArrayBuffer, o: number, c: number) => new Int32Array(b, o, c);
  const cen = (b: ArrayBuffer, o: number, c: number) => (cw === 2 ? new Uint16Array(b, o, c) : new Float32Array(b, o, c));
  const p: Parts = {
    levels,
    tokens: n,
    headDim: d,
    centroidDtype,
    source,
    calibrationRows,
    minExpanded,
    fractions: take(lengths[0], f32, 4),
    groups: take(lengths[1], i32, 4),
    fineThr: take(lengths[2], f32, 4),
    coarseThr: take(lengths[3], f32, 4),
    offsets: take(lengths[4], i32, 4),
    members: take(lengths[5], i32, 4),
    centroids: take(lengths[6], cen, cw),
    coarseOffsets: take(lengths[7], i32, 4),
    coarseCentroids: take(lengths[8], cen, cw),
  };
  // Structure: the tables, then CSR offsets and a permutation of the tokens.
  for (let i = 0; i < F; i++)
    if (!(p.fractions[i] > 0 && p.fractions[i] <= 1) || (i > 0 && p.fractions[i] <= p.fractions[i - 1])) corrupt('fractions not increasing in (0, 1]');
  if (p.fractions[F - 1] !== 1) corrupt('the last fraction is not 1');
  for (let i = 0; i < T; i++) if (p.groups[i] < 1 || (i > 0 ? p.groups[i] <= p.groups[i - 1] : p.groups[0] !== 1)) corrupt('table groups');
  for (const t of [p.fineThr, p.coarseThr]) for (let i = 0; i < t.length; i++) if (Number.isNaN(t[i]) || t[i] > 1e-3) corrupt('thresholds');
  const csr = (offs: Int32Array, count: number, what: string) => {
    if (offs[0] !== 0 || offs[offs.length - 1] !== count) corrupt(`${what} offsets do not span ${count}`);
    for (let i = 1; i < offs.length; i++) if (offs[i] <= offs[i - 1]) corrupt(`${what} offsets not increasing`);
  };
  if (n > 0) csr(p.offsets, n, 'cluster');
  if (levels === 2 && n > 0) csr(p.coarseOffsets, C, 'coarse');
  const seen = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const t = p.members[i];
    if (t < 0 || t >= n || seen[t]) corrupt('members are not a permutation of the tokens');
    seen[t] = 1;
  }
  const dt = cw === 2 ? 'f16' : 'f32';
  for (const c of [p.centroids, p.coarseCentroids]) if (c.length && firstNonFinite(bytesOf(c), dt, c.length) >= 0) corrupt('non-finite centroid');
  return p;
}

// ---------- the loaded index ----------

/** Calibration histogram bin of a log-mass. */
const bin = (logMass: number) => (logMass <= LOG_MIN ? 0 : logMass >= 0 ? BINS - 1 : Math.floor(((logMass - LOG_MIN) / -LOG_MIN) * BINS));

const ID_SPAN = 2 ** 21;
/** Sort key: ascending sort puts higher log-mass (then lower id) last. */
const sortKey = (logMass: number, id: number) =>
  Math.floor((Math.min(Math.max(logMass, -2047), 0.5) + 2048) * 1048576) * ID_SPAN + (ID_SPAN - 1 - id);
const keyId = (key: number) => ID_SPAN - 1 - (key % ID_SPAN);

/**
 * Per-search scratch shared by every head (searches are synchronous and
 * JavaScript runs one at a time; calibration holds nothing across awaits),
 * grown to the largest index seen.
 */
const scratch = {
  logw: new Float64Array(0),
  clogw: new Float64Array(0),
  sortKeys: new Float64Array(0),
  expanded: new Int32Array(0),
  isExpanded: new Uint8Array(0),
  refineScores: new Float64Array(0),
  refineOrder: new Int32Array(0),
  words: new Uint16Array(0),
  rows: new Float32Array(0),
};
function growScratch(C: number, P: number, maxSize: number): void {
  if (scratch.logw.length < C) scratch.logw = new Float64Array(C);
  if (scratch.clogw.length < P) {
    scratch.clogw = new Float64Array(P);
    scratch.expanded = new Int32Array(P);
    scratch.isExpanded = new Uint8Array(P);
  }
  if (scratch.sortKeys.length < Math.max(C, P)) scratch.sortKeys = new Float64Array(Math.max(C, P));
  if (scratch.refineScores.length < maxSize) {
    scratch.refineScores = new Float64Array(maxSize);
    scratch.refineOrder = new Int32Array(maxSize);
  }
}

export class SqueezedHead implements HeadIndex {
  readonly levels: 1 | 2;
  readonly tokens: number;
  readonly headDim: number;
  readonly clusters: number;
  readonly coarse: number;
  readonly fractions: Float32Array;
  readonly groups: Int32Array;
  fineThr: Float32Array;
  coarseThr: Float32Array;
  readonly calibration: 'queries' | 'keys' | 'none';
  readonly minExpanded: number;
  lastSearch: SearchStats = { fraction: 0, centroids: 0, expanded: 0, clustersKept: 0, tokensKept: 0, keysScored: 0, returned: 0 };

  private readonly offsets: Int32Array;
  private readonly members: Int32Array;
  private readonly coarseOffsets: Int32Array;
  private readonly scale: number;
  private readonly stride: number;
  private readonly kernel: DotKernel;
  // kernel float offsets: fine rows, coarse rows, query rows, fine scores, coarse scores
  private readonly fineOff = 0;
  private readonly coarseOff: number;
  private readonly qOff: number;
  private readonly outOff: number;
  private readonly coarseOutOff: number;
  private readonly memberOff: number;
  private readonly memberOutOff: number;
  private readonly logSize: Float64Array;
  private readonly coarseLogSize: Float64Array;
  private readonly coarseTokens: Int32Array;
  private readonly tableOf = new Map<number, number>();

  constructor(p: Parts, private readonly keys?: HeadKeys) {
    this.levels = p.levels;
    this.tokens = p.tokens;
    this.headDim = p.headDim;
    this.clusters = p.offsets.length - 1;
    this.coarse = p.levels === 2 ? p.coarseOffsets.length - 1 : 0;
    this.fractions = p.fractions;
    this.groups = p.groups;
    this.fineThr = p.fineThr;
    this.coarseThr = p.coarseThr;
    this.minExpanded = p.minExpanded;
    this.calibration = p.source === SRC.queries ? 'queries' : p.source === SRC.keys ? 'keys' : 'none';
    this.offsets = p.offsets;
    this.members = p.members;
    this.coarseOffsets = p.coarseOffsets;
    const d = p.headDim, C = this.clusters, P = this.coarse, s = (this.stride = paddedStride(d));
    this.scale = 1 / Math.sqrt(d);
    this.coarseOff = (C + 1) * s;
    this.qOff = this.coarseOff + (P + 1) * s;
    this.outOff = this.qOff + Q_CAP * s;
    this.coarseOutOff = this.outOff + 4 * (C + 2);
    this.memberOff = this.coarseOutOff + 4 * (P + 2);
    this.memberOutOff = this.memberOff + (REFINE_ROWS + 1) * s;
    this.kernel = new DotKernel(this.memberOutOff + REFINE_ROWS + 2);
    this.putRows(p.centroids, C, this.fineOff, p.centroidDtype);
    this.putRows(p.coarseCentroids, P, this.coarseOff, p.centroidDtype);
    this.logSize = new Float64Array(C);
    let maxSize = 0;
    for (let c = 0; c < C; c++) {
      const size = p.offsets[c + 1] - p.offsets[c];
      this.logSize[c] = Math.log(size);
      maxSize = Math.max(maxSize, size);
    }
    this.coarseLogSize = new Float64Array(P);
    this.coarseTokens = new Int32Array(P);
    for (let g = 0; g < P; g++) {
      this.coarseTokens[g] = p.offsets[p.coarseOffsets[g + 1]] - p.offsets[p.coarseOffsets[g]];
      this.coarseLogSize[g] = Math.log(this.coarseTokens[g]);
    }
    growScratch(C, P, maxSize);
  }

  // scratch views (see `scratch`), grown for this head at construction
  private get logw(): Float64Array {
    return scratch.logw;
  }
  private get clogw(): Float64Array {
    return scratch.clogw;
  }
  private get sortKeys(): Float64Array {
    return scratch.sortKeys;
  }
  private get expanded(): Int32Array {
    return scratch.expanded;
  }
  private get isExpanded(): Uint8Array {
    return scratch.isExpanded;
  }

  private putRows(src: Uint16Array | Float32Array, count: number, off: number, dtype: 0 | 2): void {
    const d = this.headDim, s = this.stride, f = this.kernel.f32;
    let rows: Float32Array;
    if (dtype === 0) {
      rows = new Float32Array(count * d);
      if (rows.length) convert(bytesOf(src), 'f16', bytesOf(rows), 'f32', rows.length);
    } else rows = src as Float32Array;
    if (s === d) f.set(rows, off);
    else for (let i = 0; i < count; i++) f.set(rows.subarray(i * d, i * d + d), off + i * s);
  }

  /** Index of the calibration table for a GQA group. */
  private table(group: number): number {
    let t = this.tableOf.get(group);
    if (t === undefined) {
      t = 0;
      for (let i = 0; i < this.groups.length; i++) if (this.groups[i] <= group) t = i;
      this.tableOf.set(group, t);
    }
    return t;
  }

  /** The smallest table fraction that covers k of the tokens (one token of slack for rounding). */
  private fractionIndex(k: number): number {
    const F = this.fractions.length;
    for (let i = 0; i < F - 1; i++) if (this.fractions[i] * this.tokens + 1 >= k) return i;
    return F - 1;
  }

  /** Copies query rows [g0, g0 + m) into the kernel. */
  private loadQuery(q: Float32Array, g0: number, m: number): void {
    const d = this.headDim, s = this.stride, f = this.kernel.f32;
    for (let r = 0; r < m; r++) f.set(q.subarray((g0 + r) * d, (g0 + r + 1) * d), this.qOff + r * s);
  }

  /**
   * Scores rows [0, n) at float offset `rows` into `out`: max over the group's query rows.
   * Groups up to Q_CAP rows are loaded once per search (by search()); larger ones chunk by chunk here.
   */
  private score(q: Float32Array, group: number, rows: number, n: number, out: number): void {
    if (group <= Q_CAP) return this.kernel.maxDots(rows, n, this.stride, this.qOff, group, out);
    for (let g0 = 0; g0 < group; g0 += Q_CAP) {
      const m = Math.min(Q_CAP, group - g0);
      this.loadQuery(q, g0, m);
      this.kernel.maxDots(rows, n, this.stride, this.qOff, m, out, g0 > 0);
    }
  }

  /** Per-row dots of `len` f32 rows (from row `first` of `rows`) with the fine or coarse centroids: out [len][count]. */
  rowDots(rows: Float32Array, first: number, len: number, level: 'fine' | 'coarse', out: Float32Array): void {
    const d = this.headDim, s = this.stride, f = this.kernel.f32;
    const rowsOff = level === 'fine' ? this.fineOff : this.coarseOff, count = level === 'fine' ? this.clusters : this.coarse;
    for (let r0 = 0; r0 < len; r0 += 4) {
      for (let r = 0; r < 4; r++) {
        const src = first + Math.min(r0 + r, len - 1);
        f.set(rows.subarray(src * d, (src + 1) * d), this.qOff + r * s);
      }
      this.kernel.dots4(rowsOff, count, s, this.qOff, this.outOff);
      for (let r = 0; r < 4 && r0 + r < len; r++) {
        const o = (r0 + r) * count;
        for (let c = 0, x = this.outOff + r; c < count; c++, x += 4) out[o + c] = f[x];
      }
    }
  }

  // --- masses (shared by search and calibration; raw scores are unscaled max_g q_g·c) ---

  /** One level: log-weights of every cluster; returns log Z. */
  massesOne(raw: Float32Array, ro: number): number {
    const { logw, logSize, scale } = this, C = this.clusters;
    let M = -Infinity;
    for (let c = 0; c < C; c++) {
      const w = logSize[c] + scale * raw[ro + c];
      logw[c] = w;
      if (w > M) M = w;
    }
    let z = 0;
    for (let c = 0; c < C; c++) z += Math.exp(logw[c] - M);
    return M + Math.log(z);
  }

  /** Coarse log-weights; returns log Z over the coarse groups. */
  massesCoarse(raw: Float32Array, ro: number): number {
    const { clogw, coarseLogSize, scale } = this, P = this.coarse;
    let M = -Infinity;
    for (let g = 0; g < P; g++) {
      const w = coarseLogSize[g] + scale * raw[ro + g];
      clogw[g] = w;
      if (w > M) M = w;
    }
    let z = 0;
    for (let g = 0; g < P; g++) z += Math.exp(clogw[g] - M);
    return M + Math.log(z);
  }

  /** Coarse groups to expand, in order of mass: those ≥ thr, then more until `floor` tokens and minExpanded groups. Returns how many. */
  expand(lzc: number, thr: number, floor: number): number {
    const P = this.coarse, keys = this.sortKeys, cut = thr + lzc;
    for (let g = 0; g < P; g++) keys[g] = sortKey(this.clogw[g] - lzc, g);
    keys.subarray(0, P).sort();
    let ne = 0, tokens = 0;
    for (let i = P - 1; i >= 0; i--) {
      const g = keyId(keys[i]);
      if (this.clogw[g] < cut && tokens >= floor && ne >= this.minExpanded) break;
      this.expanded[ne++] = g;
      tokens += this.coarseTokens[g];
    }
    return ne;
  }

  /** Two levels: log-weights of the expanded groups' clusters; returns log Z (the other groups by their coarse term). */
  massesTwo(raw: Float32Array, ro: number, ne: number): number {
    const { logw, logSize, scale, clogw, expanded, isExpanded, coarseOffsets } = this, P = this.coarse;
    let M = -Infinity;
    for (let e = 0; e < ne; e++) {
      const g = expanded[e];
      isExpanded[g] = 1;
      for (let c = coarseOffsets[g]; c < coarseOffsets[g + 1]; c++) {
        const w = logSize[c] + scale * raw[ro + c];
        logw[c] = w;
        if (w > M) M = w;
      }
    }
    for (let g = 0; g < P; g++) if (!isExpanded[g] && clogw[g] > M) M = clogw[g];
    let z = 0;
    for (let e = 0; e < ne; e++) {
      const g = expanded[e];
      for (let c = coarseOffsets[g]; c < coarseOffsets[g + 1]; c++) z += Math.exp(logw[c] - M);
    }
    for (let g = 0; g < P; g++) if (!isExpanded[g]) z += Math.exp(clogw[g] - M);
    for (let e = 0; e < ne; e++) isExpanded[expanded[e]] = 0;
    return M + Math.log(z);
  }

  private nk = 0;
  private tokensKept = 0;
  /** Clusters [c0, c1) with log-weight ≥ cut: appends their sort keys (this.nk) and tokens (this.tokensKept). */
  private keepRange(c0: number, c1: number, cut: number, lz: number): void {
    const { logw, offsets, sortKeys } = this;
    let nk = this.nk, tokens = this.tokensKept;
    for (let c = c0; c < c1; c++)
      if (logw[c] >= cut) {
        sortKeys[nk++] = sortKey(logw[c] - lz, c);
        tokens += offsets[c + 1] - offsets[c];
      }
    this.nk = nk;
    this.tokensKept = tokens;
  }

  /** Calibration: adds the tokens of the clusters considered by the last masses call to a histogram by log-mass. */
  histogram(h: Float64Array, lz: number, ne: number): void {
    const { logw, offsets } = this;
    const add = (c0: number, c1: number) => {
      for (let c = c0; c < c1; c++) h[bin(logw[c] - lz)] += offsets[c + 1] - offsets[c];
    };
    if (this.levels === 1) add(0, this.clusters);
    else for (let e = 0; e < ne; e++) add(this.coarseOffsets[this.expanded[e]], this.coarseOffsets[this.expanded[e] + 1]);
  }

  /** Calibration: adds the coarse groups' tokens to a histogram by coarse log-mass. */
  coarseHistogram(h: Float64Array, lzc: number): void {
    for (let g = 0; g < this.coarse; g++) h[bin(this.clogw[g] - lzc)] += this.coarseTokens[g];
  }

  // --- search ---

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = this.tokens, d = this.headDim, C = this.clusters, P = this.coarse;
    k = Math.min(Math.floor(k), n);
    if (n === 0 || !(k > 0) || group < 1) {
      this.lastSearch = { fraction: 0, centroids: 0, expanded: 0, clustersKept: 0, tokensKept: 0, keysScored: 0, returned: 0 };
      return { ids: new Int32Array(0), scanned: 0 };
    }
    if (q.length < group * d) throw new Error(`squeezed: query has ${q.length} values, expected ${group} × ${d}`);
    const F = this.fractions.length, t = this.table(group);
    const fi = k >= n ? F - 1 : this.fractionIndex(k);
    const last = fi === F - 1;
    const f = this.kernel.f32;
    if (group <= Q_CAP) this.loadQuery(q, 0, group);
    let lz: number, ne = 0, centroids: number;
    if (this.levels === 1) {
      this.score(q, group, this.fineOff, C, this.outOff);
      lz = this.massesOne(f, this.outOff);
      centroids = C;
    } else {
      this.score(q, group, this.coarseOff, P, this.coarseOutOff);
      const lzc = this.massesCoarse(f, this.coarseOutOff);
      const floor = last ? n : Math.min(n, Math.max(k, ef || 0));
      ne = this.expand(lzc, last ? -Infinity : this.coarseThr[t * F + fi], floor);
      centroids = P;
      for (let e = 0; e < ne; e++) {
        const g = this.expanded[e], c0 = this.coarseOffsets[g], c1 = this.coarseOffsets[g + 1];
        this.score(q, group, this.fineOff + c0 * this.stride, c1 - c0, this.outOff + c0);
        centroids += c1 - c0;
      }
      lz = this.massesTwo(f, this.outOff, ne);
    }
    // Keep clusters with log-mass ≥ threshold; order by mass.
    const cut = (last ? -Infinity : this.fineThr[t * F + fi]) + lz;
    const keys = this.sortKeys;
    this.nk = this.tokensKept = 0;
    if (this.levels === 1) this.keepRange(0, C, cut, lz);
    else
      for (let e = 0; e < ne; e++) {
        const g = this.expanded[e];
        this.keepRange(this.coarseOffsets[g], this.coarseOffsets[g + 1], cut, lz);
      }
    const { nk, tokensKept } = this;
    keys.subarray(0, nk).sort();
    // Emit members until k; the crossing cluster is cut by exact member scores.
    const ids = new Int32Array(Math.min(k, tokensKept));
    let pos = 0, keysScored = 0;
    for (let i = nk - 1; i >= 0 && pos < k; i--) {
      const c = keyId(keys[i]), a = this.offsets[c], b = this.offsets[c + 1];
      if (pos + b - a <= k) {
        ids.set(this.members.subarray(a, b), pos);
        pos += b - a;
      } else {
        keysScored += this.refine(a, b, k - pos, ids, pos, q, group);
        pos = k;
      }
    }
    this.lastSearch = { fraction: this.fractions[fi], centroids, expanded: ne, clustersKept: nk, tokensKept, keysScored, returned: pos };
    return { ids, scanned: centroids + keysScored };
  }

  /** Writes the `want` best members of [a, b) (max over the group of q·k) at ids[pos…]; returns the keys scored. */
  private refine(a: number, b: number, want: number, ids: Int32Array, pos: number, q: Float32Array, group: number): number {
    const members = this.members;
    if (!this.keys) {
      ids.set(members.subarray(a, a + want), pos);
      return 0;
    }
    const d = this.headDim, s = this.stride, kw = this.keys.keys, f = this.kernel.f32;
    const sc = scratch.refineScores, order = scratch.refineOrder, m = b - a;
    if (scratch.words.length < REFINE_ROWS * d) {
      scratch.words = new Uint16Array(REFINE_ROWS * d);
      scratch.rows = new Float32Array(REFINE_ROWS * d);
    }
    const words = scratch.words;
    for (let i0 = 0; i0 < m; i0 += REFINE_ROWS) {
      const rows = Math.min(REFINE_ROWS, m - i0);
      // Gather the members' 16-bit rows, widen them natively into the kernel.
      for (let i = 0; i < rows; i++) {
        const src = members[a + i0 + i] * d;
        words.set(kw.subarray(src, src + d), i * d);
      }
      const wb = bytesOf(words.subarray(0, rows * d));
      if (s === d) convert(wb, this.keys.dtype, bytesOf(f.subarray(this.memberOff, this.memberOff + rows * d)), 'f32', rows * d);
      else {
        convert(wb, this.keys.dtype, bytesOf(scratch.rows), 'f32', rows * d);
        for (let i = 0; i < rows; i++) f.set(scratch.rows.subarray(i * d, i * d + d), this.memberOff + i * s);
      }
      this.score(q, group, this.memberOff, rows, this.memberOutOff);
      for (let i = 0; i < rows; i++) {
        sc[i0 + i] = f[this.memberOutOff + i];
        order[i0 + i] = i0 + i;
      }
    }
    const o = order.subarray(0, m).sort((x, y) => sc[y] - sc[x] || members[a + x] - members[a + y]);
    for (let i = 0; i < want; i++) ids[pos + i] = members[a + o[i]];
    return m;
  }
}

// ---------- calibration ----------

interface CalibrationRows {
  rows: Float32Array; // [blocks × len, d]
  blocks: number;
  len: number;
  source: number;
}

/** Blocks of 16 consecutive prefill query rows ([token][g] order, so a block holds whole groups when G | 16), evenly spaced; or sampled keys. */
function calibrationRows(input: BuildInput, maxBlocks: number, seed: number): CalibrationRows {
  const d = input.headDim;
  if (input.queryCount > 0) {
    const len = Math.min(BLOCK_ROWS, input.queryCount), have = Math.floor(input.queryCount / len);
    const blocks = Math.min(have, maxBlocks), rows = new Float32Array(blocks * len * d);
    for (let b = 0; b < blocks; b++) {
      const start = Math.floor(((b + 0.5) * have) / blocks) * len;
      rows.set(input.queries.subarray(start * d, (start + len) * d), b * len * d);
    }
    return { rows, blocks, len, source: SRC.queries };
  }
  if (input.tokens === 0) return { rows: new Float32Array(0), blocks: 0, len: BLOCK_ROWS, source: SRC.none };
  const len = BLOCK_ROWS, count = Math.min(input.tokens, maxBlocks * len);
  const blocks = Math.max(1, Math.floor(count / len));
  const ids = sample(input.tokens, Math.min(input.tokens, blocks * len), new Rng(seed ^ 0x51ed270b));
  // shuffle so that a block's rows are unrelated tokens, like one token's heads
  const rng = new Rng(seed ^ 0x1234567);
  for (let i = ids.length - 1; i > 0; i--) {
    const j = rng.int(i + 1), t = ids[i];
    ids[i] = ids[j];
    ids[j] = t;
  }
  const rows = new Float32Array(blocks * len * d);
  rows.set(gatherF32(input.keys, d, input.dtype, ids));
  return { rows, blocks, len: Math.min(len, ids.length), source: SRC.keys };
}


/** Log-mass threshold at which the kept tokens average `f` of all (histogram of kept tokens by log-mass). */
function solve(hist: Float64Array, total: number, f: number): number {
  if (f >= 1 || total <= 0) return -Infinity;
  const want = f * total;
  let above = 0;
  for (let b = BINS - 1; b >= 0; b--) {
    if (above + hist[b] >= want) {
      if (b === 0) return -Infinity;
      const width = -LOG_MIN / BINS, top = LOG_MIN + (b + 1) * width;
      return top - (width * (want - above)) / hist[b];
    }
    above += hist[b];
  }
  return -Infinity;
}

async function calibrate(head: SqueezedHead, input: BuildInput, o: Required<SqueezedOptions>, cal: CalibrationRows): Promise<void> {
  const n = head.tokens, C = head.clusters, P = head.coarse, F = KEPT_FRACTIONS.length, T = TABLE_GROUPS.length;
  const fine = new Float32Array(T * F).fill(-Infinity), coarse = new Float32Array(head.levels === 2 ? T * F : 0).fill(-Infinity);
  head.fineThr = fine;
  head.coarseThr = coarse;
  if (n === 0 || cal.blocks === 0) return;
  const { len } = cal, two = head.levels === 2;
  // Per-row dots of one block against the fine and coarse centroids: [len][C], [len][P].
  const rowFine = new Float32Array(len * C), rowCoarse = new Float32Array(len * P);
  const rawFine = new Float32Array(C), rawCoarse = new Float32Array(P);
  const computed = TABLE_GROUPS.map((G) => G <= len);
  const hist1 = TABLE_GROUPS.map(() => new Float64Array(BINS));
  const histC = two ? TABLE_GROUPS.map(() => new Float64Array(BINS)) : [];
  const hist2 = two ? TABLE_GROUPS.map(() => KEPT_FRACTIONS.map(() => new Float64Array(BINS))) : [];
  const groupsSeen = new Float64Array(T);

  // Visits up to GROUPS_PER_BLOCK groups of G consecutive rows per block and table (rotating
  // through the block's groups from block to block), with their fine and coarse scores.
  const forEachGroup = async (fineToo: boolean, visit: (t: number, raw: Float32Array, rawC: Float32Array) => void) => {
    for (let b = 0; b < cal.blocks; b++) {
      if (fineToo) head.rowDots(cal.rows, b * len, len, 'fine', rowFine);
      if (P) head.rowDots(cal.rows, b * len, len, 'coarse', rowCoarse);
      for (let t = 0; t < T; t++) {
        const G = TABLE_GROUPS[t], count = Math.floor(len / G);
        if (!computed[t]) continue;
        const visits = Math.min(count, GROUPS_PER_BLOCK), step = Math.ceil(count / visits);
        for (let i = 0; i < visits; i++) {
          const g0 = ((b + i * step) % count) * G;
          if (fineToo) maxRows(rowFine, C, g0, G, rawFine);
          if (P) maxRows(rowCoarse, P, g0, G, rawCoarse);
          visit(t, rawFine, rawCoarse);
        }
      }
      await tick();
    }
  };

  // Pass 1: one-level fine masses, or (two levels) coarse masses only.
  await forEachGroup(!two, (t, raw, rawC) => {
    groupsSeen[t]++;
    if (!two) head.histogram(hist1[t], head.massesOne(raw, 0), 0);
    else head.coarseHistogram(histC[t], head.massesCoarse(rawC, 0));
  });
  for (let t = 0; t < T; t++) {
    if (!computed[t]) continue;
    for (let i = 0; i < F - 1; i++) {
      if (!two) fine[t * F + i] = solve(hist1[t], groupsSeen[t] * n, KEPT_FRACTIONS[i]);
      else coarse[t * F + i] = solve(histC[t], groupsSeen[t] * n, Math.min(1, o.expand * KEPT_FRACTIONS[i]));
    }
  }
  if (two) {
    // Pass 2: fine masses through the two-level pipeline, per target fraction.
    await forEachGroup(true, (t, raw, rawC) => {
      const lzc = head.massesCoarse(rawC, 0);
      for (let i = 0; i < F - 1; i++) {
        const ne = head.expand(lzc, coarse[t * F + i], Math.min(n, KEPT_FRACTIONS[i] * n));
        head.histogram(hist2[t][i], head.massesTwo(raw, 0, ne), ne);
      }
    });
    for (let t = 0; t < T; t++)
      if (computed[t]) for (let i = 0; i < F - 1; i++) fine[t * F + i] = solve(hist2[t][i], groupsSeen[t] * n, KEPT_FRACTIONS[i]);
  }
  // Tables not computable (fewer rows than the group): copy the largest smaller one.
  for (let t = 1; t < T; t++)
    if (!computed[t])
      for (let i = 0; i < F; i++) {
        fine[t * F + i] = fine[(t - 1) * F + i];
        if (coarse.length) coarse[t * F + i] = coarse[(t - 1) * F + i];
      }
}

/** raw[c] = max over rows [g0, g0 + G) of rowDots[r][c]. */
function maxRows(rowDots: Float32Array, count: number, g0: number, G: number, raw: Float32Array): void {
  raw.set(rowDots.subarray(g0 * count, (g0 + 1) * count));
  for (let r = g0 + 1; r < g0 + G; r++) {
    const o = r * count;
    for (let c = 0; c < count; c++) if (rowDots[o + c] > raw[c]) raw[c] = rowDots[o + c];
  }
}

// ---------- builders ----------

const DEFAULTS: Omit<Required<SqueezedOptions>, 'levels'> = {
  tokensPerCluster: 32,
  iterations: 12,
  seed: 0x5eed,
  flatMaxClusters: 256,
  expand: 4,
  minExpanded: 3,
  calibrationBlocks: 64,
};

function toCentroidWords(c: Float32Array): { words: Uint16Array | Float32Array; dtype: 0 | 2 } {
  for (let i = 0; i < c.length; i++) if (Math.abs(c[i]) > F16_MAX) return { words: c, dtype: 2 };
  const words = new Uint16Array(c.length);
  if (c.length) convert(bytesOf(c), 'f32', bytesOf(words), 'f16', c.length);
  return { words, dtype: 0 };
}

export interface SqueezedBuilder extends HeadIndexBuilder {
  readonly options: Required<SqueezedOptions>;
  /** Timings and shape of the most recent build (for benchmarks). */
  lastBuild?: BuildInfo;
  load(bytes: Uint8Array, keys: HeadKeys): SqueezedHead;
}

export function squeezedBuilder(options: SqueezedOptions): SqueezedBuilder {
  const o: Required<SqueezedOptions> = { ...DEFAULTS, ...options };
  const builder: SqueezedBuilder = {
    options: o,
    async build(input: BuildInput): Promise<Uint8Array> {
      const t0 = performance.now(), n = input.tokens, d = input.headDim;
      if (!Number.isInteger(n) || n < 0 || !Number.isInteger(d) || d < 1 || input.keys.length < n * d)
        throw new Error(`squeezed: keys hold ${input.keys.length} words, expected ${n} × ${d}`);
      if (input.queries.length < input.queryCount * d) throw new Error('squeezed: fewer query values than queryCount × headDim');
      const kmeans: KmeansFn = faissKmeans;
      const cl: Clustering =
        n === 0
          ? { offsets: Int32Array.of(0), members: new Int32Array(0), centroids: new Float32Array(0), twoStage: false, ...(o.levels === 2 ? { coarseOffsets: Int32Array.of(0), coarseCentroids: new Float32Array(0) } : {}) }
          : await cluster(input, o, kmeans);
      const t1 = performance.now();
      const fineW = toCentroidWords(cl.centroids), coarseW = toCentroidWords(cl.coarseCentroids ?? new Float32Array(0));
      const dtype: 0 | 2 = fineW.dtype === 2 || coarseW.dtype === 2 ? 2 : 0;
      const C = cl.offsets.length - 1;
      const maxBlocks = Math.max(8, Math.min(o.calibrationBlocks, Math.floor(2.5e9 / (BLOCK_ROWS * Math.max(1, C) * d))));
      const cal = calibrationRows(input, maxBlocks, o.seed);
      const parts: Parts = {
        levels: o.levels,
        tokens: n,
        headDim: d,
        centroidDtype: dtype,
        source: cal.source,
        calibrationRows: cal.blocks * cal.len,
        minExpanded: o.levels === 2 ? o.minExpanded : 0,
        fractions: Float32Array.from(KEPT_FRACTIONS),
        groups: Int32Array.from(TABLE_GROUPS),
        fineThr: new Float32Array(TABLE_GROUPS.length * KEPT_FRACTIONS.length),
        coarseThr: new Float32Array(o.levels === 2 ? TABLE_GROUPS.length * KEPT_FRACTIONS.length : 0),
        offsets: cl.offsets,
        members: cl.members,
        centroids: dtype === 0 ? fineW.words : cl.centroids,
        coarseOffsets: o.levels === 2 ? cl.coarseOffsets! : new Int32Array(0),
        coarseCentroids: dtype === 0 ? coarseW.words : (cl.coarseCentroids ?? new Float32Array(0)),
      };
      // Calibrate on the index exactly as load will see it (f16-rounded centroids).
      const head = new SqueezedHead(parts);
      await calibrate(head, input, o, cal);
      parts.fineThr = head.fineThr;
      parts.coarseThr = head.coarseThr;
      const t2 = performance.now();
      builder.lastBuild = {
        ms: t2 - t0,
        kmeansMs: t1 - t0,
        calibrationMs: t2 - t1,
        clusters: C,
        coarse: Math.max(0, parts.coarseOffsets.length - 1),
        twoStage: cl.twoStage,
        calibration: cal.source === SRC.queries ? 'queries' : cal.source === SRC.keys ? 'keys' : 'none',
        calibrationRows: cal.blocks * cal.len,
      };
      return encode(parts);
    },
    load(bytes: Uint8Array, keys: HeadKeys): SqueezedHead {
      const p = decode(bytes, keys);
      if (p.levels !== o.levels) corrupt(`a ${p.levels}-level index, this method loads ${o.levels}-level ones`);
      return new SqueezedHead(p, keys);
    },
  };
  return builder;
}

export const squeezedOneLevel = squeezedBuilder({ levels: 1 });
export const squeezedTwoLevel = squeezedBuilder({ levels: 2 });
export const squeezed = staticPlusRetrieved('squeezed', squeezedOneLevel);
export const squeezed2l = staticPlusRetrieved('squeezed-2l', squeezedTwoLevel);
