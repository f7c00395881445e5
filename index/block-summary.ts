// The per-(document, layer, kv head) artifact block-selecting methods share:
// per block of `blockSize` tokens, a few representatives (REPS k-means
// sub-centroids of its keys, native/kernels/block_reps.h), each with its
// radius (the largest distance of one of its members from it) and member
// count, which together rank the block for query-aware selection; and a
// stable, query-agnostic importance per block (the attention mass the
// prefill queries pay the block, estimated from the representatives;
// without prefill queries, a sample of the keys stands in).
//
// A block scores as its best representative, max over the query group and
// the block's rows of q·c + α·‖q‖·r + √d·ln n: the optimistic score of the
// wave index's clusters (index/wave/cluster-index.ts) plus the log of the
// member count in q·k units (a sub-cluster's share of the block's mass, so
// a row of 40 ordinary keys outranks a row of 1 at equal q·c). One mean per
// block hid a lone key a query seeks (a pass key's digits among 64 bytes of
// code: on kvrecall-code-13M at 32K bytes the digits' block ranked 124th by
// its mean, median, in the pass-key head; the best of 4 sub-centroids ranks
// it 0: bench/results/model-block-reps-vm.md). A row is
// [c, r, ln n, 0 ...] (stride headDim + 8), a query row
// [q, α·‖q‖, √d, 0 ...], so one native top-k over every row scores every
// block of every kv head of a step on the host (topkHeads) or the device
// (engine/cache/device-block-scores.ts) alike, bit for bit; the top k·REPS
// rows hold the top k blocks (a block above the k-th has its best row
// above the k-th block's best, and at most k − 1 blocks' rows are), so the
// step dedupes O(k·REPS) candidates and never touches every block in JS.
//
// α, the radius share, is the head's own, calibrated at seal from its
// prefill queries (index/block-calibration.ts) and stored in the artifact.
import { augmentRows } from '../addon/block-choose.js';
import { blockReps } from '../addon/block-reps.js';
import { convert, narrowWords, topkHeads, widenWords, type KvDtype } from '../addon/kernels.js';
import { DEFAULT_BLOCK_SIZE } from '../core/model.js';
import { ScratchPool } from './scratch-pool.js';
import { calibrateShare, REPS_COUNT_COLUMN, summaryStride } from './block-calibration.js';
import type { BlockMeans, BlockScorer, BuildInput, HeadIndex, HeadKeys, SearchResult } from './method.js';

export { calibrateShare, RADIUS_SHARES, summaryStride, type Calibration } from './block-calibration.js';

/** Tokens per summarized block: the GPU pool's block, so selected blocks are pool blocks. */
export const SUMMARY_BLOCK = DEFAULT_BLOCK_SIZE;
/**
 * Representatives per block. On kvrecall-code-13M at 32K bytes (4 trials,
 * the pass-key head at each digit step) the digits' block ranks within a
 * 2.5% budget at 2 sub-centroids 68%, at 4 95%, at 8 100% (the block mean:
 * 0%), and the top 13 blocks hold 0.858 / 0.852 / 0.864 of the oracle's
 * mass (mean: 0.847); 4 scores 4× the rows of one mean per block (still
 * 1/16 of the keys at 64-token blocks).
 */
export const SUMMARY_REPS = 4;
/** Lloyd rounds of the per-block k-means (from a farthest-first start). */
const REPS_ITERATIONS = 8;
const MAGIC = 0x4b56424c; // "KVBL"
/**
 * 1: bare means [blocks, headDim] (stale: no radius); 2: rows
 * [blocks, headDim + 8] with the radius (stale: no share); 3: the head's
 * calibrated radius share in the header (stale: one mean per block);
 * 4: rows [blocks · reps, headDim + 8] of sub-centroids with radius and
 * ln count, reps in the header.
 */
const VERSION = 4;
const HEADER_BYTES = 32;
const MAX_IMPORTANCE_ROWS = 256;
/** A bit of the flag scratch the row-to-block dedupe uses (block-select's bits are below it). */
const SEEN = 0x80;

/** One host scoring call's outputs for one head: the top rows' ids and scores, and every row's score. */
interface RowScratch {
  order: Int32Array;
  topScores: Float32Array;
  rowScores: Float32Array;
}

