// A running batch's step as whole arrays: KvrecallStream.attendStacked
// (issue #14), the Python client's Stream.attend_stacked (kvrecall.stacked).
//
// An LLM server steps its running batch together: one layer, n sessions, q
// as one array [n, qHeads, d], the new token's k and v as [n, kvHeads, d],
// their positions as n integers. Through the stream's shared-memory segment
// (clients/ts/shm.ts) that is one stacked frame (api/stacked.ts):
//
//   {id, layer, sessions, q: {dtype, shape: [n, qHeads, d], at}, k?, v?,
//    positions?: {dtype: i32, shape: [n], at}, outDtype?, into}
//
// made once per form (the sessions in order, dtypes, shapes: StackedPlan);
// a call writes q, k, v and the positions into the segment (one pwritev),
// sends the frame, and reads the answer's out [n, qHeads, d] and lse [n,
// qHeads] back (one preadv) into the caller's arrays, or new ones. A frame
// carries no tensor bytes either way. A failed step is listed in `errors`
// as [index, code, message] and its rows are NaN, so a caller who ignores
// `errors` uses no stale rows. Without mmap the caller cannot be handed the
// segment's own arrays (the Python client's stacked_inputs): the one copy
// each way is the kernel's, from and into the caller's arrays.
//
// Without a segment, or where the batch does not fit it, the same call goes
// as attendBatch's steps in bytes and its results are stacked the same way:
// the same answers, bit for bit.
import type { BatchResult, BatchStep, FloatDtype, OutArray, Tensor } from './client.js';
import { align4, type ShmFile } from './shm.js';

export interface StackedOptions {
  /** out in the model's 16-bit dtype (its words, rounded to nearest even) instead of f32. */
  outDtype?: FloatDtype;
  /** [n, qHeads, d] in outDtype (a Float32Array for f32, a Uint16Array for f16 and bf16): the answer is read into it. With lse. */
  out?: OutArray;
  /** [n, qHeads]: the answer's lse is read into it. With out. */
  lse?: Float32Array;
  /** Every row's softmax scale (the server's default, 1/sqrt(d), when absent): a positive finite number. */
  scale?: number;
}

/** A failed step: its index among the sessions, the error's code and message (as a batch step's error). */
export type StackedError = [index: number, code: string, message: string];

export interface StackedReply<Out extends OutArray = Float32Array> {
  /** [n, qHeads, d], row-major: the caller's out when given, else an array of its own. A failed step's rows are NaN. */
  out: Out;
  outDtype: FloatDtype;
  /** [n, qHeads]: the caller's lse when given. */
  lse: Float32Array;
  /** The steps that failed, in order (the others are answered); [] when none did. */
  errors: StackedError[];
  /** The server's time for the whole batch. */
  ms?: number;
}

/** The array the options' outDtype brings back (by keyof: options without outDtype share no property with {outDtype?}, which a conditional type would take as not matching). */
export type StackedOut<O> = 'outDtype' extends keyof O ? OutFor<O['outDtype' & keyof O]> : Float32Array;
type OutFor<D> = [D] extends ['f16' | 'bf16'] ? Uint16Array : [D] extends ['f32' | undefined] ? Float32Array : OutArray;

/** A call's arguments, checked: its form and sizes. */
export interface StackedCall {
  key: string;
  sessions: readonly string[];
  layer: number;
  n: number;
  qHeads: number;
  d: number;
  q: Tensor;
  kv?: { k: Tensor; v: Tensor };
  positions?: Int32Array;
  outDtype: FloatDtype;
  /** Whether the frame names an outDtype (the server's default, f32, otherwise). */
  asked: boolean;
  scale?: number;
}

const FLOATS: readonly string[] = ['f32', 'f16', 'bf16'];
const BYTES: Record<string, number> = { f32: 4, f16: 2, bf16: 2 };
/** A failed step's out words: NaN in the dtype (f16 0x7e00, bf16 0x7fc0). */
const NAN16: Record<string, number> = { f16: 0x7e00, bf16: 0x7fc0 };
const PAD = new Uint8Array(4);

function desc(t: unknown): string {
  if (typeof t !== 'object' || t === null) return typeof t;
  const x = t as Partial<Tensor>;
  return `${String(x.dtype)} [${Array.isArray(x.shape) ? x.shape.join(', ') : '?'}]`;
}

