// k-means on the GPU (kmeansManyDevice, native/cuda/kmeans_device.cu): on a
// device, against a float64 reference computed here from its own answer
// (every key at its nearest returned centroid, sizes its histogram), its
// objective against the host's faiss on the same problems, and repeatable.
// Without a device (here and in CI): it rejects, and a wave build asked to
// use the device falls back to the host, byte for byte the host's artifact.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { kmeansMany, kmeansManyDevice, type KmeansArgs, type KmeansResult } from '../../addon/faiss.js';
import { buildClusters } from '../../index/wave/cluster-build.js';
import { valueOf } from '../helpers/half.js';
import { clusteredKeys } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`kmeans-device: seed ${seed}`);
const info = cudaAvailable();


/** Sum of squared distances of each key to its assigned centroid, and the keys whose nearest centroid (float64) is clearly another. */
function judge(p: KmeansArgs, r: KmeansResult): { objective: number; misassigned: number } {
  const d = p.headDim, C = p.clusters, x = new Float64Array(d);
  let objective = 0, misassigned = 0;
  for (let i = 0; i < p.tokens; i++) {
    for (let j = 0; j < d; j++) x[j] = valueOf(p.dtype)(p.keys[i * d + j]);
    let best = Infinity, own = 0;
    for (let c = 0; c < C; c++) {
      let s = 0;
      for (let j = 0; j < d; j++) s += (x[j] - r.centroids[c * d + j]) ** 2;
      if (c === r.assign[i]) own = s;
      best = Math.min(best, s);
    }
    objective += own;
    // f32 dots against float64 distances: a near tie may go either way.
    if (own > best + 1e-3 * (1 + best)) misassigned++;
  }
  return { objective, misassigned };
}

function problems(rng: Rng): KmeansArgs[] {
  const d = 40;
  const head = clusteredKeys(rng, 2 * 1200 + 333, d, 'f16', 12);
  const out: KmeansArgs[] = [0, 1200, 2400].map((t0, i) => {
    const t1 = Math.min(2 * 1200 + 333, t0 + 1200);
    return { keys: head.subarray(t0 * d, t1 * d), tokens: t1 - t0, headDim: d, dtype: 'f16', clusters: Math.ceil((t1 - t0) / 16), iterations: 6, seed: 3 + i };
  });
  out.push({ keys: clusteredKeys(rng, 64, d, 'f16', 12), tokens: 64, headDim: d, dtype: 'f16', clusters: 64, iterations: 6, seed: 9 });
  return out;
}

describe('kmeansManyDevice without a device', () => {
  it('rejects, and a wave build asked for the device builds on the host instead', async () => {
    if (info.ok) return;
    const rng = new Rng(seed);
    await expect(kmeansManyDevice(problems(rng))).rejects.toThrow();
    const N = 2000, d = 16;
    const keys = clusteredKeys(rng, N, d, 'f16'), values = clusteredKeys(rng, N, d, 'f16');
    const input = { keys, values, tokens: N, headDim: d, dtype: 'f16' as const, queries: new Float32Array(0), queryCount: 0 };
    const options = { clusterSize: 8, segmentTokens: 1024, iterations: 3, seed: 1 };
    expect(await buildClusters({ ...input, device: true }, options)).toEqual(await buildClusters(input, options));
  });
});

describe.skipIf(!info.ok)('kmeansManyDevice on the GPU', () => {
  it('assigns every key to its nearest centroid, counts them, comes near faiss, and repeats itself', async () => {
    const rng = new Rng(seed);
    for (const dtype of ['f16', 'bf16'] as const) {
      const ps = problems(rng).map((p) => ({ ...p, dtype, keys: dtype === 'f16' ? p.keys : clusteredKeys(rng, p.tokens, p.headDim, 'bf16', 12) }));
      const [gpu, again, host] = [await kmeansManyDevice(ps), await kmeansManyDevice(ps), await kmeansMany(ps)];
      let gpuTotal = 0, hostTotal = 0;
      for (const [i, p] of ps.entries()) {
        const at = `${dtype} problem ${i}: `;
        expect(gpu[i].assign.every((c) => c >= 0 && c < p.clusters), at + 'assign in range').toBe(true);
        const hist = new Int32Array(p.clusters);
        for (const c of gpu[i].assign) hist[c]++;
        expect(Array.from(gpu[i].sizes), at + 'sizes').toEqual(Array.from(hist));
        const g = judge(p, gpu[i]), h = judge(p, host[i]);
        expect(g.misassigned, at + 'keys not at their nearest centroid').toBe(0);
        gpuTotal += g.objective;
        hostTotal += h.objective;
        expect(Array.from(again[i].assign), at + 'repeatable').toEqual(Array.from(gpu[i].assign));
        expect(Array.from(again[i].centroids), at + 'repeatable').toEqual(Array.from(gpu[i].centroids));
      }
      // Lloyd's from another start than faiss's: within 10% of its objective
      // over the problems together. One problem alone is too small a sample:
      // the 333 keys in 21 clusters of problem 2 land in a local minimum over
      // 10% above another start's in 37 of 200 seeds with faiss against faiss
      // itself (seed + 1000); the three together at most 7.3% above, never 10%.
      expect(gpuTotal, `${dtype}: objective against faiss, all problems`).toBeLessThanOrEqual(1.1 * hostTotal);
      // As many clusters as keys: every key its own cluster.
      expect(Array.from(gpu[3].sizes).every((s) => s === 1)).toBe(true);
    }
    await expect(kmeansManyDevice([{ ...problems(rng)[0], headDim: 6, keys: new Uint16Array(6 * 1200) }])).rejects.toThrow(/multiple of 4/);
  }, 120_000);
});
