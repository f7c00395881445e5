// `wave` (RetroInfer, arXiv 2505.02922): per step and kv head, the clusters
// with the best optimistic score form the retrieval zone (attended exactly);
// sinks, window and the session's own tokens are the steady zone; every
// other cluster is the estimation zone, estimated from its summary and
// merged by log-sum-exp (engine/estimate.ts). Sessions of `wave` estimate
// by default; the same clusters serve any method's `estimate` option.
import type { HeadIndex, HeadIndexBuilder, SearchResult } from '../method.js';
import { staticPlusRetrieved } from '../static-plus-retrieved.js';
import { buildClusters, DEFAULT_CLUSTER_OPTIONS } from './cluster-build.js';
import { upgradeClusters } from './cluster-codec.js';
import { ClusterIndex } from './cluster-index.js';

export const WAVE = 'wave';

export const clusterIndexBuilder: HeadIndexBuilder = {
  build: (input) => buildClusters(input, { ...DEFAULT_CLUSTER_OPTIONS, clusterSize: input.clusterSize ?? DEFAULT_CLUSTER_OPTIONS.clusterSize }),
  load: (bytes, keys) => ClusterIndex.load(bytes, keys),
  upgrade: upgradeClusters,
  // ef: candidate tokens rescored per kv head (0: a probe × what it keeps, smaller where the layer estimates; cluster-index.ts).
  searchHeads: (heads: HeadIndex[], q: Float32Array, group: number, k: number[], ef: number, _memo?: unknown, estimate = false): Promise<SearchResult[]> =>
    ClusterIndex.searchHeads(heads as ClusterIndex[], q, group, k, 'spread', ef, estimate),
};

export const wave = staticPlusRetrieved(WAVE, clusterIndexBuilder);
