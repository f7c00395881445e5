// A deleted document's copies on the device are freed at the delete, not
// left to wait for eviction, and never while a step is reading them (real
// server on 127.0.0.1, real LMDB files); so are those of a layer evicted from
// host memory (a document read on use from a real Redis Cluster, skipped
// without Redis as redis-store.test.ts). No device runs here: the server's
// GPU backend is made over PoolModel (engine/cache/simulated-pool.ts), the
// host model of the native pool's page tables and pins, so what it holds is
// what the device would hold. The native release is test/native/gpu.test.ts's
// (GPU only); the wave stores' is test/cache/device-wave.test.ts's.
import { describe, expect, it } from 'vitest';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import type { RunningServer } from '../../api/server.js';
import { GpuBackend } from '../../engine/cache/gpu-pool.js';
import { PoolModel } from '../../engine/cache/simulated-pool.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { redisInstalled, redisRequired, startRedisCluster, type RedisCluster } from '../helpers/redis-cluster.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
const rng = new Rng(seed);
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
// 300 tokens: 4 whole 64-token blocks per (layer, kv head) go to the pool, the last 44 rows stay on the host.
const TOKENS = 300;
const BLOCKS_PER_DOCUMENT = 4 * model.layers * model.kvHeads;

/**
 * A GPU backend over PoolModel (made at the backend's first step; `pool()`
 * after it). `holdNext()` makes the next attend wait on the device until
 * `letGo()`, and resolves once that attend is there; the others run through.
 */
function modelBackend(budgetBytes: number, rangeTables = true) {
  let pool: PoolModel | undefined;
  let hold: (() => Promise<void>) | undefined;
  let release = () => {};
  const gpu = GpuBackend.over(
    { ok: true, device: 'PoolModel (host)', memory: 1 << 30, built: false },
    { budgetBytes, rangeTables },
    { pool: (o) => (pool = new PoolModel(o, () => (hold ? hold() : Promise.resolve()))) },
  );
  return {
    gpu,
    pool: () => pool!,
    holdNext: () =>
      new Promise<void>((entered) => {
        hold = () => {
          hold = undefined;
          entered();
          return new Promise<void>((go) => (release = go));
        };
      }),
    // Also called when an expectation failed: the server's close waits for the held step.
    letGo: () => release(),
  };
}

/** Blocks resident, and blocks a step holds: pinned one by one, or in held range tables (the path GpuBackend.rangeTables picks). */
function holding(pool: PoolModel): { used: number; held: number } {
  const s = pool.stats();
  return { used: s.used, held: s.pinned + s.rangeHeld };
}

