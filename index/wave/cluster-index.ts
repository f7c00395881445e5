// A kv head's loaded clusters: ranking for the retrieval zone and the
// summaries the estimation zone reads.
//
// Ranking is by an optimistic score, max over the query group of
// q·centroid + RADIUS_SHARE·‖q‖·radius: the centroid alone can hide a lone
// outlier key (a planted fact) inside a cluster of ordinary ones, and with
// share 1 the score bounds every member's q·k. On the project's generator
// (bench/fidelity.ts, 16K tokens) shares of 0.25–2 lost the needles that
// 0–0.1 find (in 128 dimensions every cluster's radius is mostly noise), so
// the share is small. The radius sits in the centroid row's extra column, so
// one native top-k over the rows [centroid, radius, ...] with queries
// [q, share·‖q‖, 0...] scores every cluster of every head of a step in one
// call.
import { topkHeads } from '../../addon/kernels.js';
import type { ClusterHeadArgs } from '../../addon/estimate.js';
import type { HeadIndex, HeadKeys, SearchResult } from '../method.js';
import { centroidStride, decodeClusters, type ClusterArrays } from './cluster-codec.js';

export const RADIUS_SHARE = 0.1;
/**
 * The retrieval zone is chosen in two stages: the best clusters until they
 * hold PROBE × k tokens, then their members scored exactly (q·k, max over
 * the group) and the best k kept. Whole clusters waste the budget on a hot
 * token's cold neighbours. At 128K tokens of the generator (bench/fidelity.ts,
 * 2% exact, estimation on) whole clusters reached an output error of 0.21,
 * probes of 2/4/8/16× the budget 0.19/0.14/0.086/0.080 (the exact top-k:
 * 0.05); 8 scans about 16% of the keys besides the centroids.
 */
export const PROBE = 8;

export class ClusterIndex implements HeadIndex {
  readonly clusters: number;
  readonly stride: number;
  /** Members of cluster c: rows members[offsets[c] .. offsets[c + 1]), ascending. */
  readonly offsets: Int32Array;
  readonly members: Int32Array;
  private readonly topIds: Int32Array;
  private readonly topScores: Float32Array;

  constructor(
    readonly arrays: ClusterArrays,
    /** The head's key rows (the second stage scores members exactly). */
    readonly keys: Uint16Array,
    /** The head's value rows (what exact rows remove from their cluster's estimate). */
    readonly values: Uint16Array,
  ) {
    const C = arrays.counts.length;
    this.clusters = C;
    this.stride = centroidStride(arrays.headDim);
    this.offsets = new Int32Array(C + 1);
    for (let c = 0; c < C; c++) this.offsets[c + 1] = this.offsets[c] + arrays.counts[c];
    this.members = new Int32Array(arrays.tokens);
    const at = this.offsets.slice(0, C);
    arrays.tokenCluster.forEach((c, t) => (this.members[at[c]++] = t));
    this.topIds = new Int32Array(C);
    this.topScores = new Float32Array(C);
  }

  static load(bytes: Uint8Array, keys: HeadKeys): ClusterIndex {
    const arrays = decodeClusters(bytes);
    if (arrays.tokens !== keys.tokens || arrays.headDim !== keys.headDim) throw new Error('wave cluster artifact does not match the document');
    if (!keys.values) throw new Error('the wave index needs the values of the head');
    return new ClusterIndex(arrays, keys.keys, keys.values);
  }

  /** The summaries as the estimation kernel takes them. */
  estimateArgs(exact?: Int32Array): ClusterHeadArgs {
    const a = this.arrays;
    return { centroids: a.centroids, valueMeans: a.valueMeans, counts: a.counts, tokenCluster: a.tokenCluster, values: this.values, clusters: this.clusters, tokens: a.tokens, exact };
  }

  /** Rows of the best clusters, best cluster first, until k rows (the last cluster may be cut). */
  private expand(count: number, k: number): Int32Array {
    const out = new Int32Array(k);
    let n = 0;
    for (let i = 0; i < count && n < k; i++) {
      const c = this.topIds[i];
      for (let j = this.offsets[c]; j < this.offsets[c + 1] && n < k; j++) out[n++] = this.members[j];
    }
    return out.subarray(0, n);
  }

  search(): SearchResult {
    throw new Error('ClusterIndex searches every head of a step at once (searchClusterHeads)');
  }

  /**
   * Top clusters of every kv head by the optimistic score, expanded to k[h]
   * rows each: one native call for the step. Clusters asked for: enough to
   * cover k rows at the average cluster size, twice over.
   */
  static async searchHeads(heads: ClusterIndex[], q: Float32Array, group: number, k: number[]): Promise<SearchResult[]> {
    const h0 = heads[0], d = h0.arrays.headDim, stride = h0.stride;
    const aug = new Float32Array(heads.length * group * stride);
    for (let r = 0; r < heads.length * group; r++) {
      const row = q.subarray(r * d, (r + 1) * d);
      aug.set(row, r * stride);
      aug[r * stride + d] = RADIUS_SHARE * Math.hypot(...row);
    }
    const want = Math.max(...heads.map((h, i) => Math.min(h.clusters, Math.ceil((2 * PROBE * k[i] * h.clusters) / Math.max(1, h.arrays.tokens)) + 8)));
    const counts = await topkHeads({
      q: aug,
      group,
      headDim: stride,
      dtype: h0.arrays.dtype,
      k: want,
      heads: heads.map((h) => ({ keys: h.arrays.centroids, tokens: h.clusters, outIds: h.topIds, outScores: h.topScores })),
    });
    const candidates = heads.map((h, i) => h.expand(counts[i], PROBE * k[i]));
    const kMax = Math.max(...k);
    const ids = heads.map((_, i) => new Int32Array(Math.min(kMax, candidates[i].length)));
    const scores = ids.map((a) => new Float32Array(a.length));
    const kept = await topkHeads({
      q,
      group,
      headDim: d,
      dtype: h0.arrays.dtype,
      k: kMax,
      heads: heads.map((h, i) => ({ keys: h.keys, tokens: h.arrays.tokens, rows: candidates[i], outIds: ids[i], outScores: scores[i] })),
    });
    return heads.map((h, i) => ({ ids: ids[i].subarray(0, Math.min(kept[i], k[i])), scanned: h.clusters + candidates[i].length }));
  }
}
