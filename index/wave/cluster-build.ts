// Building a kv head's clusters (RetroInfer's wave index): keys are clustered
// by k-means inside segments of `segmentTokens` (nearby tokens share topics,
// and segments keep k-means cheap and a build incremental), about
// `clusterSize` tokens per cluster. Each cluster keeps what estimation and
// ranking need: the mean of its keys (so q·centroid is the mean logit over
// it), the mean of its values, each channel's key variance (the estimate's
// second-order term, native/kernels/cluster_estimate.h), its principal axis
// scaled by the members' standard deviation along it (ranking:
// native/kernels/cluster_rank.h), its token count,
// its radius (the largest distance of a member key from the centroid, for
// the optimistic score) and its members.
//
// Keys that stand out from the head's key distribution channel by channel
// (outlierKeys) are clusters of their own: a fact stored once (a planted
// needle, a pass key) is such a key, and inside a cluster of ordinary keys
// its logit is invisible to any summary (its offset from the centroid is no
// longer than the others'; only the query knows the direction that matters).
// Alone, its cluster's score is its exact logit.
import { convert, outlierScores, widenWords, type KvDtype } from '../../addon/kernels.js';
import { kmeans } from '../../addon/faiss.js';
import type { BuildInput } from '../method.js';
import { centroidStride, encodeClusters, type ClusterArrays } from './cluster-codec.js';
import { calibrateVarianceShare } from './variance-share.js';

export interface ClusterOptions {
  /** Tokens per cluster on average (8–16 in RetroInfer). */
  clusterSize: number;
  /** Tokens per k-means segment. */
  segmentTokens: number;
  /** Lloyd iterations per segment. */
  iterations: number;
  seed: number;
}

export const DEFAULT_CLUSTER_OPTIONS: ClusterOptions = { clusterSize: 8, segmentTokens: 8192, iterations: 8, seed: 1 };

/**
 * One key in OUTLIER_SHARE is kept as a cluster of its own. On the
 * generator at 128K tokens the planted needles rank 80–430 of the head's
 * keys by outlierKeys' score (both configurations), inside the 512 this
 * keeps; the ranking then scores them exactly for 0.4% more clusters.
 */
export const OUTLIER_SHARE = 256;

function narrow(values: Float32Array, dtype: KvDtype): Uint16Array {
  const out = new Uint16Array(values.length);
  convert(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), 'f32', new Uint8Array(out.buffer), dtype, values.length);
  return out;
}

/** Cluster of every row of one segment [t0, t1): k-means, or each row alone when clusters would not be fewer than rows. */
async function assignSegment(input: BuildInput, t0: number, t1: number, o: ClusterOptions): Promise<{ assign: Int32Array; clusters: number }> {
  const n = t1 - t0, d = input.headDim;
  const clusters = Math.max(1, Math.ceil(n / o.clusterSize));
  if (clusters >= n) return { assign: Int32Array.from({ length: n }, (_, i) => i), clusters: n };
  const r = await kmeans({ keys: input.keys.subarray(t0 * d, t1 * d), tokens: n, headDim: d, dtype: input.dtype, clusters, iterations: o.iterations, seed: (o.seed + t0) % 2 ** 31 });
  return { assign: r.assign, clusters };
}

/**
 * The tokens/OUTLIER_SHARE keys that stand out most from the head's keys
 * channel by channel (native outlierScores, the statistic the
 * RetrievalAttention graph's outlier entry points use), as a per-token flag;
 * ties at the cut go to the lower positions, so the count is exact.
 */
