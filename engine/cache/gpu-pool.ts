// The CUDA backend: one device pool of KV blocks (native/cuda) that decode
// steps read whole document blocks from. Each (document segment, layer, kv
// head) is one pool client with its own page table; documents are shared by
// sessions, so are their resident blocks. What a step selects beyond whole
// document blocks (the session's own tokens, partial blocks, token-level
// selections) is attended on the host and merged in by the kernel through
// log-sum-exp, so the answer is the same as the CPU path's.
//
// Admission: a session reserves its working set (the blocks one step of
// every layer reads) at creation. A working set larger than the whole pool
// runs on the host; one that fits but not beside the open sessions' is
// refused with 503 until they end.
import { totalmem } from 'node:os';
import { cudaAvailable, GpuPool, type CudaDevice, type GpuPoolOptions, type GpuPoolStats, type GpuRangeHold, type GpuTablePiece, type GpuUpload } from '../../addon/cuda.js';
import { budgetTokens, type SearchParams } from '../../index/method.js';
import type { BlockStats } from './block-stats.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { KvrecallError } from '../../core/errors.js';
import { DEFAULT_BLOCK_SIZE, type ModelShape } from '../../core/model.js';
import { concatRows, rangeBlocks, type PoolPart } from './selection-parts.js';
import { DeviceKeyScans, type DeviceKeyScanStats } from './device-key-scans.js';
import { DeviceWaveStores, type DeviceWaveStats, type HeldWaveStore } from './device-wave.js';
import type { WaveGpuStore, WaveGpuStoreOptions } from '../../addon/wave-gpu.js';
import type { ClusterIndex } from '../../index/wave/cluster-index.js';

/** Tokens per pool block: the summaries' block size, so a method's blocks are the pool's. */
export const POOL_BLOCK = DEFAULT_BLOCK_SIZE;
/** Eviction class of range parts (sinks, window, whole documents): every step reads them. */
export const RANGE_PRIORITY = 3;
/** Pool clients per segment: (layer, kv head) pairs, each below 1024 (model.ts). */
const CLIENTS_PER_SEGMENT = 1024 * 1024;

/**
 * The pool calls the backend makes: the native pool's, or a host model of
 * it where no device runs (simulated-pool.ts PoolModel, for tests of what
 * the device holds).
 */
export type DevicePool = Pick<GpuPool, 'uploadIndexed' | 'uploadIndexedMany' | 'pin' | 'pinMany' | 'holdRanges' | 'unholdRanges' | 'releaseRange' | 'attend' | 'stats' | 'close'>;

/** What the backend makes its device parts with (the native ones by default). */
export interface DeviceFactories {
  pool?: (o: GpuPoolOptions) => DevicePool;
  /** Makes a wave layer's store off the event loop (WaveGpuStore.open). */
  waveStore?: (o: WaveGpuStoreOptions) => Promise<WaveGpuStore>;
}

export interface GpuBackendOptions {
  /** Device bytes for the pool (K and V slots). */
  budgetBytes: number;
  stagingBytes?: number;
  /**
   * Device bytes for `wave` document layers held whole on the device
   * (engine/cache/device-wave.ts: clusters, K and V); 0 or unset: wave steps
   * run on the host path, their exact parts through the pool.
   */
  waveBudgetBytes?: number;
  /** A share of a layer's rows (0 < x <= 1): the wave stores are paged, K and V on the host, that share cached on the device (device-wave.ts). */
  waveCacheShare?: number;
  /** With waveCacheShare: the bytes a paged store's layer-step may copy after its first 16 steps (device-wave.ts; unset: WAVE_PAGE_CAP_DEFAULT, 0: no cap). */
  wavePageCapBytes?: number;
  /** Pinned host bytes the paged stores' K and V may take (a copy of each layer they hold); default half the host's memory. */
  waveHostBytes?: number;
  /**
   * Device bytes for retrieval-attention's code scan (engine/cache/device-key-scans.ts:
   * a layer's keys, their codes and values, ~4.5 bytes a key channel: the step's selected rows are attended there
   * too); 0 or unset: codeScan sessions scan and attend on the host.
   */
  scanBudgetBytes?: number;
  /**
   * Range parts (sinks, window, whole documents) through the pool's range
   * tables (holdRange: no per-block host work while resident) rather than
   * block by block. Default: on, unless KVRECALL_POOL_RANGES=0.
   */
  rangeTables?: boolean;
}

