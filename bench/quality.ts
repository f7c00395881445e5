// Retrieval quality against exact attention (DESIGN.md, "Quality metrics"),
// for one kv head group: the decode query rows of the heads that share a kv
// head, that head's keys and values, and a selected token set S shared by the
// group. Probabilities are computed in float64 from keys widened once to f32
// (the storage values exactly), so the metrics do not inherit the kernels'
// rounding:
//   attention recall = Σ_{i∈S} p_i, averaged over the group's heads;
//   top-k recall     = |S ∩ exact top-k of head h| / k, averaged over heads;
//   output error     = ‖o_S − o‖ / ‖o‖ per head (o_S: attention renormalised
//                      over S), averaged over heads (max also reported).
// S is what attention would read, so it should already hold the static set
// (sinks + recent window) when comparing with a full pipeline. The oracle at
// a count m is the m tokens with the highest mean probability over the
// group's heads: the set of size m that maximises the (head-averaged)
// attention recall. Duplicate ids in S count once; ids must lie in
// [0, tokens).
import { attend, bytesOf, convert, type KvDtype } from '../addon/kernels.js';

const widened = new WeakMap<Uint16Array, Float32Array>();

/** Storage-dtype words widened to f32 (exact), cached per array. */
export function widen(bits: Uint16Array, dtype: KvDtype): Float32Array {
  const hit = widened.get(bits);
  if (hit) return hit;
  const out = new Float32Array(bits.length);
  convert(bytesOf(bits), dtype, bytesOf(out), 'f32', bits.length);
  widened.set(bits, out);
  return out;
}

export interface ExactAttention {
  /** Query rows (heads of the group). */
  heads: number;
  tokens: number;
  headDim: number;
  scale: number;
  /** Per head: attention probabilities over all tokens. */
  probs: Float64Array[];
  /** Per head: log-sum-exp of the scaled scores. */
  lse: Float64Array;
  /** Per head: raw scores q·k (unscaled), kept for inner-product rankings. */
  scores: Float64Array[];
  /** Widened values [tokens, headDim], for outputs over subsets. */
  values: Float32Array;
  /** Exact outputs [heads, headDim]; empty when built with outputs: false (see exactOutput). */
  out: Float64Array;
}

export interface ExactOptions {
  headDim: number;
  /** Default 1/√headDim. */
  scale?: number;
  /** Storage dtype when keys/values are given as 16-bit words (default f16). */
  dtype?: KvDtype;
  /** Attend only tokens [0, tokens) (default: all rows of keys). */
  tokens?: number;
  /** Compute the exact outputs now (default true); exactOutput() does it later on demand. */
  outputs?: boolean;
}

/**
 * Exact attention of `heads` query rows q [heads, d] over keys/values
 * ([tokens, d], storage words or f32), in float64.
 */
export function exactAttention(
  q: Float32Array,
  heads: number,
  keys: Uint16Array | Float32Array,
  values: Uint16Array | Float32Array,
  opts: ExactOptions,
): ExactAttention {
  const d = opts.headDim, dtype = opts.dtype ?? 'f16';
  const K = keys instanceof Float32Array ? keys : widen(keys, dtype);
  const V = values instanceof Float32Array ? values : widen(values, dtype);
  const tokens = opts.tokens ?? K.length / d;
  if (!Number.isInteger(tokens) || tokens < 1 || tokens * d > K.length || tokens * d > V.length)
    throw new RangeError(`exactAttention: ${tokens} tokens do not fit keys/values of length ${K.length}/${V.length}`);
  if (q.length < heads * d) throw new RangeError('exactAttention: q is shorter than heads × headDim');
  const scale = opts.scale ?? 1 / Math.sqrt(d);
  const scores = Array.from({ length: heads }, () => new Float64Array(tokens));
  // Four query rows per pass over the keys (zero rows pad the last block).
  const blocks = Math.ceil(heads / 4);
  const qd = new Float64Array(blocks * 4 * d);
  for (let i = 0; i < heads * d; i++) qd[i] = q[i];
  for (let b = 0; b < blocks; b++) scoreBlock(qd, b * 4 * d, K, tokens, d, scores, b * 4, heads);
  const probs: Float64Array[] = [], lse = new Float64Array(heads);
  for (let h = 0; h < heads; h++) {
    const s = scores[h], p = new Float64Array(tokens);
    let m = -Infinity;
    for (let t = 0; t < tokens; t++) m = Math.max(m, s[t] * scale);
    let z = 0;
    for (let t = 0; t < tokens; t++) z += p[t] = Math.exp(s[t] * scale - m);
    for (let t = 0; t < tokens; t++) p[t] /= z;
    lse[h] = m + Math.log(z);
    probs.push(p);
  }
  const ex: ExactAttention = { heads, tokens, headDim: d, scale, probs, lse, scores, values: V, out: new Float64Array(0) };
  if (opts.outputs !== false) exactOutput(ex);
  return ex;
}

