// An attend request, checked against the session's model: the edge of the
// decode path (everything after it trusts the shapes).
import { invalid } from '../core/errors.js';
import { expectFinite, expectShape, parseFloatTensor, toF32, toStorageDtype, type FloatTensor } from '../core/tensor.js';
import type { ModelShape } from '../core/model.js';
import type { FloatDtype } from '../addon/kernels.js';

/**
 * What an answer carries besides stats: `out` (and lse), the selection, the
 * selected K/V; `timing` adds a device step's host stages to `stats.gpu.host`
 * (ms: queue, prep, launch, wait, copy, back, convert; a bench's question).
 */
export type ReturnPart = 'out' | 'kv' | 'selection' | 'timing';
const RETURN_PARTS: readonly string[] = ['out', 'kv', 'selection', 'timing'];

export interface AttendRequest {
  layer: number;
  /** Sent as f32 or 16-bit (a model holds q in its own dtype); widened exactly to f32 here. */
  q: Float32Array;
  /** The current token's k and v, [kvHeads, headDim] in the model's dtype; appended before attending. */
  k?: FloatTensor;
  v?: FloatTensor;
  scale: number;
  want: Set<ReturnPart>;
  /**
   * The position of the appended token among the session's own tokens (0 =
   * its first); when given, an append that would repeat or skip a token is
   * refused.
   */
  position?: number;
  /**
   * The dtype of the answer's `out`: f32 (the default) or the model's
   * 16-bit dtype (rounded to nearest even from the f32 result), which
   * halves the answer's largest part for a caller that holds activations
   * in that dtype anyway. Absent: f32.
   */
  outDtype?: FloatDtype;
}

/** Checks an attend body against the session's model (the edge of the decode path). */
export function parseAttendRequest(body: Record<string, unknown>, m: ModelShape): AttendRequest {
  const layer = body.layer;
  if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= m.layers)
    throw invalid(`layer must be an integer in [0, ${m.layers - 1}], got ${JSON.stringify(layer)}`);
  const q = parseFloatTensor(body.q, 'q');
  expectShape(q, [m.qHeads, m.headDim], 'q');
  expectFinite(q, 'q');
  let k: FloatTensor | undefined, v: FloatTensor | undefined;
  if ((body.k === undefined) !== (body.v === undefined)) throw invalid('k and v come together or not at all');
  if (body.k !== undefined) {
    k = parseFloatTensor(body.k, 'k');
    v = parseFloatTensor(body.v, 'v');
    expectShape(k, [m.kvHeads, m.headDim], 'k');
    expectShape(v, [m.kvHeads, m.headDim], 'v');
    expectFinite(k, 'k');
    expectFinite(v, 'v');
    // Stored in the model's dtype: a value it cannot hold is refused here, before the append.
    k = toStorageDtype(k, m.dtype, 'k');
    v = toStorageDtype(v, m.dtype, 'v');
  }
  const scale = body.scale ?? 1 / Math.sqrt(m.headDim);
  if (typeof scale !== 'number' || !Number.isFinite(scale) || scale <= 0) throw invalid('scale must be a positive number');
  const ret = body.return ?? ['out'];
  if (!Array.isArray(ret) || ret.some((r) => typeof r !== 'string' || !RETURN_PARTS.includes(r)))
    throw invalid(`return must be a list of ${RETURN_PARTS.map((r) => `"${r}"`).join(', ')}`);
  const position = body.position;
  if (position !== undefined) {
    if (typeof position !== 'number' || !Number.isInteger(position) || position < 0) throw invalid('position must be a non-negative integer');
    if (!k) throw invalid('position names the appended token: send k and v with it');
  }
  const outDtype: unknown = body.outDtype ?? 'f32';
  if (outDtype !== 'f32' && outDtype !== m.dtype)
    throw invalid(`outDtype must be "f32" or the model's dtype "${m.dtype}", got ${JSON.stringify(outDtype)}`);
  return { layer, q: toF32(q), k, v, scale, want: new Set(ret as ReturnPart[]), ...(position !== undefined && { position }), outDtype: outDtype as FloatDtype };
}
