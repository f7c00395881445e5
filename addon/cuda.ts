// Typed wrapper around the addon's CUDA decode path (native/bindings/cuda_binding.cc).
// cudaAvailable() never throws; GpuPool.create throws when there is no device
// or the addon was built without nvcc.
import { nativeAddon } from './addon.js';
import { deviceCall, DeviceTimer } from './device-calls.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

interface CudaCommon {
  /** Total device memory in bytes (0 without a device). */
  memory: number;
  freeMemory?: number;
  smCount?: number;
  computeCapability?: string;
  /** Whether the addon was compiled with CUDA. */
  built: boolean;
}

/** A device and its name, or why there is none (never in `device`). */
export type CudaInfo = CudaDevice | (CudaCommon & { ok: false; error: string });
export type CudaDevice = CudaCommon & { ok: true; device: string };

/** The device's name, or "none" and why (for logs and bench reports). */
export function deviceName(info: CudaInfo): string {
  return info.ok ? info.device : `none (${info.error})`;
}

export interface GpuPoolOptions {
  /** Device bytes for K+V slots (one cudaMalloc each for K and V). */
  budgetBytes: number;
  /** Tokens per block, a power of two. */
  blockSize: number;
  /** 64 or 128. */
  headDim: 64 | 128;
  dtype: KvDtype;
  /** Pinned host staging (and as much device staging), split in 4 chunks; default 64 MiB. */
  stagingBytes?: number;
}

export interface GpuPoolStats {
  slots: number;
  used: number;
  pinned: number;
  hits: number;
  misses: number;
  evictions: number;
  bytesCopied: number;
  copies: number;
  /** Split + merge kernel time of the last attend, from CUDA events. */
  lastKernelMs: number;
  /** Blocks of the range tables held now (holdRange; a block under two held ranges counts twice). */
  rangeHeld: number;
  /** holdRange calls answered from a table still true: no per-block work. */
  rangeReuses: number;
  /** Range table entries made block by block (first builds, and blocks that lost their slot). */
  rangePatched: number;
}

/** A held range of a client's blocks (holdRange's answer): its slot table stays on the device. */
export interface GpuRangeHold {
  readonly hold: number;
  /** Blocks in the range (its part of a head's table). */
  readonly blocks: number;
}

/** A piece of a kv head's slot table: slot ids from the host, or a held range's device table. */
export type GpuTablePiece = Int32Array | GpuRangeHold;

export interface GpuAttendArgs {
  /** [qHeads, headDim] f32. */
  q: Float32Array;
  qHeads: number;
  kvHeads: number;
  scale: number;
  /**
   * Per kv head: slot ids in token order (from upload/lookup), or its table
   * as pieces back to back (slot ids, or held ranges: those are copied on
   * the device, none of their ids from the host).
   */
  tables: (Int32Array | GpuTablePiece[])[];
  /** Per kv head: tokens attended, at most tables[h].length * blockSize (the last block may be partial). */
  validTokens: number[];
  out: Float32Array;
  lse: Float32Array;
  /** Split count; default fills the device. */
  splits?: number;
}

/** One client's blocks in uploadIndexedMany: k and v its whole rows (as uploadIndexed's), priorities one class per block. */
export interface GpuUpload {
  client: number;
  blocks: Int32Array;
  k: Uint16Array;
  v: Uint16Array;
  priorities?: Uint8Array;
}

