// The wave build's native loops (native/kernels/wave_build.h) give what the
// TypeScript loops they replaced gave, bit for bit: the moments' codes
// against moment-code.ts's loop as it was (bench/wave-build-before.ts), the
// float64 sums against plain loops here (each sum in its order, every
// product rounded before it is added: a fused multiply-add would differ in
// the last bit on most of these). Bad shapes are refused, nothing written.
import { describe, expect, it } from 'vitest';
import { encodeMomentRows, rowDots, weightedRowSums } from '../../addon/wave-build.js';
import { encodeMomentsBefore } from '../../bench/wave-build-before.js';
import { encodeMoments } from '../../index/wave/moment-code.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`wave-build (native): seed ${seed}`);

const sameBits = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  expect(a.length).toBe(b.length);
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) expect([i, a[i]]).toEqual([i, b[i]]);
};

/** Rows that reach the codes' edges: halves of an axis step, variances on and around the midpoints between two codes, zeros, -0, negatives, subnormals, all-zero rows. */
function edgyMoments(rng: Rng, C: number, d: number) {
  const axes = new Float32Array(C * d), vars = new Float32Array(C * d);
  for (let c = 0; c < C; c++) {
    const size = 10 ** (8 * rng.next() - 4), kind = c % 5, o = c * d;
    if (kind === 4) continue;
    const sa = Math.fround(size / 127), sv = Math.fround(size / 255 ** 2);
    for (let j = 0; j < d; j++) {
      const code = rng.int(255) - 127;
      axes[o + j] = kind === 1 ? Math.fround((code + 0.5) * sa) : kind === 2 ? -0 : size * rng.normal();
      const v = rng.int(256);
      // The variance halfway (in value) between two codes' decodes, or one ulp either side of it.
      const mid = (Math.fround(v * v * sv) + Math.fround((v + 1) * (v + 1) * sv)) / 2;
      vars[o + j] = kind === 1 ? Math.fround(mid * (1 + (rng.int(3) - 1) * 2 ** -23)) : kind === 3 ? (rng.next() < 0.5 ? -size * rng.next() : 1e-40 * rng.next()) : size * 10 ** (-6 * rng.next());
    }
    axes[o] = size;
    vars[o + 1] = size;
  }
  return { axes, vars };
}

