// The per-(document, layer, kv head) artifact block-selecting methods share:
// the mean key of every block of `blockSize` tokens (its representative
// for query-aware scoring) and a stable, query-agnostic importance per block
// (the attention mass the prefill queries pay the block, estimated from the
// representatives; without prefill queries, a sample of the keys stands in).
import { convert, topkHeads, type KvDtype } from '../addon/kernels.js';
import { DEFAULT_BLOCK_SIZE } from '../core/model.js';
import type { BlockScorer, BuildInput, HeadIndex, HeadKeys, SearchResult } from './method.js';

/** Tokens per summarized block: the GPU pool's block, so selected blocks are pool blocks. */
export const SUMMARY_BLOCK = DEFAULT_BLOCK_SIZE;
const MAGIC = 0x4b56424c; // "KVBL"
const MAX_IMPORTANCE_ROWS = 256;

export class BlockSummary implements HeadIndex {
  /** Block scores of the last scoreBlocks call, by block. */
  private readonly scores: Float32Array;
  private readonly order: Int32Array;
  private readonly topScores: Float32Array;

  constructor(
    readonly blocks: number,
    readonly blockSize: number,
    readonly tokens: number,
    readonly headDim: number,
    readonly dtype: KvDtype,
    /** [blocks, headDim] mean keys, storage dtype. */
    readonly means: Uint16Array,
    /** [blocks] stable importance, sums to 1. */
    readonly importance: Float32Array,
  ) {
    this.scores = new Float32Array(blocks);
    this.order = new Int32Array(blocks);
    this.topScores = new Float32Array(blocks);
  }

  /**
   * Scores every block by max over the group of q·mean: the `k` best
   * blocks, best first, and every block's score, by block (both reused
   * buffers, valid until the next call). One native pass; nothing is sorted
   * beyond the k asked for.
   */
  async scoreBlocks(q: Float32Array, group: number, k = this.blocks): Promise<{ order: Int32Array; scores: Float32Array }> {
    return (await BlockSummary.scoreHeads([this], q, group, k))[0];
  }

  /**
   * scoreBlocks for the summaries of every kv head at once (one native call
   * for the step): head h scores with the query rows h*group .. of q.
   */
  static async scoreHeads(heads: BlockSummary[], q: Float32Array, group: number, k: number): Promise<{ order: Int32Array; scores: Float32Array }[]> {
    const s0 = heads[0];
    const counts = await topkHeads({
      q,
      group,
      headDim: s0.headDim,
      dtype: s0.dtype,
      k,
      heads: heads.map((s) => ({ keys: s.means, tokens: s.blocks, outIds: s.order, outScores: s.topScores, allScores: s.scores })),
    });
    return heads.map((s, h) => ({ order: s.order.subarray(0, counts[h]), scores: s.scores }));
  }

  /**
   * A step's candidates for every kv head: the top `k` blocks, best first
   * (higher score, then lower id), and the scores of the blocks extra[h].
   * With a device scorer (GPU sessions) that takes the summaries, one device
   * call that returns only those (nothing of size blocks comes back to JS);
   * otherwise scoreHeads on the host. Both give the same blocks in the same
   * order and the same scores, bit for bit.
   */
  static async topHeads(
    heads: BlockSummary[],
    q: Float32Array,
    group: number,
    k: number,
    extra: Int32Array[],
    scorer?: BlockScorer,
  ): Promise<{ order: Int32Array; extraScores: Float32Array }[]> {
    const device = scorer ? await scorer.topBlocks(heads, q, group, k, extra) : undefined;
    if (device) return device.map((r) => ({ order: r.ids, extraScores: r.extraScores }));
    const scored = await BlockSummary.scoreHeads(heads, q, group, k);
    return scored.map(({ order, scores }, h) => ({ order, extraScores: Float32Array.from(extra[h], (b) => scores[b]) }));
  }

  /** Blocks by stable importance, most important first (computed once). */
  get byImportance(): Int32Array {
    this.importanceOrder ??= Int32Array.from(this.importance.keys()).sort((a, b) => this.importance[b] - this.importance[a] || a - b);
    return this.importanceOrder;
  }

