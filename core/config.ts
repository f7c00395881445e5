// Every setting of the service, parsed once (flags, then environment, then
// defaults). Code below the CLI takes this object and never reads env.
import { totalmem } from 'node:os';
import { invalid } from './errors.js';

export interface Config {
  host: string;
  port: number;
  dataDir: string;
  /**
   * Where documents live when not in LMDB under dataDir: a Redis Cluster
   * seed list, `redis://HOST:PORT[,HOST:PORT...]` (shared by every server
   * that names it).
   */
  store?: string;
  /** When set, every route but /v1/health requires `Authorization: Bearer <token>`. */
  token?: string;
  /** Largest request body accepted, in bytes. */
  bodyLimit: number;
  /** Host bytes the KV of documents and sessions may hold (default 80% of RAM). */
  memoryBudget: number;
  /**
   * Device bytes for the GPU block pool; 0 keeps attention on the CPU even
   * with a GPU. Unset: 80% of the device's free memory when one answers.
   */
  gpuBudget?: number;
  /**
   * Device bytes for `wave` document layers held whole on the device (their
   * clusters, K and V: one native call per layer-step), beside the pool.
   * Unset or 0: wave steps run on the host path.
   */
  gpuWaveBudget?: number;
  /**
   * Device bytes for retrieval-attention's code scan (a layer's keys and
   * their 4-bit codes on the device: one native call per layer-step for a
   * session with codeScan). Unset or 0: those sessions scan on the host.
   */
  gpuScanBudget?: number;
  /**
   * A share of a layer's rows (0 < x <= 1): the device-wave stores are paged,
   * K and V in pinned host memory and this share of the rows cached on the
   * device (native/cuda/wave_cache.cuh), so that the wave budget holds
   * summaries + cache and many more layers fit. Unset or 0: each store holds
   * its layer's K and V whole.
   */
  gpuWaveCache?: number;
  /**
   * With gpuWaveCache: the bytes (K and V) a paged store's layer-step may
   * copy into its cache after its first 16 steps, each kv head an equal
   * share; the rows the cache lacks past it are not rescored and are left to
   * the estimate (native/cuda/wave_page_cap.cuh). Unset: 2 MiB (issue #13's
   * target); 0: no cap, every row the step reads copied.
   */
  gpuWavePageCap?: number;
  /**
   * 1: the seal's k-means for `wave` runs on the GPU when the server has one
   * (native/cuda/kmeans_device.h); its clusters are not faiss's, so a
   * document then answers a little differently than on a CPU server.
   * Unset or 0: on the host, the same clusters everywhere.
   */
  gpuKmeans?: number;
  /**
   * LMDB environments a document's blocks are spread over, each with its
   * own writer (storage/lmdb-shards.ts). Unset: one per 4 cores, at most 8,
   * and at most the pool's threads less 2 (storage/lmdb-store.ts defaultShards).
   */
  lmdbShards?: number;
  /**
   * Bytes of a loading document's blocks committed between write-backs of
   * its LMDB files (written and dropped from the page cache; storage/lmdb-store.ts
   * WRITE_BACK_BYTES, 256 MiB, the value measured). Unset or 0: none (every
   * block cached until seal; faster on the GPU host, slower where first-touched
   * memory is dear, as on a VM whose balloon reports free pages).
   */
  lmdbWriteBack?: number;
  /**
   * Threads in libuv's pool, as UV_THREADPOOL_SIZE said when the process
   * started (libuv reads it once; `kvrecall` sets 16 when unset).
   */
  threadPool: number;
  /** Open decode streams (`GET /v1/stream`) at most; more are refused with 503. */
  maxStreams: number;
  /** A stream message begun must progress within this many ms, else the connection is closed (1008). */
  streamIdleMs: number;
  /**
   * The directory in which stream clients make their shared-memory
   * segments (api/shm.ts): /dev/shm unless set; `off` (undefined here)
   * refuses every attach.
   */
  shmDir?: string;
  /**
   * Bytes of shared-memory segments mapped at most for one stream (the
   * one attached and those it replaced that frames still use) and for all
   * streams together: an attach past either is refused (api/shm.ts).
   * Each positive, a stream's at most the total (shmCaps below).
   */
  shmStreamBytes: number;
  shmTotalBytes: number;
  /**
   * Attention work (rows × q heads × headDim) an event-loop turn runs on
   * its own thread instead of libuv's pool (addon/kernels.ts attend: a
   * short step skips two cross-thread wake-ups). 0: every attend on the
   * pool. Unset: the kernel's default, 2^23 (exact over 4K tokens of the
   * llama3.2-1b shape, ~0.9 ms on the 2-core VM).
   */
  attendSyncWork?: number;
  /**
   * Microseconds of expected device time an event-loop turn spends on GPU
   * calls (the wave step and rest, the pool's attend) run on its own
   * thread instead of libuv's pool (addon/device-calls.ts: a short call
   * skips two cross-thread wake-ups). 0: every GPU call on the pool.
   * Unset: the default, 1000.
   */
  gpuSyncUs?: number;
  /**
   * Microseconds the event loop keeps polling its sockets after a stream
   * answer goes out, instead of sleeping (api/loop-poll.ts): the next
   * decode call is read as it lands, at the cost of a core busy for up to
   * this long after each answer. 0: it sleeps. Unset: 1000 on the CUDA
   * backend with 8 cores or more, else 0 (api/loop-poll.ts defaultPollUs).
   */
  pollUs?: number;
}