interface NativePool {
  upload(a: { client: number; blocks: Int32Array; k: Uint16Array; v: Uint16Array; priority?: number; priorities?: Uint8Array; indexed?: boolean; hold?: boolean }): Int32Array;
  uploadMany(a: { clients: number[]; blocks: Int32Array[]; k: Uint16Array[]; v: Uint16Array[]; priorities?: Uint8Array[]; hold?: boolean }): Int32Array;
  pinMany(a: { clients: number[]; blocks: Int32Array[]; pinned: boolean }): void;
  lookup(a: { client: number; blocks: Int32Array }): Int32Array;
  pin(a: { client: number; blocks: Int32Array; pinned: boolean }): void;
  prefer(a: { client: number; blocks: Int32Array; priority: number }): void;
  release(client: number): void;
  releaseRange(first: number, last: number): number;
  holdRange(a: { client: number; first: number; count: number; k: Uint16Array; v: Uint16Array; priority?: number }): number;
  holdRanges(a: { clients: number[]; first: number; count: number; k: Uint16Array[]; v: Uint16Array[]; priority?: number }): Float64Array;
  unhold(hold: number | Float64Array): void;
  /** Resolves with the work's own ms; sync: run on the calling thread (settled the same way). */
  attend(a: GpuAttendArgs & { sync?: boolean }): Promise<number>;
  stats(): GpuPoolStats;
  resetCounters(): void;
  sync(): void;
  probeH2D(bytes: number, iters: number): number;
  close(): void;
}

interface Addon {
  cudaAvailable(): CudaInfo;
  GpuPool: new (o: { budgetBytes: number; blockSize: number; headDim: number; dtype: number; stagingBytes?: number }) => NativePool;
}

const addon = nativeAddon<Addon>();

/** Whether a CUDA device can be used: {ok: false, error: why not} otherwise. */
export function cudaAvailable(): CudaInfo {
  try {
    return addon.cudaAvailable();
  } catch (e) {
    return { ok: false, error: String(e), memory: 0, built: false };
  }
}

/**
 * A device pool of KV blocks: one pool client per (session, layer, kv head),
 * each with its page table of logical block -> slot. LRU eviction within
 * priority classes (lowest first); pinned blocks stay.
 */
export class GpuPool {
  /** The last attend's work per row attended: where the next one waits (addon/device-calls.ts). */
  private readonly attendTimer = new DeviceTimer();

  private constructor(
    private readonly pool: NativePool,
    readonly options: GpuPoolOptions,
  ) {}

  static create(options: GpuPoolOptions): GpuPool {
    const pool = new addon.GpuPool({ ...options, dtype: DTYPE_CODE[options.dtype] });
    return new GpuPool(pool, options);
  }

  /**
   * Makes blocks of a client resident; k and v hold blocks.length blocks back
   * to back (blockSize * headDim words each). Only misses are copied
   * (asynchronously; attend waits for them). Returns the slot of each block.
   */
  upload(client: number, blocks: Int32Array, k: Uint16Array, v: Uint16Array, priority = 0): Int32Array {
    return this.pool.upload({ client, blocks, k, v, priority });
  }

  /**
   * As upload, but k and v are a whole head's rows (a KvSegment's k[h], v[h])
   * and block b is read at b * blockSize * headDim: nothing is gathered in
   * JS, and only misses are copied. `priorities` gives each block its
   * eviction class; `hold` pins the blocks too (undo with pin(.., false)
   * once the attend that reads them has returned).
   */
  uploadIndexed(client: number, blocks: Int32Array, k: Uint16Array, v: Uint16Array, o: { priority?: number; priorities?: Uint8Array; hold?: boolean } = {}): Int32Array {
    return this.pool.upload({ client, blocks, k, v, ...o, indexed: true });
  }

  /**
   * uploadIndexed of several clients (a step's kv heads) in one native call,
   * each in turn as that many calls would. With `hold`, their misses go to
   * the device in one flush (one host->device copy and one scatter launch,
   * not one per client) and all are held or none (it throws, having undone
   * its holds; blocks made resident stay so). Returns each upload's slots.
   * An upload without `priorities` is in class 0 (a list with priorities
   * needs them for every upload).
   */
  uploadIndexedMany(uploads: GpuUpload[], o: { hold?: boolean } = {}): Int32Array[] {
    if (uploads.length === 0) return [];
    const some = uploads.some((u) => u.priorities);
    const all = this.pool.uploadMany({
      clients: uploads.map((u) => u.client),
      blocks: uploads.map((u) => u.blocks),
      k: uploads.map((u) => u.k),
      v: uploads.map((u) => u.v),
      ...(some && { priorities: uploads.map((u) => u.priorities ?? new Uint8Array(u.blocks.length)) }),
      hold: o.hold ?? false,
    });
    let at = 0;
    return uploads.map((u) => all.subarray(at, (at += u.blocks.length)));
  }