/** Host scoring outputs, shared by every summary (index/scratch-pool.ts: why one pool): a call takes one per head and gives it back once read. */
const scratch = new ScratchPool<RowScratch>(
  (rows) => ({ order: new Int32Array(rows), topScores: new Float32Array(rows), rowScores: new Float32Array(rows) }),
  (s) => s.order.length,
);

/** The radius shares of a (document, layer)'s heads, by its first head's summary (made once, a step reads them). */
const shares = new WeakMap<BlockSummary, { heads: readonly BlockSummary[]; shares: Float64Array }>();

function sharesOf(heads: readonly BlockSummary[]): Float64Array {
  const known = shares.get(heads[0]);
  if (known && known.heads.length === heads.length && known.heads.every((s, h) => s === heads[h])) return known.shares;
  const made = Float64Array.from(heads, (s) => s.radiusShare);
  shares.set(heads[0], { heads: [...heads], shares: made });
  return made;
}

export class BlockSummary implements HeadIndex {
  /** Words per row of `rows`: summaryStride(headDim). */
  readonly stride: number;
  /** [blocks · reps, stride] storage-dtype words: block b's representative r at row b·reps + r. */
  readonly rows: Uint16Array;
  /** The rows as a block scorer reads them (one "block" per row, its headDim the stride; stable, so a device copy is made once). */
  readonly scored: BlockMeans;

  constructor(
    readonly blocks: number,
    readonly blockSize: number,
    readonly tokens: number,
    readonly headDim: number,
    readonly dtype: KvDtype,
    /**
     * [blocks · reps, summaryStride(headDim)] rows as stored
     * (representative, radius, ln count, padding), or bare [blocks, headDim]
     * means with reps 1 (no radius or count known: taken as 0, so blocks
     * rank by q·mean alone, bit for bit).
     */
    rows: Uint16Array,
    /** [blocks] stable importance, sums to 1. */
    readonly importance: Float32Array,
    /** The head's radius share α (calibrateShare): 0 ranks by q·c + √d·ln n alone. */
    readonly radiusShare = 0,
    /** Representatives (rows) per block. */
    readonly reps = 1,
  ) {
    this.stride = summaryStride(headDim);
    const n = blocks * reps;
    if (rows.length === n * this.stride) this.rows = rows;
    else if (reps === 1 && rows.length === blocks * headDim) this.rows = padRows(rows, blocks, headDim);
    else throw new RangeError(`block summary: ${rows.length} words are neither [${blocks}, ${headDim}] means nor [${n}, ${this.stride}] rows`);
    this.scored = { blocks: n, headDim: this.stride, dtype, means: this.rows };
  }

  /** Block b's representative `rep` as stored, widened: its centroid [headDim], radius and ln count. */
  row(block: number, rep = 0): { centroid: Float32Array; radius: number; logCount: number } {
    const at = (block * this.reps + rep) * this.stride, w = widenWords(this.rows.subarray(at, at + this.headDim + REPS_COUNT_COLUMN + 1), this.dtype);
    return { centroid: w.subarray(0, this.headDim), radius: w[this.headDim], logCount: w[this.headDim + REPS_COUNT_COLUMN] };
  }

  /**
   * The query rows of `heads` (group rows each, head h's from row h·group)
   * as their rows score them: [q, α_h·‖q‖, √d, 0 ...] per row, stride
   * summaryStride(headDim), α_h head h's radius share.
   */
  static augment(heads: readonly BlockSummary[], q: Float32Array, group: number): Float32Array {
    return augmentRows(q.subarray(0, heads.length * group * heads[0].headDim), group, heads[0].headDim, sharesOf(heads));
  }

  /**
   * Scores every block (max over the group and its rows): the `k` best
   * blocks, best first, and every block's score, by block (fresh arrays).
   * One native pass; the per-block maxima are taken in JS, so this is for
   * tests, benches and search, not a decode step (candidateRows).
   */
  async scoreBlocks(q: Float32Array, group: number, k = this.blocks): Promise<{ order: Int32Array; scores: Float32Array }> {
    return (await BlockSummary.scoreHeads([this], q, group, k))[0];
  }

