// The GPU pool's eviction policy (native/cuda/block_pool.cu), modelled on the
// host for the CPU backend, so a CPU run reports what the CUDA pool would
// move (stats.blocks). One pool per (segment, kv head), sized at the first
// step to POOL_FACTOR × the blocks it selected: a hit is touched; a miss
// takes a free slot or evicts, among the blocks this step does not use, the
// least recently used block of the lowest eviction class.
// test/cache/simulated-pool.test.ts checks it against the native pool's
// documented order on the same sequence. PoolModel below models the native
// pool itself (slots, page tables, pins, range tables, release) behind
// GpuBackend's calls.
import type { SelectionPart } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import type { BlockStats } from './block-stats.js';
import type { GpuAttendArgs, GpuPoolOptions, GpuPoolStats, GpuRangeHold, GpuUpload } from '../../addon/cuda.js';
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
  /** Recency: the clock when last listed (native SlotInfo::stamp). */
  used: number;
  pins: number;
  /** The held range it was parked for (off the eviction candidates until unheld). */
  parkedBy?: ModelRange;
}

/** A range table (native pool_detail::Range): its slot per entry, dirty entries, holds. */
interface ModelRange {
  client: number;
  first: number;
  count: number;
  cls: number;
  table: Int32Array;
  holds: number;
  build: boolean;
  dirty: number[];
  parked: number[];
  lastUse: number;
}

/** Ranges a client keeps (native kMaxRanges). */
const MAX_RANGES = 8;
const contains = (r: ModelRange, block: number) => block >= r.first && block - r.first < r.count;
const clean = (r: ModelRange) => !r.build && r.dirty.length === 0;

/**
 * The native pool (native/cuda/block_pool*.cu) as a host model of its page
 * tables, range tables, pins and eviction, behind the calls GpuBackend
 * makes, so that where no device runs a backend over it shows what the
 * device would hold: admission, holding, and release. It follows the native
 * pool's steps one for one (its recency clock included), so the two agree
 * hit for hit (test/cache/simulated-pool.test.ts, on a GPU). Its attend reads
 * no data and writes no answer (the kernel's answers are the GPU tests'); it
 * records any slot a step reads that was freed or given to another block
 * before the step ended, and any held slot released: what the native pool
 * lets happen and its callers must not.
 */
export class PoolModel implements DevicePool {
  private readonly slots: (ModelSlot | undefined)[];
  private readonly free: number[];
  private readonly tables = new Map<number, Map<number, number>>();
  private readonly ranges = new Map<number, ModelRange[]>();
  private readonly holds = new Map<number, { range: ModelRange; offset: number; count: number }>();
  private nextHold = 1;
  private clock = 0;
  private counters = { hits: 0, misses: 0, evictions: 0, bytesCopied: 0, copies: 0, rangeHeld: 0, rangeReuses: 0, rangePatched: 0 };
  /** Reads of slots changed under an attend, and releases of held slots: both 0 when callers keep the rule. */
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

  /** Lists a slot (native List): most recent, unless pinned or parked. */
  private list(slot: ModelSlot): void {
    if (slot.pins === 0 && !slot.parkedBy) slot.used = this.clock++;
  }

  uploadIndexed(client: number, blocks: Int32Array, _k: Uint16Array, _v: Uint16Array, o: { priority?: number; priorities?: Uint8Array; hold?: boolean } = {}): Int32Array {
    return this.ensure(client, blocks, o);
  }

  /** Native EnsureMany: each upload in turn; with hold, all held or none (the holds made are undone when one throws). */
  uploadIndexedMany(uploads: GpuUpload[], o: { hold?: boolean } = {}): Int32Array[] {
    const got: Int32Array[] = [];
    try {
      for (const u of uploads) got.push(this.ensure(u.client, u.blocks, { priorities: u.priorities, hold: o.hold }));
    } catch (e) {
      if (o.hold) got.forEach((_, i) => this.pin(uploads[i].client, uploads[i].blocks, false));
      throw e;
    }
    return got;
  }

