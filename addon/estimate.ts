// Typed wrapper of the estimation-zone kernel (native/kernels/cluster_estimate):
// attention over the tokens a step does not attend exactly, from cluster
// summaries, as a partial (out, lse) to merge by log-sum-exp.
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

/** One document segment's clusters for one kv head, and what the step attends exactly there. */
export interface ClusterHeadArgs {
  /** [clusters, centroidStride] storage words; the first headDim of a row are the centroid. */
  centroids: Uint16Array;
  /** [clusters, headDim] storage words: each cluster's mean value. */
  valueMeans: Uint16Array;
  counts: Int32Array;
  /** [tokens]: the cluster of each row. */
  tokenCluster: Int32Array;
  /** [tokens, headDim]: the segment's value rows (what exact rows remove from their cluster). */
  values: Uint16Array;
  clusters: number;
  tokens: number;
  /** Clusters the step attends whole: not estimated (their members in `exact` are ignored). */
  retrieved?: Int32Array;
  /** Rows attended exactly: they leave their cluster's estimate (a cluster attended whole is skipped). */
  exact?: Int32Array;
  /**
   * [clusters, headDim]: per-channel key variances, uint8 codes; with `keys` the estimate
   * is second order (native/kernels/cluster_estimate.h), without them first order.
   */
  keyVars?: Uint8Array;
  /** [clusters]: keyVars' scales (with keyVars; index/wave/moment-code.ts). */
  varScales?: Float32Array;
  /** [tokens, headDim]: the segment's key rows (what exact rows take out of their cluster's moments). */
  keys?: Uint16Array;
  /** The share of the second-order term (default 1; the head's calibrated share: index/wave/variance-share.ts). */
  varianceShare?: number;
  /**
   * The clusters' member lists (with keys): cluster c's rows are
   * members[offsets[c] .. offsets[c + 1]). Given them, the rows a partly
   * attended cluster has left are weighed by their own logits (their keys
   * read) instead of the moments of the rest.
   */
  offsets?: Int32Array;
  members?: Int32Array;
}

export interface EstimateArgs {
  q: Float32Array;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  centroidStride: number;
  dtype: KvDtype;
  scale: number;
  /** [segment][kv head]. */
  segments: ClusterHeadArgs[][];
  out: Float32Array;
  /** -Infinity for a query head where nothing is left to estimate. */
  lse: Float32Array;
  /** [kvHeads]: tokens the estimate covers. */
  estimated: Float32Array;
  /** [kvHeads]: keys the estimate read (partly attended clusters' remaining rows). */
  scanned?: Float32Array;
}

interface Addon {
  estimateClusters(a: Omit<EstimateArgs, 'dtype' | 'segments'> & { dtype: number; segments: { heads: ClusterHeadArgs[] }[] }): Promise<void>;
}

const addon = nativeAddon<Addon>();

export function estimateClusters(args: EstimateArgs): Promise<void> {
  return addon.estimateClusters({ ...args, dtype: DTYPE_CODE[args.dtype], segments: args.segments.map((heads) => ({ heads })) });
}
