// k-means for clustering a head's keys. faiss (addon/faiss.ts) trains on
// every row it is given, so above TRAIN_PER_CENTROID rows per centroid it
// trains on a seeded sample and every key is then assigned here with the
// SIMD kernel of simd-dot.ts. Grouping fine centroids into coarse groups
// needs weights (the clusters' sizes), which faiss's k-means lacks: that is
// the seeded Lloyd here.
import type { KmeansArgs, KmeansResult } from '../../addon/faiss.js';
import { DotKernel, paddedStride } from '../simd-dot.js';
import { gather16, lut } from './key-rows.js';
import { Rng, sample } from './sampling.js';
import { tick } from './tick.js';

const TRAIN_PER_CENTROID = 64; // k-means training sample per centroid (then every key is assigned)

export type KmeansFn = (a: KmeansArgs) => Promise<KmeansResult>;

/**
 * Nearest centroid (L2) of each of n f32 rows: argmin |c|² − 2 x·c, with the
 * centroids in a kernel and the rows fed 4 at a time. Returns the best ids.
 */
export class Assigner {
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
export async function lloyd(x: Float32Array, m: number, d: number, k: number, iterations: number, rng: Rng, w?: Float64Array): Promise<Float32Array> {
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
export async function kmeansSampled(fn: KmeansFn, a: KmeansArgs): Promise<KmeansResult> {
  const cap = TRAIN_PER_CENTROID * a.clusters;
  if (a.tokens <= cap) return fn(a);
  const train = sample(a.tokens, cap, new Rng(a.seed ^ 0x6a09e667));
  const r = await fn({ ...a, keys: gather16(a.keys, a.headDim, train), tokens: cap });
  return assignAll(a, r.centroids);
}
