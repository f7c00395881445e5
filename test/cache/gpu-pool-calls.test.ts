// The pool calls a step of GpuBackend makes (engine/cache/gpu-pool.ts): a
// step's block lists, every kv head's, go to the pool in one call
// (uploadIndexedMany: their misses copied by one flush, not one a head), cut
// only by a range part so that the pool sees the parts in their order; the
// step's unpins are one call. No device runs here: the backend is over
// PoolModel, the host model of the native pool (what the native call does
// with them is test/native/pool-host.test.ts's).
import { describe, expect, it } from 'vitest';
import type { GpuAttendArgs, GpuPoolOptions, GpuRangeHold, GpuUpload } from '../../addon/cuda.js';
import { GpuBackend } from '../../engine/cache/gpu-pool.js';
import { PoolModel } from '../../engine/cache/simulated-pool.js';
import type { PoolPart } from '../../engine/cache/selection-parts.js';
import { KvSegment } from '../../storage/kv-segment.js';

const m = { layers: 1, qHeads: 8, kvHeads: 4, headDim: 64, dtype: 'f16' as const, blockSize: 64 };

/** PoolModel that logs the calls GpuBackend makes (not the model's calls to itself), with what the uploads answered. */
class LoggedPool extends PoolModel {
  readonly log: string[] = [];
  readonly uploads: { upload: GpuUpload; slots: Int32Array }[] = [];
  attended?: GpuAttendArgs;
  /** The slots the last attend read, per kv head. */
  read: number[][] = [];
  private depth = 0;

  constructor(o: GpuPoolOptions) {
    super(o);
  }

  private logged<T>(what: string, f: () => T): T {
    if (this.depth === 0) this.log.push(what);
    this.depth++;
    try {
      return f();
    } finally {
      this.depth--;
    }
  }

  override uploadIndexed(client: number, blocks: Int32Array, k: Uint16Array, v: Uint16Array, o: { priority?: number; priorities?: Uint8Array; hold?: boolean } = {}): Int32Array {
    return this.logged('uploadIndexed', () => super.uploadIndexed(client, blocks, k, v, o));
  }

  override uploadIndexedMany(uploads: GpuUpload[], o: { hold?: boolean } = {}): Int32Array[] {
    return this.logged(`uploadIndexedMany ${uploads.length}`, () => {
      const got = super.uploadIndexedMany(uploads, o);
      got.forEach((slots, i) => this.uploads.push({ upload: uploads[i], slots }));
      return got;
    });
  }

  override pin(client: number, blocks: Int32Array, pinned = true): void {
    this.logged('pin', () => super.pin(client, blocks, pinned));
  }

  override pinMany(lists: { client: number; blocks: Int32Array }[], pinned = true): void {
    this.logged(`pinMany ${lists.length}`, () => super.pinMany(lists, pinned));
  }

  override holdRanges(clients: number[], first: number, count: number, k: Uint16Array[], v: Uint16Array[], priority = 0): GpuRangeHold[] {
    return this.logged(`holdRanges ${clients.length}`, () => super.holdRanges(clients, first, count, k, v, priority));
  }

  override attend(a: GpuAttendArgs): Promise<void> {
    this.log.push('attend');
    this.attended = a;
    this.read = this.slotsRead(a);
    return super.attend(a);
  }
}

function backend(budgetBytes: number, rangeTables: boolean) {
  let pool: LoggedPool | undefined;
  const gpu = GpuBackend.over({ ok: true, device: 'PoolModel (host)', memory: 1 << 30, built: false }, { budgetBytes, rangeTables }, { pool: (o) => (pool = new LoggedPool(o)) });
  return { gpu, pool: () => pool! };
}

/** A segment of n tokens (rows of zeros: the model reads none). */
function segment(n: number): KvSegment {
  const s = new KvSegment(m.kvHeads, m.headDim, m.dtype);
  s.append(new Uint8Array(m.kvHeads * n * m.headDim * 2), new Uint8Array(m.kvHeads * n * m.headDim * 2), 'f16', n);
  return s;
}

/** A block part: head h's blocks are `ids` shifted by h (each head its own list), class 1 for even ids. */
function blocks(s: KvSegment, ids: number[]): PoolPart {
  const b = Array.from({ length: m.kvHeads }, (_, h) => Int32Array.from(ids, (x) => x + h));
  return { segment: s, blocks: b, priority: b.map((x) => Uint8Array.from(x, (y) => (y % 2 === 0 ? 1 : 0))) };
}

const q = new Float32Array(m.qHeads * m.headDim), out = new Float32Array(q.length), lse = new Float32Array(m.qHeads);

