// Paged device-wave stores' host side (engine/cache/device-wave.ts with a
// cache share, addon/wave-gpu.ts's waveCacheRowsBound): the slots a share
// gives, the device bytes a paged layer is counted at (summaries, the row
// map and the cache instead of K and V), the stores made paged and more of
// them held in the same budget, and pagedStepFits against a brute-force
// count of the rows a step can read. The stores are stand-ins (no device
// here); test/native/wave-gpu-paged.test.ts runs the real ones on a GPU.
import { describe, expect, it } from 'vitest';
import { bytesOf, convert } from '../../addon/kernels.js';
import { WAVE_PAGE_CAP_DEFAULT, waveCacheRowsBound, type WaveGpuStore, type WaveGpuStoreOptions } from '../../addon/wave-gpu.js';
import type { ModelShape } from '../../core/model.js';
import { DeviceWaveStores, pagedStepFits, WARM_MS, waveCacheRows, wavePageCap, wavePinnedBytes, waveStoreBytes } from '../../engine/cache/device-wave.js';
import { buildClusters } from '../../index/wave/cluster-build.js';
import { decodeClusters } from '../../index/wave/cluster-codec.js';
import { candidateTokens, ClusterIndex } from '../../index/wave/cluster-index.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
const model: ModelShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16', blockSize: 64 };
const N = 2000;

async function layerHeads(rng: Rng): Promise<ClusterIndex[]> {
  const words = () => {
    const f = Float32Array.from({ length: N * model.headDim }, () => rng.normal()), w = new Uint16Array(f.length);
    convert(bytesOf(f), 'f32', bytesOf(w), 'f16', f.length);
    return w;
  };
  return Promise.all(Array.from({ length: model.kvHeads }, async (_, h) => {
    const keys = words(), values = words();
    const bytes = await buildClusters({ keys, values, tokens: N, headDim: model.headDim, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 },
      { clusterSize: 8, segmentTokens: 512, iterations: 2, seed: seed + h });
    return new ClusterIndex(decodeClusters(bytes), keys, values);
  }));
}