  pinMany(lists: { client: number; blocks: Int32Array }[], pinned = true): void {
    for (const l of lists) this.pin(l.client, l.blocks, pinned);
  }

  /** Native Ensure (EnsureLocked). */
  private ensure(client: number, blocks: Int32Array, o: { priority?: number; priorities?: Uint8Array; hold?: boolean }): Int32Array {
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
    let error: string | undefined;
    for (let i = 0; i < blocks.length && !error; i++) {
      if (out[i] >= 0) continue;
      const b = blocks[i];
      let s = table.get(b); // repeated in this call
      if (s === undefined) {
        s = this.allocate(inCall);
        if (s === undefined) {
          error = 'GpuPool: no evictable slot left (too many pinned blocks)';
          break;
        }
        table.set(b, s);
        this.slots[s] = { client, block: b, cls: 0, used: 0, pins: 0 };
        this.counters.misses++;
        this.counters.bytesCopied += this.options.blockSize * this.options.headDim * 2 * 2;
        this.counters.copies++;
      }
      inCall.add((out[i] = s));
    }
    blocks.forEach((_, i) => {
      if (out[i] < 0) return;
      const slot = this.slots[out[i]]!;
      slot.cls = o.priorities?.[i] ?? o.priority ?? 0;
      if (!error && o.hold) slot.pins++;
    });
    // Most recent now, in the native order: the call's hits, then its misses (pinned and parked ones stay off).
    for (const s of inCall) this.list(this.slots[s]!);
    if (error) throw new Error(error);
    return out;
  }

  /**
   * A free slot, else the least recently used listed slot of the lowest
   * class outside this call; one of a held range is parked instead, one
   * whose range was used since it was listed is listed again (native Allocate).
   */
  private allocate(inCall: Set<number>): number | undefined {
    const s = this.free.pop();
    if (s !== undefined) return s;
    for (;;) {
      let victim: number | undefined;
      this.slots.forEach((e, i) => {
        if (!e || e.pins > 0 || e.parkedBy || inCall.has(i)) return;
        const v = victim === undefined ? undefined : this.slots[victim]!;
        if (!v || e.cls < v.cls || (e.cls === v.cls && e.used < v.used)) victim = i;
      });
      if (victim === undefined) return undefined;
      const e = this.slots[victim]!;
      let held: ModelRange | undefined, used = -1;
      for (const r of this.ranges.get(e.client) ?? []) {
        if (!contains(r, e.block)) continue;
        if (r.holds > 0) {
          held = r;
          break;
        }
        used = Math.max(used, r.lastUse);
      }
      if (held) {
        e.parkedBy = held;
        held.parked.push(victim);
        continue;
      }
      if (used > e.used) {
        this.list(e);
        continue;
      }
      this.tables.get(e.client)!.delete(e.block);
      for (const r of this.ranges.get(e.client) ?? []) if (contains(r, e.block)) taken(r, e.block - r.first);
      this.counters.evictions++;
      return victim;
    }
  }

  pin(client: number, blocks: Int32Array, pinned = true): void {
    const table = this.tables.get(client);
    for (const b of blocks) {
      const slot = table?.get(b) === undefined ? undefined : this.slots[table.get(b)!]!;
      if (!slot) continue;
      if (pinned) slot.pins++;
      else if (slot.pins > 0 && --slot.pins === 0) this.list(slot);
    }
  }