describe('a deleted document on the device', () => {
  for (const rangeTables of [true, false])
    it(`frees its pool blocks at the delete, and a step's blocks only once the step has read them (${rangeTables ? 'range tables' : 'block by block'})`, async () => {
      const { gpu, pool, holdNext, letGo } = modelBackend(1 << 20, rangeTables);
      const tmp = tempDataDir();
      const server = await startInProcess(tmp.dir, {}, { gpu });
      try {
        const client = new KvrecallClient({ url: server.url });
        const open = async (id: string) => {
          await client.createDocument(id, model, { methods: ['exact'] });
          for (let layer = 0; layer < model.layers; layer++) {
            const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
            await client.uploadDocumentKv(id, { layer, start: 0, k: c.k, v: c.v });
          }
          await client.sealDocument(id);
          return (await client.createSession({ model, documents: [id] })).id;
        };
        const step = (sid: string, layer: number) => client.attend(sid, { layer, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)) });
        const a = await open('a'), b = await open('b');
        for (const sid of [a, b]) for (let layer = 0; layer < model.layers; layer++) expect((await step(sid, layer)).stats.backend).toBe('cuda');
        expect(holding(pool())).toEqual({ used: 2 * BLOCKS_PER_DOCUMENT, held: 0 });

        // Deleted with no step reading it: its blocks leave the pool at once, the other document's stay.
        await client.deleteDocument('a');
        expect(pool().stats().used).toBe(BLOCKS_PER_DOCUMENT);
        expect((await step(b, 0)).stats.blocks).toMatchObject({ selected: 4 * model.kvHeads, hits: 4 * model.kvHeads });

        // Deleted while a step reads its layer 1 on the device: that layer's blocks stay (pinned) until the step
        // ends, then go; its layer 0, which no step reads, goes at once.
        const inKernel = holdNext();
        const reading = step(b, 1);
        await inKernel;
        await client.deleteDocument("b");
        expect(holding(pool())).toEqual({ used: 4 * model.kvHeads, held: 4 * model.kvHeads });
        letGo();
        expect((await reading).stats.backend).toBe('cuda');
        expect(holding(pool())).toEqual({ used: 0, held: 0 });
        // No slot was freed under a pin or changed under a read.
        expect(pool().faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
      } finally {
        letGo();
        await server.close();
        tmp.cleanup();
      }
    });

  it('a step that reaches the device after its document was dropped frees what it made resident when it ends', async () => {
    const { gpu, pool } = modelBackend(1 << 20);
    const m = { ...model, blockSize: 64 };
    const doc = new KvSegment(m.kvHeads, m.headDim, m.dtype), other = new KvSegment(m.kvHeads, m.headDim, m.dtype);
    const part = (segment: KvSegment) => ({ segment, blocks: [Int32Array.of(0, 1), Int32Array.of(0, 1)], priority: [Uint8Array.of(0, 0), Uint8Array.of(0, 0)] });
    const q = new Float32Array(m.qHeads * m.headDim), out = new Float32Array(q.length), lse = new Float32Array(m.qHeads);
    expect(gpu.fits(m, 8)).toBe(true);
    await gpu.attend(m, 0, [part(other)], q, 1, out, lse);
    // Dropped before any of its blocks reached the device (a step past its document check, not yet on the device).
    gpu.drop([doc]);
    await gpu.attend(m, 0, [part(doc), part(other)], q, 1, out, lse);
    expect(holding(pool())).toEqual({ used: 4, held: 0 }); // the other segment's 2 blocks x 2 heads
    expect(pool().faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
    gpu.close();
  });

  it('a dropped segment the step pooled no block of (none ever uploaded) ends the step as the others do: answered, every segment counted out', async () => {
    const { gpu, pool } = modelBackend(1 << 20);
    const m = { ...model, blockSize: 64 };
    const doc = new KvSegment(m.kvHeads, m.headDim, m.dtype), other = new KvSegment(m.kvHeads, m.headDim, m.dtype);
    // A block method's part whose only blocks are partial (attended on the host): nothing of it goes to the pool.
    const none = { segment: doc, blocks: [new Int32Array(0), new Int32Array(0)], priority: [new Uint8Array(0), new Uint8Array(0)] };
    const two = { segment: other, blocks: [Int32Array.of(0, 1), Int32Array.of(0, 1)], priority: [Uint8Array.of(0, 0), Uint8Array.of(0, 0)] };
    const q = new Float32Array(m.qHeads * m.headDim), out = new Float32Array(q.length), lse = new Float32Array(m.qHeads);
    expect(gpu.fits(m, 4)).toBe(true);
    gpu.drop([doc]);
    // The backend freed "its blocks" under no pool client (releaseRange(NaN, NaN): a RangeError from the native binding,
    // and from the model now) and stopped there: the step failed after its kernel, the other segment counted as read for good.
    await gpu.attend(m, 0, [none, two], q, 1, out, lse);
    gpu.drop([other]);
    expect(holding(pool())).toEqual({ used: 0, held: 0 });
    gpu.close();
  });
});

const redis = redisInstalled();
if (!redis && !redisRequired()) console.warn('device-release: the eviction test is SKIPPED: redis-server and redis-cli are not installed');

