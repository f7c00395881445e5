// The CUDA backend. Everywhere: the division of a selection between the GPU
// pool and the host (whole document blocks vs the rest) loses and repeats no
// row, so the two halves merged by log-sum-exp are the whole (checked on the
// host kernel against float64). With a GPU (skipped here and in CI): a real
// server whose attends run on the pool answers like the float64 reference
// and like a CPU-only server for exact, nosa and topk-blocks, also when its
// pool is far smaller than the KV it serves; admission refuses a session
// whose working set does not fit beside the open ones; range parts through
// the pool's range tables answer bit for bit as block by block.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import type { SelectionPart } from '../../index/method.js';
import { cudaAvailable, deviceName } from '../../addon/cuda.js';
import { attend } from '../../addon/kernels.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { GpuBackend, POOL_BLOCK, RANGE_PRIORITY } from '../../engine/cache/gpu-pool.js';
import { poolPartBlocks, rowsOf, splitForPool, toAttendSegment, type PoolPart } from '../../engine/cache/selection-parts.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`gpu-backend: seed ${seed}`);
const gpu = cudaAvailable();

type Health = { backend: string; gpu: { pool: { slots: number; evictions: number } } };
type Created = { id: string; backend?: string };

function segmentOf(c: KvChunk, n: number, kvHeads: number, d: number): KvSegment {
  const s = new KvSegment(kvHeads, d, 'f16');
  s.append(c.k.data, c.v.data, 'f16', n);
  return s;
}

/** Merges two (out, lse) parts in float64. */
function merge(a: { out: Float32Array; lse: Float32Array }, b: { out: Float32Array; lse: Float32Array }, d: number) {
  const heads = a.lse.length, out = new Float64Array(heads * d), lse = new Float64Array(heads);
  for (let h = 0; h < heads; h++) {
    const m = Math.max(a.lse[h], b.lse[h]);
    const wa = Math.exp(a.lse[h] - m), wb = Math.exp(b.lse[h] - m);
    for (let j = 0; j < d; j++) out[h * d + j] = (wa * a.out[h * d + j] + wb * b.out[h * d + j]) / (wa + wb);
    lse[h] = m + Math.log(wa + wb);
  }
  return { out, lse };
}

describe('splitForPool', () => {
  it('sends whole document blocks to the pool, the rest to the host, and the merge is the whole', async () => {
    const rng = new Rng(seed);
    const kvHeads = 2, qHeads = 8, d = 64, docTokens = 64 * 9 + 23, ownTokens = 40;
    const docChunk = randomKv(rng, 'f16', kvHeads, docTokens, d), ownChunk = randomKv(rng, 'f16', kvHeads, ownTokens, d);
    const doc = segmentOf(docChunk, docTokens, kvHeads, d), own = segmentOf(ownChunk, ownTokens, kvHeads, d);
    const last = Math.floor(docTokens / POOL_BLOCK); // the partial block
    const parts: SelectionPart[] = [
      { segment: doc, begin: 5, end: 140 }, // partial at both ends, one whole block inside
      { segment: doc, begin: 150, end: 170 }, // inside one block: host only
      { segment: doc, blocks: { size: POOL_BLOCK, ids: [Int32Array.of(3, 5, last), Int32Array.of(4)], priority: [Uint8Array.of(0, 2, 1), Uint8Array.of(1)] } },
      { segment: doc, ids: [Int32Array.of(400, 401, 390), Int32Array.of(330)] },
      { segment: own, begin: 0, end: ownTokens },
    ];
    const split = splitForPool(parts, (s) => s !== own, POOL_BLOCK, kvHeads, RANGE_PRIORITY);

    // Whole blocks of the document only, each with its class: the range part as one range (no block listed), the block list's per head.
    expect(split.pool.every((p) => p.segment === doc)).toBe(true);
    for (const p of split.pool)
      for (let h = 0; h < kvHeads; h++) {
        if (!p.range) expect(p.priority[h].length).toBe(p.blocks[h].length);
        for (const b of poolPartBlocks(p, h)) expect((b + 1) * POOL_BLOCK).toBeLessThanOrEqual(docTokens);
      }
    expect(split.pool[0]).toEqual({ segment: doc, range: { first: 1, count: 1, priority: RANGE_PRIORITY } });
    expect(split.pool.map((p) => Array.from(poolPartBlocks(p, 0)))).toEqual([[1], [3, 5]]);
    expect(Array.from(split.pool[1].priority![0])).toEqual([0, 2]);
    expect(split.poolBlocks).toBe(2 + 2 + 1);

    // The rows of both halves are the rows of the selection, none twice.
    const poolParts: SelectionPart[] = split.pool.map((p) => ({ segment: p.segment, blocks: { size: POOL_BLOCK, ids: Array.from({ length: kvHeads }, (_, h) => poolPartBlocks(p, h)) } }));
    const key = (p: SelectionPart, h: number) => Array.from(rowsOf(p, h), (r) => `${p.segment === own ? 'own' : 'doc'}:${r}`);
    for (let h = 0; h < kvHeads; h++) {
      const whole = parts.flatMap((p) => key(p, h)).sort();
      const halves = [...poolParts, ...split.host].flatMap((p) => key(p, h)).sort();
      expect(halves).toEqual(whole);
      expect(new Set(halves).size).toBe(halves.length);
    }

    // Attended separately and merged, equal to float64 attention over the selection.
    const q = randomQ(rng, qHeads, d);
    const run = async (ps: SelectionPart[]) => {
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
      await attend({ q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: 1 / Math.sqrt(d), segments: ps.map(toAttendSegment), out, lse });
      return { out, lse };
    };
    const merged = merge(await run(split.host), await run(poolParts), d);
    const k = concatValues([docChunk, ownChunk], 'kValues'), v = concatValues([docChunk, ownChunk], 'vValues');
    const rows = Array.from({ length: kvHeads }, (_, h) => parts.flatMap((p) => Array.from(rowsOf(p, h), (r) => (p.segment === own ? docTokens + r : r))));
    const ref = referenceAttention(q, k, v, qHeads, d, 1 / Math.sqrt(d), rows);
    expect(maxRelError(merged.out, ref.out, qHeads)).toBeLessThan(1e-5);
    expect(maxRelErrorScalar(merged.lse, ref.lse)).toBeLessThan(1e-5);
  });
});

