// A batch's answer `{id?, results: [{out, lse, stats}, ...], stats: {ms}}`,
// and one attend's `{id?, out, lse, stats}`, packed straight into their frame: the same bytes as packParts() of the
// answer objects (core/msgpack-parts.ts: the same forms, keys in the same
// order, tensor data at offsets that are multiples of 4), without building
// those objects, walking them, or joining parts.
//
// Why: on the 2-core VM, from a batch's end (32 steps over 4K tokens) to
// its answer frame ready to write took 0.30 ms (f16 out) to 0.39 ms (f32)
// p50 with the answer objects, packParts and the join: the batch had
// streamed 32 × 16 MB of K/V through the caches, so every object and page
// touched after it misses, and the generic packer touches each step's
// answer, tensor, shape and stats objects and its parts. Here a first pass
// sizes the frame (arithmetic over the steps) and a second writes it,
// reading each step's out once: 0.27 and 0.30 ms
// (bench/results/transport-vm-batch-trace.md).
//
// Only the common answer is packed here: every step fulfilled, without
// selection or kv, stats of numbers and short ASCII strings, an id that is
// absent, a number or a short ASCII string. Anything else returns
// undefined and goes through packParts().
import type { AttendAnswer } from '../engine/sessions.js';

/** A frame packed on demand: its length known, its bytes written by fill() into the room given (at least byteLength bytes). */
export class PackedFrame {
  constructor(
    readonly byteLength: number,
    readonly fill: (target: Uint8Array) => void,
  ) {}
}

/** Keys and strings written char by char: ASCII and short enough for a fixstr. */
const shortAscii = (s: string) => {
  if (s.length > 31) return false;
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) >= 0x80) return false;
  return true;
};