  /**
   * scoreBlocks for the summaries of every kv head at once (one native call
   * for the step): head h scores with the query rows h*group .. of q.
   */
  static async scoreHeads(heads: BlockSummary[], q: Float32Array, group: number, k: number): Promise<{ order: Int32Array; scores: Float32Array }[]> {
    return BlockSummary.scoreRows(heads, BlockSummary.augment(heads, q, group), group, k, (rows) =>
      heads.map((s, h) => {
        const scores = new Float32Array(s.blocks).fill(-Infinity);
        for (let i = 0; i < s.blocks * s.reps; i++) scores[Math.floor(i / s.reps)] = Math.max(scores[Math.floor(i / s.reps)], rows[h].rowScores[i]);
        return { order: s.blocksOf(rows[h].ids, k), scores };
      }),
    );
  }

  /**
   * The host pass: every row scored (rowScores, by row), the top k·reps rows
   * per head (ids, best first), read by `use` before the arrays go back.
   */
  private static async scoreRows<T>(heads: BlockSummary[], aug: Float32Array, group: number, k: number, use: (rows: { ids: Int32Array; rowScores: Float32Array }[]) => T): Promise<T> {
    const s0 = heads[0], sets = heads.map((s) => scratch.take(s.blocks * s.reps));
    try {
      const counts = await topkHeads({
        q: aug,
        group,
        headDim: s0.stride,
        dtype: s0.dtype,
        k: k * s0.reps,
        heads: heads.map((s, h) => ({ keys: s.rows, tokens: s.blocks * s.reps, outIds: sets[h].order, outScores: sets[h].topScores, allScores: sets[h].rowScores })),
      });
      return use(sets.map((x, h) => ({ ids: x.order.subarray(0, counts[h]), rowScores: x.rowScores })));
    } finally {
      scratch.give(sets);
    }
  }

  /**
   * The first k distinct blocks of rows given best first: the blocks in
   * score order (their best rows' order, ties towards the lower block, as
   * row ids b·reps + r order them). O(rows given).
   */
  private blocksOf(rowIds: Int32Array, k: number): Int32Array {
    const R = this.reps, f = this.flags, out = new Int32Array(Math.min(k, this.blocks));
    let n = 0;
    for (let i = 0; i < rowIds.length && n < out.length; i++) {
      const b = Math.floor(rowIds[i] / R);
      if (f[b] & SEEN) continue;
      f[b] |= SEEN;
      out[n++] = b;
    }
    for (let i = 0; i < n; i++) f[out[i]] &= ~SEEN;
    return out.subarray(0, n);
  }

