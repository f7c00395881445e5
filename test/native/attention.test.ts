// The native kernels against float64 references, at odd sizes.
import { describe, expect, it } from 'vitest';
import { attend, convert, firstNonFinite, topk, type AttendSegment } from '../../addon/kernels.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`native attention tests: seed ${seed}`);

function headsOf(rng: Rng, dt: Dt, kvHeads: number, n: number, d: number) {
  const bits: Uint16Array[] = [], values: Float64Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const b = new Uint16Array(n * d), v = new Float64Array(n * d);
    for (let i = 0; i < n * d; i++) {
      b[i] = bitsOf(dt)(rng.normal());
      v[i] = valueOf(dt)(b[i]);
    }
    bits.push(b);
    values.push(v);
  }
  return { bits, values };
}

async function run(q: Float32Array, qHeads: number, kvHeads: number, d: number, dt: Dt, segments: AttendSegment[]) {
  const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
  await attend({ q, qHeads, kvHeads, headDim: d, dtype: dt, scale: 1 / Math.sqrt(d), segments, out, lse });
  return { out, lse };
}

describe('native attend', () => {
  for (const dt of ['f16', 'bf16'] as const)
    for (const [qHeads, kvHeads, d, n] of [
      [4, 4, 8, 1],
      // Run on the calling thread (work ≤ 2^18): a session's own tokens beside a GPU wave step, and several tasks a head.
      [32, 8, 64, 41],
      [2, 2, 8, 4099],
      [8, 2, 24, 4099],
      [12, 3, 67, 777],
      [32, 8, 128, 2053],
    ])
      it(`matches float64 dense attention (${dt}, ${qHeads}q/${kvHeads}kv, d=${d}, n=${n})`, async () => {
        const rng = new Rng(seed + n + d);
        const { bits: k, values: kv } = headsOf(rng, dt, kvHeads, n, d);
        const { bits: v, values: vv } = headsOf(rng, dt, kvHeads, n, d);
        const q = Float32Array.from({ length: qHeads * d }, () => rng.normal() * 2);
        const got = await run(q, qHeads, kvHeads, d, dt, [{ k, v, tokens: n, begin: 0, end: n }]);
        const ref = referenceAttention(q, kv, vv, qHeads, d);
        expect(maxRelError(got.out, ref.out, qHeads)).toBeLessThan(1e-5);
        expect(maxRelErrorScalar(got.lse, ref.lse)).toBeLessThan(1e-5);
      });

  it('attends exactly the listed ids, per kv head', async () => {
    const rng = new Rng(seed + 1);
    const [qHeads, kvHeads, d, n] = [6, 2, 40, 3001];
    const { bits: k, values: kv } = headsOf(rng, 'f16', kvHeads, n, d);
    const { bits: v, values: vv } = headsOf(rng, 'f16', kvHeads, n, d);
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    const rows = [0, 1].map((h) => Array.from({ length: 100 + 37 * h }, () => rng.int(n)));
    const got = await run(q, qHeads, kvHeads, d, 'f16', [{ k, v, tokens: n, ids: rows.map((r) => Int32Array.from(r)) }]);
    const ref = referenceAttention(q, kv, vv, qHeads, d, 1 / Math.sqrt(d), rows);
    expect(maxRelError(got.out, ref.out, qHeads)).toBeLessThan(1e-5);
    expect(maxRelErrorScalar(got.lse, ref.lse)).toBeLessThan(1e-5);
  });

  it('parts merged by log-sum-exp equal the whole', async () => {
    const rng = new Rng(seed + 2);
    const [qHeads, kvHeads, d, n] = [8, 4, 64, 5003];
    const { bits: k } = headsOf(rng, 'bf16', kvHeads, n, d);
    const { bits: v } = headsOf(rng, 'bf16', kvHeads, n, d);
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    const whole = await run(q, qHeads, kvHeads, d, 'bf16', [{ k, v, tokens: n, begin: 0, end: n }]);
    const cut = 1 + rng.int(n - 2);
    const parts = await run(q, qHeads, kvHeads, d, 'bf16', [
      { k, v, tokens: n, begin: 0, end: cut },
      { k, v, tokens: n, begin: cut, end: n },
    ]);
    const a = await run(q, qHeads, kvHeads, d, 'bf16', [{ k, v, tokens: n, begin: 0, end: cut }]);
    const b = await run(q, qHeads, kvHeads, d, 'bf16', [{ k, v, tokens: n, begin: cut, end: n }]);
    // Merge a and b by hand, as a client would.
    const merged = new Float64Array(qHeads * d);
    for (let h = 0; h < qHeads; h++) {
      const l = Math.max(a.lse[h], b.lse[h]) + Math.log(Math.exp(a.lse[h] - Math.max(a.lse[h], b.lse[h])) + Math.exp(b.lse[h] - Math.max(a.lse[h], b.lse[h])));
      for (let j = 0; j < d; j++) merged[h * d + j] = Math.exp(a.lse[h] - l) * a.out[h * d + j] + Math.exp(b.lse[h] - l) * b.out[h * d + j];
    }
    expect(maxRelError(parts.out, whole.out, qHeads)).toBeLessThan(1e-5);
    expect(maxRelError(merged, whole.out, qHeads)).toBeLessThan(1e-5);
  });

  it('gives -inf lse and zero output over no tokens', async () => {
    const k = [new Uint16Array(8)], v = [new Uint16Array(8)];
    const got = await run(new Float32Array(8), 1, 1, 8, 'f16', [{ k, v, tokens: 1, begin: 0, end: 0 }]);
    expect(got.lse[0]).toBe(-Infinity);
    expect([...got.out]).toEqual(new Array(8).fill(0));
  });

  it('rejects short arrays and out-of-range ids before touching memory', async () => {
    const k = [new Uint16Array(10)], v = [new Uint16Array(10)];
    const base = { q: new Float32Array(8), qHeads: 1, kvHeads: 1, headDim: 8, dtype: 'f16' as const, scale: 1, out: new Float32Array(8), lse: new Float32Array(1) };
    expect(() => attend({ ...base, segments: [{ k, v, tokens: 2, begin: 0, end: 2 }] })).toThrow(/needs 16/);
    expect(() => attend({ ...base, segments: [{ k, v, tokens: 1, ids: [Int32Array.of(1)] }] })).toThrow(/outside/);
    expect(() => attend({ ...base, q: new Float32Array(4), segments: [] })).toThrow(/q holds 4/);
  });
});

