// Typed wrapper of the cluster ranking kernel (native/kernels/cluster_rank):
// every kv head's clusters ranked for a step's query group in one native
// call, by the centroid score plus `spread` standard deviations of the
// members' logits along the query.
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

export interface ClusterRankHead {
  /** [clusters, centroidStride] storage words; the first headDim of a row are the centroid. */
  centroids: Uint16Array;
  /** [clusters, headDim]: principal axes scaled by the standard deviation along them, int8 codes (index/wave/moment-code.ts). */
  axes: Int8Array;
  /** [clusters]: the axes' scales. */
  axisScales: Float32Array;
  /** [clusters, headDim]: per-channel key variances, uint8 codes. */
  vars: Uint8Array;
  /** [clusters]: the variances' scales. */
  varScales: Float32Array;
  clusters: number;
  /** [k]: the best clusters, best first (ties: lower id). */
  outIds: Int32Array;
  outScores: Float32Array;
  /**
   * Optional: the best clusters' members copied here, best cluster first,
   * until it is full; cluster c's members are members[offsets[c] .. offsets[c + 1]).
   */
  outRows?: Int32Array;
  offsets?: Int32Array;
  members?: Int32Array;
}

export interface ClusterRankArgs {
  /** [heads × group, headDim]: head h ranks with rows h*group ... */
  q: Float32Array;
  group: number;
  headDim: number;
  centroidStride: number;
  dtype: KvDtype;
  k: number;
  spread: number;
  heads: ClusterRankHead[];
}

interface Addon {
  rankClusterHeads(a: Omit<ClusterRankArgs, 'dtype'> & { dtype: number }): Promise<ClusterRankCounts>;
}

const addon = nativeAddon<Addon>();

/** Per head: ids written (min(k, clusters)) and rows written to outRows (0 without). */
export interface ClusterRankCounts {
  ids: number[];
  rows: number[];
}

export function rankClusterHeads(args: ClusterRankArgs): Promise<ClusterRankCounts> {
  return addon.rankClusterHeads({ ...args, dtype: DTYPE_CODE[args.dtype] });
}