describe.skipIf(!redis && !redisRequired())('a layer evicted from host memory on the device', () => {
  it("frees its pool blocks at the eviction (read again, it is a new segment that never hits the old ones); a step's layer is never evicted under it", async () => {
    const m = { ...model, layers: 4 };
    // 3000 tokens: 46 whole blocks per (layer, kv head) in the pool. The budget holds two layers and two
    // sessions' own tokens (256 rows a layer reserved), not three layers: a third evicts one.
    const tokens = 3000;
    const layerBlocks = Math.floor(tokens / 64) * m.kvHeads;
    const layerBytes = tokens * m.kvHeads * m.headDim * 2 * 2;
    const sessionBytes = m.layers * 256 * m.kvHeads * m.headDim * 2 * 2;
    const memoryBudget = 2 * layerBytes + 2 * sessionBytes + layerBytes / 4;
    // 1024 slots: both sessions' working sets are admitted, and the pool never evicts on its own here.
    const { gpu, pool, holdNext, letGo } = modelBackend(16 << 20);
    const dirs = [tempDataDir(), tempDataDir()];
    let cluster: RedisCluster | undefined;
    let writer: RunningServer | undefined, reader: RunningServer | undefined;
    try {
      cluster = await startRedisCluster();
      writer = await startInProcess(dirs[0].dir, { store: cluster.url });
      reader = await startInProcess(dirs[1].dir, { store: cluster.url, memoryBudget }, { gpu });
      const w = new KvrecallClient({ url: writer.url }), r = new KvrecallClient({ url: reader.url });
      await w.createDocument('big', m, { methods: ['exact'] });
      for (let layer = 0; layer < m.layers; layer++) {
        const c = randomKv(rng, 'f16', m.kvHeads, tokens, m.headDim);
        await w.uploadDocumentKv('big', { layer, start: 0, k: c.k, v: c.v });
      }
      await w.sealDocument('big');
      const [s1, s2] = [(await r.createSession({ model: m, documents: ['big'] })).id, (await r.createSession({ model: m, documents: ['big'] })).id];
      const resident = async () => (await reader!.engine.documents.acquire('big')).layers.map((s, l) => (s ? l : -1)).filter((l) => l >= 0);
      const step = async (sid: string, layer: number) => {
        const got = await r.attend(sid, { layer, q: tensor('f32', [m.qHeads, m.headDim], randomQ(rng, m.qHeads, m.headDim)) });
        expect(got.stats.backend).toBe('cuda');
        return got.stats.blocks;
      };
      const evictions = () => reader!.engine.documents.residency.stats().evictions;
      expect(await resident()).toEqual([0, 1]);

      await step(s1, 0);
      await step(s1, 1);
      expect(holding(pool())).toEqual({ used: 2 * layerBlocks, held: 0 });
      // Layer 2 read: layer 0, the least recently used, is evicted, and its blocks leave the pool with it.
      await step(s1, 2);
      expect(await resident()).toEqual([1, 2]);
      expect(evictions()).toBe(1);
      expect(holding(pool())).toEqual({ used: 2 * layerBlocks, held: 0 });

      // A step on layer 1 held on the device: its layer is pinned, so the reads of layers 0 and 3 by the other
      // session evict layer 2 and then layer 3, never layer 1, whose blocks stay held until the step ends.
      const inKernel = holdNext();
      const held = step(s1, 1);
      await inKernel;
      await step(s2, 3);
      expect(await resident()).toEqual([1, 3]);
      expect(holding(pool())).toEqual({ used: 2 * layerBlocks, held: layerBlocks });
      // Layer 0 read again is a new segment: none of its blocks hits the old segment's (which are gone).
      expect(await step(s2, 0)).toMatchObject({ selected: layerBlocks, hits: 0 });
      expect(await resident()).toEqual([0, 1]);
      expect(evictions()).toBe(3);
      expect(holding(pool())).toEqual({ used: 2 * layerBlocks, held: layerBlocks });
      letGo();
      await held;
      expect(holding(pool())).toEqual({ used: 2 * layerBlocks, held: 0 });
      // Once its step ended, layer 1 is the least recently used: evicted by the read of layer 2, its blocks go.
      await step(s1, 2);
      expect(await resident()).toEqual([0, 2]);
      expect(holding(pool())).toEqual({ used: 2 * layerBlocks, held: 0 });
      // A resident layer's blocks still hit.
      expect(await step(s1, 0)).toMatchObject({ selected: layerBlocks, hits: layerBlocks });
      expect(pool().faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
    } finally {
      letGo();
      for (const s of [writer, reader]) await s?.close();
      await cluster?.stop();
      for (const d of dirs) d.cleanup();
    }
  }, 120_000);
});
