// Typed wrapper of the addon's cluster summaries (native/kernels/cluster_summary.h):
// per cluster of one k-means segment, its mean key and radius, mean value,
// per-channel key variance and scaled principal axis (index/wave/cluster-build.ts).
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

export interface ClusterSummaryArgs {
  /** [tokens, headDim] storage words of the segment's keys and values. */
  keys: Uint16Array;
  values: Uint16Array;
  dtype: KvDtype;
  tokens: number;
  headDim: number;
  /** Floats per centroid row: headDim, the radius, padding. */
  stride: number;
  /** [tokens]: each row's cluster, in [0, clusters). */
  cluster: Int32Array;
  clusters: number;
  /** Power iterations for the principal axis after its start (the farthest member). */
  axisIterations: number;
  /** Outputs: [clusters, stride] and [clusters, headDim] each; every cluster with a member is written. */
  centroids: Float32Array;
  valueMeans: Float32Array;
  keyVars: Float32Array;
  keyAxes: Float32Array;
}

interface Addon {
  clusterSummary(a: Omit<ClusterSummaryArgs, 'dtype'> & { dtype: number }): Promise<void>;
}

const addon = nativeAddon<Addon>();

/** Every cluster's summaries, in parallel over clusters, off the event loop. */
export async function clusterSummary(a: ClusterSummaryArgs): Promise<void> {
  await addon.clusterSummary({ ...a, dtype: DTYPE_CODE[a.dtype] });
}
