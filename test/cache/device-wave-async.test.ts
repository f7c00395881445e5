// Device wave stores made and freed off the event loop (engine/cache/
// device-wave.ts with WaveGpuStore.open / closeAsync): the stand-in stores'
// creations and frees settle when the test says, as the native ones settle
// when libuv's pool has copied or freed a layer. A step that finds its
// layer's store being made waits for that one creation (other layers' steps
// do not wait on it); the device bytes, counted from a creation's start to
// its free's end, never exceed the budget, so a store evicted for another is
// freed before the other allocates; a failed creation leaves the layer on
// the host until RETRY_MS (doubling) has passed, or for good when the
// binding refused its arguments; a store is freed only once no step reads it. The real stores
// made this way: test/native/wave-gpu.test.ts (GPU).
import { describe, expect, it } from 'vitest';
import { bytesOf, convert } from '../../addon/kernels.js';
import type { WaveGpuStore, WaveGpuStoreOptions } from '../../addon/wave-gpu.js';
import type { ModelShape } from '../../core/model.js';
import { DeviceWaveStores, RETRY_MAX_MS, RETRY_MS, WARM_MS, waveStoreBytes, type HeldWaveStore } from '../../engine/cache/device-wave.js';
import { buildClusters } from '../../index/wave/cluster-build.js';
import { decodeClusters } from '../../index/wave/cluster-codec.js';
import { ClusterIndex } from '../../index/wave/cluster-index.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
const model: ModelShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16', blockSize: 64 };
const N = 600;

async function layerHeads(rng: Rng): Promise<ClusterIndex[]> {
  const words = () => {
    const f = Float32Array.from({ length: N * model.headDim }, () => rng.normal()), w = new Uint16Array(f.length);
    convert(bytesOf(f), 'f32', bytesOf(w), 'f16', f.length);
    return w;
  };
  return Promise.all(Array.from({ length: model.kvHeads }, async () => {
    const keys = words(), values = words();
    const bytes = await buildClusters({ keys, values, tokens: N, headDim: model.headDim, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 },
      { clusterSize: 8, segmentTokens: 8192, iterations: 2, seed: 1 });
    return new ClusterIndex(decodeClusters(bytes), keys, values);
  }));
}

const tick = () => new Promise<void>((r) => setImmediate(r));

/**
 * Stand-in stores whose creations and frees end when `finish`/`fail` is
 * called. `onDevice` is what the device would hold: a store's bytes from its
 * creation's start (allocation) to its free's end; `over` records every
 * instant it exceeded the budget.
 */
function slowStores(budget: number, bytes: number) {
  let onDevice = 0;
  const over: number[] = [];
  const makes: { options: WaveGpuStoreOptions; store: WaveGpuStore; finish: () => void; fail: (e: Error) => void }[] = [];
  const frees: { store: WaveGpuStore; finish: () => void }[] = [];
  const create = (options: WaveGpuStoreOptions) => {
    onDevice += bytes;
    if (onDevice > budget) over.push(onDevice);
    return new Promise<WaveGpuStore>((resolve, reject) => {
      const store = {
        close: () => void (onDevice -= bytes),
        closeAsync: () => new Promise<void>((done) => frees.push({ store, finish: () => ((onDevice -= bytes), done()) })),
      } as unknown as WaveGpuStore;
      makes.push({ options, store, finish: () => resolve(store), fail: (e) => ((onDevice -= bytes), reject(e)) });
    });
  };
  return { create, makes, frees, over, onDevice: () => onDevice };
}

/** Whether a promise has settled (after the microtasks and immediates before now). */
async function settled<T>(p: Promise<T>): Promise<boolean> {
  let done = false;
  void p.then(() => (done = true), () => (done = true));
  await tick();
  return done;
}

