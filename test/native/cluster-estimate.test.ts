// The estimation kernel against its closed form, in float64: a cluster of n
// tokens with centroid mu and value mean vbar contributes n·e^(s q·mu) to the
// normaliser and e^(s q·mu)·n·vbar to the numerator; exact rows leave their
// cluster's terms, and a cluster covered whole is not estimated at all.
import { describe, expect, it } from 'vitest';
import { estimateClusters } from '../../addon/estimate.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`cluster-estimate: seed ${seed}`);
const toBits = bitsOf('f16'), toValue = valueOf('f16');

function cluster(rng: Rng, C: number, N: number, d: number, stride: number) {
  const centroids = new Uint16Array(C * stride), valueMeans = new Uint16Array(C * d), values = new Uint16Array(N * d);
  for (let c = 0; c < C; c++) for (let j = 0; j < d; j++) (centroids[c * stride + j] = toBits(rng.normal())), (valueMeans[c * d + j] = toBits(rng.normal()));
  for (let i = 0; i < N * d; i++) values[i] = toBits(rng.normal());
  const tokenCluster = Int32Array.from({ length: N }, (_, t) => t % C);
  const counts = new Int32Array(C);
  for (const c of tokenCluster) counts[c]++;
  return { centroids, valueMeans, values, tokenCluster, counts, clusters: C, tokens: N };
}

describe('estimateClusters', () => {
  it('equals the closed form, with exact rows removed from their clusters and whole clusters skipped', async () => {
    const rng = new Rng(seed);
    const d = 24, stride = 32, C = 7, N = 61, qHeads = 6, kvHeads = 2, G = 3, scale = 0.3;
    const heads = [cluster(rng, C, N, d, stride), cluster(rng, C, N, d, stride)];
    // Head 0: rows 0 and 7 (cluster 0, partly), every row of cluster 3 (skipped whole). Head 1: none.
    const whole3 = Int32Array.from({ length: N }, (_, t) => t).filter((t) => t % C === 3);
    const exact = [Int32Array.from([0, 7, ...whole3, 7]), new Int32Array(0)];
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(kvHeads);
    await estimateClusters({ q, qHeads, kvHeads, headDim: d, centroidStride: stride, dtype: 'f16', scale, segments: [heads.map((h, i) => ({ ...h, exact: exact[i] }))], out, lse, estimated });
    expect([...estimated]).toEqual([N - 2 - whole3.length, N]);
    for (let qh = 0; qh < qHeads; qh++) {
      const h = Math.floor(qh / G), c = heads[h];
      let den = 0;
      const num = new Float64Array(d);
      for (let k = 0; k < C; k++) {
        if (h === 0 && k === 3) continue;
        let w = 0;
        for (let j = 0; j < d; j++) w += q[qh * d + j] * toValue(c.centroids[k * stride + j]);
        const e = Math.exp(scale * w);
        let n = c.counts[k];
        const rows = h === 0 && k === 0 ? [0, 7] : [];
        n -= rows.length;
        den += n * e;
        for (let j = 0; j < d; j++) {
          let s = c.counts[k] * toValue(c.valueMeans[k * d + j]);
          for (const r of rows) s -= toValue(c.values[r * d + j]);
          num[j] += e * s;
        }
      }
      expect(lse[qh]).toBeCloseTo(Math.log(den), 4);
      for (let j = 0; j < d; j++) expect(Math.abs(out[qh * d + j] - num[j] / den)).toBeLessThan(1e-4 * (1 + Math.abs(num[j] / den)));
    }
  });

  it('leaves lse at -Infinity where every token is attended exactly', async () => {
    const rng = new Rng(seed + 1);
    const d = 8, stride = 16, c = cluster(rng, 3, 10, d, stride);
    const out = new Float32Array(2 * d).fill(9), lse = new Float32Array(2), estimated = new Float32Array(1);
    const all = Int32Array.from({ length: 10 }, (_, t) => t);
    await estimateClusters({ q: new Float32Array(2 * d).fill(1), qHeads: 2, kvHeads: 1, headDim: d, centroidStride: stride, dtype: 'f16', scale: 1, segments: [[{ ...c, exact: all }]], out, lse, estimated });
    expect([...lse]).toEqual([-Infinity, -Infinity]);
    expect(estimated[0]).toBe(0);
    expect(out.every((x) => x === 0)).toBe(true);
  });

  it('refuses a token whose cluster is out of range before reading memory', async () => {
    const rng = new Rng(seed + 2);
    const d = 8, c = cluster(rng, 2, 4, d, 8);
    c.tokenCluster[1] = 5;
    await expect(async () =>
      estimateClusters({ q: new Float32Array(d), qHeads: 1, kvHeads: 1, headDim: d, centroidStride: 8, dtype: 'f16', scale: 1, segments: [[c]], out: new Float32Array(d), lse: new Float32Array(1), estimated: new Float32Array(1) }),
    ).rejects.toThrow(/tokenCluster/);
  });
});
