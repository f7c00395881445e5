// Typed wrappers around the addon's kernels (addon/addon.ts loads it).
// Tensors cross this boundary as typed arrays, never as JS number arrays,
// and are read in place.
import { nativeAddon } from './addon.js';
import { TurnBudget } from './turn-budget.js';

/** Storage and wire element types, numbered as native/common/half.h's Dtype (the one table on the TS side). */
export const DTYPE_CODE = { f16: 0, bf16: 1, f32: 2 } as const;
export type FloatDtype = keyof typeof DTYPE_CODE;
export type KvDtype = 'f16' | 'bf16';

export interface AttendSegment {
  /** Per kv head: [tokens, headDim] 16-bit words. */
  k: Uint16Array[];
  v: Uint16Array[];
  /** Rows of k and v that hold tokens. */
  tokens: number;
  /** Range attended when `ids` is absent. */
  begin?: number;
  end?: number;
  /** Per kv head: selected rows, each in [0, tokens). */
  ids?: Int32Array[];
}

export interface AttendArgs {
  q: Float32Array;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  dtype: KvDtype;
  scale: number;
  segments: AttendSegment[];
  out: Float32Array;
  lse: Float32Array;
}

export interface TopkArgs {
  q: Float32Array;
  group: number;
  headDim: number;
  keys: Uint16Array;
  tokens: number;
  dtype: KvDtype;
  k: number;
  outIds: Int32Array;
  outScores: Float32Array;
  /** When given ([tokens]), receives every row's score, by row. */
  allScores?: Float32Array;
}

/** One kv head of a topkHeads call: its keys and outputs (as in TopkArgs). */
export interface TopkHead {
  keys: Uint16Array;
  tokens: number;
  /** Scan only these rows of keys (each < tokens); ids written are rows. */
  rows?: Int32Array;
  outIds: Int32Array;
  outScores: Float32Array;
  allScores?: Float32Array;
}

export interface TopkHeadsArgs {
  /** [heads.length * group, headDim]: head h scores with rows h*group .. (h+1)*group. */
  q: Float32Array;
  group: number;
  headDim: number;
  dtype: KvDtype;
  k: number;
  heads: TopkHead[];
}

export interface AttentionMassArgs {
  /** Query rows [rows, headDim]. */
  q: Float32Array;
  rows: number;
  headDim: number;
  keys: Uint16Array;
  tokens: number;
  dtype: KvDtype;
  scale: number;
  /** Candidate rows of keys; out[i] is the mass paid to ids[i]. */
  ids: Int32Array;
  out: Float32Array;
}

interface Addon {
  threads: number;
  convert(a: { src: Uint8Array; from: number; dst: Uint8Array; to: number; count: number }): void;
  firstNonFinite(a: { src: Uint8Array; dtype: number; count: number }): number;
  prefault(a: ArrayBufferView[]): Promise<boolean>;
  collapseHugePages(a: ArrayBufferView[]): Promise<number>;
  attend(a: Omit<AttendArgs, 'dtype'> & { dtype: number }): Promise<void>;
  attendSync(a: Omit<AttendArgs, 'dtype'> & { dtype: number }): Error | undefined;
  topk(a: Omit<TopkArgs, 'dtype'> & { dtype: number }): Promise<number>;
  topkHeads(a: Omit<TopkHeadsArgs, 'dtype'> & { dtype: number }): Promise<number[]>;
  attentionMass(a: Omit<AttentionMassArgs, 'dtype'> & { dtype: number }): Promise<void>;
  outlierScores(a: { keys: Uint16Array; dtype: number; tokens: number; headDim: number; out: Float32Array }): Promise<void>;
  checksum64(bytes: Uint8Array): bigint;
}

const addon = nativeAddon<Addon>();

/** Worker threads the native kernels use (the machine's cores). */
export const nativeThreads = addon.threads;

export function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Converts `count` values between dtypes; src and dst are raw bytes at any alignment. */
export function convert(src: Uint8Array, from: FloatDtype, dst: Uint8Array, to: FloatDtype, count: number): void {
  addon.convert({ src, from: DTYPE_CODE[from], dst, to: DTYPE_CODE[to], count });
}

/** The first `count` (default: all) 16-bit storage words widened to float32. */
export function widenWords(words: Uint16Array, dtype: KvDtype, count = words.length): Float32Array {
  const out = new Float32Array(count);
  convert(new Uint8Array(words.buffer, words.byteOffset, count * 2), dtype, new Uint8Array(out.buffer), 'f32', count);
  return out;
}

/** float32 values as 16-bit words of `dtype` (round to nearest even): widenWords' inverse. */
export function narrowWords(values: Float32Array, dtype: KvDtype): Uint16Array {
  const out = new Uint16Array(values.length);
  convert(bytesOf(values), 'f32', new Uint8Array(out.buffer), dtype, values.length);
  return out;
}

/** Index of the first NaN/Inf among `count` values, or -1. */
export function firstNonFinite(src: Uint8Array, dtype: FloatDtype, count: number): number {
  return addon.firstNonFinite({ src, dtype: DTYPE_CODE[dtype], count });
}

