// A batch's answer `{id?, results: [{out, lse, stats}, ...], stats: {ms}}`
// (BatchFrame, written step by step as the steps finish) and one attend's
// `{id?, out, lse, stats}` (packAttendAnswer), packed straight into their
// frame: the same bytes as packParts() of the answer objects
// (core/msgpack-parts.ts: the same forms, keys in the same order, tensor
// data at offsets that are multiples of 4), without building those objects,
// walking them, or joining parts.
//
// Why: on the 2-core VM, from a batch's end (32 steps over 4K tokens) to
// its answer frame ready to write took 0.30 ms (f16 out) to 0.39 ms (f32)
// p50 with the answer objects, packParts and the join
// (bench/results/transport-vm-batch-trace.md): the batch had streamed 32 ×
// 16 MB of K/V through the caches, so every object and page touched after
// it misses. A step's stats are read straight from the object (for...in,
// no entries or pairs: Object.entries of the engine's spread-built stats
// cost ~3 µs a step even in a warm loop).
//
// Only the common answer is packed here: every step fulfilled, without
// selection or kv (one attend's may carry its selection), stats of numbers,
// booleans, short ASCII strings and maps of those (the GPU backend's
// stats.gpu, a block pool's stats.blocks), an id that is absent, a number
// or a short ASCII string. Anything else returns undefined and goes
// through packParts().
import type { AttendAnswer, BatchAnswer, Sessions } from '../engine/sessions.js';
import type { Metrics } from './metrics.js';
import { refuseInto, type AnswerRefs, type SharedFrame, type SharedRef } from './shm.js';
import { BufferPool } from '../storage/buffer-pool.js';

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
const outArray = (r: AttendAnswer): Float32Array | Uint16Array | undefined => (r.outDtype === 'f32' ? r.out : r.outWords);

/** Whether this file writes the step's answer: no selection or kv, out in its wire dtype; its stats are checked as they are sized (Sink.stats). */
const plainStep = (r: AttendAnswer) => !r.selection && !r.kv && outArray(r) !== undefined && shortAscii(r.outDtype);

/** An object literal's prototype: for...in then walks only its own keys, in Object.keys' order (packParts' order). */
const plainObject = (o: object) => {
  const p: unknown = Object.getPrototypeOf(o);
  return p === Object.prototype || p === null;
};

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
  tensor(dtype: string, a: number, b: number | undefined, data: Float32Array | Uint16Array | Int32Array): void {
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
    if (this.buf) this.buf.set(new Uint8Array(data.buffer, data.byteOffset, n), this.at);
    this.at += n;
  }

  /** A tensor in shared memory {dtype, shape, at} (api/shm.ts), as packParts packs that map. */
  ref(t: SharedRef): void {
    this.u8(0x83);
    this.str('dtype');
    this.str(t.dtype);
    this.str('shape');
    this.head(t.shape.length, 0x90, 0xdc, 0xdd);
    for (const s of t.shape) this.num(s);
    this.str('at');
    this.num(t.at);
  }

  /**
   * A step's stats: a map of numbers, booleans, short ASCII strings and
   * maps of those (stats.gpu, stats.blocks: without them every answer on
   * the GPU backend, or of a session with a block pool, went through
   * packParts, ~50-60 µs more a call on the 2-core VM after a step over
   * 64K tokens), undefined values left out (as packParts leaves them). Read
   * straight from the object: no entries or pairs built (cold after a
   * batch, they cost ~1 µs a step). False, nothing sure written, when it
   * holds anything else (a nested map packParts would take for a tensor
   * included). Maps nested `nest` deep at most: 0 in a batch's frame, whose
   * room per step is bounded by its count of stats (stepBound).
   */
  stats(s: Record<string, unknown>, nest: number): boolean {
    if (!plainObject(s)) return false;
    let n = 0;
    for (const k in s) if (s[k] !== undefined) n++;
    this.head(n, 0x80, 0xde, 0xdf);
    for (const k in s) {
      const v = s[k];
      if (v === undefined) continue;
      if (!shortAscii(k)) return false;
      this.str(k);
      if (typeof v === 'number') this.num(v);
      else if (typeof v === 'string' && shortAscii(v)) this.str(v);
      else if (typeof v === 'boolean') this.u8(v ? 0xc3 : 0xc2);
      else if (nest > 0 && typeof v === 'object' && v !== null && !('data' in v) && this.stats(v as Record<string, unknown>, nest - 1)) continue;
      else return false;
    }
    return true;
  }
}