  /** Each block's position in byImportance (computed once): block b is among the n most important iff rank[b] < n. */
  get importanceRank(): Int32Array {
    if (!this.rank) {
      const order = this.byImportance, rank = new Int32Array(this.blocks);
      for (let i = 0; i < order.length; i++) rank[order[i]] = i;
      this.rank = rank;
    }
    return this.rank;
  }

  /**
   * A per-block flag scratch for the methods' per-step candidate logic
   * (allocated once, blocks bytes): all zero between uses, a user sets flags
   * on the few blocks it looks at and clears exactly those before it
   * returns, without awaiting in between, so no step pays for every block.
   */
  get flags(): Uint8Array {
    return (this.flagScratch ??= new Uint8Array(this.blocks));
  }

  private importanceOrder?: Int32Array;
  private rank?: Int32Array;
  private flagScratch?: Uint8Array;

  /** Token rows of a block. */
  rows(block: number): [number, number] {
    return [block * this.blockSize, Math.min(this.tokens, (block + 1) * this.blockSize)];
  }

  /**
   * The stateless HeadIndex view: tokens of the top blocks by q·mean, best
   * block first (scored in JS on widened means; the methods use scoreBlocks).
   */
  search(q: Float32Array, group: number, k: number): SearchResult {
    const d = this.headDim;
    this.widened ??= widenWords(this.means, this.dtype);
    const m = this.widened, score = new Float32Array(this.blocks);
    for (let b = 0; b < this.blocks; b++) {
      let best = -Infinity;
      for (let g = 0; g < group; g++) {
        let s = 0;
        for (let j = 0; j < d; j++) s += q[g * d + j] * m[b * d + j];
        best = Math.max(best, s);
      }
      score[b] = best;
    }
    const order = Array.from(score.keys()).sort((a, b) => score[b] - score[a] || a - b);
    const ids = new Int32Array(Math.min(k, this.tokens));
    let n = 0;
    for (const b of order) {
      const [from, to] = this.rows(b);
      for (let t = from; t < to && n < ids.length; t++) ids[n++] = t;
      if (n === ids.length) break;
    }
    return { ids, scanned: this.blocks };
  }

  private widened?: Float32Array;
}

function widenWords(words: Uint16Array, dtype: KvDtype): Float32Array {
  const out = new Float32Array(words.length);
  convert(new Uint8Array(words.buffer, words.byteOffset, words.byteLength), dtype, new Uint8Array(out.buffer), 'f32', words.length);
  return out;
}

function meansOf(input: HeadKeys, blockSize: number): { means: Float32Array; blocks: number } {
  const { tokens, headDim: d } = input;
  const blocks = Math.ceil(tokens / blockSize);
  const means = new Float32Array(blocks * d);
  // Widened a chunk of blocks at a time: a 1M-token head is 512 MB as f32.
  const chunkBlocks = 64, keys = new Float32Array(chunkBlocks * blockSize * d);
  const bytes = new Uint8Array(input.keys.buffer, input.keys.byteOffset, tokens * d * 2);
  for (let b0 = 0; b0 < blocks; b0 += chunkBlocks) {
    const t0 = b0 * blockSize, t1 = Math.min(tokens, (b0 + chunkBlocks) * blockSize);
    convert(bytes.subarray(t0 * d * 2, t1 * d * 2), input.dtype, new Uint8Array(keys.buffer, 0, (t1 - t0) * d * 4), 'f32', (t1 - t0) * d);
    for (let t = t0; t < t1; t++) {
      const b = Math.floor(t / blockSize), row = (t - t0) * d;
      for (let j = 0; j < d; j++) means[b * d + j] += keys[row + j];
    }
  }
  for (let b = 0; b < blocks; b++) {
    const n = Math.min(tokens, (b + 1) * blockSize) - b * blockSize;
    for (let j = 0; j < d; j++) means[b * d + j] /= n;
  }
  return { means, blocks };
}