describe('paged device wave stores', () => {
  it('gives a share of the layer\'s rows as slots and counts the cache, not K and V', async () => {
    const heads = await layerHeads(new Rng(seed));
    const d = model.headDim, H = model.kvHeads;
    expect(waveCacheRows(0, H, N)).toBe(0);
    expect(waveCacheRows(0.1, H, N)).toBe(400);
    expect(waveCacheRows(0.10001, H, N)).toBe(401);
    expect(waveCacheRows(1, H, N)).toBe(H * N);
    const dense = waveStoreBytes(heads, N, d), R = 400;
    // Written out: each head's summaries (centroid + radius row and value mean: 2 bytes a word; axis and variances: a
    // byte a channel and an f32 scale each; count and member start) and token->cluster and member lists; dense adds K
    // and V (4d bytes a row), paged the row->slot map (4 bytes a row) and R + 1 slots of K and V with R owners, stamps and miss entries.
    // The lists and map take 2 bytes a row each and a cluster base per 4096-token tile: a build's clusters (wave_step_kernels.cuh's ClusterMaps).
    const summaries = heads.reduce((b, h) => b + h.clusters * ((d + 8) * 2 + d * 2 + 2 * (d + 4) + 8) + N * 4 + Math.ceil(N / 4096) * 4, 0);
    expect(dense).toBe(summaries + H * N * 4 * d);
    expect(waveStoreBytes(heads, N, d, R)).toBe(summaries + H * N * 4 + (R + 1) * 4 * d + R * 12);
    expect(waveStoreBytes(heads, N, d, R)).toBeLessThan(dense / 2);
  });

  it('makes the stores paged, with the slots the share gives, and holds more layers in the same budget', async () => {
    const heads = await layerHeads(new Rng(seed + 1));
    const made: WaveGpuStoreOptions[] = [];
    const create = async (o: WaveGpuStoreOptions) => (made.push(o), { close: () => undefined, closeAsync: async () => undefined } as unknown as WaveGpuStore);
    const dense = waveStoreBytes(heads, N, model.headDim), paged = waveStoreBytes(heads, N, model.headDim, waveCacheRows(0.1, model.kvHeads, N));
    const budget = dense;  // one dense layer
    const denseStores = new DeviceWaveStores(budget, create);
    expect((await denseStores.acquire('a:0', heads, model))).toBeDefined();
    expect((await denseStores.acquire('a:1', heads, model))).toBeUndefined();
    expect(made[0].cacheRows).toBeUndefined();
    const pagedStores = new DeviceWaveStores(budget, create, () => 0, 0.1);
    const fit = Math.floor(budget / paged);
    expect(fit).toBeGreaterThan(1);
    for (let l = 0; l < fit; l++) {
      const held = (await pagedStores.acquire(`a:${l}`, heads, model))!;
      expect(held.cacheRows).toBe(400);
      expect(held.largestCluster).toBe(Math.max(...heads.flatMap((h) => Array.from(h.arrays.counts))));
    }
    expect((await pagedStores.acquire(`a:${fit}`, heads, model))).toBeUndefined();
    expect(made.slice(1).every((o) => o.cacheRows === 400)).toBe(true);
    expect(pagedStores.stats()).toMatchObject({ cacheShare: 0.1, stores: fit, usedBytes: fit * paged });
  });

  it('caps what a paged store\'s step copies at 2 MiB unless told otherwise, never a dense store\'s, at least a row a kv head', async () => {
    const heads = await layerHeads(new Rng(seed + 4));
    const made: WaveGpuStoreOptions[] = [];
    const create = async (o: WaveGpuStoreOptions) => (made.push(o), { close: () => undefined, closeAsync: async () => undefined } as unknown as WaveGpuStore);
    const budget = 100 * waveStoreBytes(heads, N, model.headDim);
    expect(WAVE_PAGE_CAP_DEFAULT).toBe(2 * 1024 * 1024);
    await new DeviceWaveStores(budget, create, () => 0, 0.1).acquire('a:0', heads, model);
    await new DeviceWaveStores(budget, create, () => 0, 0.1, Infinity, 0).acquire('a:0', heads, model);
    await new DeviceWaveStores(budget, create, () => 0, 0.1, Infinity, 100).acquire('a:0', heads, model);
    await new DeviceWaveStores(budget, create).acquire('a:0', heads, model);
    expect(made.map((o) => o.pageCapBytes)).toEqual([WAVE_PAGE_CAP_DEFAULT, undefined, model.kvHeads * model.headDim * 4, undefined]);
    expect(made.map((o) => o.pageCapFrom)).toEqual([undefined, undefined, undefined, undefined]);  // the native default: step 16
    expect(wavePageCap(3000, { kvHeads: 8, headDim: 128 })).toBe(8 * 128 * 4);
    expect(wavePageCap(2 ** 21, { kvHeads: 8, headDim: 128 })).toBe(2 ** 21);
    expect(new DeviceWaveStores(budget, create, () => 0, 0.1).stats().pageCapBytes).toBe(WAVE_PAGE_CAP_DEFAULT);
    expect(new DeviceWaveStores(budget, create).stats().pageCapBytes).toBe(0);
  });

  it("holds paged stores' pinned host copies of K and V within a host budget: a store past it waits for an idle one to go", async () => {
    const heads = await layerHeads(new Rng(seed + 3));
    const create = async () => ({ close: () => undefined, closeAsync: async () => undefined }) as unknown as WaveGpuStore;
    const rows = waveCacheRows(0.1, model.kvHeads, N), pinned = wavePinnedBytes(model.kvHeads, N, model.headDim, rows);
    // K and V of every row, 2 bytes a word; a dense store pins nothing.
    expect(pinned).toBe(model.kvHeads * N * model.headDim * 2 * 2);
    expect(wavePinnedBytes(model.kvHeads, N, model.headDim, 0)).toBe(0);
    let t = 0;
    // Device room for many paged layers, host room for two.
    const stores = new DeviceWaveStores(100 * waveStoreBytes(heads, N, model.headDim), create, () => t, 0.1, Math.floor(2.5 * pinned));
    (await stores.acquire('a:0', heads, model))!.release();
    (await stores.acquire('a:1', heads, model))!.release();
    expect((await stores.acquire('a:2', heads, model))).toBeUndefined();
    expect(stores.stats()).toMatchObject({ stores: 2, hostUsedBytes: 2 * pinned, refused: 1, evictions: 0 });
    t += WARM_MS;
    (await stores.acquire('a:1', heads, model))!.release();  // warm again: a:0 is the one to go
    expect((await stores.acquire('a:2', heads, model))).toBeDefined();
    expect(stores.stats()).toMatchObject({ stores: 2, hostUsedBytes: 2 * pinned, evictions: 1 });
    expect((await stores.acquire('a:1', heads, model))).toBeDefined();
    stores.drop('a:');
    expect(stores.stats()).toMatchObject({ stores: 0, hostUsedBytes: 2 * pinned });  // both read by a step: freed at their release
    // Without a host budget (the default), the device budget alone decides, as before.
    const unbounded = new DeviceWaveStores(100 * waveStoreBytes(heads, N, model.headDim), create, () => 0, 0.1);
    for (let l = 0; l < 5; l++) expect(unbounded.acquire(`b:${l}`, heads, model)).toBeDefined();
  });

  it('runs a step on a paged store only where the cache holds every row it can read', async () => {
    const rng = new Rng(seed + 2);
    const heads = await layerHeads(rng);
    const largestCluster = Math.max(...heads.flatMap((h) => Array.from(h.arrays.counts)));
    for (let trial = 0; trial < 20; trial++) {
      const searchK = 1 + rng.int(200), ef = rng.next() < 0.3 ? searchK + rng.int(300) : 0, estimate = rng.next() < 0.5;
      const w = rng.int(300), sinks = rng.int(20);
      const ranges: [number, number][] = [[0, sinks], [N - w, N]];
      const a = { searchK, ef, estimate, ranges };
      // Brute force: per head the cut's clusters (under target + the largest cluster's rows) and every row of the
      // clusters the exact rows fall in, counted once.
      const target = candidateTokens(searchK, ef, estimate);
      let need = 0;
      for (const h of heads) {
        const rows = new Set<number>();
        for (let t = 0; t < N; t++) {
          const c = h.arrays.tokenCluster[t];
          let hit = false;
          for (const [lo, hi] of ranges) for (let e = lo; e < hi && !hit; e++) hit = h.arrays.tokenCluster[e] === c;
          if (hit) rows.add(t);
        }
        need += Math.min(N, target + largestCluster + rows.size);
      }
      expect(pagedStepFits({ cacheRows: 0, largestCluster }, a, heads, N)).toBe(true);
      expect(pagedStepFits({ cacheRows: need, largestCluster }, a, heads, N)).toBe(true);
      expect(pagedStepFits({ cacheRows: need - 1, largestCluster }, a, heads, N)).toBe(false);
      // The quick bound counts a cluster per exact row: never below the count.
      const loose = waveCacheRowsBound({ kvHeads: heads.length, tokens: N, target, largestCluster, exactRows: sinks + w });
      expect(loose).toBeGreaterThanOrEqual(need);
      expect(pagedStepFits({ cacheRows: loose, largestCluster }, a, heads, N)).toBe(true);
    }
  });
});