export interface GpuDescription {
  backend: 'cuda';
  device: string;
  memory: number;
  wave?: DeviceWaveStats;
  /** Retrieval-attention's code scan stores (with a scan budget). */
  keyScan?: DeviceKeyScanStats & { budgetBytes: number };
  pool: {
    budgetBytes: number;
    blockSize: number;
    /** The shape the pool was made for (the first session's that fits), once made. */
    headDim?: number;
    dtype?: string;
    reservedBytes: number;
    /** Why no pool could be made (steps then run on the host). */
    failure?: string;
  } & Partial<GpuPoolStats>;
}

export interface GpuStepResult extends BlockStats {
  /** Making the blocks resident (page-table lookups, copies of misses issued). */
  residentMs: number;
  /** The kernel (split + merge), from CUDA events. */
  kernelMs: number;
}

export class GpuBackend {
  private pool?: DevicePool;
  private shape?: { headDim: number; dtype: string };
  private readonly uids = new WeakMap<KvSegment, number>();
  /** Per segment, its layers' wave store keys (waveKey). */
  private readonly waveKeys = new WeakMap<KvSegment, string[]>();
  private nextUid = 1;
  private reserved = 0;
  /** Pool bytes: the configured budget, or what the device could give. */
  private budget: number;
  /** Why the pool could not be made, once that happened. */
  private failure?: string;
  /** Document layers of `wave` held whole on the device, when a budget allows them. */
  private readonly wave?: DeviceWaveStores;
  /** Retrieval-attention's code scan on the device, when a budget allows its stores. */
  readonly keyScanner?: DeviceKeyScans;
  /** Segments whose blocks steps are reading now (attend's uploads to its kernel's end), and by how many steps. */
  private readonly reading = new Map<KvSegment, number>();
  /** Segments whose device copies are to go (a deleted document's): freed once no step reads them. */
  private readonly dropped = new WeakSet<KvSegment>();
  private readonly createPool: (o: GpuPoolOptions) => DevicePool;
  /** Whether range parts go through range tables (settable: bench/gpu-decode.ts alternates the two paths in one run). */
  rangeTables: boolean;
  /**
   * Whether a step's block lists go to the pool in one call (one flush for
   * every kv head's misses) or a call a kv head, as before (settable:
   * bench/gpu-decode.ts --upload-path ab alternates the two in one run).
   */
  batchUploads = true;

  private constructor(
    readonly info: CudaDevice,
    readonly options: GpuBackendOptions,
    make: DeviceFactories = {},
  ) {
    this.budget = options.budgetBytes;
    this.rangeTables = options.rangeTables ?? process.env.KVRECALL_POOL_RANGES !== '0';
    this.createPool = make.pool ?? ((o) => GpuPool.create(o));
    if ((options.scanBudgetBytes ?? 0) > 0) this.keyScanner = new DeviceKeyScans(options.scanBudgetBytes!);
    if ((options.waveBudgetBytes ?? 0) > 0)
      this.wave = new DeviceWaveStores(options.waveBudgetBytes!, make.waveStore, undefined, options.waveCacheShare, options.waveHostBytes ?? Math.floor(totalmem() / 2),
        options.wavePageCapBytes);
  }

  /** A backend whose device parts `make` makes (a host model where no device runs); `open` makes the native ones. */
  static over(info: CudaDevice, options: GpuBackendOptions, make: DeviceFactories): GpuBackend {
    return new GpuBackend(info, options, make);
  }

