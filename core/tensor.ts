// Wire tensors: { dtype, shape, data } with raw little-endian row-major bytes.
// Everything is checked here, before any buffer is sized from a shape.
import { convert, firstNonFinite, type FloatDtype, type KvDtype } from '../addon/kernels.js';
import { invalid } from './errors.js';

export type WireDtype = FloatDtype | 'i32';

export interface Tensor {
  dtype: WireDtype;
  shape: number[];
  data: Uint8Array;
}

export interface FloatTensor extends Tensor {
  dtype: FloatDtype;
}

const ELEMENT_BYTES: Record<WireDtype, number> = { f16: 2, bf16: 2, f32: 4, i32: 4 };

export function elementBytes(dtype: WireDtype): number {
  return ELEMENT_BYTES[dtype];
}

function isWireDtype(x: unknown): x is WireDtype {
  return typeof x === 'string' && Object.hasOwn(ELEMENT_BYTES, x);
}

export const FLOAT_DTYPES: readonly WireDtype[] = ['f16', 'bf16', 'f32'];

/**
 * A wire tensor's dtype (one of `allowed`) and shape checked, and the bytes
 * its data must hold: what parseTensor checks before the data, shared with
 * a stream's tensors in shared memory (api/shm.ts), sized before any
 * segment's byte is read.
 */
export function tensorSize(x: unknown, name: string, allowed: readonly WireDtype[] = Object.keys(ELEMENT_BYTES) as WireDtype[]): { dtype: WireDtype; shape: number[]; bytes: number } {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) throw invalid(`${name} must be a tensor {dtype, shape, data}`);
  const o = x as Record<string, unknown>;
  if (!isWireDtype(o.dtype) || !allowed.includes(o.dtype)) throw invalid(`${name}.dtype must be one of ${allowed.join(', ')}, got ${JSON.stringify(o.dtype)}`);
  if (!Array.isArray(o.shape) || o.shape.length > 8) throw invalid(`${name}.shape must be an array of at most 8 sizes`);
  let count = 1;
  for (const s of o.shape) {
    if (typeof s !== 'number' || !Number.isInteger(s) || s < 0) throw invalid(`${name}.shape must hold non-negative integers`);
    count *= s;
    if (count > Number.MAX_SAFE_INTEGER) throw invalid(`${name}.shape declares too many elements`);
  }
  return { dtype: o.dtype, shape: o.shape as number[], bytes: count * ELEMENT_BYTES[o.dtype] };
}

/** Decodes a wire tensor of one of the `allowed` dtypes (named in the refusal); `data` may be bytes (msgpack) or base64 (JSON). */
export function parseTensor(x: unknown, name: string, allowed: readonly WireDtype[] = Object.keys(ELEMENT_BYTES) as WireDtype[]): Tensor {
  const { dtype, shape, bytes: expected } = tensorSize(x, name, allowed);
  const o = x as Record<string, unknown>;
  let data: Uint8Array;
  if (o.data instanceof Uint8Array) data = o.data;
  else if (typeof o.data === 'string') data = Buffer.from(o.data, 'base64');
  // A stream resolves `at` into data (api/shm.ts) before a request gets here: one that still has it came another way.
  else if (o.data === undefined && o.at !== undefined) throw invalid(`${name}.at names bytes in shared memory, which only a stream with a segment attached carries (GET /v1/stream); send data here`);
  else throw invalid(`${name}.data must be binary (or base64 in JSON)`);
  if (data.byteLength !== expected)
    throw invalid(`${name}.data holds ${data.byteLength} bytes, shape [${shape.join(', ')}] of ${dtype} needs ${expected}`);
  return { dtype, shape, data };
}

export function parseFloatTensor(x: unknown, name: string): FloatTensor {
  return parseTensor(x, name, FLOAT_DTYPES) as FloatTensor;
}

export function expectShape(t: Tensor, expected: number[], name: string): void {
  if (t.shape.length !== expected.length || t.shape.some((s, i) => s !== expected[i]))
    throw invalid(`${name} must have shape [${expected.join(', ')}], got [${t.shape.join(', ')}]`);
}

export function elementCount(t: Tensor): number {
  return t.data.byteLength / ELEMENT_BYTES[t.dtype];
}

export function expectFinite(t: FloatTensor, name: string): void {
  const at = firstNonFinite(t.data, t.dtype, elementCount(t));
  if (at >= 0) throw nonFinite(name, at);
}

/** The 422 for a tensor's first NaN or infinite value (found here or by a scan off the event loop). */
export function nonFinite(name: string, at: number): Error {
  return invalid(`${name} holds a NaN or infinite value at flat index ${at}`);
}

/**
 * A finite tensor in the storage dtype `dtype`: itself when already in it,
 * else one conversion, refused (422) where a value does not fit. An f32 or
 * bf16 value past f16's ±65504 (an f32 one past bf16's ~3.4e38) converts to
 * ±Inf, which stored as a key turns every later step over it to NaN or an
 * lse of -Inf; the check is on the converted words, so it matches the
 * rounding exactly (65519 still rounds to 65504).
 */
export function toStorageDtype(t: FloatTensor, dtype: KvDtype, name: string): FloatTensor {
  if (t.dtype === dtype) return t;
  const n = elementCount(t);
  const words = new Uint8Array(n * 2);
  convert(t.data, t.dtype, words, dtype, n);
  const at = firstNonFinite(words, dtype, n);
  if (at >= 0) {
    const value = new Float32Array(1), size = ELEMENT_BYTES[t.dtype];
    convert(t.data.subarray(at * size, (at + 1) * size), t.dtype, new Uint8Array(value.buffer), 'f32', 1);
    if (!Number.isFinite(value[0])) throw nonFinite(name, at);
    throw invalid(`${name} holds ${value[0]} at flat index ${at}, beyond the range of ${dtype} (the model's dtype, in which K and V are stored)`);
  }
  return { dtype, shape: t.shape, data: words };
}

let unalignedF32 = 0;

/**
 * f32 tensors toF32 copied only because their bytes did not start at a
 * multiple of 4 (a client that packs a tensor's data at an unaligned offset
 * of its body; the clients of this repository align them): in /metrics.
 */
export function unalignedF32Copies(): number {
  return unalignedF32;
}

/** The tensor as f32: a view when already f32 and aligned, else one conversion. */
export function toF32(t: FloatTensor): Float32Array {
  const n = elementCount(t);
  if (t.dtype === 'f32') {
    if (t.data.byteOffset % 4 === 0) return new Float32Array(t.data.buffer, t.data.byteOffset, n);
    unalignedF32++;
  }
  const out = new Float32Array(n);
  convert(t.data, t.dtype, new Uint8Array(out.buffer), 'f32', n);
  return out;
}

export function tensorOf(dtype: WireDtype, shape: number[], view: ArrayBufferView): Tensor {
  return { dtype, shape, data: new Uint8Array(view.buffer, view.byteOffset, view.byteLength) };
}
