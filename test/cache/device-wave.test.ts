// The device wave stores' budget (engine/cache/device-wave.ts): a layer's
// store is made once and shared, the least recently used one is evicted to
// make room, never one a step is reading or read within WARM_MS (layers that
// do not all fit do not evict each other every step), a layer that cannot be held (too
// big, every store pinned, the device refusing — that one for good) is
// refused so the step runs on the host; a deleted document's layers are
// closed, but never under a step. The device itself cannot run here: the stores are stand-ins
// that record their closing; the clusters are the real builder's. On a GPU,
// test/integration/gpu-wave.test.ts runs the real stores through a server.
import { describe, expect, it } from 'vitest';
import { bytesOf, convert } from '../../addon/kernels.js';
import type { WaveGpuStore, WaveGpuStoreOptions } from '../../addon/wave-gpu.js';
import type { ModelShape } from '../../core/model.js';
import { DeviceWaveStores, WARM_MS, waveStoreBytes } from '../../engine/cache/device-wave.js';
import { GpuBackend } from '../../engine/cache/gpu-pool.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { buildClusters } from '../../index/wave/cluster-build.js';
import { decodeClusters } from '../../index/wave/cluster-codec.js';
import { ClusterIndex } from '../../index/wave/cluster-index.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
const model: ModelShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16', blockSize: 64 };
const N = 600;

async function layerHeads(rng: Rng, m: ModelShape = model): Promise<ClusterIndex[]> {
  const words = () => {
    const f = Float32Array.from({ length: N * m.headDim }, () => rng.normal()), w = new Uint16Array(f.length);
    convert(bytesOf(f), 'f32', bytesOf(w), 'f16', f.length);
    return w;
  };
  return Promise.all(Array.from({ length: m.kvHeads }, async () => {
    const keys = words(), values = words();
    const bytes = await buildClusters({ keys, values, tokens: N, headDim: m.headDim, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 },
      { clusterSize: 8, segmentTokens: 8192, iterations: 2, seed: 1 });
    return new ClusterIndex(decodeClusters(bytes), keys, values);
  }));
}

/** Lets the stand-ins' promises (creations, frees) settle. */
const tick = () => new Promise<void>((r) => setImmediate(r));

/** Stand-in stores: which were made (with what) and which closed. */
function standIns() {
  const made: { options: WaveGpuStoreOptions; closed: boolean }[] = [];
  let fail = false;
  const create = async (options: WaveGpuStoreOptions) => {
    if (fail) throw new Error('out of device memory');
    const rec = { options, closed: false };
    made.push(rec);
    return { close: () => void (rec.closed = true), closeAsync: async () => void (rec.closed = true) } as unknown as WaveGpuStore;
  };
  return { made, create, failNext: (f: boolean) => void (fail = f) };
}

