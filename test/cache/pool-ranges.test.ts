// The pool's range tables (native/cuda/block_pool_ranges.cu, HoldRange) as
// PoolModel models them, step for step: a range none of whose blocks lost
// its slot is held with no per-block work; one partly evicted re-makes only
// the blocks that went; a held range's slots are never taken, whoever
// uploads; and a range's use counts for eviction as the per-block path's
// touches did. The native pool runs the same sequences in
// test/native/gpu-range.test.ts (GPU only) and agrees with this model hit
// for hit in test/cache/simulated-pool.test.ts.
import { describe, expect, it } from 'vitest';
import type { GpuRangeHold } from '../../addon/cuda.js';
import { PoolModel } from '../../engine/cache/simulated-pool.js';
import { Rng } from '../helpers/random.js';

const blockSize = 64, d = 64;
const poolOf = (slots: number, onAttend?: ConstructorParameters<typeof PoolModel>[1]) =>
  new PoolModel({ budgetBytes: slots * blockSize * d * 2 * 2, blockSize, headDim: d, dtype: 'f16' }, onAttend);
// A head's rows for blocks [0, 64): what the model checks holdRange's k and v against.
const k = new Uint16Array(64 * blockSize * d), v = new Uint16Array(k.length);
const ids = (first: number, n: number) => Int32Array.from({ length: n }, (_, i) => first + i);

/** The slots an attend over a hold reads, and the page table's slots for the same blocks: equal when the table is true. */
async function readAndTable(pool: PoolModel, client: number, first: number, hold: GpuRangeHold): Promise<{ read: number[]; table: number[] }> {
  const read = pool.slotsRead({ tables: [[hold]] })[0];
  const q = new Float32Array(4 * d), out = new Float32Array(q.length), lse = new Float32Array(4);
  await pool.attend({ q, qHeads: 4, kvHeads: 1, scale: 1, tables: [[hold]], validTokens: [hold.blocks * blockSize], out, lse });
  return { read, table: Array.from({ length: hold.blocks }, (_, i) => pool.slotOf(client, first + i)) };
}