export const DEFAULTS: Config = {
  host: '127.0.0.1',
  port: 8700,
  dataDir: './kvrecall-data',
  bodyLimit: 256 * 1024 * 1024,
  memoryBudget: Math.floor(totalmem() * 0.8),
  threadPool: 4,
  maxStreams: 1024,
  streamIdleMs: 30_000,
  shmDir: '/dev/shm',
  shmStreamBytes: 2 ** 30,
  shmTotalBytes: 8 * 2 ** 30,
};

const FLAGS: Record<string, keyof Config> = {
  '--host': 'host',
  '--port': 'port',
  '--data': 'dataDir',
  '--store': 'store',
  '--token': 'token',
  '--body-limit': 'bodyLimit',
  '--memory-budget': 'memoryBudget',
  '--gpu-budget': 'gpuBudget',
  '--gpu-wave-budget': 'gpuWaveBudget',
  '--gpu-scan-budget': 'gpuScanBudget',
  '--gpu-wave-cache': 'gpuWaveCache',
  '--gpu-wave-page-cap': 'gpuWavePageCap',
  '--gpu-kmeans': 'gpuKmeans',
  '--lmdb-shards': 'lmdbShards',
  '--lmdb-write-back': 'lmdbWriteBack',
  '--max-streams': 'maxStreams',
  '--stream-idle-ms': 'streamIdleMs',
  '--attend-sync-work': 'attendSyncWork',
  '--gpu-sync-us': 'gpuSyncUs',
  '--shm-dir': 'shmDir',
  '--shm-stream-bytes': 'shmStreamBytes',
  '--shm-total-bytes': 'shmTotalBytes',
  '--poll-us': 'pollUs',
};

/** The settings that take a non-negative integer. */
const INTEGERS = ['port', 'bodyLimit', 'memoryBudget', 'gpuBudget', 'gpuWaveBudget', 'gpuWavePageCap', 'gpuScanBudget', 'gpuKmeans', 'lmdbShards', 'lmdbWriteBack', 'threadPool', 'maxStreams', 'streamIdleMs', 'attendSyncWork', 'gpuSyncUs', 'pollUs', 'shmStreamBytes', 'shmTotalBytes'] as const;
const isInteger = (key: keyof Config): key is (typeof INTEGERS)[number] => (INTEGERS as readonly string[]).includes(key);

