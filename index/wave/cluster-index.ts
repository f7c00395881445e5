// A kv head's loaded clusters: ranking for the retrieval zone and the
// summaries the estimation zone reads.
//
// Ranking is by an optimistic score, max over the query group of the
// centroid score plus SPREAD standard deviations of the members' logits
// along q (the cluster's principal axis and per-channel variances;
// native/kernels/cluster_rank.h): the centroid alone hides a lone outlier
// key (a planted fact) inside a cluster of ordinary ones. The older score,
// q·centroid + RADIUS_SHARE·‖q‖·radius, stays as what the GPU wave step
// computes (bench/wave-gpu.ts checks the two against each other): on the
// generator (bench/fidelity.ts, 16K tokens) radius shares of 0.25–2 lost
// the needles that 0–0.1 find (in 128 dimensions every cluster's radius is
// mostly noise).
import { topkHeads } from '../../addon/kernels.js';
import { rankClusterHeads } from '../../addon/cluster-rank.js';
import type { ClusterHeadArgs } from '../../addon/estimate.js';
import type { HeadIndex, HeadKeys, SearchResult } from '../method.js';
import { centroidStride, decodeClusters, type ClusterArrays } from './cluster-codec.js';
import { ScratchPool } from '../scratch-pool.js';

export const RADIUS_SHARE = 0.1;
/**
 * Standard deviations above the mean logit a cluster is ranked at. At 32K
 * tokens of the generator (2% exact, 8× the budget rescored) 1 kept 2/4 and
 * 2/4 planted needles (default / broad configuration), 2 kept 4/4 and 4/4,
 * 3 no more; the top-k's share among the candidates 0.94 / 0.98.
 */
export const SPREAD = 2;

/** How the estimate treats a cluster: see ClusterIndex.estimateArgs. */
export type EstimateOrder = 'rows' | 'moments' | 'first';

/** How clusters are ranked: by SPREAD standard deviations, or by the radius (the GPU wave step's score). */
export type ClusterRanking = 'spread' | 'radius';
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
/**
 * The probe where the layer estimates what is not kept: the estimate covers
 * what fewer candidates miss. Generator 128K, clusters of 16, 2% exact
 * (bench/results/fidelity-131072-cs16-probes.md): probe 8/4/2 err
 * 0.0070/0.0056/0.0062 (default) and 0.0068/0.0066/0.0079 (broad), needles
 * 4/4; kvrecall-code-13M at 8K bytes, 4 trials: every layer's error the same
 * at 4 as at 8 within 0.001, agreement 1.000 (model-vm-8k-wave-ef*.md); at
 * 16K probe 2 left layer 4 at 0.058 against 0.055 (commit 0ebd2d9, with
 * wave-probe-fidelity-131072-cs16-probe*.md). Without the estimate
 * probe 4 errs 6–9% more than 8: PROBE stays there. At 1M the probe is not
 * free (bench/results/wave-probe-estimated-1m-vm.md, default configuration,
 * clusters of 16): probe 8/4/2/1 err 0.019/0.030/0.039/0.046, and at 16K
 * bytes the model's mean error rises 12% from 4 to 2: 4 stays, though 2
 * would be cheaper on the device.
 */
export const PROBE_ESTIMATED = 4;

/**
 * Candidate tokens rescored for k kept: a session's `ef` when it sets one
 * (at least k), else a probe × k. The host path and the device step both
 * ask this, so both rescore the same candidates.
 */
export function candidateTokens(k: number, ef = 0, estimate = false): number {
  return ef > 0 ? Math.max(k, Math.round(ef)) : (estimate ? PROBE_ESTIMATED : PROBE) * k;
}

/** A head's step scratch: its ranked clusters (ids, scores) and candidate rows. */
interface Scratch {
  ranked: { ids: Int32Array; scores: Float32Array };
  rows: Int32Array;
}

// Step scratch, shared by every cluster index (index/scratch-pool.ts: why one
// pool): a step takes one per head and gives it back once read, so steady
// decoding allocates none and concurrent sessions over a shared document
// never share one. Two pools, as the ranked clusters are sized by clusters
// and the rows by candidates, each reused or replaced on its own.
const rankedScratch = new ScratchPool<Scratch['ranked']>((n) => ({ ids: new Int32Array(n), scores: new Float32Array(n) }), (s) => s.ids.length);
const rowScratch = new ScratchPool<Int32Array>((n) => new Int32Array(n), (s) => s.length);

