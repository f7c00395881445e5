// The model shape a document or session is built for.
import type { KvDtype } from '../addon/kernels.js';
import { invalid } from './errors.js';

export interface ModelShape {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Storage dtype of K and V. */
  dtype: KvDtype;
  /** Tokens per storage block (the unit of LMDB records and GPU caching). */
  blockSize: number;
}

export const DEFAULT_BLOCK_SIZE = 64;

function int(o: Record<string, unknown>, key: string, lo: number, hi: number): number {
  const v = o[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi)
    throw invalid(`model.${key} must be an integer in [${lo}, ${hi}], got ${JSON.stringify(v)}`);
  return v;
}

export function parseModel(x: unknown): ModelShape {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) throw invalid('model must be an object');
  const o = x as Record<string, unknown>;
  const dtype = o.dtype ?? 'f16';
  if (dtype !== 'f16' && dtype !== 'bf16') throw invalid(`model.dtype must be "f16" or "bf16", got ${JSON.stringify(dtype)}`);
  const shape: ModelShape = {
    layers: int(o, 'layers', 1, 1024),
    qHeads: int(o, 'qHeads', 1, 1024),
    kvHeads: int(o, 'kvHeads', 1, 1024),
    headDim: int(o, 'headDim', 1, 1024),
    dtype,
    blockSize: o.blockSize === undefined ? DEFAULT_BLOCK_SIZE : int(o, 'blockSize', 1, 1 << 16),
  };
  if (shape.qHeads % shape.kvHeads !== 0)
    throw invalid(`model.qHeads (${shape.qHeads}) must be a multiple of model.kvHeads (${shape.kvHeads})`);
  return shape;
}

export function sameModel(a: ModelShape, b: ModelShape): boolean {
  return (
    a.layers === b.layers &&
    a.qHeads === b.qHeads &&
    a.kvHeads === b.kvHeads &&
    a.headDim === b.headDim &&
    a.dtype === b.dtype
  );
}

export function describeModel(m: ModelShape): string {
  return `${m.layers} layers, ${m.qHeads} q / ${m.kvHeads} kv heads, d=${m.headDim}, ${m.dtype}`;
}