describe('device wave stores', () => {
  it('shares a layer, evicts the least recently used unpinned one, refuses what cannot be held', async () => {
    const heads = await layerHeads(new Rng(seed));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    // K and V of every head are the bulk: 2 heads × 600 rows × 16 × 2 bytes × 2.
    expect(bytes).toBeGreaterThan(2 * N * model.headDim * 4);
    const s = standIns();
    let t = 0;
    const stores = new DeviceWaveStores(Math.floor(2.5 * bytes), s.create, () => t);

    const a = (await stores.acquire('a', heads, model))!;
    expect(s.made).toHaveLength(1);
    expect(s.made[0].options).toMatchObject({ kvHeads: 2, headDim: 16, dtype: 'f16', tokens: N });
    expect(s.made[0].options.heads[1].keys).toBe(heads[1].keys);
    a.release();
    const b = (await stores.acquire('b', heads, model))!; // pinned until the end
    const again = (await stores.acquire('a', heads, model))!;
    expect(again.store).toBe(a.store); // shared, not made twice
    expect(s.made).toHaveLength(2);
    again.release();

    // Room for c while a was stepped on just now: none (a warm store is not evicted).
    expect((await stores.acquire('c', heads, model))).toBeUndefined();
    expect(stores.stats()).toMatchObject({ stores: 2, evictions: 0, refused: 1 });
    // Once a has been idle WARM_MS: a (least recently used and unpinned) goes, b (pinned) stays.
    t += WARM_MS;
    const c = (await stores.acquire('c', heads, model))!;
    expect(s.made.map((m) => m.closed)).toEqual([true, false, false]);
    expect(stores.stats()).toMatchObject({ stores: 2, usedBytes: 2 * bytes, evictions: 1, refused: 1 });

    // Both held stores pinned: d cannot be held, nothing is closed.
    expect((await stores.acquire('d', heads, model))).toBeUndefined();
    expect(s.made.map((m) => m.closed)).toEqual([true, false, false]);
    // Larger than the whole budget, and the device refusing: the host path too.
    expect((await new DeviceWaveStores(bytes - 1, s.create).acquire('e', heads, model))).toBeUndefined();
    c.release();
    t += WARM_MS;
    s.failNext(true);
    expect((await stores.acquire('f', heads, model))).toBeUndefined();
    expect(stores.stats()).toMatchObject({ stores: 1, refused: 3, evictions: 2 }); // c (idle) was evicted to try f
    // A layer the device refused is not tried again (each try would copy the layer).
    s.failNext(false);
    const tries = s.made.length;
    expect((await stores.acquire('f', heads, model))).toBeUndefined();
    expect(s.made).toHaveLength(tries);
    expect(stores.stats()).toMatchObject({ refused: 4 });

    b.release();
    stores.close();
    expect(s.made.every((m) => m.closed)).toBe(true);
    expect(stores.stats()).toMatchObject({ stores: 0, usedBytes: 0 });
  });

  it('layers that do not all fit: those held stay, the others step on the host, nothing uploaded again, until one goes idle', async () => {
    const heads = await layerHeads(new Rng(seed ^ 3));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const s = standIns();
    let t = 0;
    const stores = new DeviceWaveStores(Math.floor(2.5 * bytes), s.create, () => t);
    // Tokens stepping through three layers, of which two fit: LRU alone evicted the next layer's store every step.
    const held: string[] = [];
    for (let token = 0; token < 5; token++)
      for (const layer of ['x', 'y', 'z']) {
        const h = (await stores.acquire(layer, heads, model));
        if (h) held.push(layer);
        h?.release();
        t += 5;
      }
    expect(s.made).toHaveLength(2);
    expect(held.filter((l) => l === 'z')).toHaveLength(0);
    expect(stores.stats()).toMatchObject({ stores: 2, evictions: 0, refused: 5 });
    // x stops being stepped on (its sessions ended): once idle WARM_MS, z takes its room.
    t += WARM_MS;
    (await stores.acquire('y', heads, model))!.release();
    const z = (await stores.acquire('z', heads, model))!;
    expect(z).toBeDefined();
    expect(s.made.map((m) => m.closed)).toEqual([true, false, false]);
    expect(stores.stats()).toMatchObject({ stores: 2, evictions: 1 });
    z.release();
    stores.close();
  });

  it("drops a deleted document's layers: now if no step reads one, else when the last releases it", async () => {
    const heads = await layerHeads(new Rng(seed));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const s = standIns();
    const stores = new DeviceWaveStores(10 * bytes, s.create);
    const read = (await stores.acquire('1:0', heads, model))!; // a step reads layer 0 of segment 1
    (await stores.acquire('1:1', heads, model))!.release();
    (await stores.acquire('11:0', heads, model))!.release(); // another segment, whose key starts with "1" too
    (await stores.acquire('2:0', heads, model))!.release();
    stores.drop('1:');
    expect(s.made.map((m) => m.closed)).toEqual([false, true, false, false]);
    // A free's bytes count until it has ended (off the event loop: the stand-in's, a promise).
    expect(stores.stats()).toMatchObject({ stores: 2, usedBytes: 4 * bytes, freeing: 1 });
    await tick();
    // The read one is out of reach (a later acquire makes a new store) but its bytes are held until it is closed.
    expect(stores.stats()).toMatchObject({ stores: 2, usedBytes: 3 * bytes, evictions: 0, freeing: 0 });
    read.release();
    expect(s.made.map((m) => m.closed)).toEqual([true, true, false, false]);
    await tick();
    expect(stores.stats()).toMatchObject({ stores: 2, usedBytes: 2 * bytes });
    stores.close();
    expect(s.made.every((m) => m.closed)).toBe(true);
  });

  it("the backend drops a segment's wave layers with it, and a step begun before steps it on the host", async () => {
    const m: ModelShape = { ...model, headDim: 64 }; // a shape the device kernels take
    const heads = await layerHeads(new Rng(seed + 1), m);
    const s = standIns();
    const gpu = GpuBackend.over({ ok: true, device: 'stand-in', memory: 1 << 30, built: false }, { budgetBytes: 1 << 20, waveBudgetBytes: 8 * waveStoreBytes(heads, N, m.headDim) }, { waveStore: s.create });
    const doc = new KvSegment(m.kvHeads, m.headDim, m.dtype), other = new KvSegment(m.kvHeads, m.headDim, m.dtype);
    const held = (await gpu.waveLayer(m, doc, 0, heads))!;
    (await gpu.waveLayer(m, doc, 1, heads))!.release();
    (await gpu.waveLayer(m, other, 0, heads))!.release();
    gpu.drop([doc]);
    expect(s.made.map((x) => x.closed)).toEqual([false, true, false]);
    expect((await gpu.waveLayer(m, doc, 1, heads))).toBeUndefined();
    held.release();
    expect(s.made.map((x) => x.closed)).toEqual([true, true, false]);
    expect(gpu.describe().wave).toMatchObject({ stores: 1 });
    gpu.close();
  });
});
