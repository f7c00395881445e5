// Typed wrapper around the addon's choice of a step's blocks
// (native/bindings/block_choose_binding.cc, native/kernels/block_choose.cc):
// for every kv head at once, the query-agnostic blocks, then the candidates
// in score order keeping the previous step's and bringing in at most
// `maxNew` others, up to the budget; the chosen blocks ascending with their
// pool classes. No per-block work in JS on the decode step's path.
import { nativeAddon } from './addon.js';

export interface BlockChoiceHead {
  /** Candidates by score, best first (ties: lower id). */
  top: Int32Array;
  /** The previous step's blocks, ascending, and their scores this step. */
  prev: Int32Array;
  prevScores: Float32Array;
  /** The query-agnostic blocks to take first, most important first. */
  agnostic: Int32Array;
  /** [blocks]: each block's position in the importance order. */
  importanceRank: Int32Array;
  /** [blocks] scratch, all zero before and after the call. */
  flags: Uint8Array;
}

export interface BlockChoiceArgs {
  blocks: number;
  budget: number;
  /** Blocks outside the previous selection brought in at most (Infinity: no limit; none either on a first step). */
  maxNew: number;
  /** Chosen blocks whose importance rank is below this are pool class 1 (when protectAgnostic), else 0. */
  agnosticClass: number;
  protectAgnostic: boolean;
}

interface Addon {
  chooseBlocks(a: Omit<BlockChoiceArgs, 'maxNew'> & { maxNew: number; heads: (BlockChoiceHead & { out: Int32Array; cls: Uint8Array })[] }): number[];
}

const addon = nativeAddon<Addon>();

/** Per kv head: the chosen blocks (ascending) and their pool classes. */
export function chooseBlocks(heads: BlockChoiceHead[], a: BlockChoiceArgs): { ids: Int32Array[]; priority: Uint8Array[] } {
  const capacity = (h: BlockChoiceHead) => Math.min(Math.max(a.budget, h.agnostic.length), a.blocks);
  const full = heads.map((h) => ({ ...h, out: new Int32Array(capacity(h)), cls: new Uint8Array(capacity(h)) }));
  const counts = addon.chooseBlocks({ ...a, maxNew: a.maxNew === Infinity ? -1 : a.maxNew, heads: full });
  return { ids: full.map((h, i) => h.out.subarray(0, counts[i])), priority: full.map((h, i) => h.cls.subarray(0, counts[i])) };
}