export function parseConfig(argv: string[], env: NodeJS.ProcessEnv): Config {
  const cfg: Config = { ...DEFAULTS };
  if (env.KVRECALL_TOKEN) cfg.token = env.KVRECALL_TOKEN;
  if (env.KVRECALL_DATA) cfg.dataDir = env.KVRECALL_DATA;
  if (env.KVRECALL_STORE) cfg.store = env.KVRECALL_STORE;
  if (env.KVRECALL_GPU_BUDGET) cfg.gpuBudget = nonNegative(env.KVRECALL_GPU_BUDGET, 'KVRECALL_GPU_BUDGET');
  if (env.KVRECALL_GPU_WAVE_BUDGET) cfg.gpuWaveBudget = nonNegative(env.KVRECALL_GPU_WAVE_BUDGET, 'KVRECALL_GPU_WAVE_BUDGET');
  if (env.KVRECALL_GPU_SCAN_BUDGET) cfg.gpuScanBudget = nonNegative(env.KVRECALL_GPU_SCAN_BUDGET, 'KVRECALL_GPU_SCAN_BUDGET');
  if (env.KVRECALL_GPU_WAVE_CACHE) cfg.gpuWaveCache = share(env.KVRECALL_GPU_WAVE_CACHE, 'KVRECALL_GPU_WAVE_CACHE');
  if (env.KVRECALL_GPU_WAVE_PAGE_CAP) cfg.gpuWavePageCap = nonNegative(env.KVRECALL_GPU_WAVE_PAGE_CAP, 'KVRECALL_GPU_WAVE_PAGE_CAP');
  if (env.KVRECALL_GPU_KMEANS) cfg.gpuKmeans = nonNegative(env.KVRECALL_GPU_KMEANS, 'KVRECALL_GPU_KMEANS');
  // libuv's own reading: atoi, anything below 1 is 1 thread, at most 1024.
  if (env.UV_THREADPOOL_SIZE !== undefined) cfg.threadPool = Math.min(1024, Math.max(1, Number.parseInt(env.UV_THREADPOOL_SIZE, 10) || 1));
  if (env.KVRECALL_LMDB_SHARDS) cfg.lmdbShards = nonNegative(env.KVRECALL_LMDB_SHARDS, 'KVRECALL_LMDB_SHARDS');
  if (env.KVRECALL_LMDB_WRITE_BACK) cfg.lmdbWriteBack = nonNegative(env.KVRECALL_LMDB_WRITE_BACK, 'KVRECALL_LMDB_WRITE_BACK');
  if (env.KVRECALL_MAX_STREAMS) cfg.maxStreams = nonNegative(env.KVRECALL_MAX_STREAMS, 'KVRECALL_MAX_STREAMS');
  if (env.KVRECALL_STREAM_IDLE_MS) cfg.streamIdleMs = nonNegative(env.KVRECALL_STREAM_IDLE_MS, 'KVRECALL_STREAM_IDLE_MS');
  if (env.KVRECALL_ATTEND_SYNC_WORK) cfg.attendSyncWork = nonNegative(env.KVRECALL_ATTEND_SYNC_WORK, 'KVRECALL_ATTEND_SYNC_WORK');
  if (env.KVRECALL_GPU_SYNC_US) cfg.gpuSyncUs = nonNegative(env.KVRECALL_GPU_SYNC_US, 'KVRECALL_GPU_SYNC_US');
  if (env.KVRECALL_SHM_DIR) cfg.shmDir = env.KVRECALL_SHM_DIR;
  if (env.KVRECALL_SHM_STREAM_BYTES) cfg.shmStreamBytes = nonNegative(env.KVRECALL_SHM_STREAM_BYTES, 'KVRECALL_SHM_STREAM_BYTES');
  if (env.KVRECALL_SHM_TOTAL_BYTES) cfg.shmTotalBytes = nonNegative(env.KVRECALL_SHM_TOTAL_BYTES, 'KVRECALL_SHM_TOTAL_BYTES');
  if (env.KVRECALL_POLL_US) cfg.pollUs = nonNegative(env.KVRECALL_POLL_US, 'KVRECALL_POLL_US');
  let streamCapGiven = Boolean(env.KVRECALL_SHM_STREAM_BYTES);
  for (let i = 0; i < argv.length; i++) {
    const key = FLAGS[argv[i]];
    const value = argv[i + 1];
    if (!key || value === undefined) throw invalid(`unknown or incomplete option ${argv[i]}`);
    i++;
    if (key === 'shmStreamBytes') streamCapGiven = true;
    if (isInteger(key)) cfg[key] = nonNegative(value, argv[i - 1]);
    else if (key === 'gpuWaveCache') cfg[key] = share(value, argv[i - 1]);
    else cfg[key] = value;
  }
  shmCaps(cfg, streamCapGiven);
  if (cfg.shmDir === 'off') cfg.shmDir = undefined;
  else if (cfg.shmDir !== undefined && !cfg.shmDir.startsWith('/')) throw invalid(`--shm-dir (KVRECALL_SHM_DIR) takes an absolute directory or off, not ${cfg.shmDir}`);
  // 0 lets the system choose (the tests do); past 65535 node's listen threw its own words, not naming the flag.
  if (cfg.port > 65535) throw invalid('--port takes a TCP port in [0, 65535] (0: any free port)');
  // At most 2^30 ms (12 days): timers and the native socket reader take no more.
  if (cfg.streamIdleMs < 1 || cfg.streamIdleMs > 2 ** 30)
    throw invalid('--stream-idle-ms (KVRECALL_STREAM_IDLE_MS) takes a number of milliseconds in [1, 2^30]');
  if (cfg.pollUs !== undefined && cfg.pollUs > 1_000_000) throw invalid('--poll-us (KVRECALL_POLL_US) takes microseconds in [0, 1000000]');
  // storage/lmdb-shards.ts MAX_SHARDS (core sits below storage).
  if (cfg.gpuKmeans !== undefined && cfg.gpuKmeans > 1) throw invalid('--gpu-kmeans (KVRECALL_GPU_KMEANS) takes 0 or 1');
  if (cfg.lmdbShards !== undefined && (cfg.lmdbShards < 1 || cfg.lmdbShards > 64))
    throw invalid('--lmdb-shards (KVRECALL_LMDB_SHARDS) takes a number of LMDB environments in [1, 64]');
  if (cfg.store !== undefined && !/^redis:\/\/[^,\s]+(,[^,\s]+)*$/.test(cfg.store))
    throw invalid(`--store (KVRECALL_STORE) takes a Redis Cluster seed list, redis://HOST:PORT[,HOST:PORT...], not ${cfg.store}`);
  return cfg;
}

