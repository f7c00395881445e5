// The GPU pool's eviction policy (native/cuda/block_pool.cu), modelled on the
// host for the CPU backend, so a CPU run reports what the CUDA pool would
// move (stats.blocks). One pool per (segment, kv head), sized at the first
// step to POOL_FACTOR × the blocks it selected: a hit is touched; a miss
// takes a free slot or evicts, among the blocks this step does not use, the
// least recently used block of the lowest eviction class.
// test/cache/simulated-pool.test.ts checks it against the native pool's
// documented order on the same sequence. PoolModel below models the native
// pool itself (slots, page tables, pins, release) behind GpuBackend's calls.
import type { SelectionPart } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import type { BlockStats } from './block-stats.js';
import type { GpuAttendArgs, GpuPoolOptions, GpuPoolStats } from '../../addon/cuda.js';
import type { DevicePool } from './gpu-pool.js';

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

interface ModelSlot {
  client: number;
  block: number;
  cls: number;
  used: number;
  pins: number;
}

/**
 * The native pool (native/cuda/block_pool.cu) as a host model of its page
 * tables, pins and eviction, behind the calls GpuBackend makes, so that
 * where no device runs a backend over it shows what the device would hold:
 * admission, holding, and release. Its attend reads no data and writes no
 * answer (the kernel's answers are the GPU tests'); it records any slot a
 * step reads that was freed or given to another block before the step
 * ended, and any pinned slot released: what the native pool lets happen
 * and its callers must not.
 */
export class PoolModel implements DevicePool {
  private readonly slots: (ModelSlot | undefined)[];
  private readonly free: number[];
  private readonly tables = new Map<number, Map<number, number>>();
  private clock = 0;
  private counters = { hits: 0, misses: 0, evictions: 0, bytesCopied: 0, copies: 0 };
  /** Reads of slots changed under an attend, and releases of pinned slots: both 0 when callers keep the rule. */
  readonly faults = { changedUnderRead: 0, pinnedReleased: 0 };

  constructor(
    readonly options: GpuPoolOptions,
    /** What an attend waits on (a test holds a step on the device with it). */
    private readonly onAttend: (a: GpuAttendArgs) => Promise<void> = async () => undefined,
  ) {
    const n = Math.floor(options.budgetBytes / (options.blockSize * options.headDim * 2 * 2));
    this.slots = new Array<ModelSlot | undefined>(n).fill(undefined);
    this.free = Array.from({ length: n }, (_, i) => n - 1 - i);
  }

  uploadIndexed(client: number, blocks: Int32Array, _k: Uint16Array, _v: Uint16Array, o: { priority?: number; priorities?: Uint8Array; hold?: boolean } = {}): Int32Array {
    if (blocks.length > this.slots.length) throw new Error(`GpuPool: ${blocks.length} blocks asked for, the pool holds ${this.slots.length}`);
    const table = this.tables.get(client) ?? new Map<number, number>();
    this.tables.set(client, table);
    const out = new Int32Array(blocks.length).fill(-1);
    // Hits first, held out of eviction for the whole call (as Ensure's first pass).
    const inCall = new Set<number>();
    blocks.forEach((b, i) => {
      const s = table.get(b);
      if (s === undefined) return;
      this.counters.hits++;
      inCall.add((out[i] = s));
    });
    blocks.forEach((b, i) => {
      if (out[i] >= 0) return;
      let s = table.get(b); // repeated in this call
      if (s === undefined) {
        s = this.allocate(inCall);
        if (s === undefined) throw new Error('GpuPool: no evictable slot left (too many pinned blocks)');
        table.set(b, s);
        this.slots[s] = { client, block: b, cls: 0, used: 0, pins: 0 };
        this.counters.misses++;
        this.counters.bytesCopied += this.options.blockSize * this.options.headDim * 2 * 2;
        this.counters.copies++;
      }
      inCall.add((out[i] = s));
    });
    blocks.forEach((_, i) => {
      const slot = this.slots[out[i]]!;
      slot.cls = o.priorities?.[i] ?? o.priority ?? 0;
      if (o.hold) slot.pins++;
    });
    // Most recent now, in the native order: the call's unpinned hits, then its misses (pinned ones when unpinned).
    for (const s of inCall) if (this.slots[s]!.pins === 0) this.slots[s]!.used = this.clock++;
    return out;
  }

  /** A free slot, else the least recently used unpinned slot of the lowest class outside this call. */
  private allocate(inCall: Set<number>): number | undefined {
    const s = this.free.pop();
    if (s !== undefined) return s;
    let victim: number | undefined;
    this.slots.forEach((e, i) => {
      if (!e || e.pins > 0 || inCall.has(i)) return;
      const v = victim === undefined ? undefined : this.slots[victim]!;
      if (!v || e.cls < v.cls || (e.cls === v.cls && e.used < v.used)) victim = i;
    });
    if (victim === undefined) return undefined;
    const e = this.slots[victim]!;
    this.tables.get(e.client)!.delete(e.block);
    this.counters.evictions++;
    return victim;
  }

  pin(client: number, blocks: Int32Array, pinned = true): void {
    const table = this.tables.get(client);
    for (const b of blocks) {
      const slot = table?.get(b) === undefined ? undefined : this.slots[table.get(b)!]!;
      if (!slot) continue;
      if (pinned) slot.pins++;
      else if (slot.pins > 0 && --slot.pins === 0) slot.used = this.clock++;
    }
  }

  releaseRange(first: number, last: number): number {
    // Refused as the native binding refuses it (IntArg): clients are integers in [0, 2^53].
    for (const [what, x] of [['first', first], ['last', last]] as const)
      if (!Number.isInteger(x) || x < 0 || x > 2 ** 53) throw new RangeError(`${what} must be an integer in [0, ${2 ** 53}]`);
    let n = 0;
    for (const [client, table] of this.tables) {
      if (client < first || client >= last) continue;
      for (const s of table.values()) {
        if (this.slots[s]!.pins > 0) this.faults.pinnedReleased++;
        this.slots[s] = undefined;
        this.free.push(s);
        n++;
      }
      this.tables.delete(client);
    }
    return n;
  }

  async attend(a: GpuAttendArgs): Promise<void> {
    const owners = a.tables.map((t) => Array.from(t, (s) => this.slots[s]));
    await this.onAttend(a);
    a.tables.forEach((t, h) => t.forEach((s, i) => void (this.slots[s] !== owners[h][i] && this.faults.changedUnderRead++)));
  }

  /** Blocks resident per client (a test's view of what the device would hold). */
  resident(client: number): number {
    return this.tables.get(client)?.size ?? 0;
  }

  stats(): GpuPoolStats {
    const held = this.slots.filter((e) => e !== undefined);
    return { slots: this.slots.length, used: held.length, pinned: held.filter((e) => e.pins > 0).length, ...this.counters, lastKernelMs: 0 };
  }

  close(): void {
    this.tables.clear();
  }
}