describe("a GPU step's pool calls", () => {
  it('block lists of every kv head in one upload call, cut only by a range part; the unpins in one call; each head reads its pieces in the parts\' order', async () => {
    const { gpu, pool } = backend(1 << 24, true);
    const a = segment(2048), b = segment(1024);
    const parts: PoolPart[] = [blocks(a, [3, 9, 17]), { segment: a, range: { first: 0, count: 2, priority: 3 } }, blocks(b, [1, 5]), blocks(a, [20, 21])];
    await gpu.attend(m, 0, parts, q, 1, out, lse);
    const p = pool();
    expect(p.log).toEqual(['uploadIndexedMany 4', 'holdRanges 4', 'uploadIndexedMany 8', 'attend', 'pinMany 12']);
    // Per head: the first part's slots, the range's hold, then the two later parts' slots (one table piece each).
    const tables = p.attended!.tables as unknown[][];
    const upl = p.uploads;
    for (let h = 0; h < m.kvHeads; h++) {
      expect(tables[h]).toHaveLength(4);
      expect(tables[h][0]).toBe(upl[h].slots);
      expect(tables[h][1]).toMatchObject({ blocks: 2 });
      expect(tables[h][2]).toBe(upl[4 + h].slots);
      expect(tables[h][3]).toBe(upl[8 + h].slots);
      expect(Array.from(upl[h].upload.blocks)).toEqual([3 + h, 9 + h, 17 + h]);
      expect(Array.from(upl[4 + h].upload.blocks)).toEqual([1 + h, 5 + h]);
      expect(upl[4 + h].upload.k).toBe(b.k[h]);
      expect(Array.from(upl[8 + h].upload.priorities!)).toEqual((20 + h) % 2 === 0 ? [1, 0] : [0, 1]);
      expect(p.attended!.validTokens[h]).toBe((3 + 2 + 2 + 2) * 64);
    }
    // The slots each upload answered are its blocks' (asked again: all hits, the same slots).
    for (const { upload, slots } of upl) expect(Array.from(p.uploadIndexed(upload.client, upload.blocks, upload.k, upload.v))).toEqual(Array.from(slots));
    const s = p.stats();
    expect({ pinned: s.pinned, rangeHeld: s.rangeHeld, misses: s.misses }).toEqual({ pinned: 0, rangeHeld: 0, misses: (3 + 2 + 2 + 2) * m.kvHeads });
    expect(p.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
    gpu.close();
  });

  it('a call a kv head (batchUploads off, for bench A/B) makes the same pool state and reads the same slots, step after step', async () => {
    const runs = [true, false].map((batchUploads) => {
      const b = backend(40 * 64 * 64 * 2 * 2, true);
      b.gpu.batchUploads = batchUploads;
      return { ...b, reads: [] as number[][][], stats: [] as unknown[] };
    });
    const a = segment(4096);
    // Steps whose lists move and overlap in a 40-slot pool: hits, misses and evictions.
    for (let step = 0; step < 12; step++)
      for (const r of runs) {
        await r.gpu.attend(m, 0, [{ segment: a, range: { first: 0, count: 1, priority: 3 } }, blocks(a, [2 * step, 2 * step + 3, 40 - step])], q, 1, out, lse);
        r.reads.push(r.pool().read);
        r.stats.push(r.pool().stats());
      }
    expect(runs[1].pool().log.filter((x) => x === 'uploadIndexed')).toHaveLength(12 * m.kvHeads);
    expect(runs[0].pool().log.filter((x) => x === 'uploadIndexed')).toEqual([]);
    expect(runs[1].reads).toEqual(runs[0].reads);
    expect(runs[1].stats).toEqual(runs[0].stats);
    expect(runs[0].pool().stats().evictions).toBeGreaterThan(0);
  });

  it('block by block (no range tables), every part is one upload call', async () => {
    const { gpu, pool } = backend(1 << 24, false);
    const a = segment(2048);
    await gpu.attend(m, 0, [blocks(a, [3, 9]), { segment: a, range: { first: 0, count: 2, priority: 3 } }, blocks(a, [20])], q, 1, out, lse);
    expect(pool().log).toEqual(['uploadIndexedMany 12', 'attend', 'pinMany 12']);
    // Head 0: 3, 9, then the range's 0 and 1 in class 3, then 20.
    expect(pool().uploads.filter((_, i) => i % m.kvHeads === 0).map((u) => Array.from(u.upload.blocks))).toEqual([[3, 9], [0, 1], [20]]);
    expect(Array.from(pool().uploads[m.kvHeads].upload.priorities!)).toEqual([3, 3]);
    gpu.close();
  });

  it('a step whose blocks do not fit throws and holds nothing after (the heads uploaded before the refusal are let go)', async () => {
    // 20 slots: heads 0-2 take 6 each, head 3 finds 2.
    const { gpu, pool } = backend(20 * 64 * 64 * 2 * 2, true);
    const a = segment(2048);
    await expect(gpu.attend(m, 0, [blocks(a, [0, 4, 8, 12, 16, 24])], q, 1, out, lse)).rejects.toThrow(/no evictable slot/);
    const s = pool().stats();
    expect({ used: s.used, pinned: s.pinned, rangeHeld: s.rangeHeld }).toEqual({ used: 20, pinned: 0, rangeHeld: 0 });
    expect(pool().log).toEqual(['uploadIndexedMany 4', 'pinMany 0']);
    // The next step runs: nothing is left pinned by the refused one.
    await gpu.attend(m, 0, [blocks(a, [1, 2])], q, 1, out, lse);
    expect(pool().stats().pinned).toBe(0);
    gpu.close();
  });
});