/** A float tensor [n, heads, d] whose data holds exactly its bytes. */
function stackedTensor(t: Tensor | undefined, name: string, n: number, d?: number): t is Tensor {
  const want = `a tensor f32, f16 or bf16 [n=${n}, heads, d${d === undefined ? '' : `=${d}`}]`;
  if (typeof t !== 'object' || t === null || !FLOATS.includes(t.dtype) || !Array.isArray(t.shape) || t.shape.length !== 3) throw new TypeError(`${name} must be ${want}, got ${desc(t)}`);
  const [rows, heads, dim] = t.shape;
  if (rows !== n || !(Number.isInteger(heads) && heads > 0) || !(Number.isInteger(dim) && dim > 0) || (d !== undefined && dim !== d)) throw new TypeError(`${name} must be ${want}, got ${desc(t)}`);
  if (!(t.data instanceof Uint8Array) || t.data.byteLength !== n * heads * dim * BYTES[t.dtype]) throw new TypeError(`${name}.data must hold its ${n * heads * dim * BYTES[t.dtype]} bytes, got ${t.data?.byteLength}`);
  return true;
}

/** The call's arguments checked (a TypeError or RangeError for any that cannot be this batch, before anything is sent). */
export function checkStacked(layer: number, sessions: readonly string[], q: Tensor, k: Tensor | undefined, v: Tensor | undefined, positions: Int32Array | readonly number[] | undefined, opts: StackedOptions): StackedCall {
  if (!Number.isSafeInteger(layer) || layer < 0) throw new TypeError(`layer must be a non-negative integer, got ${layer}`);
  if (!Array.isArray(sessions) || sessions.length === 0) throw new TypeError('sessions must be a non-empty array of session ids');
  for (const s of sessions) if (typeof s !== 'string') throw new TypeError(`a session id is a string, got ${typeof s}`);
  const n = sessions.length;
  stackedTensor(q, 'q', n);
  const [, qHeads, d] = q.shape;
  if ((k === undefined) !== (v === undefined)) throw new TypeError('k and v come together');
  let kv: StackedCall['kv'];
  if (k && v) {
    stackedTensor(k, 'k', n, d);
    stackedTensor(v, 'v', n, d);
    if (v.dtype !== k.dtype || v.shape[1] !== k.shape[1]) throw new TypeError(`v must be of k's dtype and shape (${desc(k)}), got ${desc(v)}`);
    kv = { k, v };
  }
  let pos: Int32Array | undefined;
  if (positions !== undefined) {
    if (!kv) throw new TypeError('positions are those of appended k and v: give k and v');
    if (!(positions instanceof Int32Array) && !Array.isArray(positions)) throw new TypeError('positions must be an Int32Array or an array of integers');
    if (positions.length !== n) throw new TypeError(`positions must be ${n} integers, got ${positions.length}`);
    for (let i = 0; i < n; i++) {
      const p = positions[i];
      if (!Number.isInteger(p) || p < 0 || p > 0x7fffffff) throw new RangeError(`positions must be integers in [0, 2^31), got ${p} at ${i}`);
    }
    pos = positions instanceof Int32Array ? positions : Int32Array.from(positions);
  }
  const outDtype = opts.outDtype ?? 'f32';
  if (!FLOATS.includes(outDtype)) throw new TypeError(`outDtype must be f32, f16 or bf16, got ${String(outDtype)}`);
  if ((opts.out === undefined) !== (opts.lse === undefined)) throw new TypeError('out and lse come together (or neither: new arrays)');
  if (opts.out !== undefined) {
    const Type = outDtype === 'f32' ? Float32Array : Uint16Array;
    if (!(opts.out instanceof Type) || opts.out.length !== n * qHeads * d) throw new TypeError(`out must be a ${Type.name} of ${n * qHeads * d} (${n} x ${qHeads} x ${d}) for outDtype ${outDtype}`);
    if (!(opts.lse instanceof Float32Array) || opts.lse.length !== n * qHeads) throw new TypeError(`lse must be a Float32Array of ${n * qHeads} (${n} x ${qHeads})`);
  }
  const scale = opts.scale;
  if (scale !== undefined && (typeof scale !== 'number' || !Number.isFinite(scale) || scale <= 0)) throw new TypeError(`scale must be a positive finite number, got ${String(scale)}`);
  const form = [layer, q.dtype, qHeads, d, kv ? `${kv.k.dtype}:${kv.k.shape[1]}` : '', pos ? 1 : 0, opts.outDtype ?? '', n, scale ?? ''].join('|');
  return { key: form + '\0' + sessions.join('\0'), sessions, layer, n, qHeads, d, q, kv, positions: pos, outDtype, asked: opts.outDtype !== undefined, ...(scale !== undefined && { scale }) };
}

