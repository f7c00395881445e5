// Typed wrapper around the addon's choice of a step's blocks
// (native/bindings/block_choose_binding.cc, native/kernels/block_choose.cc):
// for every kv head at once, from the scorer's top rows and the previous
// step's blocks, the query-agnostic blocks, then the candidates in score
// order keeping the previous step's and bringing in at most `maxNew` others,
// up to the budget, none of the excluded blocks; the chosen blocks ascending
// with their pool classes and their rows (the next step's extra rows). One
// native call per step, its outputs in three flat arrays: no per-block work
// in JS on the decode step's path.
import { nativeAddon } from './addon.js';

export interface BlockChooserHead {
  /** [blocks] blocks by stable importance, most important first. */
  byImportance: Int32Array;
  /** [blocks] each block's position in byImportance. */
  importanceRank: Int32Array;
}

export interface BlockStepArgs {
  /** Distinct blocks of the top rows taken as candidates (excluded ones count). */
  reach: number;
  budget: number;
  /** Blocks outside the previous selection brought in at most (Infinity: no limit; none either on a first step). */
  maxNew: number;
  /** Query-agnostic blocks taken first (the most important ones not excluded). */
  agnostic: number;
  /** Chosen blocks whose importance rank is below this are pool class 1 (when protectAgnostic), else 0. */
  agnosticClass: number;
  protectAgnostic: boolean;
  /** Blocks never chosen. */
  exclude: Int32Array;
  /** Per head, the scorer's top rows, best first (ties: lower row). */
  top: Int32Array[];
  /** The previous step's choice (absent on a first step). */
  prev?: BlockStepChoice;
  /** Per head, the scores of prev's rows in order (a device scorer's extra scores) ... */
  extraScores?: Float32Array[];
  /** ... or every row's score (the host pass). */
  rowScores?: Float32Array[];
}

/** A step's choice for every head, in flat arrays: head h's at [h·stride, h·stride + counts[h]). */
export class BlockStepChoice {
  constructor(
    /** [heads · stride] chosen blocks, ascending per head. */
    readonly out: Int32Array,
    /** [heads · stride] their pool classes. */
    readonly cls: Uint8Array,
    /** [heads · stride · reps] their rows, b·reps + r. */
    readonly rows: Int32Array,
    readonly counts: Int32Array,
    readonly stride: number,
    readonly reps: number,
  ) {}

  /** Per head, the chosen blocks (views). */
  ids(): Int32Array[] {
    return Array.from(this.counts, (n, h) => this.out.subarray(h * this.stride, h * this.stride + n));
  }

  /** Per head, the chosen blocks' pool classes (views). */
  classes(): Uint8Array[] {
    return Array.from(this.counts, (n, h) => this.cls.subarray(h * this.stride, h * this.stride + n));
  }

  /** Per head, the chosen blocks' rows (views): the extra rows a scorer scores at the next step. */
  rowLists(): Int32Array[] {
    const w = this.stride * this.reps;
    return Array.from(this.counts, (n, h) => this.rows.subarray(h * w, h * w + n * this.reps));
  }
}

interface NativeChooser {
  /** Positional (one N-API call per typed array): see native/bindings/block_choose_binding.cc. */
  step(
    params: Float64Array,
    exclude: Int32Array,
    top: Int32Array[],
    prev: Int32Array,
    prevCounts: Int32Array,
    scores: Float32Array[] | undefined,
    out: Int32Array,
    cls: Uint8Array,
    rows: Int32Array,
    counts: Int32Array,
  ): void;
}

interface Addon {
  BlockChooser: new (o: { blocks: number; reps: number; heads: BlockChooserHead[] }) => NativeChooser;
  augmentRows(q: Float32Array, group: number, headDim: number, shares: Float64Array, out: Float32Array): void;
}

const addon = nativeAddon<Addon>();

/** A step's scalars, written before each (synchronous) call. */
const PARAMS = new Float64Array(8);
const NONE = new Int32Array(0);

/**
 * One (document, layer)'s summaries, every kv head: their importance orders
 * held natively (by reference), so a step passes only what changes. A
 * step's call is synchronous: the native flags scratch (one per thread) is
 * never shared between two calls in flight.
 */
export class BlockChooser {
  private readonly native: NativeChooser;

  constructor(
    readonly blocks: number,
    readonly reps: number,
    readonly heads: number,
    summaries: BlockChooserHead[],
  ) {
    this.native = new addon.BlockChooser({ blocks, reps, heads: summaries });
  }

  step(a: BlockStepArgs): BlockStepChoice {
    const H = this.heads, R = this.reps, stride = Math.min(Math.max(a.budget, a.agnostic), this.blocks);
    // The four outputs are views of one buffer: one allocation a step instead of four (each a backing store off
    // V8's heap: ~4.6 against ~2.3 us on the 2-core VM at nosa's 1M shape).
    const n = H * stride, buf = new ArrayBuffer(4 * (n + n * R + H) + n);
    const choice = new BlockStepChoice(new Int32Array(buf, 0, n), new Uint8Array(buf, 4 * (n + n * R + H), n), new Int32Array(buf, 4 * n, n * R), new Int32Array(buf, 4 * (n + n * R), H), stride, R);
    const prev = a.prev, p = PARAMS;
    p[0] = a.reach, p[1] = a.budget, p[2] = a.maxNew === Infinity ? -1 : a.maxNew, p[3] = a.agnostic, p[4] = a.agnosticClass;
    p[5] = a.protectAgnostic ? 1 : 0, p[6] = prev ? prev.stride : 0, p[7] = a.extraScores ? 1 : a.rowScores ? 2 : 0;
    this.native.step(p, a.exclude, a.top, prev ? prev.out : NONE, prev ? prev.counts : NONE, a.extraScores ?? a.rowScores, choice.out, choice.cls, choice.rows, choice.counts);
    return choice;
  }
}

/**
 * The query rows a step scores block summary rows with: row i of q
 * [rows, headDim] as [q_i, shares[i / group] · ‖q_i‖, √headDim, 0 ...] at
 * stride headDim + 8 (a fresh array). The norm is summed in double, in
 * order, and each product rounded to float32 once: what the same loop in JS
 * gives, bit for bit, in one native call.
 */
export function augmentRows(q: Float32Array, group: number, headDim: number, shares: Float64Array): Float32Array {
  const out = new Float32Array((q.length / headDim) * (headDim + 8));
  addon.augmentRows(q, group, headDim, shares, out);
  return out;
}
