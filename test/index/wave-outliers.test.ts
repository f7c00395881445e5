// Keys that stand out channel by channel are clusters of their own
// (index/wave/cluster-build.ts, outlierKeys): a fact stored once, carrying
// content in channels where the other keys are quiet, hides inside a
// k-means cluster of ordinary keys (its offset from the centroid is no
// longer than theirs), and the ranking then misses it at a small budget.
// Alone, its cluster's score is its own logit.
import { describe, expect, it } from 'vitest';
import { outlierScores } from '../../addon/kernels.js';
import { buildClusters, OUTLIER_SHARE, outlierKeys } from '../../index/wave/cluster-build.js';
import { ClusterIndex } from '../../index/wave/cluster-index.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`wave-outliers: seed ${seed}`);
const toBits = bitsOf('f16'), toValue = valueOf('f16');
const d = 32, N = 8192, loud = 24, topics = 128, facts = 6;

/** Topic keys in channels [0, loud), near-silent channels above; facts add content of norm 3 in the quiet channels. */
function document(rng: Rng) {
  const centres = Array.from({ length: topics }, () => Float32Array.from({ length: d }, (_, j) => (j < loud ? 2 * rng.normal() : 0)));
  const keys = new Uint16Array(N * d), values = new Uint16Array(N * d), key = new Float32Array(d);
  const positions = new Set<number>();
  while (positions.size < facts) positions.add(64 + rng.int(N - 128));
  const dirs = new Map<number, Float32Array>();
  for (const p of positions) {
    const u = Float32Array.from({ length: d }, (_, j) => (j < loud ? 0 : rng.normal()));
    const n = Math.hypot(...u);
    dirs.set(p, u.map((x) => x / n));
  }
  for (let t = 0; t < N; t++) {
    const c = centres[Math.floor(t / 32) % topics];
    for (let j = 0; j < d; j++) key[j] = c[j] + (j < loud ? 1.5 * rng.normal() : 0.05 * rng.normal());
    const u = dirs.get(t);
    if (u) for (let j = 0; j < d; j++) key[j] += 3 * u[j];
    for (let j = 0; j < d; j++) (keys[t * d + j] = toBits(key[j])), (values[t * d + j] = toBits(rng.normal()));
  }
  return { input: { keys, values, tokens: N, headDim: d, dtype: 'f16' as const, queries: new Float32Array(0), queryCount: 0 }, dirs };
}

describe('wave outlier keys', () => {
  it('scores each key by Σ_c (k_c − μ_c)² / σ_c² over its head (float64 reference, 1e-4 relative)', async () => {
    const { input } = document(new Rng(seed + 3));
    const z = new Float32Array(N);
    await outlierScores(input.keys, 'f16', N, d, z);
    const k = Float64Array.from(input.keys, toValue);
    const mu = new Float64Array(d), v = new Float64Array(d);
    for (let t = 0; t < N; t++) for (let j = 0; j < d; j++) mu[j] += k[t * d + j] / N;
    for (let t = 0; t < N; t++) for (let j = 0; j < d; j++) v[j] += (k[t * d + j] - mu[j]) ** 2 / N;
    for (let t = 0; t < N; t += 97) {
      let want = 0;
      for (let j = 0; j < d; j++) want += (k[t * d + j] - mu[j]) ** 2 / v[j];
      expect(Math.abs(z[t] - want)).toBeLessThan(1e-4 * want + 1e-3);
    }
  });

  it('flags exactly tokens/OUTLIER_SHARE keys, the planted facts among them', async () => {
    const { input, dirs } = document(new Rng(seed));
    const flag = await outlierKeys(input);
    expect(flag.reduce((n, f) => n + f, 0)).toBe(Math.floor(N / OUTLIER_SHARE));
    for (const p of dirs.keys()) expect(flag[p]).toBe(1);
  });

  it('are clusters of one, every token still in exactly one cluster, and a query aimed at one finds it at a budget of one token', async () => {
    const { input, dirs } = document(new Rng(seed + 1));
    const index = ClusterIndex.load(await buildClusters(input), input);
    const { counts, tokenCluster } = index.arrays;
    expect(counts.reduce((a, b) => a + b, 0)).toBe(N);
    const histogram = new Int32Array(counts.length);
    tokenCluster.forEach((c) => histogram[c]++);
    expect(Array.from(histogram)).toEqual(Array.from(counts));
    const rng = new Rng(seed + 2);
    for (const [p, u] of dirs) {
      expect(counts[tokenCluster[p]]).toBe(1);
      // A group of 4 query rows: one asks for the fact (logit 90, where the
      // others' best keys score about 4 standard deviations of 12), three for topics.
      const q = new Float32Array(4 * d);
      for (const r of [0, 2, 3]) for (let j = 0; j < loud; j++) q[r * d + j] = rng.normal();
      for (let j = 0; j < d; j++) q[d + j] = 30 * u[j];
      const [found] = await ClusterIndex.searchHeads([index], q, 4, [1]);
      expect(Array.from(found.ids)).toEqual([p]);
    }
  });
});