  /** pin of several clients' blocks in one native call. */
  pinMany(lists: { client: number; blocks: Int32Array }[], pinned = true): void {
    if (lists.length > 0) this.pool.pinMany({ clients: lists.map((l) => l.client), blocks: lists.map((l) => l.blocks), pinned });
  }

  /** Slot of each block, -1 where not resident. */
  lookup(client: number, blocks: Int32Array): Int32Array {
    return this.pool.lookup({ client, blocks });
  }

  /** Pins count: a block pinned twice stays until it is unpinned twice. */
  pin(client: number, blocks: Int32Array, pinned = true): void {
    this.pool.pin({ client, blocks, pinned });
  }

  /** Eviction class of resident blocks: lower classes are evicted first (default 0). */
  prefer(client: number, blocks: Int32Array, priority: number): void {
    this.pool.prefer({ client, blocks, priority });
  }

  /** Drops every block of a client, pinned ones too: call it once no attend reads them. */
  release(client: number): void {
    this.pool.release(client);
  }

  /** release() of every client in [first, last) in one call; returns the blocks freed. */
  releaseRange(first: number, last: number): number {
    return this.pool.releaseRange(first, last);
  }

  /**
   * Blocks [first, first + count) of a client (k and v a whole head's rows,
   * as uploadIndexed's), made resident in class `priority` and held for an
   * attend until unholdRange. The range's slot table stays on the device:
   * while none of its blocks lost its slot since the last hold, this does no
   * work per block (no page-table lookup, touch or pin, no slot id copied);
   * otherwise only the blocks that lost theirs are made resident again. Its
   * slots are never evicted while held. Pass the answer as a piece of
   * attend's tables.
   */
  holdRange(client: number, first: number, count: number, k: Uint16Array, v: Uint16Array, priority = 0): GpuRangeHold {
    return { hold: this.pool.holdRange({ client, first, count, k, v, priority }), blocks: count };
  }

  /**
   * holdRange of the same blocks of several clients (a part's kv heads:
   * k[i], v[i] are client i's rows) in one native call: all held, or none
   * (it throws).
   */
  holdRanges(clients: number[], first: number, count: number, k: Uint16Array[], v: Uint16Array[], priority = 0): GpuRangeHold[] {
    return Array.from(this.pool.holdRanges({ clients, first, count, k, v, priority }), (hold) => ({ hold, blocks: count }));
  }

  /** Ends a holdRange's hold, once the attend that reads it has returned. */
  unholdRange(h: GpuRangeHold): void {
    this.pool.unhold(h.hold);
  }

  /** Ends several holds in one native call (an unknown one throws, and then none ends). */
  unholdRanges(holds: GpuRangeHold[]): void {
    if (holds.length > 0) this.pool.unhold(Float64Array.from(holds, (h) => h.hold));
  }

  /**
   * Attention over the tables' slots. On the event loop's thread when it is
   * expected to be short (addon/device-calls.ts), else on libuv's pool; the
   * same answer and errors either way (refused arguments throw).
   */
  attend(args: GpuAttendArgs): Promise<void> {
    let rows = 0;
    for (const n of args.validTokens) rows += n;
    return deviceCall(this.attendTimer.expect(rows), (sync) => this.pool.attend({ ...args, sync })).then((ms) => this.attendTimer.record(ms, rows));
  }

  stats(): GpuPoolStats {
    return this.pool.stats();
  }

  resetCounters(): void {
    this.pool.resetCounters();
  }

  sync(): void {
    this.pool.sync();
  }

  /** Pinned host->device copy bandwidth in bytes/s (bytes per copy, iters copies). */
  probeH2D(bytes: number, iters: number): number {
    return this.pool.probeH2D(bytes, iters);
  }

  close(): void {
    this.pool.close();
  }
}
