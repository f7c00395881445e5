// SessionCache.attend's GPU pool path (engine/cache/residency.ts) without a
// device: the backend is over PoolModel, whose attend answers as the device
// kernel does (attention over the whole blocks it was given, a head with none
// answered out 0 and lse −∞, native/cuda/decode_kernel.cu's MergeKernel). The
// host's parts (own tokens, a partial block, row ids) run on libuv's pool
// beside it and are merged after by log-sum-exp: the step is float64
// attention over every part's rows, also for heads that only one side
// attends, and a head neither attends is out 0, lse −∞.
import { describe, expect, it } from 'vitest';
import type { GpuAttendArgs } from '../../addon/cuda.js';
import { attend, attendRuns } from '../../addon/kernels.js';
import { GpuBackend, POOL_BLOCK, RANGE_PRIORITY } from '../../engine/cache/gpu-pool.js';
import { SessionCache } from '../../engine/cache/residency.js';
import { poolPartBlocks, splitForPool } from '../../engine/cache/selection-parts.js';
import { PoolModel } from '../../engine/cache/simulated-pool.js';
import type { SelectionPart } from '../../index/method.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`residency-pool-merge: seed ${seed}`);
const m = { layers: 1, qHeads: 8, kvHeads: 4, headDim: 64, dtype: 'f16' as const, blockSize: POOL_BLOCK };
const { qHeads, kvHeads, headDim: d } = m;
const G = qHeads / kvHeads, DOC = POOL_BLOCK * 6 + 17, OWN = 9;

function segmentOf(c: KvChunk, n: number): KvSegment {
  const s = new KvSegment(kvHeads, d, 'f16');
  s.append(c.k.data, c.v.data, 'f16', n);
  return s;
}

