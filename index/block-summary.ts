// The per-(document, layer, kv head) artifact block-selecting methods share:
// per block of `blockSize` tokens, its mean key and its radius (the largest
// distance of one of its keys from that mean), which together rank it for
// query-aware selection, and a stable, query-agnostic importance per block
// (the attention mass the prefill queries pay the block, estimated from the
// means; without prefill queries, a sample of the keys stands in).
//
// Ranking is by an optimistic score, max over the query group of
// q·mean + α·‖q‖·radius (the wave index's cluster score,
// index/wave/cluster-index.ts): the mean alone hides a lone high-scoring key
// (a pass key's digits) among ordinary ones (issue #16). The radius sits in
// the mean row's extra column, [mean, radius, 0 ...] (stride headDim + 8),
// so one native top-k over those rows with the query rows
// [q, α·‖q‖, 0 ...] scores every block of every kv head of a step on the
// host (topkHeads) or the device (engine/cache/device-block-scores.ts)
// alike, bit for bit.
//
// α, the radius share, is the head's own: where a head's large radii are
// lone keys its queries seek (a retrieval head on real code), a share
// finds them; where they are only spread (the synthetic generator's blocks
// that straddle two topics, or a broad head), any share displaces the right
// blocks. No one share serves both (bench/results/model-block-rank-optimistic-vm.md),
// so each (document, layer, kv head) calibrates its own at seal from its
// prefill queries (calibrateShare) and stores it in the artifact.
import { convert, topkHeads, type KvDtype } from '../addon/kernels.js';
import { DEFAULT_BLOCK_SIZE } from '../core/model.js';
import type { BlockMeans, BlockScorer, BuildInput, HeadIndex, HeadKeys, SearchResult } from './method.js';

/** Tokens per summarized block: the GPU pool's block, so selected blocks are pool blocks. */
export const SUMMARY_BLOCK = DEFAULT_BLOCK_SIZE;
/**
 * The radius shares a head's calibration tries (1 bounds every key's q·k; 0
 * is the plain mean). On kvrecall-code-13M at 8K bytes a single share for
 * every head found 10/32 pass keys at 0, 16/32 at 0.5, 20/32 at 1 (dense
 * 32/32), while on the synthetic generator any share above 0.1 raised the
 * error (0.31 → 0.69 at 0.5; bench/results/model-block-rank-optimistic-vm.md).
 */
export const RADIUS_SHARES = [0, 0.25, 0.5, 1] as const;
/** The mean row's extra columns: column headDim holds the radius, the rest pad to a multiple of 8 (SIMD rows). */
export const summaryStride = (headDim: number) => headDim + 8;
const MAGIC = 0x4b56424c; // "KVBL"
/**
 * 1: bare means [blocks, headDim] (stale: no radius); 2: rows
 * [blocks, headDim + 8] with the radius (stale: no share); 3: the head's
 * calibrated radius share in the header.
 */
const VERSION = 3;
const HEADER_BYTES = 28;
const MAX_IMPORTANCE_ROWS = 256;