/**
 * Faults arrays' pages in on a libuv thread, ahead of the copies that will
 * fill them (a document's K/V): they then run on warm pages. Never changes
 * the contents; resolves false where the kernel cannot do it.
 */
export function prefault(views: ArrayBufferView[]): Promise<boolean> {
  return addon.prefault(views);
}

/**
 * The 2 MiB-aligned part of each array collapsed into 2 MiB pages now, on a
 * libuv thread (Linux 6.1+; the contents unchanged): resolves the bytes
 * collapsed, 0 where the kernel cannot. For measurements only
 * (bench/ra-search-layer.ts --huge-keys: the graph search's random key rows
 * without a TLB miss each); the engine does not call it.
 */
export function collapseHugePages(views: ArrayBufferView[]): Promise<number> {
  return addon.collapseHugePages(views);
}

/**
 * An attend's work: rows attended over every kv head × q heads per kv head ×
 * headDim (multiply-adds of its scores, and as many of its sum).
 */
export function attendWork(args: Pick<AttendArgs, 'qHeads' | 'kvHeads' | 'headDim' | 'segments'>): number {
  let rows = 0;
  for (const s of args.segments)
    if (s.ids) for (const ids of s.ids) rows += ids.length;
    else rows += ((s.end ?? s.tokens) - (s.begin ?? 0)) * args.kvHeads;
  return (rows * args.qHeads * args.headDim) / args.kvHeads;
}

/**
 * Work (attendWork) an event-loop turn may run on its own thread. An attend
 * on libuv's pool costs two cross-thread wake-ups (the pool thread's, then
 * the loop's), 17 µs a round trip back to back and ~100 µs after the
 * process idled 5-25 ms on the 2-core VM (a decode step comes after the
 * LLM's own work); a short step runs on the loop's thread instead. The cap
 * bounds how long one turn keeps other requests waiting, a batch's steps
 * together: past it they go to the pool, and so does a step while another
 * attend runs there (steps of different sessions overlap).
 */
export const ATTEND_SYNC_WORK = 2 ** 23;
/** attendWork run on the loop's thread a turn (addon/turn-budget.ts: the rule GPU calls share). */
const budget = new TurnBudget(ATTEND_SYNC_WORK);
const RESOLVED = Promise.resolve();
/** How many attends ran on the event loop's thread and how many on libuv's pool, so far in this process. */
export function attendRuns(): { loop: number; pool: number } {
  return budget.runs();
}

/** Sets attend's per-turn cap on work run on the loop's thread (0: every attend on libuv's pool; default ATTEND_SYNC_WORK). */
export function setAttendSyncWork(work: number): void {
  budget.cap = work;
}

/**
 * Exact attention over the segments, combined by log-sum-exp; fills out and lse. Arguments it refuses throw (on either thread).
 *
 * `beside`: the caller runs this attend beside a call that will hold the loop's thread (a GPU wave step waiting for its stream
 * there, engine/wave-on-device.ts), so it goes to libuv's pool, where it runs while that call waits, rather than inline after it.
 */
export function attend(args: AttendArgs, beside = false): Promise<void> {
  const a = { ...args, dtype: DTYPE_CODE[args.dtype] };
  if (!beside && budget.open()) {
    const work = attendWork(args);
    if (budget.fits(work)) {
      budget.charge(work);
      // Arguments refused throw here, as on the pool's way; the kernel's own failure rejects, as there.
      const failed = addon.attendSync(a);
      budget.ranOnLoop();
      return failed ? Promise.reject(failed) : RESOLVED;
    }
  }
  return budget.pooled(addon.attend(a));
}

/** Top-k keys by max over the group of q·k; returns how many were written. */
export function topk(args: TopkArgs): Promise<number> {
  return addon.topk({ ...args, dtype: DTYPE_CODE[args.dtype] });
}

/** topk for every kv head in one native call; resolves to the count written per head. */
export function topkHeads(args: TopkHeadsArgs): Promise<number[]> {
  return addon.topkHeads({ ...args, dtype: DTYPE_CODE[args.dtype] });
}

/** Σ over query rows of each row's softmax over the candidates (InfiniRetri's token score). */
export function attentionMass(args: AttentionMassArgs): Promise<void> {
  return addon.attentionMass({ ...args, dtype: DTYPE_CODE[args.dtype] });
}

/**
 * How far each key stands out from its head's keys channel by channel,
 * Σ_c (k_c − μ_c)² / σ_c² (native/kernels/outlier_scores.h), into out [tokens].
 */
export function outlierScores(keys: Uint16Array, dtype: KvDtype, tokens: number, headDim: number, out: Float32Array): Promise<void> {
  return addon.outlierScores({ keys, dtype: DTYPE_CODE[dtype], tokens, headDim, out });
}

/** The 64-bit checksum of the native artifacts (native/common/checksum.h's Checksum64) over `bytes`. */
export function checksum64(bytes: Uint8Array): bigint {
  return addon.checksum64(bytes);
}