describe("a GPU pool step's host parts, merged after the pool's attend", () => {
  it('answers float64 attention over every part, for heads only the pool or only the host attends too; a head neither attends is out 0, lse −∞', async () => {
    const rng = new Rng(seed);
    const docChunk = randomKv(rng, 'f16', kvHeads, DOC, d), ownChunk = randomKv(rng, 'f16', kvHeads, OWN, d);
    const doc = segmentOf(docChunk, DOC), own = segmentOf(ownChunk, OWN);
    const last = Math.floor(DOC / POOL_BLOCK); // the partial block
    const rowsOfBlocks = (ids: number[]) => ids.flatMap((b) => Array.from({ length: Math.min(POOL_BLOCK, DOC - b * POOL_BLOCK) }, (_, i) => b * POOL_BLOCK + i));
    // Per kv head: whole blocks (head 1 none: the pool answers it −∞), the partial block (heads 0 and 1), row ids (head 0 and 2).
    const blockIds = [[1, 4, last], [last], [0, 2], [3, 5]];
    const ids = [[20, 21, 300], [], [7], []];
    const docParts: SelectionPart[] = [
      { segment: doc, blocks: { size: POOL_BLOCK, ids: blockIds.map((b) => Int32Array.from(b)), priority: blockIds.map((b) => new Uint8Array(b.length)) } },
      { segment: doc, ids: ids.map((x) => Int32Array.from(x)) },
    ];
    // The pool's answer, as the device's kernel gives it: attention over the whole blocks it holds, per head.
    const poolRows = (parts: SelectionPart[]) => {
      const split = splitForPool(parts, (s) => s !== own, POOL_BLOCK, kvHeads, RANGE_PRIORITY);
      return Array.from({ length: kvHeads }, (_, h) => split.pool.flatMap((p) => rowsOfBlocks(Array.from(poolPartBlocks(p, h)))));
    };
    let want: number[][] = [], standInPooled = 0;
    const onAttend = async (a: GpuAttendArgs) => {
      await new Promise((r) => setTimeout(r, 5)); // the kernel still runs when the host parts end
      const before = attendRuns().pool;
      const done = attend({ q: a.q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: a.scale, segments: [{ k: doc.k, v: doc.v, tokens: DOC, ids: want.map((r) => Int32Array.from(r)) }], out: a.out, lse: a.lse });
      standInPooled += attendRuns().pool - before;
      await done;
    };
    const gpu = GpuBackend.over({ ok: true, device: 'PoolModel (host)', memory: 1 << 30, built: false }, { budgetBytes: 1 << 24, rangeTables: false }, { pool: (o) => new PoolModel(o, onAttend) });
    const cache = new SessionCache(m, [own], gpu);
    try {
      for (const withOwn of [true, false]) {
        const parts: SelectionPart[] = [...docParts, ...(withOwn ? [{ segment: own, begin: 0, end: OWN }] : [])];
        want = poolRows(parts);
        expect(want[1]).toEqual([]);
        const q = randomQ(rng, qHeads, d), scale = 1 / Math.sqrt(d);
        const out = new Float32Array(qHeads * d).fill(NaN), lse = new Float32Array(qHeads).fill(NaN);
        const pooled = attendRuns().pool - standInPooled;
        const r = await cache.attend(parts, { layer: 0, q, scale, out, lse });
        expect(r.backend).toBe('cuda');
        expect(attendRuns().pool - standInPooled).toBe(pooled + 1); // the host parts: one attend, on libuv's pool
        // Every part's rows per head: the blocks (the partial one's rows stop at DOC), the ids, the own tokens after the document.
        const rows = Array.from({ length: kvHeads }, (_, h) => [...rowsOfBlocks(blockIds[h]), ...ids[h], ...(withOwn ? Array.from({ length: OWN }, (_, i) => DOC + i) : [])]);
        const kAll = concatValues([docChunk, ownChunk], 'kValues'), vAll = concatValues([docChunk, ownChunk], 'vValues');
        // Without own tokens head 3 has whole blocks only (the host answers it −∞); every head has rows.
        const ref = referenceAttention(q, kAll, vAll, qHeads, d, scale, rows);
        expect(maxRelError(out, ref.out, qHeads)).toBeLessThan(1e-4);
        expect(maxRelErrorScalar(lse, ref.lse)).toBeLessThan(1e-4);
      }
      // A head neither side attends: head 1 with no partial block, no ids, no own tokens.
      const none: SelectionPart[] = [{ segment: doc, blocks: { size: POOL_BLOCK, ids: [Int32Array.of(1), new Int32Array(0), Int32Array.of(2), Int32Array.of(last)], priority: [Uint8Array.of(0), new Uint8Array(0), Uint8Array.of(0), Uint8Array.of(0)] } }];
      want = poolRows(none);
      const q = randomQ(rng, qHeads, d), out = new Float32Array(qHeads * d).fill(NaN), lse = new Float32Array(qHeads).fill(NaN);
      await cache.attend(none, { layer: 0, q, scale: 0.125, out, lse });
      for (let qh = G; qh < 2 * G; qh++) {
        expect(lse[qh]).toBe(-Infinity);
        expect(out.subarray(qh * d, (qh + 1) * d).every((x) => x === 0)).toBe(true);
      }
      // Head 3: only its partial block, on the host; the pool answered it −∞.
      const ref = referenceAttention(q, concatValues([docChunk], 'kValues'), concatValues([docChunk], 'vValues'), qHeads, d, 0.125, [rowsOfBlocks([1]), [0], rowsOfBlocks([2]), rowsOfBlocks([last])]);
      for (const h of [0, 2, 3]) {
        expect(maxRelError(out.subarray(h * G * d, (h + 1) * G * d), ref.out.subarray(h * G * d, (h + 1) * G * d), G)).toBeLessThan(1e-4);
        expect(maxRelErrorScalar(lse.subarray(h * G, (h + 1) * G), ref.lse.subarray(h * G, (h + 1) * G))).toBeLessThan(1e-4);
      }
    } finally {
      gpu.close();
    }
  });
});