export async function outlierKeys(input: BuildInput): Promise<Uint8Array> {
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

const AXIS_ITERATIONS = 4;

/**
 * Each cluster's principal axis (power iteration on its members' offsets
 * from the centroid, started from the farthest member: a lone outlier is the
 * axis at once), scaled by the standard deviation along it, into
 * axes[c * d ..] for the clusters [first, end) of one segment.
 */
function principalAxes(keys: Float32Array, cluster: Int32Array, first: number, end: number, centroids: Float32Array, stride: number, d: number, axes: Float32Array): void {
  const n = cluster.length, C = end - first;
  const at = new Int32Array(C + 1);
  for (let i = 0; i < n; i++) at[cluster[i] - first + 1]++;
  for (let c = 0; c < C; c++) at[c + 1] += at[c];
  const rows = new Int32Array(n), fill = at.slice(0, C);
  for (let i = 0; i < n; i++) rows[fill[cluster[i] - first]++] = i;
  const off = new Float32Array(d), u = new Float32Array(d), next = new Float32Array(d);
  const offset = (i: number, c: number) => {
    for (let j = 0; j < d; j++) off[j] = keys[i * d + j] - centroids[c * stride + j];
    return off;
  };
  for (let c = first; c < end; c++) {
    const from = at[c - first], to = at[c - first + 1], m = to - from;
    if (m < 2) continue;
    let far = -1;
    for (let r = from; r < to; r++) {
      const o = offset(rows[r], c);
      let s = 0;
      for (let j = 0; j < d; j++) s += o[j] * o[j];
      if (s > far) (far = s), u.set(o);
    }
    if (!(far > 0)) continue;
    let variance = 0;
    for (let it = 0; it <= AXIS_ITERATIONS; it++) {
      let norm = 0;
      for (let j = 0; j < d; j++) norm += u[j] * u[j];
      norm = Math.sqrt(norm);
      if (!(norm > 0)) break;
      for (let j = 0; j < d; j++) u[j] /= norm;
      next.fill(0);
      variance = 0;
      for (let r = from; r < to; r++) {
        const o = offset(rows[r], c);
        let p = 0;
        for (let j = 0; j < d; j++) p += o[j] * u[j];
        variance += (p * p) / m;
        for (let j = 0; j < d; j++) next[j] += p * o[j];
      }
      if (it < AXIS_ITERATIONS) u.set(next);
    }
    const sd = Math.sqrt(variance);
    for (let j = 0; j < d; j++) axes[c * d + j] = sd * u[j];
  }
}

export async function buildClusters(input: BuildInput, o: ClusterOptions = DEFAULT_CLUSTER_OPTIONS): Promise<Uint8Array> {
  if (!input.values) throw new Error('the wave index needs the values of the head');
  const d = input.headDim, N = input.tokens, stride = centroidStride(d);
  const outliers = await outlierKeys(input);
  let bound = outliers.reduce((n, f) => n + f, 0);
  for (let t0 = 0; t0 < N; t0 += o.segmentTokens) bound += Math.ceil(Math.min(o.segmentTokens, N - t0) / Math.max(1, Math.min(o.clusterSize, N - t0)));
  const centroids = new Float32Array(bound * stride), valueMeans = new Float32Array(bound * d), keyVars = new Float32Array(bound * d), keyAxes = new Float32Array(bound * d), counts = new Int32Array(bound);
  const tokenCluster = new Int32Array(N);
  const segments: [number, number, number, number][] = [];
  let C = 0;
  for (let t0 = 0; t0 < N; t0 += o.segmentTokens) {
    const t1 = Math.min(N, t0 + o.segmentTokens), n = t1 - t0;
    const seg = await assignSegment(input, t0, t1, o);
    const assign = seg.assign;
    let clusters = seg.clusters;
    // Outliers leave their k-means cluster for one of their own (a cluster left empty is dropped below).
    if (clusters < n) for (let i = 0; i < n; i++) if (outliers[t0 + i]) assign[i] = clusters++;
    const keys = widenWords(input.keys.subarray(t0 * d), input.dtype, n * d);
    const values = widenWords(input.values.subarray(t0 * d), input.dtype, n * d);
    // Empty clusters are dropped: ids are renumbered densely.
    const cnt = new Int32Array(clusters);
    for (let i = 0; i < n; i++) cnt[assign[i]]++;
    const id = new Int32Array(clusters).fill(-1), first = C;
    for (let c = 0; c < clusters; c++) if (cnt[c] > 0) counts[(id[c] = C++)] = cnt[c];
    for (let i = 0; i < n; i++) {
      const c = (tokenCluster[t0 + i] = id[assign[i]]);
      for (let j = 0; j < d; j++) (centroids[c * stride + j] += keys[i * d + j]), (valueMeans[c * d + j] += values[i * d + j]);
    }
    for (let c = first; c < C; c++)
      for (let j = 0; j < d; j++) (centroids[c * stride + j] /= counts[c]), (valueMeans[c * d + j] /= counts[c]);
    // Radius (the farthest member key from its centroid) and per-channel variance.
    for (let i = 0; i < n; i++) {
      const c = tokenCluster[t0 + i];
      let s = 0;
      for (let j = 0; j < d; j++) {
        const x = (keys[i * d + j] - centroids[c * stride + j]) ** 2;
        s += x;
        keyVars[c * d + j] += x;
      }
      centroids[c * stride + d] = Math.max(centroids[c * stride + d], Math.sqrt(s));
    }
    for (let c = first; c < C; c++) for (let j = 0; j < d; j++) keyVars[c * d + j] /= counts[c];
    principalAxes(keys, tokenCluster.subarray(t0, t1), first, C, centroids, stride, d, keyAxes);
    segments.push([t0, t1, first, C]);
  }
  const varianceShare = calibrateVarianceShare(input, { headDim: d, stride, centroids, keyVars, valueMeans, counts, tokenCluster, segments });
  const arrays: ClusterArrays = {
    tokens: N,
    headDim: d,
    clusterSize: o.clusterSize,
    dtype: input.dtype,
    centroids: narrow(centroids.subarray(0, C * stride), input.dtype),
    valueMeans: narrow(valueMeans.subarray(0, C * d), input.dtype),
    keyVars: narrow(keyVars.subarray(0, C * d), input.dtype),
    keyAxes: narrow(keyAxes.subarray(0, C * d), input.dtype),
    varianceShare,
    counts: counts.slice(0, C),
    tokenCluster,
  };
  return encodeClusters(arrays);
}