describe('range tables (PoolModel)', () => {
  it('a range held again with nothing moved does no per-block work; its table is the page table', async () => {
    const pool = poolOf(32);
    const h1 = pool.holdRange(1, 4, 10, k, v, 3);
    expect(pool.stats()).toMatchObject({ used: 10, misses: 10, hits: 0, rangePatched: 10, rangeReuses: 0, rangeHeld: 10, pinned: 0 });
    const first = await readAndTable(pool, 1, 4, h1);
    expect(first.read).toEqual(first.table);
    pool.unholdRange(h1);
    expect(pool.stats().rangeHeld).toBe(0);
    const h2 = pool.holdRange(1, 4, 10, k, v, 3);
    // Every block counted as a hit, none looked up: the table as it was.
    expect(pool.stats()).toMatchObject({ used: 10, misses: 10, hits: 10, rangePatched: 10, rangeReuses: 1, rangeHeld: 10 });
    expect((await readAndTable(pool, 1, 4, h2)).read).toEqual(first.read);
    // A window shrinking from its front is served by the same table, at an offset.
    const h3 = pool.holdRange(1, 7, 7, k, v, 3);
    expect(pool.stats()).toMatchObject({ rangePatched: 10, rangeReuses: 2 });
    const part = await readAndTable(pool, 1, 7, h3);
    expect(part.read).toEqual(first.read.slice(3));
    pool.unholdRange(h2);
    pool.unholdRange(h3);
    expect(() => pool.unholdRange(h3)).toThrow(/no hold/);
    expect(pool.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
  });

  it("an attend over a hold whose client was released refuses, as the native pool does (the slots are another client's)", () => {
    const pool = poolOf(8);
    const h = pool.holdRange(1, 0, 4, k, v, 0);
    pool.releaseRange(1, 2);
    pool.uploadIndexed(2, ids(0, 4), k, v);
    expect(() => pool.slotsRead({ tables: [[h]] })).toThrow(/released/);
    pool.unholdRange(h);
    expect(pool.stats().rangeHeld).toBe(0);
  });

  it("a range partly evicted by another client's uploads re-makes only the blocks that went, and reads the right slots", async () => {
    const pool = poolOf(16);
    pool.unholdRange(pool.holdRange(1, 0, 12, k, v, 0));
    // Client 2 takes 7 slots: 4 free, then the range's 3 least recently used blocks (its first 3, listed first).
    pool.uploadIndexed(2, ids(0, 7), k, v);
    expect(pool.stats()).toMatchObject({ evictions: 3, used: 16 });
    expect([0, 1, 2].map((b) => pool.slotOf(1, b))).toEqual([-1, -1, -1]);
    const h = pool.holdRange(1, 0, 12, k, v, 0);
    expect(pool.stats()).toMatchObject({ rangePatched: 12 + 3, rangeReuses: 0 });
    const r = await readAndTable(pool, 1, 0, h);
    expect(r.read).toEqual(r.table);
    expect(r.read.every((s) => s >= 0)).toBe(true);
    expect(new Set(r.read).size).toBe(12);
    pool.unholdRange(h);
    expect(pool.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
  });

  it('a held range is never evicted: other uploads park its slots, fail when nothing else is left, and the slots go back to the chains at the unhold', async () => {
    let during: (() => void) | undefined;
    const pool = poolOf(16, async () => during?.());
    const h = pool.holdRange(1, 0, 10, k, v, 9); // the highest class, yet the least recently used
    pool.uploadIndexed(2, ids(0, 6), k, v); // fills the pool
    const before = (await readAndTable(pool, 1, 0, h)).read;
    // While a step reads the range: 6 more blocks of client 3 can only take client 2's slots.
    during = () => void pool.uploadIndexed(3, ids(0, 6), k, v);
    await readAndTable(pool, 1, 0, h);
    during = undefined;
    expect(pool.stats()).toMatchObject({ evictions: 6, used: 16 });
    expect(pool.resident(2)).toBe(0);
    // Nothing but the held range left to take: refused, the range intact.
    expect(() => pool.uploadIndexed(4, ids(0, 7), k, v)).toThrow(/no evictable slot/);
    const after = await readAndTable(pool, 1, 0, h);
    expect(after.read).toEqual(before);
    expect(after.table).toEqual(before);
    expect(pool.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
    // Unheld, its slots are evictable again.
    pool.unholdRange(h);
    pool.uploadIndexed(4, ids(0, 12), k, v);
    expect(pool.resident(1)).toBeLessThan(10);
  });

  it("a range's use counts for eviction as the per-block path's touches did: a recently held range outlives an older block list", () => {
    for (const rangeTables of [true, false]) {
      const pool = poolOf(16);
      pool.uploadIndexed(2, ids(0, 6), k, v); // older
      const use = () => {
        if (rangeTables) pool.unholdRange(pool.holdRange(1, 0, 10, k, v, 0));
        else {
          pool.uploadIndexed(1, ids(0, 10), k, v, { hold: true });
          pool.pin(1, ids(0, 10), false);
        }
      };
      use();
      pool.uploadIndexed(2, ids(0, 6), k, v); // client 2 touched: now more recent than the range
      use(); // the range used again: the most recent
      pool.uploadIndexed(3, ids(0, 4), k, v); // 4 evictions: client 2's, not the range's
      expect(pool.resident(1), rangeTables ? 'range tables' : 'block by block').toBe(10);
      expect(pool.resident(2)).toBe(2);
    }
  });

  it('holds, unholds and uploads in a random order: every table read is the page table, no held slot is ever taken or released', async () => {
    const rng = new Rng(5);
    const pool = poolOf(40);
    const open: [number, number, GpuRangeHold][] = [];
    for (let step = 0; step < 600; step++) {
      const client = 1 + rng.int(3), x = rng.next();
      if (x < 0.4) {
        const first = rng.int(20), count = 1 + rng.int(12);
        try {
          open.push([client, first, pool.holdRange(client, first, count, k, v, rng.int(3))]);
        } catch (e) {
          expect(String(e)).toMatch(/no evictable slot/);
        }
      } else if (x < 0.7 && open.length > 0) {
        const [, , h] = open.splice(rng.int(open.length), 1)[0];
        pool.unholdRange(h);
      } else {
        const chosen = new Set<number>();
        while (chosen.size < 5) chosen.add(rng.int(48));
        try {
          const b = Int32Array.from(chosen);
          // The same clients as the ranges: block lists over and beside them (a method's blocks beside its sinks and window).
          pool.uploadIndexed(client, b, k, v, { hold: true });
          pool.pin(client, b, false);
        } catch (e) {
          expect(String(e)).toMatch(/no evictable slot/);
        }
      }
      for (const [c, first, h] of open) {
        const r = await readAndTable(pool, c, first, h);
        expect(r.read, `step ${step}`).toEqual(r.table);
      }
    }
    for (const [, , h] of open) pool.unholdRange(h);
    expect(pool.stats()).toMatchObject({ rangeHeld: 0, pinned: 0 });
    expect(pool.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
  });
});