/**
 * A stacked batch's frame, made once per form, and its layout in the
 * segment: q, k, v, positions from 0 (each at a multiple of 4), then out's
 * rows from `into`, then lse's at the next multiple of 4.
 */
export class StackedPlan {
  /** The request's body (its id set per call). */
  readonly body: Record<string, unknown>;
  readonly fits: boolean;
  private readonly sessions: readonly string[];
  private readonly kAt: number;
  private readonly vAt: number;
  private readonly posAt: number;
  private readonly into: number;
  private readonly lseAt: number;
  private readonly outBytes: number;

  constructor(c: StackedCall, segmentBytes: number) {
    const { n, qHeads, d } = c;
    this.sessions = c.sessions.slice();
    const kvBytes = c.kv ? n * c.kv.k.shape[1] * d * BYTES[c.kv.k.dtype] : 0;
    this.kAt = align4(n * qHeads * d * BYTES[c.q.dtype]);
    this.vAt = align4(this.kAt + kvBytes);
    this.posAt = align4(this.vAt + kvBytes);
    this.into = this.posAt + (c.positions ? 4 * n : 0);
    this.outBytes = n * qHeads * d * BYTES[c.outDtype];
    this.lseAt = align4(this.into + this.outBytes);
    this.fits = this.lseAt + 4 * n * qHeads <= segmentBytes;
    // The id first (set per call): a server that keeps the forms of stacked frames (api/stacked.ts) knows one by its bytes after the id.
    const body: Record<string, unknown> = { id: 0, layer: c.layer, sessions: this.sessions, q: { dtype: c.q.dtype, shape: [n, qHeads, d], at: 0 } };
    if (c.kv) {
      const shape = [n, c.kv.k.shape[1], d];
      body.k = { dtype: c.kv.k.dtype, shape, at: this.kAt };
      body.v = { dtype: c.kv.k.dtype, shape, at: this.vAt };
    }
    if (c.positions) body.positions = { dtype: 'i32', shape: [n], at: this.posAt };
    if (c.asked) body.outDtype = c.outDtype;
    if (c.scale !== undefined) body.scale = c.scale;
    body.into = this.into;
    this.body = body;
  }

  /** Whether this plan was made for these sessions (a key can be shared by ids that hold its separator). */
  serves(sessions: readonly string[]): boolean {
    if (sessions.length !== this.sessions.length) return false;
    for (let i = 0; i < sessions.length; i++) if (sessions[i] !== this.sessions[i]) return false;
    return true;
  }

  /** The call's q, k, v and positions into the segment, in one pwritev. */
  write(seg: ShmFile, c: StackedCall): void {
    const parts: NodeJS.ArrayBufferView[] = [c.q.data];
    const pad = (at: number) => at > 0 && parts.push(PAD.subarray(0, at));
    if (c.kv) {
      pad(this.kAt - c.q.data.byteLength);
      parts.push(c.kv.k.data);
      pad(this.vAt - this.kAt - c.kv.k.data.byteLength);
      parts.push(c.kv.v.data);
      pad(this.posAt - this.vAt - c.kv.v.data.byteLength);
    }
    if (c.positions) parts.push(c.positions);
    seg.write(parts, 0);
  }