  holdRange(client: number, first: number, count: number, k: Uint16Array, v: Uint16Array, priority = 0): GpuRangeHold {
    // Refused as the native binding and pool refuse it.
    if (!Number.isInteger(first) || first < 0 || !Number.isInteger(count) || count < 1) throw new RangeError('GpuPool: a range needs first >= 0 and count >= 1');
    const words = (first + count) * this.options.blockSize * this.options.headDim;
    if (k.length < words || v.length < words) throw new RangeError(`k and v must hold ${words} elements`);
    if (count > this.slots.length) throw new Error(`GpuPool: ${count} blocks asked for, the pool holds ${this.slots.length}`);
    const r = this.rangeFor(client, first, count, priority);
    if (r.holds++ === 0) this.counters.rangeHeld += r.count;
    let patched: number;
    try {
      patched = this.patch(r);
    } catch (e) {
      this.unhold(r);
      throw e;
    }
    if (patched === 0) this.counters.rangeReuses++;
    this.counters.hits += count - patched;
    r.lastUse = this.clock++;
    const hold = this.nextHold++;
    this.holds.set(hold, { range: r, offset: first - r.first, count });
    return { hold, blocks: count };
  }

  /** Native HoldRanges: holdRange for each client in order; when one throws, those before it are unheld. */
  holdRanges(clients: number[], first: number, count: number, k: Uint16Array[], v: Uint16Array[], priority = 0): GpuRangeHold[] {
    // Checked before any is held, as the native binding checks them.
    const words = (first + count) * this.options.blockSize * this.options.headDim;
    if (k.length !== clients.length || v.length !== clients.length || k.some((x, i) => x.length < words || v[i].length < words))
      throw new RangeError(`k and v: one array of ${words} elements per client`);
    const got: GpuRangeHold[] = [];
    try {
      clients.forEach((c, i) => got.push(this.holdRange(c, first, count, k[i], v[i], priority)));
    } catch (e) {
      this.unholdRanges(got);
      throw e;
    }
    return got;
  }

  unholdRange(h: GpuRangeHold): void {
    this.unholdRanges([h]);
  }

  /** Native Unhold: every id known, or none ends. */
  unholdRanges(holds: GpuRangeHold[]): void {
    for (const h of holds) if (!this.holds.has(h.hold)) throw new Error(`GpuPool: no hold ${h.hold}`);
    for (const h of holds) {
      const held = this.holds.get(h.hold);
      if (!held) continue; // the same hold twice
      this.unhold(held.range);
      this.holds.delete(h.hold);
    }
  }

  /** Native RangeFor: a clean range containing the asked one, the one equal to it, or a new one. */
  private rangeFor(client: number, first: number, count: number, cls: number): ModelRange {
    let list = this.ranges.get(client) ?? [];
    let equal: ModelRange | undefined;
    for (const r of list) {
      if (!(r.first <= first && first + count <= r.first + r.count)) continue;
      if (clean(r)) return r;
      if (r.first === first && r.count === count) equal = r;
    }
    if (equal) return equal;
    list = list.filter((r) => !(r.holds === 0 && r.first >= first && r.first + r.count <= first + count));
    while (list.length >= MAX_RANGES) {
      let oldest = -1;
      list.forEach((r, i) => void (r.holds === 0 && (oldest < 0 || r.lastUse < list[oldest].lastUse) && (oldest = i)));
      if (oldest < 0) break;
      list.splice(oldest, 1);
    }
    const r: ModelRange = { client, first, count, cls, table: new Int32Array(count).fill(-1), holds: 0, build: true, dirty: [], parked: [], lastUse: -1 };
    list.push(r);
    this.ranges.set(client, list);
    return r;
  }

  /** Native Patch: the dirty entries (all of them when building) made resident again, as one Ensure. */
  private patch(r: ModelRange): number {
    const entries = r.build ? Array.from({ length: r.count }, (_, i) => i) : [...new Set(r.dirty)].sort((a, b) => a - b);
    if (entries.length === 0) return 0;
    const got = this.ensure(r.client, Int32Array.from(entries, (e) => r.first + e), { priority: r.cls });
    entries.forEach((e, i) => (r.table[e] = got[i]));
    r.build = false;
    r.dirty = [];
    this.counters.rangePatched += entries.length;
    return entries.length;
  }