export class BlockSummary implements HeadIndex {
  /** Words per row of `rows`: summaryStride(headDim). */
  readonly stride: number;
  /** [blocks, stride] storage-dtype words: the mean key, the radius, zeros. */
  readonly rows: Uint16Array;
  /** The rows as a block scorer reads them (its headDim is the stride; stable, so a device copy is made once). */
  readonly scored: BlockMeans;
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
    /**
     * [blocks, summaryStride(headDim)] rows as stored (mean key, radius,
     * padding), or bare [blocks, headDim] means (no radius known: taken as
     * 0, so blocks rank by q·mean alone, bit for bit).
     */
    means: Uint16Array,
    /** [blocks] stable importance, sums to 1. */
    readonly importance: Float32Array,
    /** The head's radius share α (calibrateShare): 0 ranks by q·mean alone. */
    readonly radiusShare = 0,
  ) {
    this.stride = summaryStride(headDim);
    if (means.length === blocks * this.stride) this.rows = means;
    else if (means.length === blocks * headDim) this.rows = padRows(means, blocks, headDim);
    else throw new RangeError(`block summary: ${means.length} words are neither [${blocks}, ${headDim}] means nor [${blocks}, ${this.stride}] rows`);
    this.scored = { blocks, headDim: this.stride, dtype, means: this.rows };
    this.scores = new Float32Array(blocks);
    this.order = new Int32Array(blocks);
    this.topScores = new Float32Array(blocks);
  }

  /** Block b's mean key as stored, widened. */
  mean(block: number): Float32Array {
    return widenWords(this.rows.subarray(block * this.stride, block * this.stride + this.headDim), this.dtype);
  }

  /** Block b's radius as stored (at least the largest distance of one of its keys from its stored mean). */
  radius(block: number): number {
    return widenWords(this.rows.subarray(block * this.stride + this.headDim, block * this.stride + this.headDim + 1), this.dtype)[0];
  }

  /**
   * The query rows of `heads` (group rows each, head h's from row h·group)
   * as their rows score them: [q, α_h·‖q‖, 0 ...] per row, stride
   * summaryStride(headDim), α_h head h's radius share.
   */
  static augment(heads: readonly BlockSummary[], q: Float32Array, group: number): Float32Array {
    const headDim = heads[0].headDim, stride = summaryStride(headDim), out = new Float32Array(heads.length * group * stride);
    for (let r = 0; r < heads.length * group; r++) {
      let ss = 0;
      for (let j = 0; j < headDim; j++) {
        const x = q[r * headDim + j];
        out[r * stride + j] = x;
        ss += x * x;
      }
      out[r * stride + headDim] = heads[Math.floor(r / group)].radiusShare * Math.sqrt(ss);
    }
    return out;
  }

  /**
   * Scores every block by the optimistic score, max over the group of
   * q·mean + α·‖q‖·radius: the `k` best blocks, best first, and
   * every block's score, by block (both reused buffers, valid until the next
   * call). One native pass; nothing is sorted beyond the k asked for.
   */
  async scoreBlocks(q: Float32Array, group: number, k = this.blocks): Promise<{ order: Int32Array; scores: Float32Array }> {
    return (await BlockSummary.scoreHeads([this], q, group, k))[0];
  }

  /**
   * scoreBlocks for the summaries of every kv head at once (one native call
   * for the step): head h scores with the query rows h*group .. of q.
   */
  static async scoreHeads(heads: BlockSummary[], q: Float32Array, group: number, k: number): Promise<{ order: Int32Array; scores: Float32Array }[]> {
    return BlockSummary.scoreAugmented(heads, BlockSummary.augment(heads, q, group), group, k);
  }

  private static async scoreAugmented(heads: BlockSummary[], aug: Float32Array, group: number, k: number): Promise<{ order: Int32Array; scores: Float32Array }[]> {
    const s0 = heads[0];
    const counts = await topkHeads({
      q: aug,
      group,
      headDim: s0.stride,
      dtype: s0.dtype,
      k,
      heads: heads.map((s) => ({ keys: s.rows, tokens: s.blocks, outIds: s.order, outScores: s.topScores, allScores: s.scores })),
    });
    return heads.map((s, h) => ({ order: s.order.subarray(0, counts[h]), scores: s.scores }));
  }

  /**
   * A step's candidates for every kv head: the top `k` blocks, best first
   * (higher score, then lower id), and the scores of the blocks extra[h].
   * With a device scorer (GPU sessions) that takes the summaries, one device
   * call over the rows (`scored`) with the augmented query rows, which
   * returns only those (nothing of size blocks comes back to JS); otherwise
   * the same rows and query rows on the host. Both give the same blocks in
   * the same order and the same scores, bit for bit.
   */
  static async topHeads(
    heads: BlockSummary[],
    q: Float32Array,
    group: number,
    k: number,
    extra: Int32Array[],
    scorer?: BlockScorer,
  ): Promise<{ order: Int32Array; extraScores: Float32Array }[]> {
    const aug = BlockSummary.augment(heads, q, group);
    const device = scorer ? await scorer.topBlocks(heads.map((s) => s.scored), aug, group, k, extra) : undefined;
    if (device) return device.map((r) => ({ order: r.ids, extraScores: r.extraScores }));
    const scored = await BlockSummary.scoreAugmented(heads, aug, group, k);
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

  /** Token rows of a block: [first, end). */
  tokenRange(block: number): [number, number] {
    return [block * this.blockSize, Math.min(this.tokens, (block + 1) * this.blockSize)];
  }

  /**
   * The stateless HeadIndex view: tokens of the top blocks by the optimistic
   * score, best block first (scored in JS on widened rows; the methods use
   * scoreBlocks).
   */
  search(q: Float32Array, group: number, k: number): SearchResult {
    const d = this.headDim, stride = this.stride;
    this.widened ??= widenWords(this.rows, this.dtype);
    const m = this.widened, score = new Float32Array(this.blocks);
    const aug = BlockSummary.augment([this], q, group);
    for (let b = 0; b < this.blocks; b++) {
      let best = -Infinity;
      for (let g = 0; g < group; g++) {
        let s = 0;
        for (let j = 0; j <= d; j++) s += aug[g * stride + j] * m[b * stride + j];
        best = Math.max(best, s);
      }
      score[b] = best;
    }
    const order = Array.from(score.keys()).sort((a, b) => score[b] - score[a] || a - b);
    const ids = new Int32Array(Math.min(k, this.tokens));
    let n = 0;
    for (const b of order) {
      const [from, to] = this.tokenRange(b);
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

/** Bare means [blocks, d] as rows [blocks, d + 8] with radius 0. */
function padRows(means: Uint16Array, blocks: number, d: number): Uint16Array {
  const stride = summaryStride(d), rows = new Uint16Array(blocks * stride);
  for (let b = 0; b < blocks; b++) rows.set(means.subarray(b * d, (b + 1) * d), b * stride);
  return rows;
}

/** The largest finite value of a storage dtype, as its word. */
const MAX_FINITE: Record<KvDtype, number> = { f16: 0x7bff, bf16: 0x7f7f };

/**
 * A non-negative radius as a storage word no smaller than it: rounded to
 * nearest, then one step up where that fell below (so the stored radius
 * still bounds every key's distance), at most the largest finite value.
 */
function radiusWord(r: number, dtype: KvDtype): number {
  const f = Float32Array.of(r), w = new Uint16Array(1), back = new Float32Array(1);
  convert(new Uint8Array(f.buffer), 'f32', new Uint8Array(w.buffer), dtype, 1);
  convert(new Uint8Array(w.buffer), dtype, new Uint8Array(back.buffer), 'f32', 1);
  let word = w[0];
  if (!(back[0] >= r)) word++;
  return Math.min(word, MAX_FINITE[dtype]);
}

/**
 * Each block's mean key (storage dtype) and radius: two passes over the
 * keys, widened a chunk of blocks at a time (a 1M-token head is 512 MB as
 * f32); the radius is measured from the mean as stored.
 */
function summarize(input: HeadKeys, blockSize: number): { meanWords: Uint16Array; radii: Float32Array; blocks: number } {
  const { tokens, headDim: d } = input;
  const blocks = Math.ceil(tokens / blockSize);
  const means = new Float32Array(blocks * d);
  const chunkBlocks = 64, keys = new Float32Array(chunkBlocks * blockSize * d);
  const bytes = new Uint8Array(input.keys.buffer, input.keys.byteOffset, tokens * d * 2);
  const chunks = function* () {
    for (let b0 = 0; b0 < blocks; b0 += chunkBlocks) {
      const t0 = b0 * blockSize, t1 = Math.min(tokens, (b0 + chunkBlocks) * blockSize);
      convert(bytes.subarray(t0 * d * 2, t1 * d * 2), input.dtype, new Uint8Array(keys.buffer, 0, (t1 - t0) * d * 4), 'f32', (t1 - t0) * d);
      yield [t0, t1];
    }
  };
  for (const [t0, t1] of chunks())
    for (let t = t0; t < t1; t++) {
      const b = Math.floor(t / blockSize), row = (t - t0) * d;
      for (let j = 0; j < d; j++) means[b * d + j] += keys[row + j];
    }
  for (let b = 0; b < blocks; b++) {
    const n = Math.min(tokens, (b + 1) * blockSize) - b * blockSize;
    for (let j = 0; j < d; j++) means[b * d + j] /= n;
  }
  const meanWords = new Uint16Array(blocks * d);
  convert(new Uint8Array(means.buffer), 'f32', new Uint8Array(meanWords.buffer), input.dtype, blocks * d);
  const stored = widenWords(meanWords, input.dtype);
  const radii = new Float32Array(blocks);
  for (const [t0, t1] of chunks())
    for (let t = t0; t < t1; t++) {
      const b = Math.floor(t / blockSize), row = (t - t0) * d;
      let ss = 0;
      for (let j = 0; j < d; j++) {
        const x = keys[row + j] - stored[b * d + j];
        ss += x * x;
      }
      radii[b] = Math.max(radii[b], Math.sqrt(ss));
    }
  return { meanWords, radii, blocks };
}

export async function buildBlockSummary(input: BuildInput): Promise<Uint8Array> {
  const d = input.headDim, stride = summaryStride(d);
  const { meanWords, radii, blocks } = summarize(input, SUMMARY_BLOCK);
  const rows = padRows(meanWords, blocks, d);
  for (let b = 0; b < blocks; b++) rows[b * stride + d] = radiusWord(radii[b], input.dtype);
  // Importance: mean over sampled query rows of the softmax over blocks of
  // (q·mean · scale + log blockSize), i.e. each block's share of the mass
  // (the means alone: the radius is only for ranking).
  // Every sampled row's scores come from one native pass (nothing sorted).
  const queryRows = input.queryCount > 0 ? input.queries : keysAsQueries(input);
  const count = input.queryCount > 0 ? input.queryCount : queryRows.length / d;
  const step = Math.max(1, Math.floor(count / MAX_IMPORTANCE_ROWS));
  const sampled: number[] = [];
  for (let r = 0; r < count; r += step) sampled.push(r);
  const q = new Float32Array(sampled.length * d);
  sampled.forEach((r, i) => q.set(queryRows.subarray(r * d, (r + 1) * d), i * d));
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
  const { share } = await calibrateShare(input, rows, blocks);
  return encode(blocks, SUMMARY_BLOCK, input.tokens, d, rows, imp, share);
}

/** Prefill query rows a head's calibration scores exactly (evenly among the rows that have candidates enough). */
const CALIBRATION_ROWS = 32;
/** Blocks of keys a calibration row scores exactly, at most: a run of its candidates. */
const CALIBRATION_BLOCKS = 128;
/** Candidate blocks a row needs to take part: fewer, and any budget holds most of them. */
const CALIBRATION_MIN_BLOCKS = 8;
/** The budgets calibrated for, as shares of a row's candidate blocks: issue #16's ≤ 3% exact, and twice that. */
const CALIBRATION_BUDGETS = [0.03, 0.06];
/** A row's peak: its keys of the highest scores (a pass key's digits and their neighbours). */
const CALIBRATION_PEAK = 8;
/**
 * The capture a larger share may give up against the best share and still
 * be chosen, relative: optimism is kept wherever it is nearly free.
 */
const CALIBRATION_TOLERANCE = 0.1;

export interface Calibration {
  /** The share chosen, one of RADIUS_SHARES. */
  share: number;
  /** Per share of RADIUS_SHARES: the objective, the mean of mass and peak. */
  capture: number[];
  /** Per share: the rows' attention mass the top blocks hold, mean over rows and budgets. */
  mass: number[];
  /** Per share: the share of the rows' peak (the mass of their CALIBRATION_PEAK best keys) the top blocks hold. */
  peak: number[];
}

/**
 * A head's radius share: the largest of RADIUS_SHARES whose top blocks, at
 * the calibrated budgets, capture within CALIBRATION_TOLERANCE as much of a
 * few of the document's own prefill query rows' exact attention as the
 * best share's (0 without prefill queries, or when no row has candidates
 * enough). The largest within the tolerance, not the best: the lone key a
 * share is for is typically asked for once (a pass key, at the question),
 * so the prefill rows rarely show it; where a share costs the rows nothing
 * it is kept, and where large radii are only spread (the generator's blocks
 * that straddle topics: capture 0.39 at 0, 0.24 at 0.25) it is not.
 * Captured is the mean of two shares: of the row's
 * attention mass, and of its peak, the mass of its CALIBRATION_PEAK best
 * keys. The peak counts on its own because with estimation on (the default
 * wherever documents have clusters) the broad rest of the mass is estimated
 * well, while a lone key that neither a block mean nor a cluster centroid
 * shows is lost unless its block is selected: the pass key on
 * kvrecall-code-13M.
 *
 * A row at position p (inferred from its index: the rows come in token
 * order at an even stride) attends the keys before it; its candidates are
 * blocks 1 .. (p's block − 2), as a decode step's are the blocks outside
 * sinks and window, and it scores exactly a run of at most
 * CALIBRATION_BLOCKS of them (spread over the document from row to row).
 * Cost per head, whatever the document's length: CALIBRATION_ROWS ×
 * CALIBRATION_BLOCKS × blockSize = 262K key scores in one native pass
 * (32 × 8192 × headDim multiply-adds), then per row one pass over those
 * scores and RADIUS_SHARES sorts of ≤ 128 blocks: per head at headDim 128,
 * 35 ms at 8K tokens, 43 ms at 131K, 84 ms at 1M (3% of that head's build)
 * on the 2-core VM under a load of 8 (bench/results/model-block-share-vm.md).
 */
export async function calibrateShare(input: BuildInput, rows: Uint16Array, blocks: number): Promise<Calibration> {
  const { queryCount: count, tokens, headDim: d, dtype } = input;
  const B = SUMMARY_BLOCK, stride = summaryStride(d);
  const zeros = () => RADIUS_SHARES.map(() => 0);
  const none = { share: 0, capture: zeros(), mass: zeros(), peak: zeros() };
  if (count === 0 || blocks < CALIBRATION_MIN_BLOCKS + 2) return none;
  const candidates = (r: number) => Math.min(blocks, Math.floor(((r + 0.5) * tokens) / count / B)) - 2;
  let first = 0;
  while (first < count && candidates(first) < CALIBRATION_MIN_BLOCKS) first++;
  if (first === count) return none;
  const n = Math.min(CALIBRATION_ROWS, count - first);
  const picked = Array.from({ length: n }, (_, i) => first + Math.floor(((i + 0.5) * (count - first)) / n));
  // Each row's run of candidate blocks [from, from + width): where its candidates exceed
  // the cap, placed along them by the golden-ratio sequence, so the rows cover the document.
  const runs = picked.map((r, i) => {
    const avail = candidates(r), width = Math.min(avail, CALIBRATION_BLOCKS);
    return { from: 1 + Math.floor(((i * 0.6180339887) % 1) * (avail - width + 1)), width };
  });
  const q = new Float32Array(n * d);
  picked.forEach((r, i) => q.set(input.queries.subarray(r * d, (r + 1) * d), i * d));
  const exact = runs.map(({ width }) => new Float32Array(width * B));
  const none0 = new Int32Array(0), noScores = new Float32Array(0);
  await topkHeads({
    q,
    group: 1,
    headDim: d,
    dtype,
    k: 0,
    heads: runs.map(({ from, width }, i) => ({ keys: input.keys.subarray(from * B * d, (from + width) * B * d), tokens: width * B, outIds: none0, outScores: noScores, allScores: exact[i] })),
  });
  const m = widenWords(rows, dtype), scale = 1 / Math.sqrt(d);
  const mass = new Float64Array(RADIUS_SHARES.length), peak = new Float64Array(RADIUS_SHARES.length);
  const per = 1 / (n * CALIBRATION_BUDGETS.length);
  for (let i = 0; i < n; i++) {
    const { from, width } = runs[i], s = exact[i], qi = q.subarray(i * d, (i + 1) * d);
    const peakKeys = topKeys(s, CALIBRATION_PEAK);
    const top = s[peakKeys[0]];
    const blockMass = new Float64Array(width), blockPeak = new Float64Array(width);
    let z = 0, zPeak = 0;
    for (let t = 0; t < s.length; t++) {
      const e = Math.exp((s[t] - top) * scale);
      blockMass[Math.floor(t / B)] += e;
      z += e;
    }
    for (const t of peakKeys) {
      const e = Math.exp((s[t] - top) * scale);
      blockPeak[Math.floor(t / B)] += e;
      zPeak += e;
    }
    const dot = new Float64Array(width);
    let qq = 0;
    for (let j = 0; j < d; j++) qq += qi[j] * qi[j];
    for (let b = 0; b < width; b++) for (let j = 0; j < d; j++) dot[b] += qi[j] * m[(from + b) * stride + j];
    RADIUS_SHARES.forEach((alpha, a) => {
      const score = (b: number) => dot[b] + alpha * Math.sqrt(qq) * m[(from + b) * stride + d];
      const order = Array.from({ length: width }, (_, b) => b).sort((x, y) => score(y) - score(x) || x - y);
      for (const budget of CALIBRATION_BUDGETS) {
        const k = Math.max(1, Math.ceil(budget * width));
        for (let c = 0; c < k; c++) {
          mass[a] += (blockMass[order[c]] / z) * per;
          peak[a] += (blockPeak[order[c]] / zPeak) * per;
        }
      }
    });
  }
  const capture = RADIUS_SHARES.map((_, a) => (mass[a] + peak[a]) / 2);
  const floor = (1 - CALIBRATION_TOLERANCE) * Math.max(...capture);
  let chosen = 0;
  for (let a = 0; a < RADIUS_SHARES.length; a++) if (capture[a] >= floor) chosen = a;
  return { share: RADIUS_SHARES[chosen], capture, mass: [...mass], peak: [...peak] };
}

/** The indices of the `n` largest of `s`, largest first (ties to the lower index). */
function topKeys(s: Float32Array, n: number): number[] {
  const out: number[] = [];
  for (let t = 0; t < s.length; t++) {
    if (out.length === n && !(s[t] > s[out[n - 1]])) continue;
    if (out.length === n) out.pop();
    let at = out.length;
    while (at > 0 && s[out[at - 1]] < s[t]) at--;
    out.splice(at, 0, t);
  }
  return out;
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

/**
 * The artifact: a header of six int32 (magic, version, blocks, blockSize,
 * tokens, headDim) and the radius share (f32), the rows
 * [blocks, headDim + 8] (mean, radius, zeros; storage dtype), the
 * importance [blocks] f32.
 */
function encode(blocks: number, blockSize: number, tokens: number, d: number, rows: Uint16Array, importance: Float32Array, share: number): Uint8Array {
  const header = new Int32Array([MAGIC, VERSION, blocks, blockSize, tokens, d, 0]);
  new Float32Array(header.buffer, 24, 1)[0] = share;
  const out = new Uint8Array(header.byteLength + rows.byteLength + importance.byteLength);
  out.set(new Uint8Array(header.buffer), 0);
  out.set(new Uint8Array(rows.buffer, rows.byteOffset, rows.byteLength), header.byteLength);
  out.set(new Uint8Array(importance.buffer), header.byteLength + rows.byteLength);
  return out;
}

/**
 * A stored artifact as a BlockSummary. An artifact of an older version
 * (1: means without the radius; 2: no calibrated share) is refused as
 * stale: its index is to be rebuilt from the keys, not read.
 */
export function loadBlockSummary(bytes: Uint8Array, keys: HeadKeys): BlockSummary {
  const copy = bytes.slice();
  if (copy.byteLength < 8) throw new Error('block summary artifact is truncated');
  const [magic, version] = new Int32Array(copy.buffer, 0, 2);
  if (magic !== MAGIC) throw new Error('block summary artifact is corrupt or belongs to other keys');
  if (version >= 1 && version < VERSION)
    throw new Error(`block summary artifact version ${version} is stale (this build reads version ${VERSION}: block radii and a calibrated radius share): rebuild the index from the keys`);
  if (copy.byteLength < HEADER_BYTES) throw new Error('block summary artifact is truncated');
  const [, , blocks, blockSize, tokens, d] = new Int32Array(copy.buffer, 0, 6);
  const share = new Float32Array(copy.buffer, 24, 1)[0];
  const stride = summaryStride(d);
  const size = HEADER_BYTES + blocks * stride * 2 + blocks * 4;
  if (version !== VERSION || tokens !== keys.tokens || d !== keys.headDim || blocks !== Math.ceil(tokens / blockSize) || copy.byteLength !== size || !(share >= 0 && share <= 16))
    throw new Error('block summary artifact is corrupt or belongs to other keys');
  const rows = new Uint16Array(copy.buffer, HEADER_BYTES, blocks * stride);
  // Copied out: the importance section may sit at an offset that is not a multiple of 4.
  const importance = new Float32Array(copy.slice(HEADER_BYTES + blocks * stride * 2).buffer);
  return new BlockSummary(blocks, blockSize, tokens, d, keys.dtype, rows, importance, share);
}
