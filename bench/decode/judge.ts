// Judging a method's selection against float64 exact attention
// (bench/quality.ts) on the sampled layers and kv heads.
import { attentionRecall, distinctIds, meanProbs, topKIndices, type ExactAttention } from '../quality.js';

/**
 * Exact attention of one sampled kv head group at one step, and what every
 * method's selection is judged against, computed once (quality.ts's
 * compareWithOracle recomputes the per-head top-k and the oracle for each
 * selection, which at 1M tokens costs more than the decode itself).
 */
export class Judge {
  private readonly topk: Int32Array[];
  private order: Int32Array = new Int32Array(0);
  private mean?: Float64Array;

  constructor(
    readonly ex: ExactAttention,
    private readonly k: number,
  ) {
    this.topk = ex.probs.map((p) => topKIndices(p, Math.min(k, ex.tokens)));
  }

  /** Attention recall, the oracle's recall at the same count, top-k recall; dup: S held a position twice. */
  judge(S: Int32Array): { recall: number; oracle: number; topK: number; dup: boolean } {
    const ex = this.ex, ids = distinctIds(S, ex.tokens), m = ids.length;
    if (this.order.length < m) {
      this.mean ??= meanProbs(ex);
      this.order = topKIndices(this.mean, Math.min(ex.tokens, Math.max(m, 2 * this.order.length)));
    }
    let oracle = 0;
    for (const p of ex.probs) for (let i = 0; i < m; i++) oracle += p[this.order[i]];
    const inS = new Uint8Array(ex.tokens);
    for (let i = 0; i < m; i++) inS[ids[i]] = 1;
    let topK = 0;
    for (const top of this.topk) {
      let hit = 0;
      for (let i = 0; i < top.length; i++) hit += inS[top[i]];
      topK += hit / Math.max(1, top.length);
    }
    return { recall: attentionRecall(ex, ids), oracle: oracle / ex.heads, topK: topK / ex.heads, dup: m < S.length };
  }
}