  /** Native Impl::Unhold: the last hold lists the parked slots again (or parks them for another held range over them). */
  private unhold(r: ModelRange): void {
    if (r.holds === 0 || --r.holds > 0) return;
    this.counters.rangeHeld -= r.count;
    for (const s of r.parked) {
      const slot = this.slots[s];
      if (!slot || slot.parkedBy !== r) continue;
      slot.parkedBy = undefined;
      const other = (this.ranges.get(slot.client) ?? []).find((o) => o.holds > 0 && contains(o, slot.block));
      if (other) {
        slot.parkedBy = other;
        other.parked.push(s);
      } else {
        this.list(slot);
      }
    }
    r.parked = [];
  }

  releaseRange(first: number, last: number): number {
    // Refused as the native binding refuses it (IntArg): clients are integers in [0, 2^53].
    for (const [what, x] of [['first', first], ['last', last]] as const)
      if (!Number.isInteger(x) || x < 0 || x > 2 ** 53) throw new RangeError(`${what} must be an integer in [0, ${2 ** 53}]`);
    let n = 0;
    for (const [client, table] of this.tables) {
      if (client < first || client >= last) continue;
      // In block order, as the native pool frees a client's table (so the slots taken next are the same).
      for (const [, s] of [...table].sort((a, b) => a[0] - b[0])) {
        const slot = this.slots[s]!;
        if (slot.pins > 0 || (this.ranges.get(client) ?? []).some((r) => r.holds > 0 && contains(r, slot.block))) this.faults.pinnedReleased++;
        this.slots[s] = undefined;
        this.free.push(s);
        n++;
      }
      this.tables.delete(client);
    }
    for (const [client, list] of this.ranges) {
      if (client < first || client >= last) continue;
      for (const r of list) {
        if (r.holds > 0) this.counters.rangeHeld -= r.count;
        r.holds = 0;
        r.parked = [];
      }
      this.ranges.delete(client);
    }
    return n;
  }

  /** Per kv head, the slots an attend over these tables reads (a held range's from its table). */
  slotsRead(a: Pick<GpuAttendArgs, 'tables'>): number[][] {
    return a.tables.map((t) => {
      if (t instanceof Int32Array) return Array.from(t);
      return t.flatMap((p) => {
        if (p instanceof Int32Array) return Array.from(p);
        const held = this.holds.get(p.hold);
        if (!held) throw new Error(`GpuPool: no hold ${p.hold}`);
        if (held.range.holds === 0) throw new Error(`GpuPool: hold ${p.hold}'s client was released under it`);
        if (held.count !== p.blocks) throw new Error(`GpuPool: hold ${p.hold} has ${held.count} blocks, not ${p.blocks}`);
        return Array.from(held.range.table.subarray(held.offset, held.offset + held.count));
      });
    });
  }

  async attend(a: GpuAttendArgs): Promise<void> {
    const read = this.slotsRead(a);
    const owners = read.map((t) => t.map((s) => this.slots[s]));
    await this.onAttend(a);
    read.forEach((t, h) => t.forEach((s, i) => void (this.slots[s] !== owners[h][i] && this.faults.changedUnderRead++)));
  }

  /** Blocks resident per client (a test's view of what the device would hold). */
  resident(client: number): number {
    return this.tables.get(client)?.size ?? 0;
  }

  /** Whether a client's block is resident (its slot), -1 if not. */
  slotOf(client: number, block: number): number {
    return this.tables.get(client)?.get(block) ?? -1;
  }

  stats(): GpuPoolStats {
    const held = this.slots.filter((e) => e !== undefined);
    return { slots: this.slots.length, used: held.length, pinned: held.filter((e) => e.pins > 0).length, ...this.counters, lastKernelMs: 0 };
  }

  close(): void {
    this.tables.clear();
    this.ranges.clear();
  }
}

/** An entry of a range lost its slot (native Range::Taken): dirty, or the whole table once too many are. */
function taken(r: ModelRange, entry: number): void {
  if (r.build) return;
  if (r.dirty.length >= Math.max(16, Math.floor(r.count / 4))) {
    r.build = true;
    r.dirty = [];
  } else r.dirty.push(entry);
}