describe('splitForPool: range parts', () => {
  it("a range part's whole blocks are one range, no block listed, the same blocks as listing them; the partial ends stay on the host", () => {
    const rng = new Rng(seed + 7);
    const kvHeads = 8, d = 64;
    for (let trial = 0; trial < 200; trial++) {
      const tokens = 1 + rng.int(64 * 40);
      const seg = new KvSegment(kvHeads, d, 'f16', 1);
      seg.setTokens(tokens);
      const begin = rng.int(tokens), end = begin + rng.int(tokens - begin + 1);
      const split = splitForPool([{ segment: seg, begin, end }], () => true, POOL_BLOCK, kvHeads, RANGE_PRIORITY);
      // The blocks a per-block split listed: every whole block inside [begin, end).
      const whole: number[] = [];
      for (let b = 0; (b + 1) * POOL_BLOCK <= tokens; b++) if (b * POOL_BLOCK >= begin && (b + 1) * POOL_BLOCK <= end) whole.push(b);
      if (whole.length === 0) expect(split.pool).toEqual([]);
      else {
        expect(split.pool).toEqual([{ segment: seg, range: { first: whole[0], count: whole.length, priority: RANGE_PRIORITY } }]);
        for (let h = 0; h < kvHeads; h++) expect(Array.from(poolPartBlocks(split.pool[0], h))).toEqual(whole);
      }
      expect(split.poolBlocks).toBe(whole.length * kvHeads);
      // Host rows + pool rows = [begin, end), none twice.
      const rows = new Set<number>();
      for (const b of whole) for (let t = b * POOL_BLOCK; t < (b + 1) * POOL_BLOCK; t++) rows.add(t);
      for (const p of split.host) for (const r of rowsOf(p, 0)) {
        expect(rows.has(r)).toBe(false);
        rows.add(r);
      }
      expect(rows.size).toBe(end - begin);
      if (end > begin) expect(Math.min(...rows)).toBe(begin);
    }
  });

  it('a whole 1M-token document is one range part of 16384 blocks for every head', () => {
    const seg = new KvSegment(8, 128, 'f16', 1);
    seg.setTokens(2 ** 20);
    const split = splitForPool([{ segment: seg }], () => true, POOL_BLOCK, 8, RANGE_PRIORITY);
    expect(split).toEqual({ pool: [{ segment: seg, range: { first: 0, count: 16384, priority: RANGE_PRIORITY } }], host: [], poolBlocks: 16384 * 8 });
  });
});

