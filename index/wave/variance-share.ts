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
import type { BuildInput } from '../method.js';

export const VARIANCE_SHARES = [0, 0.25, 0.5, 0.75, 1];
export const DEFAULT_SHARE = 0.5;
/** Query rows and segments the calibration reads (its cost: rows × segments × segmentTokens × headDim × 2 multiply-adds). */
const ROWS = 16;
const SEGMENTS = 4;
/** The exact share the calibration stands in for: the tokens of highest score, their clusters whole. */
const EXACT_SHARE = 0.02;

/** The clusters a build made, in float32, and the token range of each segment's clusters. */
export interface BuiltClusters {
  headDim: number;
  stride: number;
  centroids: Float32Array;
  keyVars: Float32Array;
  valueMeans: Float32Array;
  counts: Int32Array;
  tokenCluster: Int32Array;
  /** Per segment: [first token, end token, first cluster, end cluster). */
  segments: [number, number, number, number][];
}

/** Evenly spaced picks of `want` out of `n`. */
const spread = (n: number, want: number) => Array.from({ length: Math.min(n, want) }, (_, i) => Math.floor(((i + 0.5) * n) / Math.min(n, want)));

export function calibrateVarianceShare(input: BuildInput, c: BuiltClusters): number {
  if (input.queryCount === 0 || !input.values) return DEFAULT_SHARE;
  const d = c.headDim, stride = c.stride, s = 1 / Math.sqrt(d);
  const errors = new Float64Array(VARIANCE_SHARES.length);
  const rows = spread(input.queryCount, ROWS);
  for (const si of spread(c.segments.length, SEGMENTS)) {
    const [t0, t1, c0, c1] = c.segments[si];
    const keys = widenWords(input.keys.subarray(t0 * d, t1 * d), input.dtype);
    const values = widenWords(input.values.subarray(t0 * d, t1 * d), input.dtype);
    const n = t1 - t0, logits = new Float64Array(n), exact = new Uint8Array(c1 - c0);
    const want = new Float64Array(d), got = new Float64Array(d), numExact = new Float64Array(d);
    const base = new Float64Array(c1 - c0), second = new Float64Array(c1 - c0), cap = new Float64Array(c1 - c0);
    for (const r of rows) {
      const q = input.queries.subarray(r * d, (r + 1) * d);
      let m = -Infinity;
      for (let t = 0; t < n; t++) {
        let x = 0;
        for (let j = 0; j < d; j++) x += q[j] * keys[t * d + j];
        logits[t] = s * x;
        m = Math.max(m, logits[t]);
      }
      // The top tokens' clusters are attended exactly, whole.
      const top = Math.max(1, Math.ceil(EXACT_SHARE * n));
      const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
      exact.fill(0);
      for (let i = 0; i < top; i++) exact[c.tokenCluster[t0 + order[i]] - c0] = 1;
      want.fill(0);
      numExact.fill(0);
      let denAll = 0, denExact = 0;
      for (let t = 0; t < n; t++) {
        const p = Math.exp(logits[t] - m);
        denAll += p;
        const isExact = exact[c.tokenCluster[t0 + t] - c0] === 1;
        if (isExact) denExact += p;
        for (let j = 0; j < d; j++) {
          want[j] += p * values[t * d + j];
          if (isExact) numExact[j] += p * values[t * d + j];
        }
      }
      for (let j = 0; j < d; j++) want[j] /= denAll;
      let qn = 0;
      for (let j = 0; j < d; j++) qn += q[j] * q[j];
      qn = Math.sqrt(qn);
      for (let k = c0; k < c1; k++) {
        let a = 0, b = 0;
        for (let j = 0; j < d; j++) (a += q[j] * c.centroids[k * stride + j]), (b += q[j] * q[j] * c.keyVars[k * d + j]);
        base[k - c0] = s * a;
        second[k - c0] = 0.5 * s * s * b;
        cap[k - c0] = s * (a + qn * c.centroids[k * stride + d]);
      }
      let ref = 0;
      for (let j = 0; j < d; j++) ref += want[j] * want[j];
      VARIANCE_SHARES.forEach((share, i) => {
        got.set(numExact);
        let den = denExact;
        for (let k = c0; k < c1; k++) {
          if (exact[k - c0]) continue;
          const w = c.counts[k] * Math.exp(Math.min(base[k - c0] + share * second[k - c0], cap[k - c0]) - m);
          den += w;
          for (let j = 0; j < d; j++) got[j] += w * c.valueMeans[k * d + j];
        }
        let e = 0;
        for (let j = 0; j < d; j++) e += (got[j] / den - want[j]) ** 2;
        errors[i] += Math.sqrt(e / Math.max(ref, 1e-30));
      });
    }
  }
  let best = 0;
  for (let i = 1; i < errors.length; i++) if (errors[i] < errors[best]) best = i;
  return VARIANCE_SHARES[best];
}
