// Checks a kv upload ({layer, start, k, v, q?}) against a model shape.
import type { ModelShape } from './model.js';
import { invalid } from './errors.js';
import { expectFinite, expectShape, parseFloatTensor, type FloatTensor } from './tensor.js';

export interface KvUpload {
  layer: number;
  start: number;
  tokens: number;
  k: FloatTensor;
  v: FloatTensor;
  q?: FloatTensor;
}

export function parseKvUpload(body: Record<string, unknown>, model: ModelShape): KvUpload {
  const layer = body.layer;
  if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= model.layers)
    throw invalid(`layer must be an integer in [0, ${model.layers - 1}], got ${JSON.stringify(layer)}`);
  const start = body.start;
  if (typeof start !== 'number' || !Number.isInteger(start) || start < 0)
    throw invalid(`start must be a non-negative integer, got ${JSON.stringify(start)}`);
  const k = parseFloatTensor(body.k, 'k');
  const v = parseFloatTensor(body.v, 'v');
  const n = k.shape[1] ?? 0;
  expectShape(k, [model.kvHeads, n, model.headDim], 'k');
  expectShape(v, [model.kvHeads, n, model.headDim], 'v');
  if (n === 0) throw invalid('k and v must hold at least one token');
  expectFinite(k, 'k');
  expectFinite(v, 'v');
  let q: FloatTensor | undefined;
  if (body.q !== undefined && body.q !== null) {
    q = parseFloatTensor(body.q, 'q');
    expectShape(q, [model.qHeads, n, model.headDim], 'q');
    expectFinite(q, 'q');
  }
  return { layer, start, tokens: n, k, v, q };
}