describe('wave build: native loops', () => {
  it('codes moments as the TypeScript loop did, bit for bit, edges included', () => {
    const rng = new Rng(seed);
    // 5000 rows: more than one of the pool's chunks (2048 clusters).
    for (const [d, C] of [[64, 5000], [128, 700], [7, 300]]) {
      const { axes, vars } = edgyMoments(rng, C, d);
      const a = encodeMoments(axes, vars, C, d), b = encodeMomentsBefore(axes, vars, C, d);
      sameBits(a.keyAxes, b.keyAxes);
      sameBits(a.keyVars, b.keyVars);
      sameBits(a.axisScales, b.axisScales);
      sameBits(a.varScales, b.varScales);
    }
  });

  it('refuses non-finite moments as the TypeScript loop did', () => {
    const axes = new Float32Array(3 * 8).fill(1), vars = new Float32Array(3 * 8).fill(1);
    for (const [arr, x] of [[axes, Infinity], [vars, NaN], [axes, -Infinity]] as const) {
      const keep = arr[17];
      arr[17] = x;
      expect(() => encodeMoments(axes, vars, 3, 8)).toThrow(/not finite/);
      expect(() => encodeMomentsBefore(axes, vars, 3, 8)).toThrow(/not finite/);
      arr[17] = keep;
    }
    const out = { keyAxes: new Int8Array(24), axisScales: new Float32Array(3), keyVars: new Uint8Array(24), varScales: new Float32Array(3) };
    vars[9] = Infinity;
    expect(encodeMomentRows(axes, vars, 3, 8, out)).toBe(1);
    // In a later chunk of the pool's (2048 clusters a chunk) too.
    const many = new Float32Array(5000 * 8).fill(1);
    many[4500 * 8 + 2] = NaN;
    expect(() => encodeMoments(many, new Float32Array(5000 * 8), 5000, 8)).toThrow(/not finite/);
  });

  it('row dots: each sum over the channels in order, scaled after', () => {
    const rng = new Rng(seed + 1);
    for (const [rows, d, n, stride] of [[16, 64, 3000, 64], [5, 64, 77, 72], [1, 3, 10, 3], [16, 128, 50, 136], [0, 8, 4, 8], [3, 8, 0, 8]]) {
      const q = Float64Array.from({ length: rows * d }, () => Math.fround(rng.normal() * 3));
      const x = Float32Array.from({ length: Math.max(0, n * stride) }, () => rng.normal() * 10 ** (2 * rng.next()));
      const s = 1 / Math.sqrt(d), got = new Float64Array(rows * n), want = new Float64Array(rows * n);
      rowDots(q, rows, d, x, n, stride, s, got);
      for (let r = 0; r < rows; r++)
        for (let t = 0; t < n; t++) {
          let acc = 0;
          for (let j = 0; j < d; j++) acc += q[r * d + j] * x[t * stride + j];
          want[r * n + t] = s * acc;
        }
      sameBits(got, want);
    }
  });

  it('weighted row sums: each channel over the rows in order, masked rows skipped, added to what is there', () => {
    const rng = new Rng(seed + 2);
    for (const [rows, d, n, stride, masked] of [[16, 64, 500, 64, true], [5, 64, 200, 64, false], [2, 9, 31, 12, true], [1, 128, 40, 128, true]] as const) {
      const w = Float64Array.from({ length: rows * n }, () => Math.exp(-20 * rng.next()));
      const mask = masked ? Uint8Array.from({ length: rows * n }, () => (rng.next() < 0.3 ? 1 : 0)) : undefined;
      const x = Float32Array.from({ length: n * stride }, () => rng.normal());
      const start = Float64Array.from({ length: rows * d }, () => rng.normal());
      const got = start.slice(), want = start.slice();
      weightedRowSums(w, mask, rows, n, x, stride, d, got);
      for (let r = 0; r < rows; r++)
        for (let t = 0; t < n; t++) {
          if (mask && !mask[r * n + t]) continue;
          for (let j = 0; j < d; j++) want[r * d + j] += w[r * n + t] * x[t * stride + j];
        }
      sameBits(got, want);
    }
  });

  it('refuses arrays shorter than their shapes, or of the wrong type, writing nothing', () => {
    const out = new Float64Array(4 * 10).fill(7);
    expect(() => rowDots(new Float64Array(4 * 8), 4, 8, new Float32Array(9 * 8), 10, 8, 1, out)).toThrow(RangeError);
    expect(() => rowDots(new Float64Array(4 * 8), 4, 8, new Float32Array(10 * 8), 10, 4, 1, out)).toThrow(RangeError);
    expect(() => rowDots(new Float32Array(4 * 8) as unknown as Float64Array, 4, 8, new Float32Array(10 * 8), 10, 8, 1, out)).toThrow(TypeError);
    expect(() => weightedRowSums(new Float64Array(40), new Uint8Array(39), 4, 10, new Float32Array(80), 8, 8, new Float64Array(32))).toThrow(RangeError);
    expect(() => weightedRowSums(new Float64Array(40), undefined, 4, 10, new Float32Array(80), 8, 8, new Float64Array(31))).toThrow(RangeError);
    const codes = { keyAxes: new Int8Array(16), axisScales: new Float32Array(2), keyVars: new Uint8Array(15), varScales: new Float32Array(2) };
    expect(() => encodeMomentRows(new Float32Array(16), new Float32Array(16), 2, 8, codes)).toThrow(RangeError);
    expect(out.every((v) => v === 7)).toBe(true);
  });
});