  /**
   * A decode step's raw candidates for every kv head, read by `use` before
   * the host pass's arrays go back: the top k·reps rows, best first (higher
   * score, then lower row: the top k blocks' best rows are among them; a
   * device scorer answers the k blocks themselves, each as its first row, in
   * the order of their first rows in that list, which is what the choice
   * reads of it), and
   * the scores of the rows extraRows[h] in order (`extraScores`, from a
   * device scorer that takes the summaries: one device call over the rows
   * (`scored`) with the augmented query rows, nothing of size blocks back in
   * JS) or every row's score (`rowScores`, the same rows and query rows
   * scored on the host). Both give the same rows in the same order and the
   * same scores, bit for bit; the blocks are made of them natively
   * (addon/block-choose.ts).
   */
  static async candidateRows<T>(
    heads: BlockSummary[],
    q: Float32Array,
    group: number,
    k: number,
    extraRows: Int32Array[],
    scorer: BlockScorer | undefined,
    use: (c: { top: Int32Array[]; extraScores?: Float32Array[]; rowScores?: Float32Array[] }) => T,
  ): Promise<T> {
    const aug = BlockSummary.augment(heads, q, group), R = heads[0].reps;
    const device = scorer ? await scorer.topBlocks(heads.map((s) => s.scored), aug, group, k, extraRows, R) : undefined;
    if (device) return use({ top: device.map((r) => r.ids), extraScores: device.map((r) => r.extraScores) });
    return BlockSummary.scoreRows(heads, aug, group, k, (rows) => use({ top: rows.map((r) => r.ids), rowScores: rows.map((r) => r.rowScores) }));
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
   * The stateless HeadIndex view: tokens of the top blocks by the block
   * score, best block first (scored in JS on widened rows; the methods use
   * candidateRows).
   */
  search(q: Float32Array, group: number, k: number): SearchResult {
    const stride = this.stride, n = this.blocks * this.reps;
    this.widened ??= widenWords(this.rows, this.dtype);
    const m = this.widened, score = new Float32Array(this.blocks).fill(-Infinity);
    const aug = BlockSummary.augment([this], q, group);
    for (let i = 0; i < n; i++) {
      const b = Math.floor(i / this.reps);
      for (let g = 0; g < group; g++) {
        let s = 0;
        for (let j = 0; j < stride; j++) s += aug[g * stride + j] * m[i * stride + j];
        score[b] = Math.max(score[b], s);
      }
    }
    const order = Array.from(score.keys()).sort((a, b) => score[b] - score[a] || a - b);
    const ids = new Int32Array(Math.min(k, this.tokens));
    let t0 = 0;
    for (const b of order) {
      const [from, to] = this.tokenRange(b);
      for (let t = from; t < to && t0 < ids.length; t++) ids[t0++] = t;
      if (t0 === ids.length) break;
    }
    return { ids, scanned: n };
  }

  private widened?: Float32Array;
}

/** Bare means [blocks, d] as rows [blocks, d + 8] with radius and ln count 0. */
function padRows(means: Uint16Array, blocks: number, d: number): Uint16Array {
  const stride = summaryStride(d), rows = new Uint16Array(blocks * stride);
  for (let b = 0; b < blocks; b++) rows.set(means.subarray(b * d, (b + 1) * d), b * stride);
  return rows;
}

/** The largest finite value of a storage dtype, as its word. */
const MAX_FINITE: Record<KvDtype, number> = { f16: 0x7bff, bf16: 0x7f7f };

/**
 * Non-negative radii as storage words no smaller than them: rounded to
 * nearest, then one step up where that fell below (so a stored radius
 * still bounds every member's distance), at most the largest finite value.
 */
function radiusWords(r: Float32Array, dtype: KvDtype): Uint16Array {
  const w = narrowWords(r, dtype), back = widenWords(w, dtype);
  for (let i = 0; i < r.length; i++) w[i] = Math.min(back[i] >= r[i] ? w[i] : w[i] + 1, MAX_FINITE[dtype]);
  return w;
}

export async function buildBlockSummary(input: BuildInput): Promise<Uint8Array> {
  const d = input.headDim, stride = summaryStride(d), B = SUMMARY_BLOCK, R = SUMMARY_REPS;
  const blocks = Math.ceil(input.tokens / B), n = blocks * R;
  const reps = await blockReps(input.keys, input.dtype, input.tokens, d, B, R, REPS_ITERATIONS);
  const radii = radiusWords(reps.radii, input.dtype);
  const logs = narrowWords(Float32Array.from(reps.counts, (c) => Math.log(Math.max(1, c))), input.dtype);
  const rows = new Uint16Array(n * stride);
  for (let i = 0; i < n; i++) {
    rows.set(reps.centroids.subarray(i * d, (i + 1) * d), i * stride);
    rows[i * stride + d] = radii[i];
    // A slot the block could not fill (count 0) repeats another slot with
    // ln 1 = 0 beside it: never above the slot it repeats.
    rows[i * stride + d + REPS_COUNT_COLUMN] = logs[i];
  }
  const imp = await importanceOf(input, reps.centroids, reps.counts, blocks, R);
  const { share } = await calibrateShare(input, rows, blocks, R, B);
  return encode(blocks, B, input.tokens, d, R, rows, imp, share);
}

/**
 * Importance: the mean over sampled prefill query rows of each block's
 * share of the row's attention, as its representatives estimate it
 * (Σ_r n_r·exp(scale·q·c_r), the estimation zone's estimate of a cluster);
 * every sampled row's scores from native passes of 32 rows (nothing sorted).
 */
async function importanceOf(input: BuildInput, centroids: Uint16Array, counts: Int32Array, blocks: number, R: number): Promise<Float32Array> {
  const d = input.headDim, n = blocks * R, scale = 1 / Math.sqrt(d);
  const queryRows = input.queryCount > 0 ? input.queries : keysAsQueries(input);
  const count = input.queryCount > 0 ? input.queryCount : queryRows.length / d;
  const step = Math.max(1, Math.floor(count / MAX_IMPORTANCE_ROWS));
  const sampled: number[] = [];
  for (let r = 0; r < count; r += step) sampled.push(r);
  const importance = new Float64Array(blocks), none = new Int32Array(0), noScores = new Float32Array(0);
  for (let c0 = 0; c0 < sampled.length; c0 += 32) {
    const chunk = sampled.slice(c0, c0 + 32);
    const q = new Float32Array(chunk.length * d);
    chunk.forEach((r, i) => q.set(queryRows.subarray(r * d, (r + 1) * d), i * d));
    const scores = chunk.map(() => new Float32Array(n));
    await topkHeads({ q, group: 1, headDim: d, dtype: input.dtype, k: 0, heads: scores.map((all) => ({ keys: centroids, tokens: n, outIds: none, outScores: noScores, allScores: all })) });
    for (const row of scores) {
      let m = -Infinity;
      for (let i = 0; i < n; i++) if (counts[i] > 0) m = Math.max(m, row[i] * scale);
      let z = 0;
      for (let i = 0; i < n; i++) if (counts[i] > 0) z += counts[i] * Math.exp(row[i] * scale - m);
      for (let i = 0; i < n; i++) if (counts[i] > 0) importance[Math.floor(i / R)] += (counts[i] * Math.exp(row[i] * scale - m)) / z;
    }
  }
  return Float32Array.from(importance, (x) => x / Math.max(1, sampled.length));
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
 * tokens, headDim), the radius share (f32) and reps (int32), the rows
 * [blocks · reps, headDim + 8] (representative, radius, ln count, zeros;
 * storage dtype), the importance [blocks] f32.
 */
function encode(blocks: number, blockSize: number, tokens: number, d: number, reps: number, rows: Uint16Array, importance: Float32Array, share: number): Uint8Array {
  const header = new Int32Array([MAGIC, VERSION, blocks, blockSize, tokens, d, 0, reps]);
  new Float32Array(header.buffer, 24, 1)[0] = share;
  const out = new Uint8Array(header.byteLength + rows.byteLength + importance.byteLength);
  out.set(new Uint8Array(header.buffer), 0);
  out.set(new Uint8Array(rows.buffer, rows.byteOffset, rows.byteLength), header.byteLength);
  out.set(new Uint8Array(importance.buffer), header.byteLength + rows.byteLength);
  return out;
}

/**
 * A stored artifact as a BlockSummary. An artifact of an older version
 * (1: means without the radius; 2: no calibrated share; 3: one mean per
 * block) is refused as stale: its index is to be rebuilt from the keys, not
 * read.
 */
export function loadBlockSummary(bytes: Uint8Array, keys: HeadKeys): BlockSummary {
  const copy = bytes.slice();
  if (copy.byteLength < 8) throw new Error('block summary artifact is truncated');
  const [magic, version] = new Int32Array(copy.buffer, 0, 2);
  if (magic !== MAGIC) throw new Error('block summary artifact is corrupt or belongs to other keys');
  if (version >= 1 && version < VERSION)
    throw new Error(`block summary artifact version ${version} is stale (this build reads version ${VERSION}: per-block sub-centroids with radii and counts, a calibrated radius share): rebuild the index from the keys`);
  if (copy.byteLength < HEADER_BYTES) throw new Error('block summary artifact is truncated');
  const [, , blocks, blockSize, tokens, d, , reps] = new Int32Array(copy.buffer, 0, 8);
  const share = new Float32Array(copy.buffer, 24, 1)[0];
  const stride = summaryStride(d);
  const size = HEADER_BYTES + blocks * reps * stride * 2 + blocks * 4;
  if (version !== VERSION || tokens !== keys.tokens || d !== keys.headDim || blocks !== Math.ceil(tokens / blockSize) || !(reps >= 1 && reps <= 64) || copy.byteLength !== size || !(share >= 0 && share <= 16))
    throw new Error('block summary artifact is corrupt or belongs to other keys');
  const rows = new Uint16Array(copy.buffer, HEADER_BYTES, blocks * reps * stride);
  // Copied out: the importance section may sit at an offset that is not a multiple of 4.
  const importance = new Float32Array(copy.slice(HEADER_BYTES + blocks * reps * stride * 2).buffer);
  return new BlockSummary(blocks, blockSize, tokens, d, keys.dtype, rows, importance, share, reps);
}