  /**
   * The device store of a document's wave layer (made on first use, off the
   * event loop: a step waits for its layer's), pinned until `release`;
   * undefined without a wave budget, for a shape the pool does not take, or
   * when it cannot be held (the step then runs the host path). A live
   * store comes back as it is, not in a promise (a step's common case: no
   * async function's promise and microtask turns before its device call);
   * one still to be made, in a promise.
   */
  waveLayer(m: ModelShape, segment: KvSegment, layer: number, heads: ClusterIndex[]): HeldWaveStore | undefined | Promise<HeldWaveStore | undefined> {
    // A dropped segment's step (begun before its document was deleted) runs on the host rather than upload it again.
    if (!this.wave || !this.accepts(m) || this.dropped.has(segment)) return undefined;
    const key = this.waveKey(segment, layer);
    // A live store (every step but a layer's first) is held at once, not through acquire's promise.
    return this.wave.holdLive(key) ?? this.wave.acquire(key, heads, m);
  }

  /** A document layer's key among the wave stores, `uid:layer` (drop's prefix is `uid:`), made once per (segment, layer). */
  private waveKey(segment: KvSegment, layer: number): string {
    let keys = this.waveKeys.get(segment);
    if (!keys) this.waveKeys.set(segment, (keys = []));
    return (keys[layer] ??= `${this.uidOf(segment)}:${layer}`);
  }

  /** The backend when a CUDA device answers and the budget is positive; undefined otherwise. */
  static open(options: GpuBackendOptions): GpuBackend | undefined {
    const info = cudaAvailable();
    if (!info.ok || options.budgetBytes <= 0) return undefined;
    return new GpuBackend(info, options);
  }

  /** Whether sessions of this model can use the pool (the kernel's head dims; one pool shape per process). */
  accepts(m: ModelShape): boolean {
    if (m.headDim !== 64 && m.headDim !== 128) return false;
    return !this.shape || (this.shape.headDim === m.headDim && this.shape.dtype === m.dtype);
  }

  private slotBytes(m: ModelShape): number {
    return POOL_BLOCK * m.headDim * 2 * 2;
  }

  /**
   * Reserves a session's working set; returns the bytes to give back at its
   * end, or 0 when the session runs on the host (shape not accepted, or a
   * working set larger than the pool).
   */
  admit(m: ModelShape, method: string, params: SearchParams, documentTokens: number): number {
    if (!this.accepts(m) || documentTokens === 0 || (this.failure && !this.pool)) return 0;
    // Blocks per kv head one step reads: exact, the whole documents; the
    // others, their budget plus sinks and window (+2 blocks for alignment).
    const perHead = method === 'exact' ? Math.ceil(documentTokens / POOL_BLOCK) : Math.min(Math.ceil(documentTokens / POOL_BLOCK), Math.ceil((budgetTokens(params.budget, documentTokens) + params.sinks + params.window) / POOL_BLOCK) + 2);
    const bytes = perHead * m.kvHeads * m.layers * this.slotBytes(m);
    if (bytes > this.budget) return 0;
    if (this.reserved + bytes > this.budget)
      throw new KvrecallError(
        'over_budget',
        `the GPU pool cannot hold this session's working set (${gib(bytes)}) beside the open sessions' (${gib(this.reserved)} of ${gib(this.budget)}); retry when sessions end`,
      );
    this.reserved += bytes;
    return bytes;
  }

  release(bytes: number): void {
    this.reserved = Math.max(0, this.reserved - bytes);
  }

  /**
   * The pool, made at the first step that needs it. When the device cannot
   * give the budget (another process holds memory), it tries half, down to
   * 1/16, and admission then counts what it got; with none, steps stay on the
   * host (never an error to the client).
   */
  private poolFor(m: ModelShape): DevicePool | undefined {
    if (this.pool || this.failure) return this.pool;
    for (let bytes = this.budget; bytes >= this.options.budgetBytes / 16; bytes = Math.floor(bytes / 2)) {
      try {
        this.pool = this.createPool({ budgetBytes: bytes, blockSize: POOL_BLOCK, headDim: m.headDim as 64 | 128, dtype: m.dtype, stagingBytes: this.options.stagingBytes });
        this.budget = bytes;
        this.shape = { headDim: m.headDim, dtype: m.dtype };
        return this.pool;
      } catch (e) {
        this.failure = String(e);
      }
    }
    console.error(`kvrecall: GPU pool unavailable, attending on the host: ${this.failure}`);
    return undefined;
  }

