// The pool's range tables on a device (native/cuda/block_pool_ranges.cu,
// GpuPool.holdRange): an attend over held ranges answers bit for bit as the
// per-block path over the same blocks (the same slots in the same order, the
// same kernel) and as a float64 reference; so do pieces (ranges and a block
// list back to back); a range partly evicted by another client's uploads is
// made resident again and answers right; a held range loses no slot to
// other clients' uploads, even when they run out of slots; a step's kv
// heads uploaded in one call (uploadIndexedMany, one flush) answer as the
// per-head uploads, across staging chunks and evictions. Run by
// test/native/gpu-range.test.ts and by `node dist/bench/gpu.js --check`.
import { GpuPool, type GpuRangeHold, type GpuTablePiece } from '../addon/cuda.js';
import type { KvDtype } from '../addon/kernels.js';
import { Rng } from '../workload/index.js';
import { maxAbs, randomWords, reference, TOL } from './gpu.js';

export interface RangeCheck {
  name: string;
  /** Max abs difference of out and lse, range path vs per-block path: 0 is the same answer. */
  fastVsSlow: number;
  /** Max abs error of the range path vs float64 (out, lse). */
  fastVsRef: { out: number; lse: number };
  /** What the case needs of the pool besides the answers (evictions happened, a table patched, a hold kept). */
  pool: boolean;
  ok: boolean;
}

const ids = (first: number, n: number) => Int32Array.from({ length: n }, (_, i) => first + i);