export class ClusterIndex implements HeadIndex {
  readonly clusters: number;
  readonly stride: number;
  /** Members of cluster c: rows members[offsets[c] .. offsets[c + 1]), ascending. */
  readonly offsets: Int32Array;
  readonly members: Int32Array;

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
  }

  static load(bytes: Uint8Array, keys: HeadKeys): ClusterIndex {
    const arrays = decodeClusters(bytes);
    if (arrays.tokens !== keys.tokens || arrays.headDim !== keys.headDim) throw new Error('wave cluster artifact does not match the document');
    if (!keys.values) throw new Error('the wave index needs the values of the head');
    return new ClusterIndex(arrays, keys.keys, keys.values);
  }

  /**
   * The summaries as the estimation kernel takes them. 'rows' (the engine's):
   * second order, a partly attended cluster's remaining rows by their own
   * logits; 'moments': second order, those rows by their moments (what the
   * GPU wave step's 'spread' path computes); 'first': first order (its
   * 'radius' path). bench/wave-gpu.ts checks the GPU against the last two.
   */
  estimateArgs(exact?: Int32Array, order: EstimateOrder = 'rows'): ClusterHeadArgs {
    const a = this.arrays;
    const base = { centroids: a.centroids, valueMeans: a.valueMeans, counts: a.counts, tokenCluster: a.tokenCluster, values: this.values, clusters: this.clusters, tokens: a.tokens, exact };
    if (order === 'first') return base;
    const second = { ...base, keyVars: a.keyVars, varScales: a.varScales, keys: this.keys, varianceShare: a.varianceShare };
    return order === 'rows' ? { ...second, offsets: this.offsets, members: this.members } : second;
  }

  /** Rows of the best clusters in s.ranked.ids[0 .. count), best cluster first, until k rows (the last cluster may be cut); the radius ranking's path. */
  private expand(s: Scratch, count: number, k: number): Int32Array {
    let n = 0;
    for (let i = 0; i < count && n < k; i++) {
      const c = s.ranked.ids[i];
      for (let j = this.offsets[c]; j < this.offsets[c + 1] && n < k; j++) s.rows[n++] = this.members[j];
    }
    return s.rows.subarray(0, n);
  }

  search(): SearchResult {
    throw new Error('ClusterIndex searches every head of a step at once (searchClusterHeads)');
  }

  /**
   * Top clusters of every kv head by the optimistic score, expanded to k[h]
   * rows each: one native call for the step. Clusters asked for: enough to
   * cover k rows at the average cluster size, twice over.
   */
  static async searchHeads(heads: ClusterIndex[], q: Float32Array, group: number, k: number[], ranking: ClusterRanking = 'spread', ef = 0,
                           estimate = false): Promise<SearchResult[]> {
    const h0 = heads[0], d = h0.arrays.headDim, stride = h0.stride;
    // No more candidates than the head has rows (a session's ef may ask up to
    // 2^30): the scratch holds them, and the device step clamps alike.
    const target = k.map((n, i) => Math.min(candidateTokens(n, ef, estimate), heads[i].arrays.tokens));
    const want = Math.max(...heads.map((h, i) => Math.min(h.clusters, Math.ceil((2 * target[i] * h.clusters) / Math.max(1, h.arrays.tokens)) + 8)));
    const scratch: Scratch[] = target.map((rows) => ({ ranked: rankedScratch.take(want), rows: rowScratch.take(rows) }));
    try {
      let candidates: Int32Array[];
      if (ranking === 'spread') {
        // The members of the best clusters come back from the same native call.
        const counts = await rankClusterHeads({
          q, group, headDim: d, centroidStride: stride, dtype: h0.arrays.dtype, k: want, spread: SPREAD,
          heads: heads.map((h, i) => ({
            centroids: h.arrays.centroids, axes: h.arrays.keyAxes, axisScales: h.arrays.axisScales, vars: h.arrays.keyVars, varScales: h.arrays.varScales, clusters: h.clusters,
            outIds: scratch[i].ranked.ids.subarray(0, want), outScores: scratch[i].ranked.scores.subarray(0, want),
            offsets: h.offsets, members: h.members, outRows: scratch[i].rows.subarray(0, target[i]),
          })),
        });
        candidates = scratch.map((s, i) => s.rows.subarray(0, counts.rows[i]));
      } else {
        const counts = await ClusterIndex.rankByRadius(heads, scratch, q, group, want);
        candidates = heads.map((h, i) => h.expand(scratch[i], counts[i], target[i]));
      }
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
    } finally {
      rankedScratch.give(scratch.map((s) => s.ranked));
      rowScratch.give(scratch.map((s) => s.rows));
    }
  }

  /** The radius ranking: one top-k over the rows [centroid, radius, 0 ...] with queries [q, share·‖q‖, 0 ...]. */
  private static rankByRadius(heads: ClusterIndex[], scratch: Scratch[], q: Float32Array, group: number, want: number): Promise<number[]> {
    const h0 = heads[0], d = h0.arrays.headDim, stride = h0.stride;
    const aug = new Float32Array(heads.length * group * stride);
    for (let r = 0; r < heads.length * group; r++) {
      const row = q.subarray(r * d, (r + 1) * d);
      aug.set(row, r * stride);
      aug[r * stride + d] = RADIUS_SHARE * Math.hypot(...row);
    }
    return topkHeads({
      q: aug,
      group,
      headDim: stride,
      dtype: h0.arrays.dtype,
      k: want,
      heads: heads.map((h, i) => ({ keys: h.arrays.centroids, tokens: h.clusters, outIds: scratch[i].ranked.ids.subarray(0, want), outScores: scratch[i].ranked.scores.subarray(0, want) })),
    });
  }
}
