// Checks a kv upload ({layer, start, k, v, q?, queryStride?}) against a model shape, and keeps a document upload's prefill queries.
import type { ModelShape } from '../core/model.js';
import { invalid } from '../core/errors.js';
import { keptTokens } from '../core/query-stride.js';
import { copyChecked } from '../addon/copy-ranges.js';
import { elementBytes, expectFinite, expectShape, nonFinite, parseFloatTensor, toF32, toStorageDtype, type FloatTensor } from '../core/tensor.js';
import type { PrefillQueries } from './document-indexes.js';

export interface KvUpload {
  layer: number;
  start: number;
  tokens: number;
  k: FloatTensor;
  v: FloatTensor;
  /** [qHeads, tokens, d], or with qStride [qHeads, kept, d]: the rows of the kept tokens only. */
  q?: FloatTensor;
  /** Set when q holds only the tokens t with t % qStride == 0 (the document's stride). */
  qStride?: number;
}

/**
 * With `finite` (the default), k and v come back in the model's dtype
 * (toStorageDtype); without it, as sent.
 * `queryStride`: the stride of the route's prefill queries (a document's).
 * With it, a body may declare `queryStride` (it must be that one) and send
 * q for the kept tokens only (or no q where none is kept); without it,
 * `queryStride` is not read. `finite: false` leaves the NaN/Inf scan of
 * k, v and q to the caller (expectUploadFinite, or a checked append).
 */
export function parseKvUpload(body: Record<string, unknown>, model: ModelShape, queryStride?: number, { finite = true } = {}): KvUpload {
  const layer = body.layer;
  if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= model.layers)
    throw invalid(`layer must be an integer in [0, ${model.layers - 1}], got ${JSON.stringify(layer)}`);
  const start = body.start;
  if (typeof start !== 'number' || !Number.isInteger(start) || start < 0)
    throw invalid(`start must be a non-negative integer, got ${JSON.stringify(start)}`);
  let k = parseFloatTensor(body.k, 'k');
  let v = parseFloatTensor(body.v, 'v');
  // n is read from k itself, so a k of the wrong rank would be told a shape made up from its own dims.
  if (k.shape.length !== 3)
    throw invalid(`k must have shape [kvHeads, tokens, headDim] = [${model.kvHeads}, tokens, ${model.headDim}], got [${k.shape.join(', ')}]`);
  const n = k.shape[1];
  expectShape(k, [model.kvHeads, n, model.headDim], 'k');
  expectShape(v, [model.kvHeads, n, model.headDim], 'v');
  if (n === 0) throw invalid('k and v must hold at least one token');
  let qStride: number | undefined;
  if (queryStride !== undefined && body.queryStride !== undefined && body.queryStride !== null) {
    if (body.queryStride !== queryStride)
      throw invalid(`queryStride must be the document's, ${queryStride}, got ${JSON.stringify(body.queryStride)}`);
    qStride = queryStride;
  }
  let q: FloatTensor | undefined;
  if (body.q !== undefined && body.q !== null) {
    q = parseFloatTensor(body.q, 'q');
    const rows = qStride === undefined ? n : keptTokens(start, n, qStride).count;
    expectShape(q, [model.qHeads, rows, model.headDim], qStride === undefined ? 'q' : `q (the ${rows} tokens of ${n} kept at queryStride ${qStride})`);
  }
  if (finite) {
    expectFinite(k, 'k');
    expectFinite(v, 'v');
    if (q) expectFinite(q, 'q');
    // A value the model's dtype cannot hold is refused before anything is stored.
    k = toStorageDtype(k, model.dtype, 'k');
    v = toStorageDtype(v, model.dtype, 'v');
  }
  return { layer, start, tokens: n, k, v, ...(q && { q }), ...(qStride !== undefined && { qStride }) };
}

/**
 * parseKvUpload's NaN/Inf scan of k, v and q (the first found, in that
 * order, refused as it words it), run off the event loop: a 16 MiB body
 * scanned there held up reading the next one.
 */
export async function expectUploadFinite(up: KvUpload): Promise<void> {
  const tensors: [string, FloatTensor][] = [['k', up.k], ['v', up.v], ...(up.q ? [['q', up.q] as [string, FloatTensor]] : [])];
  const first = await copyChecked(tensors.map(([, t]) => ({ src: t.data, dst: null, dtype: t.dtype })));
  const bad = first.findIndex((i) => i >= 0);
  if (bad >= 0) throw nonFinite(tensors[bad][0], first[bad]);
}

/**
 * Keeps an upload's prefill queries of the tokens t with t % stride == 0,
 * converting only those rows to f32.
 */
export function keepQueries(queries: PrefillQueries, up: KvUpload): void {
  const q = up.q!;
  if (up.qStride !== undefined || queries.stride === 1) {
    // q already holds only the kept rows (or every row is kept).
    const rows = q.shape[1];
    if (up.qStride !== undefined) queries.addKept(up.layer, toF32(q), rows);
    else queries.add(up.layer, up.start, toF32(q), up.tokens);
    return;
  }
  const [heads, n, d] = q.shape;
  const { first, count } = keptTokens(up.start, n, queries.stride);
  if (count === 0) return;
  const row = d * elementBytes(q.dtype);
  const picked = new Uint8Array(heads * count * row);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < count; i++) {
      const src = (h * n + first + i * queries.stride) * row;
      picked.set(q.data.subarray(src, src + row), (h * count + i) * row);
    }
  queries.addKept(up.layer, toF32({ dtype: q.dtype, shape: [heads, count, d], data: picked }), count);
}
