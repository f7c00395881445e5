// How much of the estimate's second-order term a kv head gets, calibrated
// at build from the document's prefill queries.
//
// The term s²/2·Σ_j q_j²·var_j is the Gaussian moment along q with the
// channels taken independent. Where keys vary in correlated channels (a
// real model's later layers) it overstates the spread along q and the rest
// of the context gets too much mass: on kvrecall-code-13M (8K bytes, the
// exact top-2.5% plus sinks and window, clusters of 8, float64) the full
// term raised layers 3–5's error from 0.011/0.022/0.009 (first order) to
// 0.065/0.033/0.055 while half of it gave 0.009/0.009/0.005 (each cluster's
// true mass: 0.007/0.006/0.003); on the generator the full term is best
// (0.015 against 0.020 for half). So each head takes the share of
// VARIANCE_SHARES that answers its own prefill queries best: a few query
// rows over a few segments, the whole clusters that hold their top tokens
// attended exactly, the rest estimated, the output compared with exact
// attention over the same tokens. Without prefill queries, DEFAULT_SHARE.
import { widenWords } from '../../addon/kernels.js';
import { rowDots, weightedRowSums } from '../../addon/wave-build.js';
import type { BuildInput } from '../method.js';
import { decodeVarRows, type MomentCodes } from './moment-code.js';
import { kthLargest } from './select-kth.js';

export const VARIANCE_SHARES = [0, 0.25, 0.5, 0.75, 1];
export const DEFAULT_SHARE = 0.5;
/** Query rows and segments the calibration reads (its cost: rows × segments × segmentTokens × headDim × 2 multiply-adds). */
const ROWS = 16;
const SEGMENTS = 4;
/** The exact share the calibration stands in for: the tokens of highest score, their clusters whole. */
const EXACT_SHARE = 0.02;

/** The clusters a build made, in float32 (the moments coded), and the token range of each segment's clusters. */
export interface BuiltClusters {
  headDim: number;
  stride: number;
  centroids: Float32Array;
  /** The coded moments: the calibration reads the variances they decode to (what the estimate reads), for its segments only. */
  moments: MomentCodes;
  valueMeans: Float32Array;
  counts: Int32Array;
  tokenCluster: Int32Array;
  /** Per segment: [first token, end token, first cluster, end cluster). */
  segments: [number, number, number, number][];
}

/** Evenly spaced picks of `want` out of `n`. */
const spread = (n: number, want: number) => Array.from({ length: Math.min(n, want) }, (_, i) => Math.floor(((i + 0.5) * n) / Math.min(n, want)));

/**
 * Each share's error summed over the calibration's rows and segments (the
 * calibration's choice is the least; tests compare them with the
 * TypeScript loops' bit for bit). The float64 sums over tokens, channels and
 * clusters run in the addon (native/kernels/wave_build.h), each in the order
 * the loop over one row gave it; the exponentials and the top-token cut stay
 * here (Math.exp's values are V8's, not the C library's).
 */
