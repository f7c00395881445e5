// The GPU pool's eviction policy (native/cuda/block_pool.cu), modelled on the
// host for the CPU backend, so a CPU run reports what the CUDA pool would
// move (stats.blocks). One pool per (segment, kv head), sized at the first
// step to POOL_FACTOR × the blocks it selected: a hit is touched; a miss
// takes a free slot or evicts, among the blocks this step does not use, the
// least recently used block of the lowest eviction class.
// test/cache/simulated-pool.test.ts checks it against the native pool's
// documented order on the same sequence.
import type { SelectionPart } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import type { BlockStats } from './block-stats.js';

/** Pool capacity per head, in multiples of the blocks its first step selected. */
export const POOL_FACTOR = 1.5;

interface HeadPool {
  capacity: number;
  /** Resident block → its eviction class and when it was last used (a counter). */
  resident: Map<number, { cls: number; used: number }>;
  clock: number;
}

export class SimulatedPool {
  // Weak: a document layer evicted from host memory (a shared store's, read on use) is not kept alive by its pool.
  private readonly heads = new WeakMap<KvSegment, HeadPool[]>();

  constructor(private readonly kvHeads: number) {}

  /** Runs one step's block parts through the policy; undefined when the step has none. */
  step(parts: SelectionPart[], headDim: number, bytesPerWord = 2): BlockStats | undefined {
    let stats: BlockStats | undefined;
    for (const p of parts) {
      if (!p.blocks) continue;
      stats ??= { selected: 0, hits: 0, bytesIn: 0 };
      let heads = this.heads.get(p.segment);
      if (!heads) this.heads.set(p.segment, (heads = []));
      const bytesPerBlock = p.blocks.size * headDim * bytesPerWord * 2;
      for (let h = 0; h < this.kvHeads; h++) {
        const ids = p.blocks.ids[h];
        heads[h] ??= { capacity: Math.max(1, Math.ceil(ids.length * POOL_FACTOR)), resident: new Map(), clock: 0 };
        const st = touch(heads[h], ids, p.blocks.priority?.[h], bytesPerBlock);
        stats.selected += st.selected;
        stats.hits += st.hits;
        stats.bytesIn += st.bytesIn;
      }
    }
    return stats;
  }
}

/** One head's step: hits touched, misses admitted, evicting as the native pool does. */
export function touch(pool: HeadPool, ids: Int32Array, priority: Uint8Array | undefined, bytesPerBlock: number): BlockStats {
  const stats: BlockStats = { selected: ids.length, hits: 0, bytesIn: 0 };
  const now = new Set(ids);
  ids.forEach((b, i) => {
    if (pool.resident.has(b)) stats.hits++;
    else {
      stats.bytesIn += bytesPerBlock;
      if (pool.resident.size >= pool.capacity) {
        let victim = -1, worstCls = Infinity, worstUsed = Infinity;
        for (const [r, e] of pool.resident) {
          if (now.has(r)) continue;
          if (e.cls < worstCls || (e.cls === worstCls && e.used < worstUsed)) (victim = r), (worstCls = e.cls), (worstUsed = e.used);
        }
        if (victim >= 0) pool.resident.delete(victim);
      }
    }
    pool.resident.set(b, { cls: priority?.[i] ?? 0, used: pool.clock++ });
  });
  return stats;
}

export type { HeadPool };
