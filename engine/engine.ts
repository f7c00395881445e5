// The engine: the document store, the documents and the sessions, wired
// together once at start. The store is LMDB in `dataDir`, or a Redis Cluster
// shared with other servers when `store` names one.
import { mkdirSync } from 'node:fs';
import { methodNames } from '../index/registry.js';
import { HostBudget } from '../storage/host-budget.js';
import type { DocumentStore, OpenedStore } from '../storage/document-store.js';
import { LmdbStore } from '../storage/lmdb-store.js';
import { RedisStore } from '../storage/redis-store.js';
import { cudaAvailable } from '../addon/cuda.js';
import { Documents } from './documents.js';
import { GpuBackend } from './cache/gpu-pool.js';
import { Sessions } from './sessions.js';

export interface EngineOptions {
  dataDir: string;
  /** A Redis Cluster seed list (`redis://HOST:PORT[,HOST:PORT...]`) to keep documents on instead of LMDB in dataDir. */
  store?: string;
  /** LMDB environments a document's blocks are spread over (unset: the store's default). */
  lmdbShards?: number;
  /** Bytes of a loading document committed between write-backs of its LMDB files (unset: the store's default; 0: none). */
  lmdbWriteBack?: number;
  /** Threads in libuv's pool (for the default shard count). */
  threadPool?: number;
  /** Host bytes the KV of documents and sessions may hold. */
  memoryBudget: number;
  /** Device bytes for the GPU block pool (0: CPU only; unset: 80% of free device memory). */
  gpuBudget?: number;
  /** Device bytes for wave document layers held whole on the device (0 or unset: none; engine/cache/device-wave.ts). */
  gpuWaveBudget?: number;
  /** Device bytes for retrieval-attention's code scan stores (0 or unset: none; engine/cache/device-key-scans.ts). */
  gpuScanBudget?: number;
  /** A share of a layer's rows: the wave stores are paged, that share cached on the device (core/config.ts gpuWaveCache). */
  gpuWaveCache?: number;
  /** With gpuWaveCache: the bytes a paged store's layer-step may copy after its first 16 steps (core/config.ts gpuWavePageCap; unset: 2 MiB, 0: no cap). */
  gpuWavePageCap?: number;
  /** wave's k-means at seal on the device, when there is one (core/config.ts gpuKmeans). */
  gpuKmeans?: boolean;
}

export class Engine {
  private constructor(
    readonly store: DocumentStore,
    readonly documents: Documents,
    readonly sessions: Sessions,
    /** Documents found mid-preload at start (a crash) and marked incomplete. */
    readonly recovered: string[],
    readonly budget: HostBudget,
    /** The CUDA backend, when a device answered and the budget allows one. */
    readonly gpu?: GpuBackend,
  ) {}

  /** `gpu`: a backend made by the caller (one over a host model of the device, where none runs) instead of the device's. */
  static async open(opts: EngineOptions, given?: { gpu?: GpuBackend }): Promise<Engine> {
    const { store, recovered } = await openStore(opts);
    const budget = new HostBudget(opts.memoryBudget);
    const device = cudaAvailable();
    const gpu = given?.gpu ?? (device.ok ? GpuBackend.open({ budgetBytes: opts.gpuBudget ?? Math.floor((device.freeMemory ?? 0) * 0.8), waveBudgetBytes: opts.gpuWaveBudget, waveCacheShare: opts.gpuWaveCache, wavePageCapBytes: opts.gpuWavePageCap, scanBudgetBytes: opts.gpuScanBudget }) : undefined);
    const documents = new Documents(store, methodNames, budget, gpu !== undefined && opts.gpuKmeans === true, gpu);
    return new Engine(store, documents, new Sessions(documents, budget, gpu), recovered, budget, gpu);
  }

  async close(): Promise<void> {
    await this.store.close();
    this.gpu?.close();
  }
}

function openStore(opts: EngineOptions): Promise<OpenedStore> {
  if (opts.store) return RedisStore.open(opts.store);
  mkdirSync(opts.dataDir, { recursive: true });
  return LmdbStore.open(opts.dataDir, { shards: opts.lmdbShards, threadPool: opts.threadPool, writeBack: opts.lmdbWriteBack });
}