export function calibrationErrors(input: BuildInput, c: BuiltClusters): Float64Array {
  const d = c.headDim, stride = c.stride, s = 1 / Math.sqrt(d);
  const S = VARIANCE_SHARES.length, errors = new Float64Array(S);
  const rows = spread(input.queryCount, ROWS), R = rows.length;
  // The rows and their squares in float64 (exact: what q[j] and q[j]·q[j] were in the sums).
  const Q = new Float64Array(R * d), Q2 = new Float64Array(R * d);
  rows.forEach((r, i) => Q.set(input.queries.subarray(r * d, (r + 1) * d), i * d));
  for (let i = 0; i < R * d; i++) Q2[i] = Q[i] * Q[i];
  const W = new Float64Array(R * d), NE = new Float64Array(R * d), want = new Float64Array(d);
  const GOT = new Float64Array(S * d), DEN = new Float64Array(S);
  const { centroids, valueMeans, counts } = c;
  for (const si of spread(c.segments.length, SEGMENTS)) {
    const [t0, t1, c0, c1] = c.segments[si];
    const n = t1 - t0, K = c1 - c0;
    const keys = widenWords(input.keys.subarray(t0 * d, t1 * d), input.dtype);
    const values = widenWords(input.values!.subarray(t0 * d, t1 * d), input.dtype);
    const vars = decodeVarRows(c.moments, d, c0, c1);
    const tokenCluster = c.tokenCluster.subarray(t0, t1);
    const L = new Float64Array(R * n), P = new Float64Array(R * n), M = new Uint8Array(R * n), scratch = new Float64Array(n);
    const exact = new Uint8Array(R * K), m = new Float64Array(R), denAll = new Float64Array(R), denExact = new Float64Array(R);
    rowDots(Q, R, d, keys, n, d, s, L);
    for (let r = 0; r < R; r++) {
      const logits = L.subarray(r * n, (r + 1) * n), p = P.subarray(r * n, (r + 1) * n), ex = exact.subarray(r * K, (r + 1) * K);
      let mr = -Infinity;
      for (let t = 0; t < n; t++) mr = Math.max(mr, logits[t]);
      m[r] = mr;
      // The top tokens' clusters are attended exactly, whole: those above the
      // top-th logit, then those equal to it from the lowest position (the
      // prefix a stable sort by descending logit gives). A logit that is NaN
      // or +Infinity (or all -Infinity) makes m non-finite and every share's
      // error NaN whatever is exact (share 0 then, as before).
      const top = Math.max(1, Math.ceil(EXACT_SHARE * n));
      if (Number.isFinite(mr)) {
        scratch.set(logits);
        const cut = kthLargest(scratch, n, top);
        let left = top;
        for (let t = 0; t < n; t++) if (logits[t] > cut) (ex[tokenCluster[t] - c0] = 1), left--;
        for (let t = 0; t < n && left > 0; t++) if (logits[t] === cut) (ex[tokenCluster[t] - c0] = 1), left--;
      }
      let den = 0, denEx = 0;
      for (let t = 0; t < n; t++) {
        const pt = Math.exp(logits[t] - mr);
        p[t] = pt;
        den += pt;
        if ((M[r * n + t] = ex[tokenCluster[t] - c0]) === 1) denEx += pt;
      }
      denAll[r] = den;
      denExact[r] = denEx;
    }
    W.fill(0);
    weightedRowSums(P, undefined, R, n, values, d, d, W);
    NE.fill(0);
    weightedRowSums(P, M, R, n, values, d, d, NE);
    // Per row and cluster: q·centroid and Σ q_j²·var_j.
    const A = new Float64Array(R * K), B = new Float64Array(R * K);
    rowDots(Q, R, d, centroids.subarray(c0 * stride), K, stride, 1, A);
    rowDots(Q2, R, d, vars, K, d, 1, B);
    const WS = new Float64Array(S * K), MS = new Uint8Array(S * K);
    for (let r = 0; r < R; r++) {
      const ex = exact.subarray(r * K, (r + 1) * K), mr = m[r];
      for (let j = 0; j < d; j++) want[j] = W[r * d + j] / denAll[r];
      let qn = 0;
      for (let j = 0; j < d; j++) qn += Q[r * d + j] * Q[r * d + j];
      qn = Math.sqrt(qn);
      let ref = 0;
      for (let j = 0; j < d; j++) ref += want[j] * want[j];
      // Every share's estimate: the exact clusters' sums, then the others' weights, in cluster order.
      for (let i = 0; i < S; i++) (DEN[i] = denExact[r]), GOT.set(NE.subarray(r * d, (r + 1) * d), i * d);
      for (let k = 0; k < K; k++) {
        const a = A[r * K + k], base = s * a, second = 0.5 * s * s * B[r * K + k], cap = s * (a + qn * centroids[(c0 + k) * stride + d]);
        for (let i = 0; i < S; i++) {
          if ((MS[i * K + k] = 1 - ex[k]) === 0) continue;
          const w = counts[c0 + k] * Math.exp(Math.min(base + VARIANCE_SHARES[i] * second, cap) - mr);
          DEN[i] += w;
          WS[i * K + k] = w;
        }
      }
      weightedRowSums(WS, MS, S, K, valueMeans.subarray(c0 * d), d, d, GOT);
      for (let i = 0; i < S; i++) {
        let e = 0;
        for (let j = 0; j < d; j++) e += (GOT[i * d + j] / DEN[i] - want[j]) ** 2;
        errors[i] += Math.sqrt(e / Math.max(ref, 1e-30));
      }
    }
  }
  return errors;
}

export function calibrateVarianceShare(input: BuildInput, c: BuiltClusters): number {
  if (input.queryCount === 0 || !input.values) return DEFAULT_SHARE;
  const errors = calibrationErrors(input, c);
  let best = 0;
  for (let i = 1; i < errors.length; i++) if (errors[i] < errors[best]) best = i;
  return VARIANCE_SHARES[best];
}
