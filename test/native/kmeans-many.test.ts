// kmeansMany (several k-means side by side, as a wave head's segments are
// built) against kmeans run on each problem alone: the same centroids,
// assignments and sizes, bit for bit, whatever the problems' sizes and
// however many share the pool; and every BLAS-reaching faiss call (k-means
// alone, k-means side by side, IVF training) in flight at once, as a server
// sealing several documents runs them, answering as each does alone
// (native/indexes/faiss_common.h's BlasScope: OpenBLAS's thread count never
// changes under a call in flight, and its own threads serve one call at a time).
import { describe, expect, it } from 'vitest';
import { IvfIndex, kmeans, kmeansMany, type KmeansArgs } from '../../addon/faiss.js';
import { bf16Bits } from '../helpers/half.js';
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

  it('answers alike with k-means alone, side by side and IVF training all in flight at once', async () => {
    const rng = new Rng(seed + 2);
    const d = 32;
    // Big enough that faiss takes its sgemm path (>= 20 rows a search) and OpenBLAS its own threads.
    const big: KmeansArgs = { keys: clusteredKeys(rng, 6000, d, 'f16'), tokens: 6000, headDim: d, dtype: 'f16', clusters: 96, iterations: 4, seed: 3 };
    const segments: KmeansArgs[] = [0, 1, 2, 3].map((i) => ({ keys: clusteredKeys(rng, 2048, d, 'f16'), tokens: 2048, headDim: d, dtype: 'f16', clusters: 128, iterations: 4, seed: 20 + i }));
    const ivfArgs = { keys: big.keys, tokens: big.tokens, headDim: d, dtype: 'f16' as const, nlist: 64, seed: 4 };
    const q = Float32Array.from({ length: 4 * d }, () => rng.normal());
    const probe = (index: IvfIndex) => {
      const outIds = new Int32Array(4 * 50), outScores = new Float32Array(4 * 50);
      index.search({ q, group: 4, k: 50, nprobe: 8, outIds, outScores });
      index.dispose();
      return outIds;
    };
    const alone = { big: await kmeans(big), many: await kmeansMany(segments), ivf: probe(await IvfIndex.build(ivfArgs)) };
    for (let round = 0; round < 3; round++) {
      const [b, m1, m2, ivf] = await Promise.all([kmeans(big), kmeansMany(segments), kmeansMany(segments.slice(1)), IvfIndex.build(ivfArgs)]);
      expect(b.assign).toEqual(alone.big.assign);
      expect(b.centroids).toEqual(alone.big.centroids);
      for (const [i, r] of m1.entries()) expect(r.centroids).toEqual(alone.many[i].centroids);
      for (const [i, r] of m2.entries()) expect(r.assign).toEqual(alone.many[i + 1].assign);
      expect(probe(ivf)).toEqual(alone.ivf);
    }
  });

  it('refuses bf16 keys past 2^50 (a RangeError), on its own and side by side, and takes 2^50 itself', async () => {
    const rng = new Rng(seed + 3);
    const d = 16, n = 400;
    const withKey = (x: number) => {
      const keys = clusteredKeys(rng, n, d, 'bf16');
      keys[137 * d + 3] = bf16Bits(x);
      return { keys, tokens: n, headDim: d, dtype: 'bf16' as const, clusters: 25, iterations: 3, seed: 2 };
    };
    const edge = 2 ** 50, past = 2 ** 50 * (1 + 2 ** -7);  // the next bf16 up
    expect((await kmeans(withKey(-edge))).sizes.reduce((s, x) => s + x, 0)).toBe(n);
    (await IvfIndex.build({ ...withKey(edge), nlist: 8, seed: 1 })).dispose();
    const refused = /keys hold a value of magnitude 1\.135e\+15, beyond the 2\^50/;
    await expect(kmeans(withKey(-past))).rejects.toThrow(RangeError);
    await expect(kmeans(withKey(past))).rejects.toThrow(refused);
    await expect(kmeansMany([withKey(1), withKey(-past)])).rejects.toThrow(refused);
    await expect(IvfIndex.build({ ...withKey(past), nlist: 8, seed: 1 })).rejects.toThrow(RangeError);
  });

  it('takes no problems, and refuses a bad one before any work', async () => {
    expect(await kmeansMany([])).toEqual([]);
    const rng = new Rng(seed + 1);
    const good: KmeansArgs = { keys: clusteredKeys(rng, 100, 8, 'f16'), tokens: 100, headDim: 8, dtype: 'f16', clusters: 10, iterations: 2, seed: 1 };
    await expect(kmeansMany([good, { ...good, clusters: 101 }])).rejects.toThrow(RangeError);
    await expect(kmeansMany([good, { ...good, keys: good.keys.subarray(0, 10) }])).rejects.toThrow();
  });
});
