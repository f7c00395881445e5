// kmeansMany (several k-means side by side, as a wave head's segments are
// built) against kmeans run on each problem alone: the same centroids,
// assignments and sizes, bit for bit, whatever the problems' sizes and
// however many share the pool.
import { describe, expect, it } from 'vitest';
import { kmeans, kmeansMany, type KmeansArgs } from '../../addon/faiss.js';
import { clusteredKeys } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`kmeansMany tests: seed ${seed}`);


describe('native kmeansMany', () => {
  it('answers each problem as kmeans answers it alone', async () => {
    const rng = new Rng(seed);
    const d = 24;
    // Segments of one head (views into one array, as cluster-build passes them) plus odd ones.
    const head = clusteredKeys(rng, 3 * 1500 + 701, d, 'f16');
    const problems: KmeansArgs[] = [0, 1500, 3000, 4500].map((t0, i) => {
      const t1 = Math.min(3 * 1500 + 701, t0 + 1500);
      return { keys: head.subarray(t0 * d, t1 * d), tokens: t1 - t0, headDim: d, dtype: 'f16', clusters: Math.ceil((t1 - t0) / 8), iterations: 6, seed: 11 + i };
    });
    problems.push({ keys: clusteredKeys(rng, 333, 16, 'bf16'), tokens: 333, headDim: 16, dtype: 'bf16', clusters: 41, iterations: 4, seed: 5 });
    problems.push({ keys: clusteredKeys(rng, 50, 8, 'f16'), tokens: 50, headDim: 8, dtype: 'f16', clusters: 50, iterations: 2, seed: 9 });
    const many = await kmeansMany(problems);
    expect(many.length).toBe(problems.length);
    for (const [i, p] of problems.entries()) {
      const alone = await kmeans(p);
      expect(many[i].assign).toEqual(alone.assign);
      expect(many[i].sizes).toEqual(alone.sizes);
      expect(many[i].centroids).toEqual(alone.centroids);
      expect(many[i].sizes.reduce((s, x) => s + x, 0)).toBe(p.tokens);
    }
    // Different seeds did give different answers (the comparison above is not of one answer with itself).
    expect(many[0].assign).not.toEqual(many[1].assign);
  });

  it('takes no problems, and refuses a bad one before any work', async () => {
    expect(await kmeansMany([])).toEqual([]);
    const rng = new Rng(seed + 1);
    const good: KmeansArgs = { keys: clusteredKeys(rng, 100, 8, 'f16'), tokens: 100, headDim: 8, dtype: 'f16', clusters: 10, iterations: 2, seed: 1 };
    await expect(kmeansMany([good, { ...good, clusters: 101 }])).rejects.toThrow(RangeError);
    await expect(kmeansMany([good, { ...good, keys: good.keys.subarray(0, 10) }])).rejects.toThrow();
  });
});