/**
 * One step's answer `{out, lse, selection?, stats}` (after its map header,
 * which the caller writes with any keys before these); false when its
 * stats are not plain (maps in them `nest` deep at most). A selection only
 * from packAttendAnswer (a batch's steps have none: plainStep). With
 * `refs`, out and lse were written to shared memory and are named there.
 */
function writeStep(sink: Sink, r: AttendAnswer, nest = 0, refs?: AnswerRefs): boolean {
  sink.str('out');
  if (refs) sink.ref(refs.out);
  else sink.tensor(r.outDtype, r.model.qHeads, r.model.headDim, outArray(r)!);
  sink.str('lse');
  if (refs) sink.ref(refs.lse);
  else sink.tensor('f32', r.model.qHeads, undefined, r.lse);
  if (r.selection) {
    sink.str('selection');
    sink.head(r.selection.length, 0x90, 0xdc, 0xdd);
    for (const ids of r.selection) sink.tensor('i32', ids.length, undefined, ids);
  }
  sink.str('stats');
  return sink.stats(r.stats as unknown as Record<string, unknown>, nest);
}

/** An id as packParts writes it (the caller has checked it is a number or a short ASCII string). */
function writeId(sink: Sink, id: unknown): void {
  sink.str('id');
  if (typeof id === 'number') sink.num(id);
  else sink.str(id as string);
}

/** Whether packParts would write this id as this file writes it (absent, a number, or a short ASCII string). */
const plainId = (id: unknown) => id === undefined || typeof id === 'number' || (typeof id === 'string' && shortAscii(id));

/**
 * One attend's answer frame `{id, out, lse, selection?, stats}` (id left
 * out when undefined), the bytes packParts makes of `{id,
 * ...attendAnswer(r)}`, or undefined when the answer is not the common one
 * (kv, stats beyond numbers, booleans, short strings and maps of those, an
 * id of another kind). A selection (8 kv heads × 10K positions, 0.34 MB, at
 * 1M tokens with a 1% budget) is copied once, straight into the frame.
 *
 * Why: a single decode step's answer went through the answer object, the
 * spread with its id, packParts (a zeroed 4 KB scratch, the parts) and the
 * join into the frame: 35-50 µs p50 on the 2-core VM after a step over 4K
 * tokens, against ~10 here (bench/results/transport-vm-stream-trace.md).
 */
export function packAttendAnswer(id: unknown, r: AttendAnswer, refs?: AnswerRefs): PackedFrame | undefined {
  if (!plainId(id) || r.kv || outArray(r) === undefined || !shortAscii(r.outDtype)) return undefined;
  const one = (sink: Sink) => {
    sink.u8(0x83 + (id === undefined ? 0 : 1) + (r.selection ? 1 : 0));
    if (id !== undefined) writeId(sink, id);
    return writeStep(sink, r, 3, refs);
  };
  // The sizing pass checks what the writing pass writes: both run the same code.
  const size = new Sink();
  if (!one(size)) return undefined;
  return new PackedFrame(size.at, (target) => {
    const sink = new Sink(target);
    one(sink);
    if (sink.at !== size.at) throw new Error(`attend answer: wrote ${sink.at} bytes of ${size.at}`);
  });
}

/**
 * A stacked batch's answer `{id, out, lse, stats: {ms}}` with no failed
 * step (api/stacked.ts), the bytes packParts makes of it; undefined for an
 * id of another kind. Why: packParts and its join cost ~0.1 ms more than
 * this on the 2-core VM after a 32-step batch (its code cold by then).
 */
export function packStackedAnswer(id: unknown, out: SharedRef, lse: SharedRef, ms: number): PackedFrame | undefined {
  if (!plainId(id) || !shortAscii(out.dtype)) return undefined;
  const one = (sink: Sink) => {
    sink.u8(0x83 + (id === undefined ? 0 : 1));
    if (id !== undefined) writeId(sink, id);
    sink.str('out');
    sink.ref(out);
    sink.str('lse');
    sink.ref(lse);
    sink.str('stats');
    sink.u8(0x81);
    sink.str('ms');
    sink.num(ms);
  };
  const size = new Sink();
  one(size);
  return new PackedFrame(size.at, (target) => {
    const sink = new Sink(target);
    one(sink);
  });
}

