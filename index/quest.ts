// `quest` (Quest, arXiv 2406.10774): query-aware block selection by an
// upper bound. Per block of `blockSize` keys the artifact keeps each
// channel's largest and smallest key value; for a query q the block's
// bound Σ_c max(q_c·max_c, q_c·min_c) is at least q·k for every key k of the
// block, so a block holding one key the query seeks (a planted fact, a pass
// key among code) ranks by that key, where a block mean would average it
// away. A GQA group's blocks rank by the largest bound over its q heads;
// the step attends the top blocks within the budget, spent as every block
// method spends it (static-plus-retrieved.ts blockSelection: whole blocks
// clear of the sinks and window, half of them traded for the rows just
// before the window in the last document).
//
// The bound is one dot product: a block's row is [max, min] (2·headDim
// storage-dtype words, the keys' own values, so no rounding), a query's row
// [max(q, 0), min(q, 0)]; so the native top-k over rows (topkHeads) scores
// every block of every kv head of a step in one call, as the other block
// methods' summaries are scored, and a device block scorer that takes rows
// of this width scores them on the GPU.
import { convert, topkHeads, widenWords, type KvDtype } from '../addon/kernels.js';
import { DEFAULT_BLOCK_SIZE } from '../core/model.js';
import type { BlockMeans, BlockScorer, BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, LayerContext, RetrievalMethod, SearchParams, SearchResult, Selection } from './method.js';
import { blockSelection, without } from './static-plus-retrieved.js';
import { ScratchPool } from './scratch-pool.js';

/** Tokens per block: the GPU pool's block, so selected blocks are pool blocks. */
export const QUEST_BLOCK = DEFAULT_BLOCK_SIZE;
const MAGIC = 0x4b565153; // "KVQS"
const VERSION = 1;
const HEADER_BYTES = 24;
/** Keys widened per pass at seal (a 1M-token head is not widened whole: 512 MB at d = 128). */
const WIDEN_TOKENS = 8192;

/** Host top-k outputs, shared by every summary (index/scratch-pool.ts: why one pool): a call takes one per head and gives it back once read. */
const scratch = new ScratchPool<{ order: Int32Array; topScores: Float32Array }>(
  (blocks) => ({ order: new Int32Array(blocks), topScores: new Float32Array(blocks) }),
  (s) => s.order.length,
);

export class QuestSummary implements HeadIndex {
  /** [blocks, 2·headDim] words: per block each channel's max, then each channel's min. */
  readonly rows: Uint16Array;
  readonly scored: BlockMeans;

  constructor(
    readonly blocks: number,
    readonly blockSize: number,
    readonly tokens: number,
    readonly headDim: number,
    readonly dtype: KvDtype,
    rows: Uint16Array,
  ) {
    this.rows = rows;
    this.scored = { blocks, headDim: 2 * headDim, dtype, means: rows };
  }

  /**
   * The first k tokens of the blocks in bound order (for benches and tests;
   * a decode step goes through topHeads). Synchronous, in JS.
   */
  search(q: Float32Array, group: number, k: number): SearchResult {
    const d = this.headDim;
    this.widened ??= widenWords(this.rows, this.dtype);
    const m = this.widened, aug = QuestSummary.queryRows(q, group, d), score = new Float32Array(this.blocks).fill(-Infinity);
    for (let b = 0; b < this.blocks; b++)
      for (let g = 0; g < group; g++) {
        let s = 0;
        for (let j = 0; j < 2 * d; j++) s += aug[g * 2 * d + j] * m[b * 2 * d + j];
        score[b] = Math.max(score[b], s);
      }
    const order = Array.from(score.keys()).sort((a, b) => score[b] - score[a] || a - b);
    const ids = new Int32Array(Math.min(k, this.tokens));
    let n = 0;
    for (const b of order) {
      for (let t = b * this.blockSize; t < Math.min(this.tokens, (b + 1) * this.blockSize) && n < ids.length; t++) ids[n++] = t;
      if (n === ids.length) break;
    }
    return { ids, scanned: this.blocks };
  }

  private widened?: Float32Array;

  /** Query rows [q⁺, q⁻] for heads·group q rows of headDim. */
  static queryRows(q: Float32Array, rows: number, headDim: number): Float32Array {
    const out = new Float32Array(rows * 2 * headDim);
    for (let r = 0; r < rows; r++)
      for (let j = 0; j < headDim; j++) {
        const x = q[r * headDim + j];
        out[r * 2 * headDim + (x > 0 ? j : headDim + j)] = x;
      }
    return out;
  }

