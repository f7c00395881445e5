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
import { narrowWords, outlierScores, widenWords, type KvDtype } from '../../addon/kernels.js';
import { kmeansMany, kmeansManyDevice, type KmeansArgs, type KmeansResult } from '../../addon/faiss.js';
import { clusterSummary } from '../../addon/cluster-summary.js';
import type { BuildInput } from '../method.js';
import { centroidStride, encodeClusters, type ClusterArrays } from './cluster-codec.js';
import { encodeMoments } from './moment-code.js';
import { kthLargest } from './select-kth.js';
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

// Clusters of 16 (a document's clusterSize at PUT overrides): against 8 the
// device's layer-step at 1M takes 0.440 instead of 0.599 ms and the summaries
// half the memory (14.4% of the layer's K/V against 27%), and the error stays
// within issue #13's targets on kvrecall-code-13M (0.030 -> 0.036 at 8K bytes,
// 0.021 -> 0.025 at 16K, every pass key) and on the generator (1M default
// configuration 0.021 -> 0.030, needles 4/4): bench/results/wave-cluster-size-
// 8-vs-16-vm.md, decode-full-llama3.2-1b-h100-2layers-cs16-prof-ah.md.
export const DEFAULT_CLUSTER_OPTIONS: ClusterOptions = { clusterSize: 16, segmentTokens: 8192, iterations: 8, seed: 1 };

/**
 * One key in OUTLIER_SHARE is kept as a cluster of its own. On the
 * generator at 128K tokens the planted needles rank 80–430 of the head's
 * keys by outlierKeys' score (both configurations), inside the 512 this
 * keeps; the ranking then scores them exactly for 0.4% more clusters.
 */
export const OUTLIER_SHARE = 256;

/**
 * The segments' k-means on the GPU where the server has one, else on the
 * host (faiss: most of a wave layer's 100-112 s seal at 1M tokens on the
 * 16-core H200 host, bench/results/gpu-decode-wave-h200.md); a device that
 * fails (memory, a shape it refuses) leaves the build to the host. The clusters differ between the two (not the same algorithm
 * step for step), each valid and repeatable.
 */
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
export async function outlierKeys(input: BuildInput): Promise<Uint8Array> {
  const N = input.tokens, flag = new Uint8Array(N);
  const want = Math.floor(N / OUTLIER_SHARE);
  if (want === 0) return flag;
  const z = new Float32Array(N);
  await outlierScores(input.keys, input.dtype, N, input.headDim, z);
  // The value at N - want of z sorted ascending (NaN last), found without
  // sorting: the k-th largest of the values that are not NaN, or NaN where
  // the NaNs reach down to it (then nothing is flagged).
  const scratch = new Float32Array(N);
  let numbers = 0;
  for (let t = 0; t < N; t++) if (z[t] === z[t]) scratch[numbers++] = z[t];
  const k = want - (N - numbers);
  const cut = k >= 1 ? kthLargest(scratch, numbers, k) : NaN;
  let left = want;
  for (let t = 0; t < N && left > 0; t++) if (z[t] > cut) (flag[t] = 1), left--;
  for (let t = 0; t < N && left > 0; t++) if (z[t] === cut) (flag[t] = 1), left--;
  return flag;
}

/** Power iterations for a cluster's principal axis (native/kernels/cluster_summary.h), from its farthest member: a lone outlier is the axis at once. */
const AXIS_ITERATIONS = 4;

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
  const moments = encodeMoments(keyAxes, keyVars, C, d);
  const varianceShare = calibrateVarianceShare(input, { headDim: d, stride, centroids, moments, valueMeans, counts, tokenCluster, segments });
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
