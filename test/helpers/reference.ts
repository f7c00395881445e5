// Dense attention in float64, straight from the definition, over K/V given
// as decoded numbers per kv head ([tokens][d] flattened).
export interface Reference {
  out: Float64Array; // [qHeads, d]
  lse: Float64Array; // [qHeads]
}

export function referenceAttention(
  q: ArrayLike<number>, // [qHeads, d]
  k: Float64Array[], // per kv head [n, d]
  v: Float64Array[],
  qHeads: number,
  d: number,
  scale = 1 / Math.sqrt(d),
  rows?: number[][], // per kv head: which rows to attend (default all)
): Reference {
  const kvHeads = k.length, G = qHeads / kvHeads;
  const out = new Float64Array(qHeads * d), lse = new Float64Array(qHeads);
  for (let qh = 0; qh < qHeads; qh++) {
    const h = Math.floor(qh / G);
    const n = k[h].length / d;
    const ids = rows ? rows[h] : Array.from({ length: n }, (_, i) => i);
    const s = ids.map((t) => {
      let dot = 0;
      for (let j = 0; j < d; j++) dot += q[qh * d + j] * k[h][t * d + j];
      return dot * scale;
    });
    const m = Math.max(...s);
    let z = 0;
    const p = s.map((x) => {
      const e = Math.exp(x - m);
      z += e;
      return e;
    });
    ids.forEach((t, i) => {
      for (let j = 0; j < d; j++) out[qh * d + j] += (p[i] / z) * v[h][t * d + j];
    });
    lse[qh] = m + Math.log(z);
  }
  return { out, lse };
}

/** max over heads of ‖a − b‖ / ‖b‖ per head. */
export function maxRelError(a: ArrayLike<number>, b: ArrayLike<number>, heads: number): number {
  const d = b.length / heads;
  let worst = 0;
  for (let h = 0; h < heads; h++) {
    let num = 0, den = 0;
    for (let j = 0; j < d; j++) {
      num += (a[h * d + j] - b[h * d + j]) ** 2;
      den += b[h * d + j] ** 2;
    }
    worst = Math.max(worst, Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-30));
  }
  return worst;
}

export function maxRelErrorScalar(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let worst = 0;
  for (let i = 0; i < b.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), 1));
  return worst;
}

/**
 * A GQA group's float64 attention over n keys ([n, d] row-major, already
 * widened): each of the G q rows' softmax of scale·q·k, and per key the
 * group's mean probability and its largest logit over the rows (what the
 * graph search's two rankings order by).
 */
export function groupMeanProb(q: Float32Array, G: number, keys: Float64Array, n: number, d: number, scale: number): { meanProb: Float64Array; maxLogit: Float64Array } {
  const meanProb = new Float64Array(n), maxLogit = new Float64Array(n).fill(-Infinity);
  for (let g = 0; g < G; g++) {
    const x = Float64Array.from({ length: n }, (_, t) => {
      let s = 0;
      for (let j = 0; j < d; j++) s += q[g * d + j] * keys[t * d + j];
      return s * scale;
    });
    const m = Math.max(...x);
    let z = 0;
    for (let t = 0; t < n; t++) z += Math.exp(x[t] - m);
    for (let t = 0; t < n; t++) (meanProb[t] += Math.exp(x[t] - m) / z / G), (maxLogit[t] = Math.max(maxLogit[t], x[t]));
  }
  return { meanProb, maxLogit };
}