/** The step's out as the answer sends it: f32 as computed, or its 16-bit words (rounded in the step). */
function outBytes(r: AttendAnswer): Uint8Array | undefined {
  const a = r.outDtype === 'f32' ? r.out : r.outWords;
  return a && new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** A step's stats as [key, value] pairs, undefined values left out (as packParts leaves them); undefined when this file does not write this step's answer. */
function plainStats(r: AttendAnswer): [string, number | string][] | undefined {
  if (r.selection || r.kv || !outBytes(r) || !shortAscii(r.outDtype)) return undefined;
  const pairs: [string, number | string][] = [];
  for (const [k, v] of Object.entries(r.stats)) {
    if (v === undefined) continue;
    if (!shortAscii(k) || (typeof v !== 'number' && !(typeof v === 'string' && shortAscii(v)))) return undefined;
    pairs.push([k, v]);
  }
  return pairs;
}

/** Scratch for a float64's big-endian bytes. */
const f64 = new Float64Array(1);
const f64Bytes = new Uint8Array(f64.buffer);

/**
 * Writes msgpack forms at `at`, or only counts their bytes when `buf` is
 * undefined (the sizing pass): both passes run the same code, so the size
 * is the bytes written.
 */
class Sink {
  at = 0;

  constructor(private readonly buf?: Uint8Array) {}

  u8(x: number): void {
    if (this.buf) this.buf[this.at] = x;
    this.at++;
  }

  /** A tag and an unsigned (or two's complement) big-endian integer of 1, 2 or 4 bytes. */
  tag(tag: number, bytes: 1 | 2 | 4, x: number): void {
    const b = this.buf;
    if (b) {
      const at = this.at;
      b[at] = tag;
      if (bytes === 1) b[at + 1] = x;
      else if (bytes === 2) {
        b[at + 1] = x >>> 8;
        b[at + 2] = x;
      } else {
        b[at + 1] = x >>> 24;
        b[at + 2] = x >>> 16;
        b[at + 3] = x >>> 8;
        b[at + 4] = x;
      }
    }
    this.at += 1 + bytes;
  }

  /** A tag and 8 bytes: a float64, or a 64-bit integer (two's complement). */
  tag8(tag: number, x: number, float: boolean): void {
    const b = this.buf;
    if (b) {
      b[this.at] = tag;
      if (float) {
        f64[0] = x;
        for (let i = 0; i < 8; i++) b[this.at + 1 + i] = f64Bytes[7 - i];
      } else {
        let v = BigInt.asUintN(64, BigInt(x));
        for (let i = 8; i >= 1; i--, v >>= 8n) b[this.at + i] = Number(v & 0xffn);
      }
    }
    this.at += 9;
  }

  /** An ASCII string of at most 31 chars (a fixstr), or one `wider` form up (1: str8, 2: str16) as packParts widens tensor keys. */
  str(s: string, wider: 0 | 1 | 2 = 0): void {
    const n = s.length;
    if (wider === 0) this.u8(0xa0 | n);
    else this.tag(wider === 1 ? 0xd9 : 0xda, wider, n);
    const b = this.buf;
    if (b) for (let i = 0, at = this.at; i < n; i++) b[at + i] = s.charCodeAt(i);
    this.at += n;
  }

  /** packParts' number: safe integers in their smallest form, anything else float64. */
  num(x: number): void {
    if (!Number.isSafeInteger(x)) return this.tag8(0xcb, x, true);
    if (x >= 0) {
      if (x < 0x80) this.u8(x);
      else if (x < 0x100) this.tag(0xcc, 1, x);
      else if (x < 0x10000) this.tag(0xcd, 2, x);
      else if (x < 0x100000000) this.tag(0xce, 4, x);
      else this.tag8(0xcf, x, false);
    } else if (x >= -32) this.u8(x & 0xff);
    else if (x >= -0x80) this.tag(0xd0, 1, x & 0xff);
    else if (x >= -0x8000) this.tag(0xd1, 2, x & 0xffff);
    else if (x >= -0x80000000) this.tag(0xd2, 4, x >>> 0);
    else this.tag8(0xd3, x, false);
  }

  /** A map or array header of n entries (fixmap/fixarray up to 15). */
  head(n: number, fix: number, tag16: number, tag32: number): void {
    if (n <= 15) this.u8(fix | n);
    else if (n < 0x10000) this.tag(tag16, 2, n);
    else this.tag(tag32, 4, n);
  }

  /** A wire tensor {dtype, shape: [a] or [a, b], data} laid out as packParts lays it out: data at a multiple of 4. */
  tensor(dtype: string, a: number, b: number | undefined, data: Uint8Array): void {
    this.u8(0x83);
    this.str('dtype');
    this.str(dtype);
    const dim = (s: number) => (s < 0x80 ? 1 : s < 0x100 ? 2 : s < 0x10000 ? 3 : 5);
    const shapeBytes = 1 + dim(a) + (b === undefined ? 0 : dim(b));
    const n = data.byteLength;
    const before = this.at + 6 + shapeBytes + 5 + (n < 0x100 ? 2 : n < 0x10000 ? 3 : 5);
    const pad = (4 - (before % 4)) % 4;
    this.str('shape', pad === 3 ? 1 : 0);
    this.u8(b === undefined ? 0x91 : 0x92);
    this.num(a);
    if (b !== undefined) this.num(b);
    this.str('data', (pad === 3 ? 2 : pad) as 0 | 1 | 2);
    if (n < 0x100) this.tag(0xc4, 1, n);
    else if (n < 0x10000) this.tag(0xc5, 2, n);
    else this.tag(0xc6, 4, n);
    if (this.buf) this.buf.set(data, this.at);
    this.at += n;
  }

  /** A map of numbers and short ASCII strings. */
  flat(pairs: [string, number | string][]): void {
    this.head(pairs.length, 0x80, 0xde, 0xdf);
    for (const [k, v] of pairs) {
      this.str(k);
      if (typeof v === 'number') this.num(v);
      else this.str(v);
    }
  }
}

/** One step's answer `{out, lse, stats}` (after its map header, which the caller writes with any keys before these). */
function writeStep(sink: Sink, r: AttendAnswer, stats: [string, number | string][]): void {
  sink.str('out');
  sink.tensor(r.outDtype, r.model.qHeads, r.model.headDim, outBytes(r)!);
  sink.str('lse');
  sink.tensor('f32', r.model.qHeads, undefined, new Uint8Array(r.lse.buffer, r.lse.byteOffset, r.lse.byteLength));
  sink.str('stats');
  sink.flat(stats);
}

/** An id as packParts writes it (the caller has checked it is a number or a short ASCII string). */
function writeId(sink: Sink, id: unknown): void {
  sink.str('id');
  if (typeof id === 'number') sink.num(id);
  else sink.str(id as string);
}

function write(sink: Sink, id: unknown, results: AttendAnswer[], stats: [string, number | string][][], ms: number): void {
  sink.u8(id === undefined ? 0x82 : 0x83);
  if (id !== undefined) writeId(sink, id);
  sink.str('results');
  sink.head(results.length, 0x90, 0xdc, 0xdd);
  for (let i = 0; i < results.length; i++) {
    sink.u8(0x83);
    writeStep(sink, results[i], stats[i]);
  }
  sink.str('stats');
  sink.u8(0x81);
  sink.str('ms');
  sink.num(ms);
}

/** Whether packParts would write this id as this file writes it (absent, a number, or a short ASCII string). */
const plainId = (id: unknown) => id === undefined || typeof id === 'number' || (typeof id === 'string' && shortAscii(id));

/**
 * One attend's answer frame `{id, out, lse, stats}` (id left out when
 * undefined), the bytes packParts makes of `{id, ...attendAnswer(r)}`, or
 * undefined when the answer is not the common one (selection, kv, stats
 * beyond numbers and short strings, an id of another kind).
 *
 * Why: a single decode step's answer went through the answer object, the
 * spread with its id, packParts (a zeroed 4 KB scratch, the parts) and the
 * join into the frame: 35-50 µs p50 on the 2-core VM after a step over 4K
 * tokens, against ~10 here (bench/results/transport-vm-stream-trace.md).
 */
export function packAttendAnswer(id: unknown, r: AttendAnswer): PackedFrame | undefined {
  if (!plainId(id)) return undefined;
  const stats = plainStats(r);
  if (!stats) return undefined;
  const one = (sink: Sink) => {
    sink.u8(id === undefined ? 0x83 : 0x84);
    if (id !== undefined) writeId(sink, id);
    writeStep(sink, r, stats);
  };
  const size = new Sink();
  one(size);
  return new PackedFrame(size.at, (target) => {
    const sink = new Sink(target);
    one(sink);
    if (sink.at !== size.at) throw new Error(`attend answer: wrote ${sink.at} bytes of ${size.at}`);
  });
}

/**
 * The batch answer frame `{id, results, stats: {ms}}` (id left out when
 * undefined) packed as packParts would pack it, or undefined when a step
 * failed or any part of it is not the common answer.
 */
export function packBatchAnswer(id: unknown, settled: PromiseSettledResult<AttendAnswer>[], ms: number): PackedFrame | undefined {
  if (!plainId(id)) return undefined;
  // Anything but a number goes the general way, which refuses what it cannot pack (the stream then closes with 1011).
  if (typeof ms !== 'number') return undefined;
  const results: AttendAnswer[] = [], stats: [string, number | string][][] = [];
  for (const r of settled) {
    const pairs = r.status === 'fulfilled' ? plainStats(r.value) : undefined;
    if (!pairs) return undefined;
    results.push((r as PromiseFulfilledResult<AttendAnswer>).value);
    stats.push(pairs);
  }
  const size = new Sink();
  write(size, id, results, stats, ms);
  return new PackedFrame(size.at, (target) => {
    const sink = new Sink(target);
    write(sink, id, results, stats, ms);
    if (sink.at !== size.at) throw new Error(`batch answer: wrote ${sink.at} bytes of ${size.at}`);
  });
}
