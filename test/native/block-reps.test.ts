// Block representatives (native/kernels/block_reps.h, addon/block-reps.ts):
// per block of keys, up to `reps` k-means sub-centroids with radius and
// count, checked against float64 computed here from the keys:
//  - a block of four well-separated groups gets the four group means
//    (within the dtype's rounding), each with its group's count;
//  - a lone outlier key among ordinary ones gets a slot of its own (count 1,
//    the key itself, radius 0), which the block mean hides;
//  - counts sum to each block's tokens (a partial last block too), every
//    key lies within the radius of some slot (the bound the α = 1 score
//    relies on), a slot without members repeats another's centroid and
//    radius with count 0;
//  - the same keys give the same answer (deterministic whatever the threads).
import { describe, expect, it } from 'vitest';
import { blockReps } from '../../addon/block-reps.js';
import type { KvDtype } from '../../addon/kernels.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`block-reps: seed ${seed}`);

function words(values: number[], dtype: KvDtype): Uint16Array {
  return Uint16Array.from(values, bitsOf(dtype));
}

const dist = (a: ArrayLike<number>, b: ArrayLike<number>) => Math.sqrt(Array.from(a, (x, j) => (x - b[j]) ** 2).reduce((s, x) => s + x, 0));

describe('block representatives', () => {
  for (const dtype of ['f16', 'bf16'] as KvDtype[])
    it(`${dtype}: four separated groups give their four means, a lone outlier a slot of its own`, async () => {
      const rng = new Rng(seed);
      const d = 24, B = 64, R = 4, value = valueOf(dtype);
      // Block 0: four groups of 16 keys around 10·e_g (noise 0.2), interleaved.
      // Block 1: 63 keys of noise 0.2 and one key 12·e_5 (token 64 + 37).
      const f: number[] = [];
      for (let t = 0; t < B; t++) for (let j = 0; j < d; j++) f.push((j === t % 4 ? 10 : 0) + 0.2 * rng.normal());
      for (let t = 0; t < B; t++) for (let j = 0; j < d; j++) f.push(t === 37 ? (j === 5 ? 12 : 0) : 0.2 * rng.normal());
      const keys = words(f, dtype), stored = Array.from(keys, value);
      const r = await blockReps(keys, dtype, 2 * B, d, B, R, 8);
      const key = (t: number) => stored.slice(t * d, (t + 1) * d);
      const centroid = (i: number) => Array.from(r.centroids.subarray(i * d, (i + 1) * d), value);
      // Block 0: each group's float64 mean is a slot's centroid, with 16 members.
      const used = new Set<number>();
      for (let g = 0; g < 4; g++) {
        const mean = new Array(d).fill(0);
        for (let t = g; t < B; t += 4) key(t).forEach((x, j) => (mean[j] += x / 16));
        const slot = [0, 1, 2, 3].reduce((best, s) => (dist(centroid(s), mean) < dist(centroid(best), mean) ? s : best), 0);
        used.add(slot);
        expect(dist(centroid(slot), mean)).toBeLessThan(dtype === 'f16' ? 0.02 : 0.1);
        expect(r.counts[slot]).toBe(16);
      }
      expect(used.size).toBe(4);
      // Block 1: the outlier alone, exactly, radius 0 (the other slots: the
      // bulk, and in pure noise the next farthest keys, alone too).
      const lone = [4, 5, 6, 7].filter((i) => dist(centroid(i), key(B + 37)) === 0);
      expect(lone.length).toBe(1);
      expect(r.counts[lone[0]]).toBe(1);
      expect(r.radii[lone[0]]).toBe(0);
      // The block's mean (what one row per block stored) is far from it.
      const mean = new Array(d).fill(0);
      for (let t = B; t < 2 * B; t++) key(t).forEach((x, j) => (mean[j] += x / B));
      expect(dist(mean, key(B + 37))).toBeGreaterThan(11);
    });

  it('counts sum to each block, every key lies within some slot radius, empty slots repeat a slot with count 0, deterministic', async () => {
    const rng = new Rng(seed + 1);
    const d = 40, B = 64, R = 4, dtype: KvDtype = 'f16', value = valueOf(dtype);
    // Odd sizes: 5 blocks and 3 tokens; block 2 holds only two distinct keys;
    // the last block three tokens.
    const tokens = 5 * B + 3;
    const f: number[] = [];
    for (let t = 0; t < tokens; t++)
      for (let j = 0; j < d; j++) {
        if (Math.floor(t / B) === 2) f.push(t % 2 ? (j === 0 ? 3 : 0) : j === 1 ? -2 : 0);
        else f.push(rng.normal() * (1 + (t % 7)) + (rng.next() < 0.01 ? 30 : 0));
      }
    const keys = words(f, dtype), stored = Array.from(keys, value);
    const r = await blockReps(keys, dtype, tokens, d, B, R, 8);
    const blocks = 6;
    expect(r.counts.length).toBe(blocks * R);
    for (let b = 0; b < blocks; b++) {
      const n = Math.min(tokens, (b + 1) * B) - b * B;
      const counts = [...r.counts.subarray(b * R, (b + 1) * R)];
      expect(counts.reduce((a, x) => a + x, 0)).toBe(n);
      const c = (s: number) => Array.from(r.centroids.subarray((b * R + s) * d, (b * R + s + 1) * d), value);
      for (let t = b * B; t < b * B + n; t++) {
        const k = stored.slice(t * d, (t + 1) * d);
        // Within its nearest slot's radius (the float32 radius, before the summary rounds it up).
        const gaps = [0, 1, 2, 3].map((s) => dist(k, c(s)) - r.radii[b * R + s] * (1 + 1e-6));
        expect(Math.min(...gaps)).toBeLessThanOrEqual(1e-6);
      }
      for (let s = 0; s < R; s++)
        if (counts[s] === 0) {
          const twin = counts.findIndex((x) => x > 0);
          expect(c(s)).toEqual(c(twin));
          expect(r.radii[b * R + s]).toBe(r.radii[b * R + twin]);
        }
    }
    // Block 2: two distinct keys, two empty slots; the last block three tokens, one empty slot.
    expect([...r.counts.subarray(2 * R, 3 * R)].filter((x) => x > 0).sort()).toEqual([32, 32]);
    expect([...r.counts.subarray(5 * R, 6 * R)].filter((x) => x === 0).length).toBe(1);
    const again = await blockReps(keys, dtype, tokens, d, B, R, 8);
    expect(again).toEqual(r);
  });
});
