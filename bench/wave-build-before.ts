// The wave index build as it was at commit 077953a, before its seal was made
// faster (bench/wave-build.ts times the two; test/index/wave-build-same.test.ts
// checks that both give the same bytes). Kept verbatim but for the names and
// the calibration's errors split out of its choice (the tests compare them):
// it is the reference the faster build must match byte for byte.
import { narrowWords, outlierScores, widenWords } from '../addon/kernels.js';
import { kmeansMany, kmeansManyDevice, type KmeansArgs, type KmeansResult } from '../addon/faiss.js';
import { clusterSummary } from '../addon/cluster-summary.js';
import { invalid } from '../core/errors.js';
import type { BuildInput } from '../index/method.js';
import { DEFAULT_CLUSTER_OPTIONS, OUTLIER_SHARE, type ClusterOptions } from '../index/wave/cluster-build.js';
import { centroidStride, encodeClusters, type ClusterArrays } from '../index/wave/cluster-codec.js';
import { decodeAxis, decodeVar, type MomentCodes } from '../index/wave/moment-code.js';
import { DEFAULT_SHARE, VARIANCE_SHARES } from '../index/wave/variance-share.js';

export interface BuiltClustersBefore {
  headDim: number;
  stride: number;
  centroids: Float32Array;
  keyVars: Float32Array;
  valueMeans: Float32Array;
  counts: Int32Array;
  tokenCluster: Int32Array;
  segments: [number, number, number, number][];
}

const ROWS = 16;
const SEGMENTS = 4;
const EXACT_SHARE = 0.02;
const AXIS_MAX = 127;
const VAR_MAX = 255;

/** Evenly spaced picks of `want` out of `n`. */
const spread = (n: number, want: number) => Array.from({ length: Math.min(n, want) }, (_, i) => Math.floor(((i + 0.5) * n) / Math.min(n, want)));

export function calibrateVarianceShareBefore(input: BuildInput, c: BuiltClustersBefore): number {
  if (input.queryCount === 0 || !input.values) return DEFAULT_SHARE;
  const errors = calibrationErrorsBefore(input, c);
  let best = 0;
  for (let i = 1; i < errors.length; i++) if (errors[i] < errors[best]) best = i;
  return VARIANCE_SHARES[best];
}

/** The errors calibrateVarianceShareBefore chose by (split from it so that tests can compare them; input.values given). */
export function calibrationErrorsBefore(input: BuildInput, c: BuiltClustersBefore): Float64Array {
  const d = c.headDim, stride = c.stride, s = 1 / Math.sqrt(d);
  const errors = new Float64Array(VARIANCE_SHARES.length);
  const rows = spread(input.queryCount, ROWS);
  for (const si of spread(c.segments.length, SEGMENTS)) {
    const [t0, t1, c0, c1] = c.segments[si];
    const keys = widenWords(input.keys.subarray(t0 * d, t1 * d), input.dtype);
    const values = widenWords(input.values!.subarray(t0 * d, t1 * d), input.dtype);
    const n = t1 - t0, logits = new Float64Array(n), exact = new Uint8Array(c1 - c0);
    const want = new Float64Array(d), got = new Float64Array(d), numExact = new Float64Array(d);
    const base = new Float64Array(c1 - c0), second = new Float64Array(c1 - c0), cap = new Float64Array(c1 - c0);
    for (const r of rows) {
      const q = input.queries.subarray(r * d, (r + 1) * d);
      let m = -Infinity;
      for (let t = 0; t < n; t++) {
        let x = 0;
        for (let j = 0; j < d; j++) x += q[j] * keys[t * d + j];
        logits[t] = s * x;
        m = Math.max(m, logits[t]);
      }
      // The top tokens' clusters are attended exactly, whole.
      const top = Math.max(1, Math.ceil(EXACT_SHARE * n));
      const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
      exact.fill(0);
      for (let i = 0; i < top; i++) exact[c.tokenCluster[t0 + order[i]] - c0] = 1;
      want.fill(0);
      numExact.fill(0);
      let denAll = 0, denExact = 0;
      for (let t = 0; t < n; t++) {
        const p = Math.exp(logits[t] - m);
        denAll += p;
        const isExact = exact[c.tokenCluster[t0 + t] - c0] === 1;
        if (isExact) denExact += p;
        for (let j = 0; j < d; j++) {
          want[j] += p * values[t * d + j];
          if (isExact) numExact[j] += p * values[t * d + j];
        }
      }
      for (let j = 0; j < d; j++) want[j] /= denAll;
      let qn = 0;
      for (let j = 0; j < d; j++) qn += q[j] * q[j];
      qn = Math.sqrt(qn);
      for (let k = c0; k < c1; k++) {
        let a = 0, b = 0;
        for (let j = 0; j < d; j++) (a += q[j] * c.centroids[k * stride + j]), (b += q[j] * q[j] * c.keyVars[k * d + j]);
        base[k - c0] = s * a;
        second[k - c0] = 0.5 * s * s * b;
        cap[k - c0] = s * (a + qn * c.centroids[k * stride + d]);
      }
      let ref = 0;
      for (let j = 0; j < d; j++) ref += want[j] * want[j];
      VARIANCE_SHARES.forEach((share, i) => {
        got.set(numExact);
        let den = denExact;
        for (let k = c0; k < c1; k++) {
          if (exact[k - c0]) continue;
          const w = c.counts[k] * Math.exp(Math.min(base[k - c0] + share * second[k - c0], cap[k - c0]) - m);
          den += w;
          for (let j = 0; j < d; j++) got[j] += w * c.valueMeans[k * d + j];
        }
        let e = 0;
        for (let j = 0; j < d; j++) e += (got[j] / den - want[j]) ** 2;
        errors[i] += Math.sqrt(e / Math.max(ref, 1e-30));
      });
    }
  }
  return errors;
}