describe('device wave stores made off the event loop', () => {
  it("steps of a layer being made wait for its one creation; other layers' steps do not", async () => {
    const heads = await layerHeads(new Rng(seed));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const f = slowStores(10 * bytes, bytes);
    const stores = new DeviceWaveStores(10 * bytes, f.create);
    const a = [stores.acquire('a', heads, model), stores.acquire('a', heads, model), stores.acquire('a', heads, model)];
    await tick();
    expect(f.makes).toHaveLength(1);
    expect(stores.stats()).toMatchObject({ stores: 0, creating: 1, usedBytes: bytes });
    // Another layer's step starts its own creation and, once that is made, steps on it while a's is still copying.
    const b = stores.acquire('b', heads, model);
    await tick();
    expect(f.makes).toHaveLength(2);
    f.makes[1].finish();
    const hb = (await b)!;
    expect(hb.store).toBe(f.makes[1].store);
    expect(await settled(Promise.all(a))).toBe(false);
    // A step arriving meanwhile joins the same creation.
    a.push(stores.acquire('a', heads, model));
    f.makes[0].finish();
    const held = (await Promise.all(a)) as HeldWaveStore[];
    expect(held.every((h) => h.store === f.makes[0].store)).toBe(true);
    expect(f.makes).toHaveLength(2);
    expect(stores.stats()).toMatchObject({ stores: 2, creating: 0, refused: 0 });
    // Made: the next step has it at once.
    const again = stores.acquire('a', heads, model);
    expect(await settled(again)).toBe(true);
    for (const h of [...held, hb, (await again)!]) h.release();
    stores.close();
    expect(f.onDevice()).toBe(0);
    expect(f.over).toEqual([]);
  });

  it('an evicted store is freed before the one made in its place allocates: the budget holds at every instant', async () => {
    const heads = await layerHeads(new Rng(seed + 1));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const budget = Math.floor(2.5 * bytes);
    const f = slowStores(budget, bytes);
    let t = 0;
    const stores = new DeviceWaveStores(budget, f.create, () => t);
    for (const k of ['a', 'b']) {
      const p = stores.acquire(k, heads, model);
      await tick();
      f.makes.at(-1)!.finish();
      (await p)!.release();
    }
    t += WARM_MS;
    const c = stores.acquire('c', heads, model);
    await tick();
    // a (idle, least recent) is being freed; c is admitted but allocates nothing until that free has ended.
    expect(f.frees.map((x) => x.store)).toEqual([f.makes[0].store]);
    expect(f.makes).toHaveLength(2);
    expect(stores.stats()).toMatchObject({ stores: 1, creating: 1, freeing: 1, usedBytes: 2 * bytes, evictions: 1 });
    // No room for d beside b (stepped on just now) and c (the bytes a frees are c's): refused at once, nothing else evicted.
    (await stores.acquire('b', heads, model))!.release();
    expect(await settled(stores.acquire('d', heads, model).then((h) => expect(h).toBeUndefined()))).toBe(true);
    expect(f.frees).toHaveLength(1);
    f.frees[0].finish();
    await tick();
    expect(f.makes).toHaveLength(3);
    expect(stores.stats()).toMatchObject({ freeing: 0, usedBytes: 2 * bytes });
    f.makes[2].finish();
    (await c)!.release();
    expect(stores.stats()).toMatchObject({ stores: 2, creating: 0, refused: 1 });
    expect(f.over).toEqual([]);
    stores.close();
    expect(f.onDevice()).toBe(0);
  });

  it('a failed creation: the steps waiting on it and later ones take the host path, its bytes return; tried again after RETRY_MS, doubling', async () => {
    const heads = await layerHeads(new Rng(seed + 2));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const f = slowStores(Math.floor(1.5 * bytes), bytes);
    let clock = 0;
    const stores = new DeviceWaveStores(Math.floor(1.5 * bytes), f.create, () => clock);
    const waiting = [stores.acquire('a', heads, model), stores.acquire('a', heads, model)];
    await tick();
    // Beside a's creation there is no room for b.
    expect(await stores.acquire('b', heads, model)).toBeUndefined();
    f.makes[0].fail(new Error('out of device memory'));
    expect(await Promise.all(waiting)).toEqual([undefined, undefined]);
    expect(stores.stats()).toMatchObject({ stores: 0, creating: 0, usedBytes: 0, refused: 3 });
    clock = RETRY_MS - 1;
    expect(await stores.acquire('a', heads, model)).toBeUndefined();
    expect(f.makes).toHaveLength(1);
    // Its room is free again: b is made.
    const b = stores.acquire('b', heads, model);
    await tick();
    f.makes[1].finish();
    expect((await b)!.store).toBe(f.makes[1].store);
    (await b)!.release();
    expect(f.over).toEqual([]);

    // Past RETRY_MS a is tried again (b, idle and cold, evicted for it); a second failure waits twice as long.
    clock = RETRY_MS + WARM_MS;
    const again = stores.acquire('a', heads, model);
    await tick();
    f.frees[0]?.finish();
    await tick();
    expect(f.makes).toHaveLength(3);
    f.makes[2].fail(new Error('out of device memory'));
    expect(await again).toBeUndefined();
    const failedAt = clock;
    clock = failedAt + 2 * RETRY_MS - 1;
    expect(await stores.acquire('a', heads, model)).toBeUndefined();
    expect(f.makes).toHaveLength(3);
    clock = failedAt + 2 * RETRY_MS;
    const third = stores.acquire('a', heads, model);
    await tick();
    expect(f.makes).toHaveLength(4);
    f.makes[3].finish();
    const held = (await third)!;
    expect(held.store).toBe(f.makes[3].store);
    held.release();
    expect(f.over).toEqual([]);
  });

  it('a creation refused for its arguments (TypeError, RangeError) is never tried again', async () => {
    const heads = await layerHeads(new Rng(seed + 5));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const f = slowStores(10 * bytes, bytes);
    let clock = 0;
    const stores = new DeviceWaveStores(10 * bytes, f.create, () => clock);
    const p = stores.acquire('a', heads, model);
    await tick();
    f.makes[0].fail(new TypeError('keys: expected a Uint16Array'));
    expect(await p).toBeUndefined();
    clock = 100 * RETRY_MAX_MS;
    expect(await stores.acquire('a', heads, model)).toBeUndefined();
    expect(f.makes).toHaveLength(1);
    expect(stores.stats()).toMatchObject({ usedBytes: 0, refused: 2 });
  });

  it('a dropped store is freed after its last reader; one dropped while being made, once made, its waiting steps on the host', async () => {
    const heads = await layerHeads(new Rng(seed + 3));
    const bytes = waveStoreBytes(heads, N, model.headDim);
    const f = slowStores(10 * bytes, bytes);
    const stores = new DeviceWaveStores(10 * bytes, f.create);
    const p = stores.acquire('1:0', heads, model);
    await tick();
    f.makes[0].finish();
    const r1 = (await p)!, r2 = (await stores.acquire('1:0', heads, model))!;
    stores.drop('1:');
    r1.release();
    await tick();
    expect(f.frees).toHaveLength(0); // r2 still reads it
    r2.release();
    expect(f.frees.map((x) => x.store)).toEqual([f.makes[0].store]);
    expect(stores.stats()).toMatchObject({ freeing: 1, usedBytes: bytes });
    f.frees[0].finish();
    await tick();
    expect(stores.stats()).toMatchObject({ freeing: 0, usedBytes: 0 });

    const waiting = stores.acquire('2:0', heads, model);
    await tick();
    stores.drop('2:');
    expect(f.frees).toHaveLength(1);
    f.makes[1].finish();
    expect(await waiting).toBeUndefined();
    expect(f.frees.map((x) => x.store)).toEqual([f.makes[0].store, f.makes[1].store]);
    f.frees[1].finish();
    // The stores closed while one is being made: it is freed once made, and no step gets it.
    const late = stores.acquire('3:0', heads, model);
    await tick();
    stores.close();
    f.makes[2].finish();
    expect(await late).toBeUndefined();
    expect(f.frees).toHaveLength(3);
    f.frees[2].finish();
    await tick();
    expect(f.onDevice()).toBe(0);
    expect(stores.stats()).toMatchObject({ usedBytes: 0, freeing: 0, creating: 0 });
    expect(f.over).toEqual([]);
  });
});
