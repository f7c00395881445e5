// convert's 8-at-a-time paths (f16 <-> f32, bf16 -> f32: the decode path's
// 16-bit q and out) against the independent IEEE encoders of
// test/helpers/half.ts, at odd byte offsets (tensors in a msgpack body sit
// anywhere) and odd lengths, with the values rounding gets wrong first: ties,
// subnormals, overflow, signed zeros, infinities, NaN.
import { describe, expect, it } from 'vitest';
import { convert } from '../../addon/kernels.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`convert-rows: seed ${seed}`);

/** `n` values: random magnitudes from 1e-9 to 1e6 and the edge cases, shuffled in. */
function values(rng: Rng, n: number): Float32Array {
  const edge = [0, -0, 1, -1, 65504, 65505, 65519.996, 65520, 70000, -70000, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -14, 1 + 2 ** -11, 1 + 3 * 2 ** -11, Infinity, -Infinity, NaN, 3.4e38];
  return Float32Array.from({ length: n }, (_, i) => (i % 7 === 3 ? edge[rng.int(edge.length)] : rng.normal() * 10 ** (rng.int(16) - 9)));
}

/** `bytes` placed at byte offset `at` of a fresh buffer: a view that is aligned to nothing. */
function at(bytes: Uint8Array, offset: number): Uint8Array {
  const buf = new Uint8Array(bytes.byteLength + offset);
  buf.set(bytes, offset);
  return buf.subarray(offset);
}

const sameBits = (a: number, b: number, nan: boolean) => (nan ? Number.isNaN(b) : Object.is(a, b));

describe('convert, 8 at a time', () => {
  const rng = new Rng(seed);
  it.each([1, 2, 3])('f32 -> f16 and back, f32 -> bf16 -> f32, at byte offset %i, odd lengths', (offset) => {
    for (const n of [7, 8, 9, 17, 4099]) {
      const x = values(rng, n);
      const src = at(new Uint8Array(x.buffer), offset);
      for (const dt of ['f16', 'bf16'] as const) {
        const words = new Uint8Array(2 * n + offset).subarray(offset);
        convert(src, 'f32', words, dt, n);
        const view = new DataView(words.buffer, words.byteOffset, words.byteLength);
        for (let i = 0; i < n; i++) {
          const w = view.getUint16(2 * i, true), want = bitsOf(dt)(x[i]);
          // NaN: any NaN word (its payload is the instruction's choice); otherwise the exact word.
          if (Number.isNaN(x[i])) expect(Number.isNaN(valueOf(dt)(w))).toBe(true);
          else expect(w).toBe(want);
        }
        const back = new Uint8Array(4 * n + offset).subarray(offset);
        convert(words, dt, back, 'f32', n);
        const bv = new DataView(back.buffer, back.byteOffset, back.byteLength);
        for (let i = 0; i < n; i++) expect(sameBits(Math.fround(valueOf(dt)(view.getUint16(2 * i, true))), bv.getFloat32(4 * i, true), Number.isNaN(x[i]))).toBe(true);
      }
    }
  });
});