  /**
   * Per kv head, the top `k` blocks by the group's largest bound, best
   * first (ties towards the lower block): on the device scorer when it
   * takes these rows, else in one native host pass.
   */
  static async topHeads(heads: QuestSummary[], q: Float32Array, group: number, k: number, scorer?: BlockScorer): Promise<Int32Array[]> {
    const s0 = heads[0];
    const aug = QuestSummary.queryRows(q, heads.length * group, s0.headDim);
    const none = heads.map(() => new Int32Array(0));
    const device = scorer ? await scorer.topBlocks(heads.map((s) => s.scored), aug, group, k, none) : undefined;
    if (device) return device.map((r) => r.ids);
    const sets = heads.map((s) => scratch.take(s.blocks));
    try {
      const counts = await topkHeads({
        q: aug,
        group,
        headDim: 2 * s0.headDim,
        dtype: s0.dtype,
        k,
        heads: heads.map((s, h) => ({ keys: s.rows, tokens: s.blocks, outIds: sets[h].order, outScores: sets[h].topScores })),
      });
      return sets.map((x, h) => x.order.slice(0, counts[h]));
    } finally {
      scratch.give(sets);
    }
  }
}

/** Per block, each channel's max and min over its keys, as the keys' own words. */
export async function buildQuestSummary(input: BuildInput): Promise<Uint8Array> {
  const d = input.headDim, B = QUEST_BLOCK, blocks = Math.ceil(input.tokens / B);
  const hi = new Float32Array(blocks * d).fill(-Infinity), lo = new Float32Array(blocks * d).fill(Infinity);
  for (let t0 = 0; t0 < input.tokens; t0 += WIDEN_TOKENS) {
    const t1 = Math.min(input.tokens, t0 + WIDEN_TOKENS);
    const x = widenWords(input.keys.subarray(t0 * d, t1 * d), input.dtype);
    for (let t = t0; t < t1; t++) {
      const b = Math.floor(t / B) * d, r = (t - t0) * d;
      for (let j = 0; j < d; j++) {
        const v = x[r + j];
        if (v > hi[b + j]) hi[b + j] = v;
        if (v < lo[b + j]) lo[b + j] = v;
      }
    }
  }
  // The widened values are the words' own, so narrowing them back is exact.
  const rows = new Uint16Array(blocks * 2 * d);
  const narrow = (src: Float32Array, at: number) =>
    convert(new Uint8Array(src.buffer, src.byteOffset, src.byteLength), 'f32', new Uint8Array(rows.buffer, at * 2, src.length * 2), input.dtype, src.length);
  for (let b = 0; b < blocks; b++) {
    narrow(hi.subarray(b * d, (b + 1) * d), b * 2 * d);
    narrow(lo.subarray(b * d, (b + 1) * d), b * 2 * d + d);
  }
  const out = new Uint8Array(HEADER_BYTES + rows.byteLength);
  new Int32Array(out.buffer, 0, 6).set([MAGIC, VERSION, blocks, B, input.tokens, d]);
  out.set(new Uint8Array(rows.buffer), HEADER_BYTES);
  return out;
}

export function loadQuestSummary(bytes: Uint8Array, keys: HeadKeys): QuestSummary {
  const copy = bytes.slice();
  if (copy.byteLength < HEADER_BYTES) throw new Error('quest artifact is truncated');
  const [magic, version, blocks, blockSize, tokens, d] = new Int32Array(copy.buffer, 0, 6);
  if (magic !== MAGIC || version !== VERSION || tokens !== keys.tokens || d !== keys.headDim || !(blockSize >= 1) || blocks !== Math.ceil(tokens / blockSize) || copy.byteLength !== HEADER_BYTES + blocks * 2 * d * 2)
    throw new Error('quest artifact is corrupt or belongs to other keys');
  return new QuestSummary(blocks, blockSize, tokens, d, keys.dtype, new Uint16Array(copy.buffer, HEADER_BYTES, blocks * 2 * d));
}

export const questBuilder: HeadIndexBuilder = { build: buildQuestSummary, load: loadQuestSummary };

export const quest: RetrievalMethod = {
  name: 'quest',
  builder: questBuilder,
  select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
    const G = ctx.qHeads / ctx.kvHeads;
    return blockSelection<QuestSummary>(ctx, p, async (_s, heads, budget, exclude) => {
      const top = await QuestSummary.topHeads(heads, q.subarray(0, ctx.qHeads * ctx.headDim), G, budget + exclude.length, ctx.blockScorer);
      return { ids: top.map((blocks) => without(blocks, exclude).subarray(0, budget).sort()), scanned: heads[0].blocks };
    });
  },
};