/** q·k for rows [h0, h0 + 4) of q (at qb) against every key, into scores. */
function scoreBlock(q: Float64Array, qb: number, K: Float32Array, tokens: number, d: number, scores: Float64Array[], h0: number, heads: number): void {
  const s0 = scores[h0], s1 = h0 + 1 < heads ? scores[h0 + 1] : undefined;
  const s2 = h0 + 2 < heads ? scores[h0 + 2] : undefined, s3 = h0 + 3 < heads ? scores[h0 + 3] : undefined;
  const q1 = qb + d, q2 = qb + 2 * d, q3 = qb + 3 * d;
  for (let t = 0, kb = 0; t < tokens; t++, kb += d) {
    let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (let j = 0; j < d; j++) {
      const x = K[kb + j];
      a0 += q[qb + j] * x;
      a1 += q[q1 + j] * x;
      a2 += q[q2 + j] * x;
      a3 += q[q3 + j] * x;
    }
    s0[t] = a0;
    if (s1) s1[t] = a1;
    if (s2) s2[t] = a2;
    if (s3) s3[t] = a3;
  }
}

/** The exact outputs Σ_t p_t v_t per head [heads, d] (computed once, kept in ex.out). */
export function exactOutput(ex: ExactAttention): Float64Array {
  if (ex.out.length === ex.heads * ex.headDim) return ex.out;
  const d = ex.headDim, V = ex.values, out = new Float64Array(ex.heads * d);
  for (let h = 0; h < ex.heads; h++) {
    const p = ex.probs[h], ob = h * d;
    for (let t = 0; t < ex.tokens; t++) {
      const w = p[t];
      if (w === 0) continue;
      const vb = t * d;
      for (let j = 0; j < d; j++) out[ob + j] += w * V[vb + j];
    }
  }
  ex.out = out;
  return out;
}

/** S as distinct ids in [0, tokens), in first-seen order. */
export function distinctIds(S: Int32Array, tokens: number): Int32Array {
  const seen = new Uint8Array(tokens);
  const out = new Int32Array(S.length);
  let n = 0;
  for (let i = 0; i < S.length; i++) {
    const t = S[i];
    if (!(t >= 0 && t < tokens)) throw new RangeError(`selection id ${t} is outside [0, ${tokens})`);
    if (!seen[t]) {
      seen[t] = 1;
      out[n++] = t;
    }
  }
  return out.subarray(0, n);
}

/** The k largest entries of x (ties: lower index first), best first. */
export function topKIndices(x: Float64Array, k: number): Int32Array {
  const n = x.length;
  k = Math.max(0, Math.min(k, n));
  if (k === 0) return new Int32Array(0);
  // Min-heap of the best k by (value desc, index asc); root = worst kept.
  const heap = new Int32Array(k);
  let size = 0;
  const worse = (a: number, b: number) => x[a] < x[b] || (x[a] === x[b] && a > b);
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < size && worse(heap[l], heap[m])) m = l;
      if (r < size && worse(heap[r], heap[m])) m = r;
      if (m === i) return;
      const t = heap[i];
      heap[i] = heap[m];
      heap[m] = t;
      i = m;
    }
  };
  for (let i = 0; i < n; i++) {
    if (size < k) {
      let j = size++;
      heap[j] = i;
      while (j > 0) {
        const p = (j - 1) >> 1;
        if (!worse(heap[j], heap[p])) break;
        const t = heap[j];
        heap[j] = heap[p];
        heap[p] = t;
        j = p;
      }
    } else if (worse(heap[0], i)) {
      heap[0] = i;
      siftDown(0);
    }
  }
  return Int32Array.from(heap).sort((a, b) => (x[b] - x[a]) || a - b);
}

/** Rank (1 = highest) of token t in x. */
export function rankOf(x: Float64Array, t: number): number {
  let r = 1;
  const v = x[t];
  for (let i = 0; i < x.length; i++) if (x[i] > v || (x[i] === v && i < t)) r++;
  return r;
}

/** Σ_{i∈S} p_i, averaged over the group's heads. */
export function attentionRecall(ex: ExactAttention, S: Int32Array): number {
  const ids = distinctIds(S, ex.tokens);
  let sum = 0;
  for (const p of ex.probs) {
    let m = 0;
    for (let i = 0; i < ids.length; i++) m += p[ids[i]];
    sum += m;
  }
  return sum / ex.heads;
}

/** |S ∩ exact top-k of head h| / k, averaged over heads. */
export function topKRecall(ex: ExactAttention, S: Int32Array, k: number): number {
  const ids = distinctIds(S, ex.tokens);
  const inS = new Uint8Array(ex.tokens);
  for (let i = 0; i < ids.length; i++) inS[ids[i]] = 1;
  const kk = Math.min(k, ex.tokens);
  let sum = 0;
  for (const p of ex.probs) {
    const top = topKIndices(p, kk);
    let hit = 0;
    for (let i = 0; i < top.length; i++) hit += inS[top[i]];
    sum += hit / kk;
  }
  return sum / ex.heads;
}