/** Codes of `clusters` rows of `headDim` axes and variances (float32, as the summary computes them). */
export function encodeMomentsBefore(axes: Float32Array, vars: Float32Array, clusters: number, headDim: number): MomentCodes {
  const d = headDim;
  const out: MomentCodes = {
    keyAxes: new Int8Array(clusters * d),
    axisScales: new Float32Array(clusters),
    keyVars: new Uint8Array(clusters * d),
    varScales: new Float32Array(clusters),
  };
  for (let c = 0; c < clusters; c++) {
    const o = c * d;
    let ma = 0, mv = 0;
    for (let j = 0; j < d; j++) {
      const a = Math.abs(axes[o + j]), v = vars[o + j];
      // Finite keys can still overflow float32 here (bf16 keys past ~1e19): no scale codes them, so the seal is refused (422), not a 500.
      if (!Number.isFinite(a) || !Number.isFinite(v))
        throw invalid('the wave index cannot code these keys: a cluster\'s key variance or axis is not finite in float32 (keys past ~1e19 in magnitude)');
      if (a > ma) ma = a;
      if (v > mv) mv = v;
    }
    const sa = Math.fround(ma / AXIS_MAX), sv = Math.fround(mv / (VAR_MAX * VAR_MAX));
    out.axisScales[c] = sa;
    out.varScales[c] = sv;
    if (sa > 0)
      for (let j = 0; j < d; j++) out.keyAxes[o + j] = Math.max(-AXIS_MAX, Math.min(AXIS_MAX, Math.round(axes[o + j] / sa)));
    if (sv > 0)
      for (let j = 0; j < d; j++) {
        // The nearer of the two codes around the std, by the variance it decodes to.
        const v = Math.max(0, vars[o + j]), r = Math.sqrt(v / sv);
        const lo = Math.min(VAR_MAX, Math.floor(r)), hi = Math.min(VAR_MAX, lo + 1);
        out.keyVars[o + j] = Math.abs(decodeVar(hi, sv) - v) < Math.abs(decodeVar(lo, sv) - v) ? hi : lo;
      }
  }
  return out;
}

/** The decoded rows, as the native decode gives them (tests, the build's calibration, benches). */
export function decodeMomentsBefore(m: MomentCodes, headDim: number): { axes: Float32Array; vars: Float32Array } {
  const C = m.axisScales.length, d = headDim;
  const axes = new Float32Array(C * d), vars = new Float32Array(C * d);
  for (let c = 0; c < C; c++)
    for (let j = 0; j < d; j++) {
      axes[c * d + j] = decodeAxis(m.keyAxes[c * d + j], m.axisScales[c]);
      vars[c * d + j] = decodeVar(m.keyVars[c * d + j], m.varScales[c]);
    }
  return { axes, vars };
}

async function kmeansOn(device: boolean, problems: KmeansArgs[]): Promise<KmeansResult[]> {
  if (device && problems.length > 0 && problems[0].headDim % 4 === 0) {
    try {
      return await kmeansManyDevice(problems);
    } catch {
      // the host's below
    }
  }
  return kmeansMany(problems);
}

/**
 * Cluster of every row of each segment [t0, t1): k-means, all segments side
 * by side (native kmeansMany), or each row alone where clusters would not
 * be fewer than rows.
 */
async function assignSegments(input: BuildInput, bounds: readonly [number, number][], o: ClusterOptions): Promise<{ assign: Int32Array; clusters: number }[]> {
  const d = input.headDim;
  const clustersOf = (t0: number, t1: number) => Math.max(1, Math.ceil((t1 - t0) / o.clusterSize));
  const trained = bounds.filter(([t0, t1]) => clustersOf(t0, t1) < t1 - t0);
  const results = await kmeansOn(
    input.device === true,
    trained.map(([t0, t1]) => ({ keys: input.keys.subarray(t0 * d, t1 * d), tokens: t1 - t0, headDim: d, dtype: input.dtype, clusters: clustersOf(t0, t1), iterations: o.iterations, seed: (o.seed + t0) % 2 ** 31 })),
  );
  let next = 0;
  return bounds.map(([t0, t1]) => {
    const n = t1 - t0, clusters = clustersOf(t0, t1);
    return clusters < n ? { assign: results[next++].assign, clusters } : { assign: Int32Array.from({ length: n }, (_, i) => i), clusters: n };
  });
}