/**
 * The most bytes a step's answer `{out, lse, stats}` takes besides its
 * tensors' `data` bytes: its map head and keys (16), each tensor's map with
 * a dtype of at most 31 chars, a shape of two 32-bit dims and the widest
 * padded key and bin heads (69 each), the stats' map head (5) and each stat
 * (a key and a string of at most 31 chars: 64).
 */
const stepBound = (dataBytes: number, stats: number) => 16 + 2 * 69 + 5 + 64 * stats + dataBytes;

/** Room kept before a ReadyFrame's payload for its WebSocket header (a server frame's is at most 10 bytes). */
export const HEADER_ROOM = 10;
/** Warm buffers for batch answers (0.27-0.54 MB at 32 steps): a fresh one costs its page faults. */
const frames = new BufferPool(4);

/** A frame's payload written: buf[HEADER_ROOM, HEADER_ROOM + byteLength); release() gives the buffer back once it is sent (or dropped). */
export class ReadyFrame {
  constructor(
    readonly buf: Buffer,
    readonly byteLength: number,
    readonly release: () => void,
  ) {}
}

/**
 * A batch's answer frame `{id, results: [{out, lse, stats}, ...], stats:
 * {ms}}` (id left out when undefined), the bytes packParts makes of the
 * answer objects, written step by
 * step as the steps finish, each while its out, lse and stats are fresh in
 * cache, in order: a step that finishes before one ahead of it waits for
 * it. At the batch's end only the frame's last bytes are left to write.
 *
 * Why: written after the batch, every step's objects and out had been
 * pushed out of the caches by the later steps' K/V (32 × 16 MB over 4K
 * tokens): on the 2-core VM the sizing pass, the fill and the metrics
 * after a batch cost ~0.2-0.3 ms, nearly all of it cache misses. Here
 * each step costs its own sizing and copy while hot, beside the steps
 * still running.
 *
 * Any step that fails or is not the common answer (see the top of this file)
 * leaves the frame unfinished: finish() then answers undefined and the
 * answer goes the general way.
 */
export class BatchFrame {
  private buf?: Buffer;
  /** buf from HEADER_ROOM on: the payload, which positions (and the tensors' padding) count from. */
  private payload?: Uint8Array;
  private at = 0;
  private next = 0;
  private readonly waiting: (AttendAnswer | undefined)[] = [];
  private readonly waitingRefs: (AnswerRefs | undefined)[] = [];
  private broken: boolean;

  constructor(private readonly id: unknown) {
    this.broken = !plainId(id);
  }

  /** Step `i` of `count` has finished with `r` (at most once per step; a step that failed is simply never given); `refs`: its out and lse went to shared memory. */
  step(i: number, count: number, r: AttendAnswer, refs?: AnswerRefs): void {
    if (this.broken) return;
    if (i !== this.next) {
      this.waiting[i] = r;
      this.waitingRefs[i] = refs;
      return;
    }
    try {
      if (i === 0) this.prefix(count, r, refs);
      let w: AttendAnswer | undefined = r;
      while (w !== undefined && !this.broken) {
        this.write(w, this.next === i ? refs : this.waitingRefs[this.next]);
        this.waiting[this.next] = this.waitingRefs[this.next] = undefined;
        w = this.waiting[++this.next];
      }
    } catch {
      // Nothing here should throw (a buffer we cannot take, say): the answer goes the general way.
      this.drop();
    }
  }

  /** The frame with its last bytes written, or undefined (buffer given back) when it is not the common answer of every step. */
  finish(settled: PromiseSettledResult<AttendAnswer>[], ms: number): ReadyFrame | undefined {
    if (this.broken || this.next !== settled.length || settled.length === 0 || typeof ms !== 'number') return void this.drop();
    const tail = (sink: Sink) => {
      sink.str('stats');
      sink.u8(0x81);
      sink.str('ms');
      sink.num(ms);
    };
    if (!this.put(tail)) return void this.drop();
    const buf = this.buf!;
    this.buf = this.payload = undefined;
    this.broken = true;
    return new ReadyFrame(buf, this.at, () => frames.give(buf));
  }

  /** Gives the buffer back; the frame is not finished. */
  drop(): void {
    this.broken = true;
    if (this.buf) frames.give(this.buf);
    this.buf = this.payload = undefined;
    this.waiting.length = this.waitingRefs.length = 0;
  }

