// The two native helpers of a K/V upload's server path: firstNonFinite (the
// check of every uploaded word, scanned in blocks) against a word-by-word
// scan written here, with non-finite words planted at and around the block
// edges; and prefault (a segment's pages faulted in off the event loop),
// which must never change an array's contents, even while it is written.
import { describe, expect, it } from 'vitest';
import { firstNonFinite, prefault, type FloatDtype } from '../../addon/kernels.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`upload-check: seed ${seed}`);
const BLOCK = 4096;

/** The first word whose exponent bits are all ones (NaN or ±Inf), -1 if none: the plain scan. */
function reference(words: Uint16Array | Uint32Array, dtype: FloatDtype, count: number): number {
  const mask = dtype === 'f32' ? 0x7f800000 : dtype === 'f16' ? 0x7c00 : 0x7f80;
  for (let i = 0; i < count; i++) if ((words[i] & mask) >>> 0 === mask >>> 0) return i;
  return -1;
}

describe('firstNonFinite over blocks', () => {
  const rng = new Rng(seed);
  it.each(['f16', 'bf16', 'f32'] as const)('%s: the first NaN/Inf anywhere, block edges included, as the plain scan finds it', (dtype) => {
    const n = 3 * BLOCK + 123;
    const nonFinite = dtype === 'f32' ? [0x7f800000, 0xff800000, 0x7fc00001] : dtype === 'f16' ? [0x7c00, 0xfc00, 0x7e01] : [0x7f80, 0xff80, 0x7fc1];
    // Finite words of every exponent but all ones (the largest finite values included).
    const finite = () => (dtype === 'f32' ? (rng.int(0xff) << 23) | rng.int(1 << 23) | (rng.int(2) << 31) : dtype === 'f16' ? (rng.int(0x1f) << 10) | rng.int(1 << 10) | (rng.int(2) << 15) : (rng.int(0xff) << 7) | rng.int(1 << 7) | (rng.int(2) << 15));
    const spots = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 3 * BLOCK, n - 1, ...Array.from({ length: 8 }, () => rng.int(n))];
    const make = () => (dtype === 'f32' ? Uint32Array.from({ length: n }, () => finite() >>> 0) : Uint16Array.from({ length: n }, finite));
    const clean = make();
    expect(firstNonFinite(new Uint8Array(clean.buffer), dtype, n)).toBe(-1);
    for (const at of spots) {
      const w = make();
      w[at] = nonFinite[rng.int(3)];
      if (rng.next() < 0.5) w[Math.min(n - 1, at + 1 + rng.int(2 * BLOCK))] = nonFinite[rng.int(3)]; // a later one too
      const want = reference(w, dtype, n);
      expect(want).toBe(at);
      expect(firstNonFinite(new Uint8Array(w.buffer), dtype, n)).toBe(want);
      // A count that stops before the hit sees none.
      expect(firstNonFinite(new Uint8Array(w.buffer), dtype, at)).toBe(-1);
    }
  });
});

describe('prefault', () => {
  it('faults an array in without changing its contents, while it is being written', async () => {
    const rng = new Rng(seed + 1);
    const a = new Uint16Array(8 << 20); // 16 MiB
    const before = Uint16Array.from({ length: 1 << 16 }, () => rng.int(0x10000));
    a.set(before, 0);
    const done = prefault([a.subarray(1 << 15), a.subarray(0, 1 << 15)]);
    // Written while the fault-in runs on another thread: every word stays as written.
    const tail = Uint16Array.from({ length: 1 << 16 }, () => rng.int(0x10000));
    a.set(tail, a.length - tail.length);
    expect(typeof (await done)).toBe('boolean');
    expect(a.subarray(0, before.length)).toEqual(before);
    expect(a.subarray(a.length - tail.length)).toEqual(tail);
    expect(a.subarray(before.length, before.length + 4096).every((x) => x === 0)).toBe(true);
  });

  it('a segment whose next rows are prefaulted after each append keeps every row as appended', async () => {
    const rng = new Rng(seed + 2);
    const heads = 2, d = 128, n = 1100; // 275 KiB per head per append: the rows ahead are prefaulted
    const seg = new KvSegment(heads, d, 'f16', 4 * n);
    const chunks: Uint16Array[][] = [];
    for (let c = 0; c < 4; c++) {
      const k = Uint16Array.from({ length: heads * n * d }, () => rng.int(0x7c00));
      const v = Uint16Array.from({ length: heads * n * d }, () => rng.int(0x7c00));
      seg.append(new Uint8Array(k.buffer), new Uint8Array(v.buffer), 'f16', n);
      chunks.push([k, v]);
      if (c === 1) await new Promise((r) => setTimeout(r, 20)); // some appends land after the fault-in, some during it
    }
    await new Promise((r) => setTimeout(r, 50));
    chunks.forEach(([k, v], c) => {
      for (let h = 0; h < heads; h++) {
        expect(seg.k[h].subarray(c * n * d, (c + 1) * n * d)).toEqual(k.subarray(h * n * d, (h + 1) * n * d));
        expect(seg.v[h].subarray(c * n * d, (c + 1) * n * d)).toEqual(v.subarray(h * n * d, (h + 1) * n * d));
      }
    });
  });
});
