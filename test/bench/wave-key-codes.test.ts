// bench/wave-key-codes.ts: the codes bench/wave-code-rescore.ts rescores
// with. Its numbers mean something only if a code's table score is the
// scaled q · (the key the code stands for): checked against float64 sums,
// on keys a code holds exactly (PQ) and on any key within the levels'
// rounding (scalar codes); and the row cache's `has` it chooses by.
import { describe, expect, it } from 'vitest';
import { bytesOf, convert } from '../../addon/kernels.js';
import { outlierRows, pqCode, scalarCode, type KeyCode } from '../../bench/wave-key-codes.js';
import { ClockCache } from '../../bench/wave-paged-model.js';
import { Rng } from '../../workload/index.js';

const d = 128, G = 4, scale = 1 / Math.sqrt(d);

function f16(x: Float32Array): Uint16Array {
  const w = new Uint16Array(x.length);
  convert(bytesOf(x), 'f32', bytesOf(w), 'f16', x.length);
  return w;
}

/** Σ_b T[g, b, code byte] for row r and q row g, as the bench sums it. */
function tableScore(c: KeyCode, T: Float32Array, r: number, g: number): number {
  let x = 0;
  for (let b = 0; b < c.bytes; b++) x += T[(g * c.bytes + b) * 256 + c.codes[r * c.bytes + b]];
  return x;
}

describe('bench/wave-key-codes', () => {
  const rng = new Rng(11);
  const q = Float32Array.from({ length: G * d }, () => rng.normal());

  it('PQ: keys made of 16 prototypes a subspace are coded exactly, so the table score is the exact scaled logit', () => {
    // Subspace s of row t is prototype (16t/N + s·(t mod 16)) mod 16: the k-means start (rows 16 + 32i) sees each
    // prototype once, and a row's codes differ from subspace to subspace (so a nibble swapped would show).
    const N = 512, protos = Float32Array.from({ length: (d / 4) * 16 * 4 }, () => Math.round(8 * rng.normal()) / 8);
    const K = new Float32Array(N * d);
    for (let t = 0; t < N; t++)
      for (let s = 0; s < d / 4; s++) {
        const p = (Math.floor((16 * t) / N) + s * (t % 16)) % 16;
        for (let j = 0; j < 4; j++) K[t * d + 4 * s + j] = protos[(s * 16 + p) * 4 + j];
      }
    const c = pqCode(f16(K), N, d);
    expect(c.bytes).toBe(16);
    const T = c.tables(q, G, d, scale);
    for (let t = 0; t < N; t += 7)
      for (let g = 0; g < G; g++) {
        let exact = 0;
        for (let j = 0; j < d; j++) exact += q[g * d + j] * K[t * d + j];
        expect(tableScore(c, T, t, g)).toBeCloseTo(scale * exact, 4);
      }
  });

  it('scalar codes: the table score is the scaled q · (each channel\'s level: mean ± sigmas·σ cut in 2^bits, the middle of its cell)', () => {
    const N = 2048, K = Float32Array.from({ length: N * d }, () => rng.normal() * 2 + 0.5);
    const Kh = f16(K), Kf = new Float32Array(N * d);
    convert(bytesOf(Kh), 'f16', bytesOf(Kf), 'f32', N * d);
    for (const [bits, sigmas] of [[4, 3], [2, 2]]) {
      const c = scalarCode(Kh, N, d, bits, sigmas), T = c.tables(q, G, d, scale);
      expect(c.bytes).toBe((d * bits) / 8);
      // Channel statistics in float64; a level within half a cell of the key (clamped at the ends).
      const mu = new Float64Array(d), sd = new Float64Array(d), L = 1 << bits;
      for (let t = 0; t < N; t++) for (let j = 0; j < d; j++) mu[j] += Kf[t * d + j] / N;
      for (let t = 0; t < N; t++) for (let j = 0; j < d; j++) sd[j] += (Kf[t * d + j] - mu[j]) ** 2 / N;
      let clamped = 0;
      for (let t = 0; t < N; t += 31)
        for (let g = 0; g < G; g++) {
          let ref = 0;
          for (let j = 0; j < d; j++) {
            const s = Math.sqrt(sd[j]), low = mu[j] - sigmas * s, step = (2 * sigmas * s) / L;
            const cell = Math.min(L - 1, Math.max(0, Math.floor((Kf[t * d + j] - low) / step)));
            if (g === 0 && (cell === 0 || cell === L - 1)) clamped++;
            ref += q[g * d + j] * (low + (cell + 0.5) * step);
          }
          expect(tableScore(c, T, t, g)).toBeCloseTo(scale * ref, 3);
        }
      expect(clamped).toBeGreaterThan(0); // the ends' clamping was exercised
    }
  });

  it('outliers: the rows with a channel past the sigmas, and only they', () => {
    const N = 1000, K = Float32Array.from({ length: N * d }, () => rng.normal() * 0.1);
    for (const t of [3, 500, 999]) K[t * d + (t % d)] = 50;
    const out = outlierRows(f16(K), N, d, 5);
    expect([...out.keys()].filter((t) => out[t])).toEqual([3, 500, 999]);
  });

  it('the clock cache holds what a step read until a later step takes its slot', () => {
    const c = new ClockCache(4);
    expect(c.run([1, 2, 3])).toBe(3);
    expect([1, 2, 3, 4].map((k) => c.has(k))).toEqual([true, true, true, false]);
    expect(c.run([1, 4, 5])).toBe(2); // 4 takes the free slot, 5 the first slot not read this step (2's)
    expect([1, 2, 3, 4, 5].map((k) => c.has(k))).toEqual([true, false, true, true, true]);
  });
});
