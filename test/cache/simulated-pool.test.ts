// The host model of the GPU pool's eviction policy: classes first, then least
// recently used, never a block the step itself uses. On a GPU the same
// random sequence runs through the native pool and the two must agree hit
// for hit (the policy is written once per language; this keeps them one).
// So must the model of the whole pool (PoolModel: holding, range tables,
// release), which the CPU tests of a deleted document's device copies and
// of the range tables (pool-ranges.test.ts) run on.
import { describe, expect, it } from 'vitest';
import { cudaAvailable, GpuPool, type GpuRangeHold } from '../../addon/cuda.js';
import { PoolModel, touch, type HeadPool } from '../../engine/cache/simulated-pool.js';
import { Rng } from '../helpers/random.js';

const fresh = (capacity: number): HeadPool => ({ capacity, resident: new Map(), clock: 0 });
const ids = (...b: number[]) => Int32Array.from(b);

describe('simulated pool', () => {
  it('evicts the least recently used block of the lowest class, never one the step uses', () => {
    const p = fresh(3);
    expect(touch(p, ids(1, 2, 3), Uint8Array.of(1, 0, 0), 10)).toEqual({ selected: 3, hits: 0, bytesIn: 30 });
    expect(touch(p, ids(3), undefined, 10).hits).toBe(1);
    // Full: block 4 evicts 2 (class 0, used before 3); class-1 block 1 outlives both.
    expect(touch(p, ids(4), undefined, 10)).toEqual({ selected: 1, hits: 0, bytesIn: 10 });
    expect([...p.resident.keys()].sort()).toEqual([1, 3, 4]);
    // 3 and 4 are this step's: the only victim left is class-1 block 1.
    touch(p, ids(3, 4, 5), undefined, 10);
    expect([...p.resident.keys()].sort()).toEqual([3, 4, 5]);
  });

  it('agrees with the native pool on a random sequence (GPU only)', async (ctx) => {
    if (!cudaAvailable().ok) return ctx.skip();
    const blockSize = 64, d = 64, capacity = 24, blocks = 64;
    const pool = GpuPool.create({ budgetBytes: capacity * blockSize * d * 2 * 2, blockSize, headDim: d, dtype: 'f16' });
    try {
      const slots = pool.stats().slots;
      const sim = fresh(slots);
      const k = new Uint16Array(blocks * blockSize * d), v = new Uint16Array(k.length);
      const rng = new Rng(7);
      for (let step = 0; step < 200; step++) {
        const chosen = new Set<number>();
        while (chosen.size < 8) chosen.add(Math.floor(rng.next() * blocks * (step % 3 === 0 ? 0.5 : 1)));
        const b = Int32Array.from([...chosen].sort((x, y) => x - y));
        const pr = Uint8Array.from(b, (x) => (x % 5 === 0 ? 1 : 0));
        const before = pool.stats().hits;
        pool.uploadIndexed(1, b, k, v, { priorities: pr, hold: true });
        pool.pin(1, b, false);
        expect(pool.stats().hits - before, `step ${step}`).toBe(touch(sim, b, pr, 0).hits);
      }
    } finally {
      pool.close();
    }
  });

  it('the pool model evicts as touch does, hit for hit, when each step holds its blocks until its kernel ends', () => {
    const blockSize = 64, capacity = 24, blocks = 64;
    const model = new PoolModel({ budgetBytes: capacity * blockSize * 64 * 2 * 2, blockSize, headDim: 64, dtype: 'f16' });
    const sim = fresh(capacity);
    const k = new Uint16Array(blocks * blockSize * 64), v = new Uint16Array(k.length);
    const rng = new Rng(7);
    for (let step = 0; step < 200; step++) {
      const chosen = new Set<number>();
      while (chosen.size < 8) chosen.add(Math.floor(rng.next() * blocks * (step % 3 === 0 ? 0.5 : 1)));
      const b = Int32Array.from([...chosen].sort((x, y) => x - y));
      const pr = Uint8Array.from(b, (x) => (x % 5 === 0 ? 1 : 0));
      const before = model.stats().hits;
      model.uploadIndexed(1, b, k, v, { priorities: pr, hold: true });
      model.pin(1, b, false);
      expect(model.stats().hits - before, `step ${step}`).toBe(touch(sim, b, pr, 0).hits);
    }
    expect(model.stats()).toMatchObject({ used: capacity, pinned: 0 });
  });

  it('the pool model holds, evicts and releases as the native pool does on a random sequence (GPU only)', async (ctx) => {
    if (!cudaAvailable().ok) return ctx.skip();
    const blockSize = 64, d = 64, blocks = 48;
    const options = { budgetBytes: 40 * blockSize * d * 2 * 2, blockSize, headDim: 64 as const, dtype: 'f16' as const };
    const pool = GpuPool.create(options), model = new PoolModel(options);
    try {
      const k = new Uint16Array(blocks * blockSize * d), v = new Uint16Array(k.length);
      const rng = new Rng(11);
      const held: [number, Int32Array][] = [];
      for (let step = 0; step < 300; step++) {
        // Clients as GpuBackend numbers them: segment s's (layer, head) pairs in [s * 2^20, (s + 1) * 2^20).
        const segment = 1 + Math.floor(rng.next() * 4), client = segment * 2 ** 20 + Math.floor(rng.next() * 3);
        if (step % 17 === 16) {
          // A segment dropped while nothing holds it (GpuBackend waits for its readers).
          for (const [c, b] of held.splice(0)) for (const p of [pool, model]) p.pin(c, b, false);
          expect(pool.releaseRange(segment * 2 ** 20, (segment + 1) * 2 ** 20), `step ${step}`).toBe(model.releaseRange(segment * 2 ** 20, (segment + 1) * 2 ** 20));
        } else {
          const chosen = new Set<number>();
          while (chosen.size < 6) chosen.add(Math.floor(rng.next() * blocks));
          const b = Int32Array.from(chosen);
          const pr = Uint8Array.from(b, (x) => (x % 7 === 0 ? 1 : 0));
          const hold = step % 3 === 0;
          pool.uploadIndexed(client, b, k, v, { priorities: pr, hold });
          model.uploadIndexed(client, b, k, v, { priorities: pr, hold });
          if (hold) held.push([client, b]);
          if (held.length > 3) for (const p of [pool, model]) p.pin(...held[0], false);
          if (held.length > 3) held.shift();
        }
        const { slots, used, pinned, hits, misses, evictions } = pool.stats();
        expect(model.stats(), `step ${step}`).toMatchObject({ slots, used, pinned, hits, misses, evictions });
      }
      expect(model.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
    } finally {
      pool.close();
    }
  });
  it('the pool model holds ranges, parks, evicts and releases as the native pool does on a random sequence (GPU only)', async (ctx) => {
    if (!cudaAvailable().ok) return ctx.skip();
    const blockSize = 64, d = 64, blocks = 48;
    const options = { budgetBytes: 40 * blockSize * d * 2 * 2, blockSize, headDim: 64 as const, dtype: 'f16' as const };
    const pool = GpuPool.create(options), model = new PoolModel(options);
    try {
      const k = new Uint16Array(blocks * blockSize * d), v = new Uint16Array(k.length);
      const rng = new Rng(13);
      // Open holds, each as both pools answered it.
      const open: [GpuRangeHold, GpuRangeHold][] = [];
      const pinned: [number, Int32Array][] = [];
      for (let step = 0; step < 400; step++) {
        const segment = 1 + Math.floor(rng.next() * 3), client = segment * 2 ** 20 + Math.floor(rng.next() * 2);
        const x = rng.next();
        const both = (f: (p: GpuPool | PoolModel) => void) => {
          const threw = [pool, model].map((p) => {
            try {
              f(p);
              return false;
            } catch {
              return true;
            }
          });
          expect(threw[0], `step ${step}: the native pool threw, the model ${threw[1] ? 'too' : 'not'}`).toBe(threw[1]);
          return threw[0];
        };
        if (step % 23 === 22) {
          // A segment dropped while nothing holds it (GpuBackend waits for its readers).
          for (const [a, b] of open.splice(0)) pool.unholdRange(a), model.unholdRange(b);
          for (const [c, b] of pinned.splice(0)) for (const p of [pool, model]) p.pin(c, b, false);
          expect(pool.releaseRange(segment * 2 ** 20, (segment + 1) * 2 ** 20), `step ${step}`).toBe(model.releaseRange(segment * 2 ** 20, (segment + 1) * 2 ** 20));
        } else if (x < 0.35) {
          const first = Math.floor(rng.next() * 24), count = 1 + Math.floor(rng.next() * 16), priority = Math.floor(rng.next() * 3);
          const got: GpuRangeHold[] = [];
          if (!both((p) => got.push(p.holdRange(client, first, count, k, v, priority)))) open.push([got[0], got[1]]);
        } else if (x < 0.6 && open.length > 0) {
          const [a, b] = open.splice(Math.floor(rng.next() * open.length), 1)[0];
          pool.unholdRange(a);
          model.unholdRange(b);
        } else if (x > 0.85) {
          // A step's kv heads in one call (GpuBackend's way): both heads of the segment, held, all or none.
          const heads = [0, 1].map((h) => {
            const chosen = new Set<number>();
            while (chosen.size < 4) chosen.add(Math.floor(rng.next() * blocks));
            const b = Int32Array.from(chosen);
            return { client: segment * 2 ** 20 + h, blocks: b, k, v, priorities: Uint8Array.from(b, (y) => (y % 7 === 0 ? 1 : 0)) };
          });
          if (!both((p) => p.uploadIndexedMany(heads, { hold: true }))) for (const u of heads) pinned.push([u.client, u.blocks]);
          // The oldest held lists unpinned in one call.
          const done = pinned.splice(0, Math.max(0, pinned.length - 2)).map(([c, b]) => ({ client: c, blocks: b }));
          for (const p of [pool, model]) p.pinMany(done, false);
        } else {
          const chosen = new Set<number>();
          while (chosen.size < 5) chosen.add(Math.floor(rng.next() * blocks));
          const b = Int32Array.from(chosen);
          const pr = Uint8Array.from(b, (y) => (y % 7 === 0 ? 1 : 0));
          const hold = step % 3 === 0;
          if (!both((p) => p.uploadIndexed(client, b, k, v, { priorities: pr, hold })) && hold) pinned.push([client, b]);
          if (pinned.length > 2) for (const p of [pool, model]) p.pin(...pinned[0], false);
          if (pinned.length > 2) pinned.shift();
        }
        const { slots, used, pinned: pins, hits, misses, evictions, rangeHeld, rangeReuses, rangePatched } = pool.stats();
        expect(model.stats(), `step ${step}`).toMatchObject({ slots, used, pinned: pins, hits, misses, evictions, rangeHeld, rangeReuses, rangePatched });
      }
      expect(model.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
    } finally {
      pool.close();
    }
  });
});