  /** The map's head, the id and the results' head, in room taken for `count` steps like the first. */
  private prefix(count: number, first: AttendAnswer, refs?: AnswerRefs): void {
    const head = new Sink();
    this.head(head, count);
    const one = new Sink();
    one.at = head.at;
    if (!plainStep(first)) return this.drop();
    one.u8(0x83);
    if (!writeStep(one, first, 0, refs)) return this.drop();
    // Steps like the first, a little more each for their stats, and the tail: most batches need no second buffer.
    this.room(head.at + count * (one.at - head.at + 32) + 32);
    this.put((sink) => this.head(sink, count));
  }

  private head(sink: Sink, count: number): void {
    sink.u8(this.id === undefined ? 0x82 : 0x83);
    if (this.id !== undefined) writeId(sink, this.id);
    sink.str('results');
    sink.head(count, 0x90, 0xdc, 0xdd);
  }

  /** One step's answer, in one pass (a sizing pass too cost ~2 µs a step): room for the most it can take, then written. */
  private write(r: AttendAnswer, refs: AnswerRefs | undefined): void {
    if (!plainStep(r)) return this.drop();
    let stats = 0;
    for (const _ in r.stats) stats++;
    // A shared tensor's map ({dtype, shape, at}) is within a tensor's bound of 69 bytes, without data.
    this.room(this.at + stepBound(refs ? 0 : outArray(r)!.byteLength + r.lse.byteLength, stats));
    const sink = new Sink(this.payload);
    sink.at = this.at;
    sink.u8(0x83);
    if (!writeStep(sink, r, 0, refs)) return this.drop();
    this.at = sink.at;
  }

  /** Sizes `part` from the current position, makes room for it, writes it; false when it does not write (not the common answer). */
  private put(part: (sink: Sink) => boolean | void): boolean {
    const size = new Sink();
    size.at = this.at;
    if (part(size) === false) return false;
    this.room(size.at);
    const sink = new Sink(this.payload);
    sink.at = this.at;
    part(sink);
    if (sink.at !== size.at) throw new Error(`batch answer: wrote ${sink.at - this.at} bytes of ${size.at - this.at}`);
    this.at = sink.at;
    return true;
  }

  /** A payload of at least n bytes, what is written kept. */
  private room(n: number): void {
    if (this.buf && this.buf.byteLength >= HEADER_ROOM + n) return;
    const next = frames.take(HEADER_ROOM + Math.max(n, 2 * (this.buf?.byteLength ?? 0)));
    if (this.buf) {
      next.set(this.buf.subarray(HEADER_ROOM, HEADER_ROOM + this.at), HEADER_ROOM);
      frames.give(this.buf);
    }
    this.buf = next;
    this.payload = next.subarray(HEADER_ROOM);
  }
}

/**
 * Runs a batch (Sessions.attendBatch) with its answer frame written as its
 * steps finish, each step's time observed in `metrics` there too: the
 * frame when it is the common answer (else undefined: the caller packs the
 * results the general way), the results and the batch's ms. With `shared`
 * (a stream's), each step's tensors given by `at` are read from shared
 * memory and a step with `into` has its out and lse written there as it
 * finishes (`refs`: where, per step).
 */
export async function attendBatchFramed(
  sessions: Sessions,
  body: Record<string, unknown>,
  id: unknown,
  metrics: Metrics,
  shared?: SharedFrame,
): Promise<BatchAnswer & { frame?: ReadyFrame; refs: (AnswerRefs | undefined)[] }> {
  const frame = new BatchFrame(id);
  const into: (number | undefined)[] = [], refs: (AnswerRefs | undefined)[] = [];
  const prepare = shared
    ? (step: Record<string, unknown>, i: number) => {
        shared.resolve(step, STEP_TENSORS);
        const at = shared.claim(step, i, () => sessions.get(step.session as string).model);
        if (at !== undefined) into[i] = at;
      }
    : refuseInto;
  let batch: BatchAnswer;
  try {
    batch = await sessions.attendBatch(
      body,
      (i, count, r) => {
        metrics.observeAttend(r.stats.ms);
        const at = into[i];
        if (at !== undefined) refs[i] = shared!.write(at, r);
        frame.step(i, count, r, refs[i]);
      },
      prepare,
    );
  } catch (e) {
    frame.drop();
    throw e;
  }
  return { ...batch, frame: frame.finish(batch.results, batch.ms), refs };
}

/** An attend's (a step's) tensors that may be in shared memory. */
export const STEP_TENSORS = ['q', 'k', 'v'] as const;