describe('native topk', () => {
  it('returns the exact top-k of max-over-group inner products', async () => {
    const rng = new Rng(seed + 3);
    const [G, d, n, k] = [4, 72, 20011, 57];
    const { bits, values } = headsOf(rng, 'f16', 1, n, d);
    const q = Float32Array.from({ length: G * d }, () => rng.normal());
    const ids = new Int32Array(k), scores = new Float32Array(k);
    const got = await topk({ q, group: G, headDim: d, keys: bits[0], tokens: n, dtype: 'f16', k, outIds: ids, outScores: scores });
    expect(got).toBe(k);
    const ref = Array.from({ length: n }, (_, t) => {
      let best = -Infinity;
      for (let g = 0; g < G; g++) {
        let s = 0;
        for (let j = 0; j < d; j++) s += q[g * d + j] * values[0][t * d + j];
        best = Math.max(best, s);
      }
      return { t, s: best };
    }).sort((x, y) => y.s - x.s);
    // The k-th and (k+1)-th scores are distinct with overwhelming probability.
    expect([...ids].sort((a, b) => a - b)).toEqual(ref.slice(0, k).map((r) => r.t).sort((a, b) => a - b));
    for (let i = 0; i < k; i++) expect(Math.abs(scores[i] - ref[i].s)).toBeLessThan(1e-3);
  });
});

describe('native convert', () => {
  it('rounds f32 to f16 and bf16 like the IEEE definition and widens back exactly', () => {
    const rng = new Rng(seed + 4);
    const n = 10007;
    const src = Float32Array.from({ length: n }, (_, i) => (i % 97 === 0 ? 0 : rng.normal() * 10 ** (rng.int(9) - 4)));
    for (const dt of ['f16', 'bf16'] as const) {
      const dst = new Uint16Array(n);
      convert(new Uint8Array(src.buffer), 'f32', new Uint8Array(dst.buffer), dt, n);
      for (let i = 0; i < n; i++) expect(dst[i]).toBe(bitsOf(dt)(src[i]));
      const back = new Float32Array(n);
      convert(new Uint8Array(dst.buffer), dt, new Uint8Array(back.buffer), 'f32', n);
      for (let i = 0; i < n; i++) expect(back[i]).toBe(Math.fround(valueOf(dt)(dst[i])));
    }
  });

  it('reads sources at odd byte offsets', () => {
    const bytes = new Uint8Array(4 * 3 + 1);
    new DataView(bytes.buffer).setFloat32(1, 1.5, true);
    new DataView(bytes.buffer).setFloat32(5, -2.25, true);
    new DataView(bytes.buffer).setFloat32(9, 65504, true);
    const dst = new Uint16Array(3);
    convert(bytes.subarray(1), 'f32', new Uint8Array(dst.buffer), 'f16', 3);
    expect([...dst]).toEqual([0x3e00, 0xc080, 0x7bff]);
  });

  it('finds the first NaN or Inf', () => {
    const a = Float32Array.of(1, 2, 3, Infinity, NaN);
    expect(firstNonFinite(new Uint8Array(a.buffer), 'f32', 3)).toBe(-1);
    expect(firstNonFinite(new Uint8Array(a.buffer), 'f32', 5)).toBe(3);
    expect(firstNonFinite(new Uint8Array(Uint16Array.of(0x3c00, 0x7e00).buffer), 'f16', 2)).toBe(1);
    expect(firstNonFinite(new Uint8Array(Uint16Array.of(0x3f80, 0xff80).buffer), 'bf16', 2)).toBe(1);
  });
});