  /** The answer frame's out and lse read from the segment (one preadv) into the caller's arrays or new ones; failed steps' rows NaN. */
  read<Out extends OutArray>(seg: ShmFile, frame: Record<string, unknown>, c: StackedCall, out?: OutArray, lse?: Float32Array): StackedReply<Out> {
    const { n, qHeads, d, outDtype } = c;
    const o = frame.out as { dtype?: unknown; shape?: unknown; at?: unknown } | undefined;
    const l = frame.lse as { at?: unknown } | undefined;
    if (o?.at !== this.into || o.dtype !== outDtype || l?.at !== this.lseAt || !sameShape(o.shape, n, qHeads, d))
      throw new Error(`stream: a stacked answer not where it was asked (out ${JSON.stringify(o)}, lse ${JSON.stringify(l)})`);
    const outs = out ?? newOut(outDtype, n * qHeads * d);
    const lses = lse ?? new Float32Array(Buffer.allocUnsafeSlow(4 * n * qHeads).buffer, 0, n * qHeads);
    const gap = this.lseAt - this.into - this.outBytes;
    seg.read(gap > 0 ? [outs, PAD.subarray(0, gap), lses] : [outs, lses], this.into);
    const errors = stepErrors(frame.errors);
    for (const [i] of errors) nanRows(outs, lses, outDtype, i, qHeads, d);
    const stats = frame.stats as { ms?: unknown } | undefined;
    return { out: outs as Out, outDtype, lse: lses, errors, ...(typeof stats?.ms === 'number' && { ms: stats.ms }) };
  }
}

function sameShape(shape: unknown, n: number, heads: number, d: number): boolean {
  return Array.isArray(shape) && shape.length === 3 && shape[0] === n && shape[1] === heads && shape[2] === d;
}

/** An uninitialised array of `count` (every element is read into it). */
function newOut(dtype: FloatDtype, count: number): OutArray {
  return dtype === 'f32' ? new Float32Array(Buffer.allocUnsafeSlow(4 * count).buffer, 0, count) : new Uint16Array(Buffer.allocUnsafeSlow(2 * count).buffer, 0, count);
}

function nanRows(out: OutArray, lse: Float32Array, dtype: FloatDtype, i: number, heads: number, d: number): void {
  const row = heads * d;
  if (out instanceof Float32Array) out.fill(NaN, i * row, (i + 1) * row);
  else out.fill(NAN16[dtype], i * row, (i + 1) * row);
  lse.fill(NaN, i * heads, (i + 1) * heads);
}

function stepErrors(x: unknown): StackedError[] {
  if (x === undefined) return [];
  if (!Array.isArray(x)) throw new Error('stream: a stacked answer whose errors are not a list');
  return x.map((e) => {
    if (!Array.isArray(e) || typeof e[0] !== 'number') throw new Error('stream: a stacked answer with a malformed error');
    return [e[0], String(e[1]), String(e[2])] as StackedError;
  });
}

/** The call as attendBatch's steps (each tensor a view of its row: no copy). */
export function stackedSteps(c: StackedCall): BatchStep[] {
  const row = (t: Tensor, i: number): Tensor => {
    const bytes = t.data.byteLength / c.n;
    return { dtype: t.dtype, shape: t.shape.slice(1), data: t.data.subarray(i * bytes, (i + 1) * bytes) };
  };
  return c.sessions.map((session, i) => {
    const step: BatchStep = { session, q: row(c.q, i) };
    if (c.kv) {
      step.k = row(c.kv.k, i);
      step.v = row(c.kv.v, i);
    }
    if (c.positions) step.position = c.positions[i];
    if (c.asked) step.outDtype = c.outDtype;
    if (c.scale !== undefined) step.scale = c.scale;
    return step;
  });
}

/** attendBatch's results stacked as a stacked answer: into the caller's arrays or new ones, failed steps named and NaN. */
export function stackResults<Out extends OutArray>(results: BatchResult<OutArray>[] & { ms?: number }, c: StackedCall, out?: OutArray, lse?: Float32Array): StackedReply<Out> {
  const { n, qHeads, d, outDtype } = c;
  const outs = out ?? newOut(outDtype, n * qHeads * d);
  const lses = lse ?? new Float32Array(n * qHeads);
  const errors: StackedError[] = [];
  results.forEach((r, i) => {
    if ('error' in r) {
      errors.push([i, r.error.code, r.error.message]);
      nanRows(outs, lses, outDtype, i, qHeads, d);
      return;
    }
    if (r.out.length !== qHeads * d || (r.out instanceof Float32Array) !== (outs instanceof Float32Array)) throw new Error(`stream: step ${i}'s out is not [${qHeads}, ${d}] ${outDtype}`);
    outs.set(r.out, i * qHeads * d);
    lses.set(r.lse, i * qHeads);
  });
  return { out: outs as Out, outDtype, lse: lses, errors, ...(results.ms !== undefined && { ms: results.ms }) };
}