export async function checkRangeTables(dt: KvDtype, seed: number): Promise<RangeCheck[]> {
  const rng = new Rng(seed);
  const d = 128, bs = 64, kvHeads = 2, G = 4, qHeads = G * kvHeads, blocks = 40, scale = 1 / Math.sqrt(d);
  const k: Uint16Array[] = [], v: Uint16Array[] = [], kf: Float32Array[] = [], vf: Float32Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const a = randomWords(rng, dt, blocks * bs * d), b = randomWords(rng, dt, blocks * bs * d);
    k.push(a.bits), kf.push(a.values), v.push(b.bits), vf.push(b.values);
  }
  const other = new Uint16Array(64 * bs * d); // other clients' blocks: their answers are not read
  const q = new Float32Array(qHeads * d);
  for (let i = 0; i < q.length; i++) q[i] = rng.normal() * 1.5;
  // 104 slots: both heads' 40 blocks and 24 more.
  const pool = GpuPool.create({ budgetBytes: (kvHeads * blocks + 24) * 2 * bs * d * 2, blockSize: bs, headDim: d, dtype: dt });
  const client = (h: number) => 10 + h;
  const results: RangeCheck[] = [];

  const run = async (tables: (Int32Array | GpuTablePiece[])[], blocksPerHead: number) => {
    const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
    await pool.attend({ q, qHeads, kvHeads, scale, tables, validTokens: new Array(kvHeads).fill(blocksPerHead * bs), out, lse });
    return { out, lse };
  };
  /** The per-block path over these block lists: each uploaded, held, read, unpinned. */
  const slow = async (lists: Int32Array[]) => {
    const tables = Array.from({ length: kvHeads }, (_, h) => {
      const parts = lists.map((b) => pool.uploadIndexed(client(h), b, k[h], v[h], { priority: 3, hold: true }));
      const all = new Int32Array(parts.reduce((n, p) => n + p.length, 0));
      parts.reduce((at, p) => (all.set(p, at), at + p.length), 0);
      return all;
    });
    const n = lists.reduce((a, b) => a + b.length, 0);
    try {
      return await run(tables, n);
    } finally {
      for (let h = 0; h < kvHeads; h++) for (const b of lists) pool.pin(client(h), b, false);
    }
  };
  /** The range path: each list a range ([first, first + n)) or, marked `list`, a block list uploaded and held. */
  const fast = async (pieces: ({ first: number; n: number } | { list: Int32Array })[], during?: () => void) => {
    const holds: GpuRangeHold[] = [], pinned: [number, Int32Array][] = [];
    try {
      const tables = Array.from({ length: kvHeads }, (_, h) =>
        pieces.map((p): GpuTablePiece => {
          if ('list' in p) {
            pinned.push([client(h), p.list]);
            return pool.uploadIndexed(client(h), p.list, k[h], v[h], { hold: true });
          }
          const held = pool.holdRange(client(h), p.first, p.n, k[h], v[h], 3);
          holds.push(held);
          return held;
        }));
      during?.();
      return await run(tables, pieces.reduce((n, p) => n + ('list' in p ? p.list.length : p.n), 0));
    } finally {
      for (const [c, b] of pinned) pool.pin(c, b, false);
      for (const hd of holds) pool.unholdRange(hd);
    }
  };
  const rowsOf = (lists: Int32Array[]) => {
    const r: number[] = [];
    for (const l of lists) for (const b of l) for (let t = b * bs; t < (b + 1) * bs; t++) r.push(t);
    return Array.from({ length: kvHeads }, () => Int32Array.from(r));
  };
  const record = (name: string, a: { out: Float32Array; lse: Float32Array }, b: { out: Float32Array; lse: Float32Array }, lists: Int32Array[], poolOk: boolean) => {
    const ref = reference(q, kf, vf, qHeads, d, scale, rowsOf(lists));
    const lseScale = Math.max(1, ...Array.from(ref.lse, Math.abs));
    const r: RangeCheck = {
      name: `${dt} ${name}`,
      fastVsSlow: Math.max(maxAbs(a.out, b.out), maxAbs(a.lse, b.lse)),
      fastVsRef: { out: maxAbs(a.out, ref.out), lse: maxAbs(a.lse, ref.lse) },
      pool: poolOk,
      ok: false,
    };
    r.ok = r.fastVsSlow === 0 && r.fastVsRef.out <= TOL.out && r.fastVsRef.lse <= TOL.lse * lseScale && poolOk;
    results.push(r);
  };
  const lookupAll = () => Array.from({ length: kvHeads }, (_, h) => Array.from(pool.lookup(client(h), ids(0, blocks))));

  try {
    // A whole document: built at the first hold (every block a hit: the per-block path made them resident), reused at the next.
    const whole = [ids(0, blocks)];
    const s1 = await slow(whole);
    await fast([{ first: 0, n: blocks }]);
    const reusesBefore = pool.stats().rangeReuses;
    const f1 = await fast([{ first: 0, n: blocks }]);
    record('whole range, reused', f1, s1, whole, pool.stats().rangeReuses - reusesBefore === kvHeads);

    // Sinks, a block list and a window back to back (the sinks' and window's ranges served by the whole range's table).
    const lists = [ids(0, 2), Int32Array.of(10, 17, 23), ids(36, 4)];
    const s2 = await slow(lists);
    const f2 = await fast([{ first: 0, n: 2 }, { list: lists[1] }, { first: 36, n: 4 }]);
    record('sinks + block list + window', f2, s2, lists, true);

    // Another client fills the pool: some of the ranges' blocks are evicted; the next hold re-makes them.
    const ev0 = pool.stats().evictions;
    pool.uploadIndexed(99, ids(0, 40), other, other);
    const lost = lookupAll().flat().filter((s) => s < 0).length;
    const patched0 = pool.stats().rangePatched;
    const f3 = await fast([{ first: 0, n: blocks }]);
    const patched = pool.stats().rangePatched - patched0;
    const s3 = await slow(whole);
    record(`whole range after ${lost} of its blocks were evicted (${patched} re-made)`, f3, s3, whole, pool.stats().evictions > ev0 && lost > 0 && patched === lost);

    // Held: other clients' uploads while the step holds the ranges take only their own slots, then run out.
    const before = lookupAll();
    let refused = false;
    const f4 = await fast([{ first: 0, n: blocks }], () => {
      pool.uploadIndexed(98, ids(0, 20), other, other);
      try {
        pool.uploadIndexed(97, ids(0, 40), other, other);
      } catch (e) {
        refused = /no evictable slot/.test(String(e));
      }
    });
    const kept = JSON.stringify(lookupAll()) === JSON.stringify(before);
    const s4 = await slow(whole);
    record('whole range held while other clients upload past the pool', f4, s4, whole, refused && kept);

    // A step's kv heads in one call (uploadIndexedMany: one flush), on a pool whose staging chunks hold 7 blocks
    // (the batch wraps its ring of 4 several times) and whose 64 slots take two such steps only by evicting.
    const small = GpuPool.create({ budgetBytes: 64 * 2 * bs * d * 2, blockSize: bs, headDim: d, dtype: dt, stagingBytes: 1 << 20 });
    try {
      // The second step: 20..39 and 0..9, so 30..39 are new (20 misses over both heads: 4 free slots, 16 evictions).
      for (const [name, list] of [['30 blocks a head', ids(0, 30)], ['30 a head, 10 of them new (evicting)', Int32Array.from([...ids(20, 20), ...ids(0, 10)])]] as const) {
        const lists = [list];
        const s5 = await slow(lists);
        const before5 = small.stats();
        const heads = Array.from({ length: kvHeads }, (_, h) => ({ client: client(h), blocks: list, k: k[h], v: v[h] }));
        const tables = small.uploadIndexedMany(heads, { hold: true });
        const after5 = small.stats();
        const copies = after5.copies - before5.copies, misses = after5.misses - before5.misses;
        const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
        try {
          await small.attend({ q, qHeads, kvHeads, scale, tables, validTokens: new Array(kvHeads).fill(lists[0].length * bs), out, lse });
        } finally {
          small.pinMany(heads, false);
        }
        // One flush a chunk filled (7 blocks each), not one a head; the second step evicts the first's blocks.
        const second = list[0] !== 0;
        const poolOk = small.stats().pinned === 0 && misses === (second ? 20 : 60) && copies === Math.ceil(misses / 7) && (!second || after5.evictions - before5.evictions === 16);
        record(`uploadIndexedMany, ${name}`, { out, lse }, s5, lists, poolOk);
      }
    } finally {
      small.close();
    }
    return results;
  } finally {
    pool.close();
  }
}