  /** Pool client of one (segment, layer, kv head): layers and heads are below 1024 (model.ts). */
  private client(segment: KvSegment, layer: number, head: number): number {
    return this.uidOf(segment) * CLIENTS_PER_SEGMENT + layer * 1024 + head;
  }

  /**
   * Frees what the device holds of these segments (a deleted document's
   * layers, or a layer evicted from host memory): their pool blocks once no
   * step reads them (now, or when the last step that does ends), their wave
   * stores likewise. They would otherwise hold their slots until evicted.
   * A step that began before the delete and reaches the device afterwards
   * frees what it made resident when it ends; its wave layer steps on the
   * host.
   */
  drop(segments: readonly KvSegment[]): void {
    for (const segment of segments) {
      // Marked even when never on the device: a step begun before the delete may still upload it.
      this.dropped.add(segment);
      const uid = this.uids.get(segment);
      if (uid === undefined) continue;
      this.wave?.drop(`${uid}:`);
      if (!this.reading.has(segment)) this.freeBlocks(uid);
    }
  }

  private freeBlocks(uid: number): void {
    this.pool?.releaseRange(uid * CLIENTS_PER_SEGMENT, (uid + 1) * CLIENTS_PER_SEGMENT);
  }

  /** Counts a step in as reading these segments' blocks; the returned function counts it out (and frees the dropped ones it was the last reader of). */
  private read(segments: ReadonlySet<KvSegment>): () => void {
    for (const s of segments) this.reading.set(s, (this.reading.get(s) ?? 0) + 1);
    return () => {
      for (const s of segments) {
        const n = this.reading.get(s)! - 1;
        if (n > 0) this.reading.set(s, n);
        else {
          this.reading.delete(s);
          // A segment no block of which was ever uploaded has no pool client, and nothing to free.
          const uid = this.uids.get(s);
          if (uid !== undefined && this.dropped.has(s)) this.freeBlocks(uid);
        }
      }
    };
  }

  private uidOf(segment: KvSegment): number {
    let uid = this.uids.get(segment);
    if (uid === undefined) this.uids.set(segment, (uid = this.nextUid++));
    return uid;
  }

  /** Whether a step with this many blocks can be held in the pool beside the blocks other steps hold now. */
  fits(m: ModelShape, blocks: number): boolean {
    const pool = this.poolFor(m);
    if (!pool) return false;
    const st = pool.stats();
    return blocks <= st.slots - st.pinned - st.rangeHeld;
  }

