// InfiniRetri's chunked reading (arXiv 2502.12962, "Infinite Retrieval"),
// with what the sidecar has standing in for the model. The paper reads a
// long text chunk by chunk; each chunk is read together with the tokens kept
// so far (its cache) and the question, the question tokens' attention over
// cache + chunk (summed over the question's tokens) is smoothed by a 1D
// window over positions, so a phrase scores rather than a lone token, and
// the text around the top tokens is what the cache keeps into the next chunk.
// Here the question's tokens are query rows (the document's prefill queries
// at seal, the session's question at decode), a chunk is a run of key rows,
// and a "phrase" is the ±span positions around a top token.
import { attentionMass } from '../addon/kernels.js';
import type { HeadKeys } from './method.js';

export interface ReadOptions {
  /** Key rows read per chunk. */
  chunk: number;
  /** Half-width of the phrase window: scores are summed over ±span positions and ±span is kept around each top token. */
  span: number;
  /** Tokens the cache holds (the kept set's size). */
  budget: number;
  /** Softmax scale (1/√headDim). */
  scale: number;
}

/** The kept set: ids ranked best first, with the phrase score that kept each. */
export interface Kept {
  ids: Int32Array;
  scores: Float32Array;
}

/**
 * Query rows per attentionMass call: its score matrix is rows × candidates
 * floats, so thousands of prefill rows are summed in slices (the mass is a
 * sum over rows, so slicing changes nothing but rounding).
 */
const ROW_SLICE = 256;

async function massOf(keys: HeadKeys, rows: Float32Array, rowCount: number, ids: Int32Array, scale: number): Promise<Float64Array> {
  const d = keys.headDim, total = new Float64Array(ids.length), part = new Float32Array(ids.length);
  for (let r0 = 0; r0 < rowCount; r0 += ROW_SLICE) {
    const n = Math.min(ROW_SLICE, rowCount - r0);
    await attentionMass({ q: rows.subarray(r0 * d, (r0 + n) * d), rows: n, headDim: d, keys: keys.keys, tokens: keys.tokens, dtype: keys.dtype, scale, ids, out: part });
    for (let i = 0; i < ids.length; i++) total[i] += part[i];
  }
  return total;
}

/**
 * The paper's 1D convolution with a ones kernel, over positions: each
 * candidate's score is the mass of the candidates within ±span positions of
 * it (ids ascending, so a sliding window; gaps between kept phrases count as absent tokens).
 */
export function phraseScores(ids: Int32Array, mass: Float64Array, span: number): Float64Array {
  const out = new Float64Array(ids.length);
  let lo = 0, hi = 0, sum = 0;
  for (let i = 0; i < ids.length; i++) {
    while (hi < ids.length && ids[hi] <= ids[i] + span) sum += mass[hi++];
    while (ids[lo] < ids[i] - span) sum -= mass[lo++];
    out[i] = sum;
  }
  return out;
}

/**
 * Reads one kv head's keys in chunks with `rows` as the question. Each
 * chunk: the candidates are the cache (all earlier) plus the chunk; the
 * phrases around the top-scoring candidates, best first, fill the new cache
 * up to the budget. Returns the last cache, best first.
 */
export async function readChunks(keys: HeadKeys, rows: Float32Array, rowCount: number, o: ReadOptions): Promise<Kept> {
  const n = keys.tokens, budget = Math.min(o.budget, n), span = Math.max(0, o.span), chunk = Math.max(1, o.chunk);
  if (budget <= 0 || rowCount === 0) return { ids: new Int32Array(0), scores: new Float32Array(0) };
  let kept: Kept = { ids: new Int32Array(0), scores: new Float32Array(0) };
  for (let c0 = 0; c0 < n; c0 += chunk) {
    const c1 = Math.min(n, c0 + chunk);
    const prior = Int32Array.from(kept.ids).sort();
    const ids = new Int32Array(prior.length + c1 - c0);
    ids.set(prior);
    for (let t = c0; t < c1; t++) ids[prior.length + t - c0] = t;
    const phrase = phraseScores(ids, await massOf(keys, rows, rowCount, ids, o.scale), span);
    const order = Array.from(ids.keys()).sort((a, b) => phrase[b] - phrase[a] || ids[a] - ids[b]);
    const score = new Map<number, number>();
    for (const i of order) {
      if (score.size >= budget) break;
      // The phrase around a top token, within what has been read so far.
      for (let t = Math.max(0, ids[i] - span); t <= Math.min(c1 - 1, ids[i] + span) && score.size < budget; t++) if (!score.has(t)) score.set(t, phrase[i]);
    }
    const entries = [...score].sort((a, b) => b[1] - a[1] || a[0] - b[0]);
    kept = { ids: Int32Array.from(entries, (e) => e[0]), scores: Float32Array.from(entries, (e) => e[1]) };
  }
  return kept;
}
