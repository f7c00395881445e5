// Typed wrapper of the addon's cluster summaries (native/kernels/cluster_summary.h):
// per cluster of one k-means segment, its mean key and radius, mean value,
// per-channel key variance and scaled principal axis (index/wave/cluster-build.ts).
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

interface Addon {
  clusterSummary(a: {
    keys: Uint16Array;
    values: Uint16Array;
    dtype: number;
    tokens: number;
    headDim: number;
    stride: number;
    cluster: Int32Array;
    clusters: number;
    axisIterations: number;
    centroids: Float32Array;
    valueMeans: Float32Array;
    keyVars: Float32Array;
    keyAxes: Float32Array;
  }): Promise<void>;
}

const addon = nativeAddon<Addon>();

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

/** Every cluster's summaries, in parallel over clusters, off the event loop. */
export async function clusterSummary(a: ClusterSummaryArgs): Promise<void> {
  await addon.clusterSummary({ ...a, dtype: DTYPE_CODE[a.dtype] });
}