/** Attention restricted to S and renormalised, per head [heads, d] (zeros where S is empty). */
export function selectedOutput(ex: ExactAttention, S: Int32Array): Float64Array {
  const ids = distinctIds(S, ex.tokens);
  const d = ex.headDim, V = ex.values;
  const out = new Float64Array(ex.heads * d);
  for (let h = 0; h < ex.heads; h++) {
    const p = ex.probs[h], ob = h * d;
    let z = 0;
    for (let i = 0; i < ids.length; i++) {
      const t = ids[i], w = p[t];
      z += w;
      const vb = t * d;
      for (let j = 0; j < d; j++) out[ob + j] += w * V[vb + j];
    }
    if (z > 0) for (let j = 0; j < d; j++) out[ob + j] /= z;
    else if (ids.length > 0) {
      // Every selected probability underflowed: fall back to the scores.
      const s = ex.scores[h];
      let m = -Infinity;
      for (let i = 0; i < ids.length; i++) m = Math.max(m, s[ids[i]] * ex.scale);
      let zz = 0;
      for (let i = 0; i < ids.length; i++) {
        const t = ids[i], w = Math.exp(s[t] * ex.scale - m);
        zz += w;
        for (let j = 0; j < d; j++) out[ob + j] += w * V[t * d + j];
      }
      for (let j = 0; j < d; j++) out[ob + j] /= zz;
    }
  }
  return out;
}

/** Per head ‖a_h − b_h‖ / ‖b_h‖. */
export function relativeErrors(a: ArrayLike<number>, b: ArrayLike<number>, heads: number): Float64Array {
  const d = b.length / heads, e = new Float64Array(heads);
  for (let h = 0; h < heads; h++) {
    let num = 0, den = 0;
    for (let j = 0; j < d; j++) {
      const x = a[h * d + j] - b[h * d + j];
      num += x * x;
      den += b[h * d + j] * b[h * d + j];
    }
    e[h] = den > 0 ? Math.sqrt(num / den) : num > 0 ? Infinity : 0;
  }
  return e;
}

/** ‖o_S − o‖/‖o‖: mean and max over the group's heads. */
export function outputError(ex: ExactAttention, S: Int32Array): { mean: number; max: number } {
  const e = relativeErrors(selectedOutput(ex, S), exactOutput(ex), ex.heads);
  let sum = 0, max = 0;
  for (const x of e) {
    sum += x;
    max = Math.max(max, x);
  }
  return { mean: sum / ex.heads, max };
}

/** Mean probability over the group's heads, per token. */
export function meanProbs(ex: ExactAttention): Float64Array {
  const m = new Float64Array(ex.tokens);
  for (const p of ex.probs) for (let t = 0; t < ex.tokens; t++) m[t] += p[t];
  for (let t = 0; t < ex.tokens; t++) m[t] /= ex.heads;
  return m;
}

/** The oracle selection of `count` tokens: highest mean probability over the group. */
export function oracleSelection(ex: ExactAttention, count: number): Int32Array {
  return topKIndices(meanProbs(ex), count);
}

export interface SelectionQuality {
  /** Distinct tokens selected. */
  count: number;
  attentionRecall: number;
  topKRecall: number;
  /** Mean over heads of ‖o_S − o‖/‖o‖. */
  outputError: number;
  outputErrorMax: number;
}

export function evaluateSelection(ex: ExactAttention, S: Int32Array, k = 100): SelectionQuality {
  const ids = distinctIds(S, ex.tokens);
  const err = outputError(ex, ids);
  return {
    count: ids.length,
    attentionRecall: attentionRecall(ex, ids),
    topKRecall: topKRecall(ex, ids, k),
    outputError: err.mean,
    outputErrorMax: err.max,
  };
}

/** A method's selection and the oracle's at the same count. */
export function compareWithOracle(ex: ExactAttention, S: Int32Array, k = 100): { method: SelectionQuality; oracle: SelectionQuality } {
  const method = evaluateSelection(ex, S, k);
  return { method, oracle: evaluateSelection(ex, oracleSelection(ex, method.count), k) };
}

/**
 * o_S from the native kernel (f32), for one kv head group: q [G, d], the
 * head's storage words, S. A cross-check of selectedOutput and a fast path
 * for large sets; returns out [G, d] and lse [G] (scaled scores).
 */
export async function nativeSelectedOutput(
  q: Float32Array,
  group: number,
  keys: Uint16Array,
  values: Uint16Array,
  S: Int32Array,
  opts: { headDim: number; dtype: KvDtype; scale?: number },
): Promise<{ out: Float32Array; lse: Float32Array }> {
  const d = opts.headDim, tokens = keys.length / d;
  const out = new Float32Array(group * d), lse = new Float32Array(group);
  await attend({
    q: q.subarray(0, group * d),
    qHeads: group,
    kvHeads: 1,
    headDim: d,
    dtype: opts.dtype,
    scale: opts.scale ?? 1 / Math.sqrt(d),
    segments: [{ k: [keys], v: [values], tokens, ids: [distinctIds(S, tokens)] }],
    out,
    lse,
  });
  return { out, lse };
}