  /**
   * Makes the parts' blocks resident (copying misses from the host
   * segments), holds them for the kernel, and attends (the host's parts are
   * merged by the caller, engine/cache/residency.ts). Returns what the pool
   * did for this step.
   */
  async attend(
    m: ModelShape,
    layer: number,
    parts: PoolPart[],
    q: Float32Array,
    scale: number,
    out: Float32Array,
    lse: Float32Array,
  ): Promise<GpuStepResult> {
    const pool = this.poolFor(m);
    if (!pool) throw new Error('GpuBackend.attend without a pool (fits() said no)');
    const ranges = this.rangeTables;
    // The per-block path lists a range's blocks (outside the clock, as splitForPool did before range tables).
    const listed = ranges ? [] : parts.map((p) => p.range && { ids: rangeBlocks(p.range.first, p.range.count), priority: new Uint8Array(p.range.count).fill(p.range.priority) });
    const before = pool.stats();
    const held: GpuUpload[] = [];
    // Block lists wait for the next range part or the end of the parts: one
    // native call for all of them, their misses copied in one flush (a call
    // per kv head made 8 flushes a step, each a thread-pool wake, a copy and
    // a launch: residency 0.41 ms of a 1.00 ms nosa step at 1M, H100).
    let waiting: { upload: GpuUpload; head: number }[] = [];
    const batch = this.batchUploads;
    const upload = () => {
      // Held (pinned) until the kernel has read them: a later upload (another
      // session's step) must not evict them. All held or none (it throws).
      const got = batch && waiting.length > 0 ? pool.uploadIndexedMany(waiting.map((w) => w.upload), { hold: true }) : [];
      waiting.forEach((w, i) => {
        const u = w.upload;
        // A call a head: each held as it returns (a later head's refusal leaves it to the unpins below).
        pieces[w.head].push(batch ? got[i] : pool.uploadIndexed(u.client, u.blocks, u.k, u.v, { priorities: u.priorities, hold: true }));
        held.push(u);
      });
      waiting = [];
    };
    const holds: GpuRangeHold[] = [];
    const pieces: GpuTablePiece[][] = Array.from({ length: m.kvHeads }, () => []);
    let selected = 0;
    const t0 = performance.now();
    let t1 = t0;
    const done = this.read(new Set(parts.map((p) => p.segment)));
    try {
      parts.forEach((part, i) => {
        if (part.range && ranges) {
          // The waiting lists first: the pool sees the parts in their order (a hold's misses may evict).
          upload();
          // One native call for the part's kv heads, each range held by one count until the kernel has read it.
          const { first, count, priority } = part.range;
          const clients = Array.from({ length: m.kvHeads }, (_, h) => this.client(part.segment, layer, h));
          const got = pool.holdRanges(clients, first, count, part.segment.k.slice(0, m.kvHeads), part.segment.v.slice(0, m.kvHeads), priority);
          holds.push(...got);
          got.forEach((hold, h) => pieces[h].push(hold));
          selected += count * m.kvHeads;
          return;
        }
        for (let h = 0; h < m.kvHeads; h++) {
          const client = this.client(part.segment, layer, h);
          const list = part.range ? listed[i]! : { ids: part.blocks[h], priority: part.priority[h] };
          if (list.ids.length === 0) continue;
          waiting.push({ upload: { client, blocks: list.ids, k: part.segment.k[h], v: part.segment.v[h], priorities: list.priority }, head: h });
          selected += list.ids.length;
        }
      });
      upload();
      // A head with a held range keeps its pieces (the pool gathers them on the device); one without, one table.
      const tables = pieces.map((p) => (p.every((x) => x instanceof Int32Array) ? concatRows(p as Int32Array[]) : p));
      t1 = performance.now();
      await pool.attend({
        q,
        qHeads: m.qHeads,
        kvHeads: m.kvHeads,
        scale,
        tables,
        validTokens: pieces.map((p) => p.reduce((n, x) => n + (x instanceof Int32Array ? x.length : x.blocks), 0) * POOL_BLOCK),
        out,
        lse,
      });
    } finally {
      if (batch) pool.pinMany(held, false);
      else for (const u of held) pool.pin(u.client, u.blocks, false);
      pool.unholdRanges(holds);
      done();
    }
    const after = pool.stats();
    return { selected, hits: after.hits - before.hits, bytesIn: after.bytesCopied - before.bytesCopied, kernelMs: after.lastKernelMs, residentMs: t1 - t0 };
  }

  describe(): GpuDescription {
    return {
      backend: 'cuda',
      device: this.info.device,
      memory: this.info.memory,
      ...(this.wave && { wave: this.wave.stats() }),
      ...(this.keyScanner && { keyScan: { ...this.keyScanner.stats, budgetBytes: this.keyScanner.budgetBytes } }),
      pool: { budgetBytes: this.budget, blockSize: POOL_BLOCK, ...this.shape, reservedBytes: this.reserved, ...(this.failure && !this.pool && { failure: this.failure }), ...this.pool?.stats() },
    };
  }

  close(): void {
    this.pool?.close();
    this.pool = undefined;
    this.wave?.close();
    this.keyScanner?.close();
  }
}

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
}