/**
 * The tokens/OUTLIER_SHARE keys that stand out most from the head's keys
 * channel by channel (native outlierScores, the statistic the
 * RetrievalAttention graph's outlier entry points use), as a per-token flag;
 * ties at the cut go to the lower positions, so the count is exact.
 */
export async function outlierKeysBefore(input: BuildInput): Promise<Uint8Array> {
  const N = input.tokens, flag = new Uint8Array(N);
  const want = Math.floor(N / OUTLIER_SHARE);
  if (want === 0) return flag;
  const z = new Float32Array(N);
  await outlierScores(input.keys, input.dtype, N, input.headDim, z);
  const cut = z.slice().sort()[N - want];
  let left = want;
  for (let t = 0; t < N && left > 0; t++) if (z[t] > cut) (flag[t] = 1), left--;
  for (let t = 0; t < N && left > 0; t++) if (z[t] === cut) (flag[t] = 1), left--;
  return flag;
}

/** Power iterations for a cluster's principal axis (native/kernels/cluster_summary.h), from its farthest member: a lone outlier is the axis at once. */
const AXIS_ITERATIONS = 4;

export async function buildClustersBefore(input: BuildInput, o: ClusterOptions = DEFAULT_CLUSTER_OPTIONS): Promise<Uint8Array> {
  if (!input.values) throw new Error('the wave index needs the values of the head');
  const d = input.headDim, N = input.tokens, stride = centroidStride(d);
  const outliers = await outlierKeysBefore(input);
  let bound = outliers.reduce((n, f) => n + f, 0);
  for (let t0 = 0; t0 < N; t0 += o.segmentTokens) bound += Math.ceil(Math.min(o.segmentTokens, N - t0) / Math.max(1, Math.min(o.clusterSize, N - t0)));
  const centroids = new Float32Array(bound * stride), valueMeans = new Float32Array(bound * d), keyVars = new Float32Array(bound * d), keyAxes = new Float32Array(bound * d), counts = new Int32Array(bound);
  const tokenCluster = new Int32Array(N);
  const segments: [number, number, number, number][] = [];
  let C = 0;
  const bounds: [number, number][] = [];
  for (let t0 = 0; t0 < N; t0 += o.segmentTokens) bounds.push([t0, Math.min(N, t0 + o.segmentTokens)]);
  const assigned = await assignSegments(input, bounds, o);
  for (const [s, [t0, t1]] of bounds.entries()) {
    const n = t1 - t0;
    const seg = assigned[s];
    const assign = seg.assign;
    let clusters = seg.clusters;
    // Outliers leave their k-means cluster for one of their own (a cluster left empty is dropped below).
    if (clusters < n) for (let i = 0; i < n; i++) if (outliers[t0 + i]) assign[i] = clusters++;
    // Empty clusters are dropped: ids are renumbered densely.
    const cnt = new Int32Array(clusters);
    for (let i = 0; i < n; i++) cnt[assign[i]]++;
    const id = new Int32Array(clusters).fill(-1), first = C;
    for (let c = 0; c < clusters; c++) if (cnt[c] > 0) counts[(id[c] = C++)] = cnt[c];
    const local = new Int32Array(n);
    for (let i = 0; i < n; i++) local[i] = (tokenCluster[t0 + i] = id[assign[i]]) - first;
    await clusterSummary({
      keys: input.keys.subarray(t0 * d, t1 * d), values: input.values.subarray(t0 * d, t1 * d), dtype: input.dtype, tokens: n, headDim: d, stride,
      cluster: local, clusters: C - first, axisIterations: AXIS_ITERATIONS,
      centroids: centroids.subarray(first * stride, C * stride), valueMeans: valueMeans.subarray(first * d, C * d),
      keyVars: keyVars.subarray(first * d, C * d), keyAxes: keyAxes.subarray(first * d, C * d),
    });
    segments.push([t0, t1, first, C]);
  }
  // The moments in 8 bits; the share is calibrated on the variances they decode to (what the estimate reads).
  const moments = encodeMomentsBefore(keyAxes, keyVars, C, d);
  const decodedVars = decodeMomentsBefore(moments, d).vars;
  const varianceShare = calibrateVarianceShareBefore(input, { headDim: d, stride, centroids, keyVars: decodedVars, valueMeans, counts, tokenCluster, segments });
  const arrays: ClusterArrays = {
    tokens: N,
    headDim: d,
    clusterSize: o.clusterSize,
    dtype: input.dtype,
    centroids: narrowWords(centroids.subarray(0, C * stride), input.dtype),
    valueMeans: narrowWords(valueMeans.subarray(0, C * d), input.dtype),
    ...moments,
    varianceShare,
    counts: counts.slice(0, C),
    tokenCluster,
  };
  return encodeClusters(arrays);
}