export async function buildBlockSummary(input: BuildInput): Promise<Uint8Array> {
  const d = input.headDim;
  const { means, blocks } = meansOf(input, SUMMARY_BLOCK);
  const meanWords = new Uint16Array(blocks * d);
  convert(new Uint8Array(means.buffer), 'f32', new Uint8Array(meanWords.buffer), input.dtype, blocks * d);
  // Importance: mean over sampled query rows of the softmax over blocks of
  // (q·mean · scale + log blockSize), i.e. each block's share of the mass.
  // Every sampled row's scores come from one native pass (nothing sorted).
  const rows = input.queryCount > 0 ? input.queries : keysAsQueries(input);
  const count = input.queryCount > 0 ? input.queryCount : rows.length / d;
  const step = Math.max(1, Math.floor(count / MAX_IMPORTANCE_ROWS));
  const sampled: number[] = [];
  for (let r = 0; r < count; r += step) sampled.push(r);
  const q = new Float32Array(sampled.length * d);
  sampled.forEach((r, i) => q.set(rows.subarray(r * d, (r + 1) * d), i * d));
  const none = new Int32Array(0), noScores = new Float32Array(0);
  const scores = sampled.map(() => new Float32Array(blocks));
  await topkHeads({ q, group: 1, headDim: d, dtype: input.dtype, k: 0, heads: scores.map((all) => ({ keys: meanWords, tokens: blocks, outIds: none, outScores: noScores, allScores: all })) });
  const importance = new Float64Array(blocks), scale = 1 / Math.sqrt(d);
  for (const row of scores) {
    let m = -Infinity;
    for (let i = 0; i < blocks; i++) m = Math.max(m, row[i] * scale);
    let z = 0;
    for (let i = 0; i < blocks; i++) z += Math.exp(row[i] * scale - m);
    for (let i = 0; i < blocks; i++) importance[i] += Math.exp(row[i] * scale - m) / z;
  }
  const imp = Float32Array.from(importance, (x) => x / Math.max(1, sampled.length));
  return encode(blocks, SUMMARY_BLOCK, input.tokens, d, meanWords, imp);
}

/** Without prefill queries: every 16th key stands in for a query row. */
function keysAsQueries(input: HeadKeys): Float32Array {
  const d = input.headDim, n = Math.ceil(input.tokens / 16);
  const out = new Float32Array(n * d);
  const row = new Float32Array(d);
  for (let i = 0; i < n; i++) {
    convert(new Uint8Array(input.keys.buffer, input.keys.byteOffset + i * 16 * d * 2, d * 2), input.dtype, new Uint8Array(row.buffer), 'f32', d);
    out.set(row, i * d);
  }
  return out;
}

function encode(blocks: number, blockSize: number, tokens: number, d: number, means: Uint16Array, importance: Float32Array): Uint8Array {
  const header = new Int32Array([MAGIC, 1, blocks, blockSize, tokens, d]);
  const out = new Uint8Array(header.byteLength + means.byteLength + importance.byteLength);
  out.set(new Uint8Array(header.buffer), 0);
  out.set(new Uint8Array(means.buffer), header.byteLength);
  out.set(new Uint8Array(importance.buffer), header.byteLength + means.byteLength);
  return out;
}

export function loadBlockSummary(bytes: Uint8Array, keys: HeadKeys): BlockSummary {
  const copy = bytes.slice();
  if (copy.byteLength < 24) throw new Error('block summary artifact is truncated');
  const h = new Int32Array(copy.buffer, 0, 6);
  const [magic, version, blocks, blockSize, tokens, d] = h;
  const size = 24 + blocks * d * 2 + blocks * 4;
  if (magic !== MAGIC || version !== 1 || tokens !== keys.tokens || d !== keys.headDim || blocks !== Math.ceil(tokens / blockSize) || copy.byteLength !== size)
    throw new Error('block summary artifact is corrupt or belongs to other keys');
  const means = new Uint16Array(copy.buffer, 24, blocks * d);
  // Copied out: the importance section may sit at an offset that is not a multiple of 4.
  const importance = new Float32Array(copy.slice(24 + blocks * d * 2).buffer);
  return new BlockSummary(blocks, blockSize, tokens, d, keys.dtype, means, importance);
}