describe.skipIf(!gpu.ok)('GPU backend: range tables', () => {
  it('range parts through range tables answer bit for bit as block by block on the same pool, and as float64, step after step', async () => {
    const rng = new Rng(seed + 9);
    const m = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 128, dtype: 'f16' as const, blockSize: POOL_BLOCK };
    const d = m.headDim, tokens = 64 * 50, scale = 1 / Math.sqrt(d);
    const chunk = randomKv(rng, 'f16', m.kvHeads, tokens, d);
    const doc = segmentOf(chunk, tokens, m.kvHeads, d);
    // Sinks, a block list, a window: the parts of a block method's step.
    const parts: PoolPart[] = [
      { segment: doc, range: { first: 0, count: 2, priority: RANGE_PRIORITY } },
      { segment: doc, blocks: [Int32Array.of(10, 20), Int32Array.of(11)], priority: [Uint8Array.of(0, 1), Uint8Array.of(0)] },
      { segment: doc, range: { first: 45, count: 5, priority: RANGE_PRIORITY } },
    ];
    const rows = Array.from({ length: m.kvHeads }, (_, h) =>
      parts.flatMap((p) => Array.from(poolPartBlocks(p, h)).flatMap((b) => Array.from({ length: POOL_BLOCK }, (_, i) => b * POOL_BLOCK + i))));
    const backend = GpuBackend.open({ budgetBytes: 64 << 20 })!;
    try {
      for (let step = 0; step < 4; step++) {
        const q = randomQ(rng, m.qHeads, d);
        const run = async (rangeTables: boolean) => {
          backend.rangeTables = rangeTables;
          const out = new Float32Array(m.qHeads * d), lse = new Float32Array(m.qHeads);
          expect(backend.fits(m, 2 + 2 + 5)).toBe(true);
          await backend.attend(m, 0, parts, q, scale, out, lse);
          return { out, lse };
        };
        const slow = await run(false), fast = await run(true);
        expect(fast.out).toEqual(slow.out);
        expect(fast.lse).toEqual(slow.lse);
        const ref = referenceAttention(q, concatValues([chunk], 'kValues'), concatValues([chunk], 'vValues'), m.qHeads, d, scale, rows);
        expect(maxRelError(fast.out, ref.out, m.qHeads)).toBeLessThan(1e-4);
        expect(maxRelErrorScalar(fast.lse, ref.lse)).toBeLessThan(1e-4);
      }
      // The ranges were held from their tables (4 reuses of 2 ranges x 2 heads after the first build), nothing left held.
      expect(backend.describe().pool).toMatchObject({ rangeHeld: 0, pinned: 0 });
      expect(backend.describe().pool.rangeReuses).toBeGreaterThanOrEqual(3 * 2 * m.kvHeads);
    } finally {
      backend.close();
    }
  });
});