/**
 * The caps on mapped segment bytes (api/shm.ts ShmPool), each a positive
 * integer, a stream's at most all streams'. 0 is refused rather than taken
 * as "off": it would refuse every attach with a message about a cap, and
 * --shm-dir off says that plainly. A stream cap set (flag or variable)
 * above the total is refused, naming both: no stream could ever map what
 * it allows, so the two contradict each other and the likelier story is a
 * slip (swapped values, a unit off) that serving with either number would
 * hide. The stream cap's default, where only the total is set below it,
 * follows the total instead: the operator asked for nothing contradictory,
 * and every stream may then map up to all of it, as before.
 */
function shmCaps(cfg: Config, streamGiven: boolean): void {
  if (cfg.shmStreamBytes < 1) throw invalid('--shm-stream-bytes (KVRECALL_SHM_STREAM_BYTES) takes a positive number of bytes (to refuse every attach: --shm-dir off)');
  if (cfg.shmTotalBytes < 1) throw invalid('--shm-total-bytes (KVRECALL_SHM_TOTAL_BYTES) takes a positive number of bytes (to refuse every attach: --shm-dir off)');
  if (cfg.shmStreamBytes <= cfg.shmTotalBytes) return;
  if (streamGiven)
    throw invalid(
      `--shm-stream-bytes ${cfg.shmStreamBytes} (KVRECALL_SHM_STREAM_BYTES) is over --shm-total-bytes ${cfg.shmTotalBytes} (KVRECALL_SHM_TOTAL_BYTES): one stream cannot map more than all streams together; lower the first or raise the second`,
    );
  cfg.shmStreamBytes = cfg.shmTotalBytes;
}

/** A share of a layer's rows in [0, 1] (0: off). */
function share(value: string, what: string): number {
  const n = value.trim() === '' ? NaN : Number(value);
  if (!Number.isFinite(n) || n < 0 || n > 1) throw invalid(`${what} takes a share of a layer's rows in [0, 1] (0: off)`);
  return n;
}

function nonNegative(value: string, what: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw invalid(`${what} takes a non-negative integer`);
  return n;
}