describe.skipIf(!gpu.ok)('GPU backend (server)', () => {
  const model = { layers: 2, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
  const { qHeads, kvHeads, headDim: d } = model;
  const DOC = 64 * 40 + 29;
  const dirs = [tempDataDir(), tempDataDir(), tempDataDir()];
  let onGpu: RunningServer, onCpu: RunningServer, tiny: RunningServer;
  const chunks: KvChunk[] = [];

  beforeAll(async () => {
    onGpu = await startInProcess(dirs[0].dir);
    onCpu = await startInProcess(dirs[1].dir, { gpuBudget: 0 });
    // 48 slots, 3 blocks per (layer, kv head): far less than the document's 40.
    tiny = await startInProcess(dirs[2].dir, { gpuBudget: 3 * model.layers * kvHeads * POOL_BLOCK * d * 2 * 2 });
    const rng = new Rng(seed + 1);
    for (let l = 0; l < model.layers; l++) chunks.push(randomKv(rng, 'f16', kvHeads, DOC, d));
    for (const s of [onGpu, onCpu, tiny]) {
      const c = new KvrecallClient({ url: s.url });
      await c.createDocument('doc', model, { methods: ['nosa', 'topk-blocks', 'quest'] });
      for (let l = 0; l < model.layers; l++) await c.uploadDocumentKv('doc', { layer: l, start: 0, k: chunks[l].k, v: chunks[l].v });
      await c.sealDocument('doc');
    }
  }, 120_000);
  afterAll(async () => {
    for (const s of [onGpu, onCpu, tiny]) await s?.close();
    for (const t of dirs) t.cleanup();
  });

  it('health says cuda with the device and the pool; a CPU-only server says cpu', async () => {
    const h = (await new KvrecallClient({ url: onGpu.url }).health()) as unknown as Health;
    expect(h.backend).toBe('cuda');
    expect(JSON.stringify(h.gpu)).toContain(deviceName(gpu));
    expect((await new KvrecallClient({ url: onCpu.url }).health()).backend).toBe('cpu');
  });

  // quest's rows [max, min] are 2·headDim wide: the device scorer takes them (block_scores.cu's Supports).
  for (const method of ['exact', 'nosa', 'topk-blocks', 'quest'])
    it(`${method}: the GPU answers as float64 and as the CPU server, step after step`, async () => {
      const rng = new Rng(seed + 2);
      const params = { method, budget: 64 * 6, sinks: 16, window: 100 };
      const sessions = await Promise.all([onGpu, onCpu].map(async (s) => {
        const c = new KvrecallClient({ url: s.url });
        return { c, id: (await c.createSession({ model, documents: ['doc'], ...params })).id };
      }));
      const own: KvChunk[][] = [[], []];
      for (let step = 0; step < 6; step++)
        for (let layer = 0; layer < model.layers; layer++) {
          const tok = randomKv(rng, 'f16', kvHeads, 1, d);
          own[layer].push(tok);
          const q = randomQ(rng, qHeads, d);
          const body = { layer, q: tensor('f32', [qHeads, d], q), k: { ...tok.k, shape: [kvHeads, d] }, v: { ...tok.v, shape: [kvHeads, d] }, return: ['out', 'selection'] as ('out' | 'selection')[] };
          const [g, c] = await Promise.all(sessions.map((s) => s.c.attend(s.id, body)));
          expect(g.stats.backend).toBe('cuda');
          expect(c.stats.backend).toBe('cpu');
          // The same selection, attended on the GPU: float64 over exactly those rows.
          const rows = g.selection!.map((ids) => Array.from(ids));
          expect(rows.map((r) => r.length)).toEqual(c.selection!.map((ids) => ids.length));
          const all = [chunks[layer], ...own[layer]];
          const ref = referenceAttention(q, concatValues(all, 'kValues'), concatValues(all, 'vValues'), qHeads, d, 1 / Math.sqrt(d), rows);
          expect(maxRelError(g.out, ref.out, qHeads)).toBeLessThan(1e-4);
          expect(maxRelErrorScalar(g.lse, ref.lse)).toBeLessThan(1e-4);
          expect(maxRelError(g.out, c.out, qHeads)).toBeLessThan(1e-4);
          expect(g.stats.blocks!.selected).toBeGreaterThan(0);
        }
    }, 120_000);

  it('scores past float32 in some of the pool kernel\'s splits are refused (422) as on the CPU, never answered from the rest', async () => {
    // q of ones: q·k ~ N(0, 128) over random keys; at this scale the few keys past q·k = 20 overflow float32 and
    // the rest do not. The split kernel dropped a split whose sum was NaN and answered from the others.
    const q = tensor('f32', [qHeads, d], new Float32Array(qHeads * d).fill(1));
    for (const s of [onGpu, onCpu]) {
      const c = new KvrecallClient({ url: s.url });
      const { id } = (await c.createSession({ model, documents: ['doc'], method: 'exact' })) as Created;
      await expect(c.attend(id, { layer: 0, q, scale: 3.4e38 / 20 })).rejects.toMatchObject({ status: 422, message: expect.stringMatching(/overflow float32/) });
      const fine = await c.attend(id, { layer: 0, q, scale: 1 });
      expect(fine.lse.every(Number.isFinite)).toBe(true);
      await c.deleteSession(id);
    }
  });

  it('a pool far smaller than the document evicts under pressure without a wrong answer', async () => {
    const c = new KvrecallClient({ url: tiny.url });
    // Working set 1 + 2 blocks per (layer, kv head): admitted to the 48 slots, which it fills.
    const { id, backend } = (await c.createSession({ model, documents: ['doc'], method: 'topk-blocks', budget: 64, sinks: 0, window: 0 })) as Created;
    expect(backend).toBe('cuda');
    const rng = new Rng(seed + 3);
    for (let step = 0; step < 16; step++) {
      const layer = step % model.layers;
      const q = randomQ(rng, qHeads, d, 3);
      const r = await c.attend(id, { layer, q: tensor('f32', [qHeads, d], q), return: ['out', 'selection'] });
      expect(r.stats.backend).toBe('cuda');
      const rows = r.selection!.map((ids) => Array.from(ids));
      const ref = referenceAttention(q, concatValues([chunks[layer]], 'kValues'), concatValues([chunks[layer]], 'vValues'), qHeads, d, 1 / Math.sqrt(d), rows);
      expect(maxRelError(r.out, ref.out, qHeads)).toBeLessThan(1e-4);
      expect(maxRelErrorScalar(r.lse, ref.lse)).toBeLessThan(1e-4);
    }
    const { pool } = ((await c.health()) as unknown as Health).gpu;
    expect(pool.slots).toBe(48);
    expect(pool.evictions).toBeGreaterThan(0);
    await c.deleteSession(id);
  });

  it('admission: a working set that does not fit beside the open sessions is refused with 503', async () => {
    const c = new KvrecallClient({ url: tiny.url });
    // 2 blocks per (layer, kv head), 32 slots: the tiny pool (48) holds one such session, not two.
    const params = { model, documents: ['doc'], method: 'nosa', budget: 0, sinks: 0, window: 0 };
    const first = (await c.createSession(params)) as Created;
    expect(first.backend).toBe('cuda');
    await expect(c.createSession(params)).rejects.toMatchObject({ status: 503 });
    await c.deleteSession(first.id);
    const again = (await c.createSession(params)) as Created;
    expect(again.backend).toBe('cuda');
  });
});
