// `wave` on the GPU (issue #13): a document layer's clusters and its K/V held
// on the device (addon/wave-gpu.ts), so that one native call per layer-step
// ranks the clusters, rescores their members, keeps the budget, attends the
// kept rows with the sinks and window and estimates everything else — the
// document's whole share of the attention — with no per-block host work.
// The session's own tokens stay on the host (they grow every step) and are
// merged by the decode step.
//
// A layer's store is made on the first GPU step over it and shared by every
// session of the document. Stores live within their own device budget
// (GpuBackendOptions.waveBudgetBytes, beside the block pool's), the least
// recently used evicted first, never one a step is reading nor one a step
// read in the last WARM_MS; a layer whose store cannot be held steps on the
// host path, as without a GPU. The upload at first use takes about a second
// per 1M-token layer: where the layers a token steps through do not all
// fit, evicting a warm store to upload the next one made every layer-step
// copy gigabytes, far slower than the host; instead the layers that fit
// stay, the others step on the host until a store goes idle.
//
// Stores are made and freed on libuv's pool (WaveGpuStore.open/closeAsync),
// so the server answers other requests meanwhile. A step whose layer's
// store is being made waits for that one creation (not the host path: the
// wait is what the layer's first step paid before, and a token keeps one
// layer's copy in flight instead of one per layer on libuv's few threads).
// A store's bytes count from its creation's start to its free's end; a
// creation admitted in the room an eviction makes waits until that free has
// ended (pump), so the device never holds more than the budget.
//
// Paged stores (GpuBackendOptions.waveCacheShare, --gpu-wave-cache): K and V
// stay in pinned host memory and the device caches that share of the layer's
// rows (native/cuda/wave_cache.cuh), so a layer takes its summaries + the
// cache of the budget instead of summaries + K/V, and many more layers fit.
// A step whose rows the cache could overflow (waveCacheRowsBound) runs on
// the host path; rest (engine/rest-on-device.ts) does not run on a paged store.
// A paged store's K and V are a pinned host copy of the layer (4 GiB at 1M
// tokens, 8 kv heads, d=128), which the device budget does not see: at ~23%
// of a dense layer's device bytes, a budget holds ~4x its size of them. They
// live within a host budget of their own (hostBudgetBytes; GpuBackend: half
// the host's memory unless told), evicted as the device bytes are.
// A paged store's layer-step copies at most pageCapBytes (--gpu-wave-page-cap,
// default WAVE_PAGE_CAP_DEFAULT, 2 MiB) after its first 16 steps, each kv
// head an equal share: the rows its cache lacks past that are not rescored
// and are left to the estimate (native/cuda/wave_page_cap.cuh); 0: no cap.
import { WAVE_PAGE_CAP_DEFAULT, WaveGpuStore, waveCacheRowsBound, type WaveGpuRanking, type WaveGpuStepResult, type WaveGpuStoreOptions } from '../../addon/wave-gpu.js';
import type { ModelShape } from '../../core/model.js';
import { candidateTokens, PROBE, SPREAD, type ClusterIndex } from '../../index/wave/cluster-index.js';

type State = 'waiting' | 'creating' | 'live' | 'freeing' | 'freed';

interface Entry {
  key: string;
  /** Set once made ('live'). */
  store?: WaveGpuStore;
  state: State;
  /** The creation's arguments (until it starts). */
  options?: WaveGpuStoreOptions;
  /** Settles when the creation has ended, made or failed (the steps that wait on it). */
  ready?: Promise<void>;
  settle?: () => void;
  bytes: number;
  /** Pinned host bytes (a paged store's K and V; 0 dense). */
  hostBytes: number;
  /** The paged store's cached rows (0: dense) and the layer's largest cluster (its steps' cache bound). */
  cacheRows: number;
  largestCluster: number;
  /** Steps reading the store now. */
  pins: number;
  /** Dropped (its document deleted, or the stores closed): freed when made, or when the last step reading it releases it. */
  dropped?: boolean;
  /** When a step last acquired it (the stores' clock, ms). */
  usedAt: number;
  /** The handle steps hold it by, made at its first hold (hold). */
  held?: HeldWaveStore;
}

/** A store a step used this recently is not evicted to make room (a layer's steps recur every token). */
export const WARM_MS = 10_000;
/**
 * A layer whose store's creation failed for want of room (device or pinned
 * host memory the budget did not see: another process, the pool's growth) is
 * tried again after this, doubling with each failure up to RETRY_MAX_MS:
 * memory comes back, and a layer kept on the host for good was ~30x slower
 * for the server's life. Arguments the binding refuses (TypeError,
 * RangeError) fail the same way every time: never tried again.
 */
export const RETRY_MS = 30_000;
export const RETRY_MAX_MS = 15 * 60_000;

export interface DeviceWaveStats {
  budgetBytes: number;
  usedBytes: number;
  stores: number;
  /** Steps that ran on the host because their layer's store could not be held. */
  refused: number;
  /** Stores being made (waiting for room or copying), and being freed (their bytes counted until the free ends). */
  creating: number;
  freeing: number;
  evictions: number;
  /** Layer-steps of other methods (nosa, topk-blocks, ...) whose estimate ran on a store here (engine/rest-on-device.ts) instead of on the host. */
  rests: number;
  /** The share of a layer's rows a paged store caches (0: stores hold K and V whole). */
  cacheShare: number;
  /** Paged stores: the bytes a layer-step may copy after its first 16 steps (0: no cap, or dense stores). */
  pageCapBytes: number;
  /** Steps that ran on the host because their rows could exceed their paged store's cache (pagedStepFits). */
  overCache: number;
  /** Pinned host bytes paged stores may take (their K and V), and take now. */
  hostBudgetBytes: number;
  hostUsedBytes: number;
}

/**
 * Device bytes a layer's store takes (native/cuda/wave_step.cu's and
 * wave_cache.cuh's layouts, before alignment): summaries, member lists and
 * token->cluster map, then K and V whole, or with `cacheRows` > 0 (paged)
 * the row cache: its slots' K and V (one more: the dump slot), owners,
 * stamps and miss list, and the row-to-slot map. The member lists and map
 * at 2 bytes a row and a base per 4096-token tile: the store's layout for
 * clusters numbered segment by segment, as every build numbers them (4
 * bytes a row otherwise: wave_step_kernels.cuh's ClusterMaps).
 */
export function waveStoreBytes(heads: ClusterIndex[], tokens: number, headDim: number, cacheRows = 0): number {
  let b = 0;
  // Per cluster: centroid row and value mean (16-bit words), key axis and variances (8-bit codes and two f32 scales), count and member start.
  const maps = tokens * 4 + Math.ceil(tokens / 4096) * 4;
  for (const h of heads) b += h.clusters * ((headDim + 8) * 2 + headDim * 2 + 2 * headDim + 8 + 8) + maps + tokens * (cacheRows > 0 ? 4 : 4 * headDim);
  return cacheRows > 0 ? b + (cacheRows + 1) * 4 * headDim + cacheRows * 12 : b;
}

/** Pinned host bytes a paged store takes: K and V of every row (wave_cache.cuh's copy); 0 for a dense one. */
export function wavePinnedBytes(kvHeads: number, tokens: number, headDim: number, cacheRows: number): number {
  return cacheRows > 0 ? kvHeads * tokens * headDim * 4 : 0;
}

/**
 * A paged store's cap for a layer of this shape: at least one row of K and V
 * a kv head (what the native store refuses below), else the cap asked for.
 */
export function wavePageCap(bytes: number, model: Pick<ModelShape, 'kvHeads' | 'headDim'>): number {
  return Math.max(bytes, model.kvHeads * model.headDim * 4);
}

/** A paged store's slots for a share of the layer's rows (every kv head's). */
export function waveCacheRows(share: number, kvHeads: number, tokens: number): number {
  return share > 0 ? Math.min(kvHeads * tokens, Math.ceil(share * kvHeads * tokens)) : 0;
}

/**
 * A store pinned for a step: `release` unpins it; `countRest` counts a rest
 * call (WaveGpuStore.rest) in the stats, `countOverCache` a step that a paged
 * store's cache could not hold.
 */
export interface HeldWaveStore {
  store: WaveGpuStore;
  release: () => void;
  countRest: () => void;
  countOverCache: () => void;
  /** The paged store's cached rows (0: dense). */
  cacheRows: number;
  /** The layer's largest cluster, over its kv heads (the cache bound's term). */
  largestCluster: number;
}

export class DeviceWaveStores {
  /** Entries by (segment, layer) key, least recently used first (Map keeps insertion order): waiting, being made, or live. */
  private readonly lru = new Map<string, Entry>();
  /**
   * Device and pinned host bytes allocated, being allocated or being freed
   * (a store's bytes count from its creation's start until its free has
   * ended): never above the budgets.
   */
  private used = 0;
  private hostUsed = 0;
  /** Of those, the stores being freed. */
  private freeingBytes = 0;
  private freeingHost = 0;
  private freeingStores = 0;
  /** Admitted creations waiting for frees to end before they allocate, and their bytes. */
  private readonly queue: Entry[] = [];
  private reserved = 0;
  private hostReserved = 0;
  private refused = 0;
  private evictions = 0;
  private rests = 0;
  private overCache = 0;
  private closed = false;
  /**
   * Layers whose creation failed: when they may be tried again (Infinity for
   * arguments the binding refuses) and how often they failed. Not tried
   * before then, or every step would copy gigabytes to fail (RETRY_MS).
   */
  private readonly failed = new Map<string, { retryAt: number; failures: number }>();
  /** Dropped stores that steps still read or that are still being made: out of the LRU, their bytes still held. */
  private readonly draining = new Set<Entry>();

  constructor(
    readonly budgetBytes: number,
    /** Makes a store off the event loop (a stand-in where no device runs: the budget and eviction logic's tests). */
    private readonly create: (o: WaveGpuStoreOptions) => Promise<WaveGpuStore> = (o) => WaveGpuStore.open(o),
    /** The clock WARM_MS is measured on (a test's own). */
    private readonly now: () => number = () => performance.now(),
    /** A share of a layer's rows (0 < x <= 1): stores are paged, that share of the rows cached on the device; 0: dense. */
    readonly cacheShare = 0,
    /** Pinned host bytes for paged stores' K and V (see the top). */
    readonly hostBudgetBytes = Infinity,
    /** Paged stores: the bytes a layer-step may copy after its first 16 steps (see the top); 0: no cap. */
    readonly pageCapBytes = WAVE_PAGE_CAP_DEFAULT,
  ) {}

  /**
   * The store of a document layer (`key`), made on first use, pinned until
   * `release`; undefined when it cannot be held beside the stores steps are
   * reading, or its creation failed (the caller steps on the host). A live
   * store is pinned before this returns; a step that finds the layer's store
   * being made waits for that one creation.
   */
  async acquire(key: string, heads: ClusterIndex[], model: ModelShape): Promise<HeldWaveStore | undefined> {
    if (this.closed) return undefined;
    let e = this.lru.get(key);
    const failure = e ? undefined : this.failed.get(key);
    if (failure && this.now() < failure.retryAt) {
      this.refused++;
      return undefined;
    }
    if (e) {
      this.lru.delete(key);
      this.lru.set(key, e);
      e.usedAt = this.now();
    } else {
      const tokens = heads[0].arrays.tokens;
      const cacheRows = waveCacheRows(this.cacheShare, model.kvHeads, tokens);
      const bytes = waveStoreBytes(heads, tokens, model.headDim, cacheRows);
      const hostBytes = wavePinnedBytes(model.kvHeads, tokens, model.headDim, cacheRows);
      if (!this.makeRoom(bytes, hostBytes)) {
        this.refused++;
        return undefined;
      }
      let largestCluster = 0;
      for (const h of heads) for (const n of h.arrays.counts) if (n > largestCluster) largestCluster = n;
      const options: WaveGpuStoreOptions = {
        kvHeads: model.kvHeads, headDim: model.headDim, dtype: model.dtype, tokens,
        heads: heads.map((h) => ({
          centroids: h.arrays.centroids, valueMeans: h.arrays.valueMeans, keyAxes: h.arrays.keyAxes, axisScales: h.arrays.axisScales,
          keyVars: h.arrays.keyVars, varScales: h.arrays.varScales,
          varianceShare: h.arrays.varianceShare, counts: h.arrays.counts, tokenCluster: h.arrays.tokenCluster, keys: h.keys, values: h.values,
        })),
        ...(cacheRows > 0 && { cacheRows }),
        ...(cacheRows > 0 && this.pageCapBytes > 0 && { pageCapBytes: wavePageCap(this.pageCapBytes, model) }),
      };
      const entry: Entry = { key, state: 'waiting', options, bytes, hostBytes, cacheRows, largestCluster, pins: 0, usedAt: this.now() };
      entry.ready = new Promise<void>((r) => (entry.settle = r));
      e = entry;
      this.lru.set(key, e);
      this.reserved += bytes;
      this.hostReserved += hostBytes;
      this.queue.push(e);
      this.pump();
    }
    if (e.state === 'live') return this.hold(e);
    await e.ready;
    if ((e.state as State) === 'live' && !e.dropped) return this.hold(e);
    this.refused++;
    return undefined;
  }

  /**
   * The store of `key` pinned, as acquire gives it, where it is live now;
   * undefined where acquire has more to do (not made yet, being made, or the
   * stores closed). A layer's steps after its first take this path, with
   * no async function's promise and turns.
   */
  holdLive(key: string): HeldWaveStore | undefined {
    if (this.closed) return undefined;
    const e = this.lru.get(key);
    if (e?.state !== 'live') return undefined;
    this.lru.delete(key);
    this.lru.set(key, e);
    e.usedAt = this.now();
    return this.hold(e);
  }

  /** Pins a live store; the handle is made once per store (its functions read the entry), not once a step. */
  private hold(e: Entry): HeldWaveStore {
    e.pins++;
    return (e.held ??= {
      store: e.store!,
      release: () => {
        if (--e.pins === 0 && e.dropped && e.state === 'live') this.free(e);
      },
      countRest: () => {
        this.rests++;
      },
      countOverCache: () => {
        this.overCache++;
      },
      cacheRows: e.cacheRows,
      largestCluster: e.largestCluster,
    });
  }

  /** Starts the waiting creations that fit beside what is allocated now (a free's bytes count until it has ended). */
  private pump(): void {
    for (let i = 0; i < this.queue.length; ) {
      const e = this.queue[i];
      if (this.used + e.bytes > this.budgetBytes || this.hostUsed + e.hostBytes > this.hostBudgetBytes) {
        i++;
        continue;
      }
      this.queue.splice(i, 1);
      this.reserved -= e.bytes;
      this.hostReserved -= e.hostBytes;
      this.used += e.bytes;
      this.hostUsed += e.hostBytes;
      e.state = 'creating';
      const options = e.options!;
      e.options = undefined;
      let made: Promise<WaveGpuStore>;
      try {
        made = this.create(options);
      } catch (err) {
        made = Promise.reject(err);
      }
      made.then(
        (store) => {
          e.store = store;
          e.state = 'live';
          e.usedAt = this.now();
          this.failed.delete(e.key);
          // Dropped (or the stores closed) while it was made: no step holds it.
          if (e.dropped) this.free(e);
          e.settle!();
        },
        (err: unknown) => {
          // Out of device memory, or arguments the binding refuses: the host path answers, for a while or for good.
          e.state = 'freed';
          this.used -= e.bytes;
          this.hostUsed -= e.hostBytes;
          this.draining.delete(e);
          if (!e.dropped) {
            if (this.lru.get(e.key) === e) this.lru.delete(e.key);
            const failures = (this.failed.get(e.key)?.failures ?? 0) + 1;
            const permanent = err instanceof TypeError || err instanceof RangeError;
            const waitMs = permanent ? Infinity : Math.min(RETRY_MAX_MS, RETRY_MS * 2 ** (failures - 1));
            this.failed.set(e.key, { retryAt: this.now() + waitMs, failures });
            console.error(`kvrecall: wave layer ${e.key} stays on the host ${permanent ? 'for good' : `for ${Math.round(waitMs / 1000)} s`}: ${String(err)}`);
          }
          e.settle!();
          this.pump();
        },
      );
    }
  }

  /**
   * Closes the stores whose keys start with `prefix` (a deleted document's
   * layers): now, or, for one a step is reading or that is being made, when
   * the last such step releases it or it is made. No step acquires them again.
   */
  drop(prefix: string): void {
    for (const [key, e] of this.lru) {
      if (!key.startsWith(prefix)) continue;
      this.lru.delete(key);
      this.retire(e);
    }
    for (const key of this.failed.keys()) if (key.startsWith(prefix)) this.failed.delete(key);
  }

  /** Out of the LRU: freed now if nothing reads or makes it, else once that ends. */
  private retire(e: Entry): void {
    e.dropped = true;
    if (e.state === 'waiting') {
      this.queue.splice(this.queue.indexOf(e), 1);
      this.reserved -= e.bytes;
      this.hostReserved -= e.hostBytes;
      e.state = 'freed';
      e.settle!();
    } else if (e.state === 'live' && e.pins === 0) this.free(e);
    else this.draining.add(e);
  }

  /**
   * Frees a live store no step reads, off the event loop; its bytes stay
   * counted until the free has ended, so a store made in its place allocates
   * only after (the budget is never exceeded on the device).
   */
  private free(e: Entry): void {
    const store = e.store!;
    e.store = undefined;
    e.state = 'freeing';
    this.freeingBytes += e.bytes;
    this.freeingHost += e.hostBytes;
    this.freeingStores++;
    this.draining.add(e);
    const done = () => {
      e.state = 'freed';
      this.used -= e.bytes;
      this.hostUsed -= e.hostBytes;
      this.freeingBytes -= e.bytes;
      this.freeingHost -= e.hostBytes;
      this.freeingStores--;
      this.draining.delete(e);
      this.pump();
    };
    store.closeAsync().then(done, (err: unknown) => {
      console.error(`kvrecall: freeing wave layer ${e.key}: ${String(err)}`);
      done();
    });
  }

  /**
   * Room for a store of `bytes` device and `host` pinned host bytes once the
   * frees under way have ended, beside the creations admitted before it;
   * idle stores evicted (least recent first) for it.
   */
  private makeRoom(bytes: number, host: number): boolean {
    if (bytes > this.budgetBytes || host > this.hostBudgetBytes) return false;
    const now = this.now();
    // An idle store goes where it frees what is short (a dense one frees no host bytes).
    const helps = (e: Entry, free: number, hostFree: number) =>
      e.state === 'live' && e.pins === 0 && now - e.usedAt >= WARM_MS && ((free < bytes && e.bytes > 0) || (hostFree < host && e.hostBytes > 0));
    const room = () => this.budgetBytes - (this.used - this.freeingBytes + this.reserved);
    const hostRoom = () => this.hostBudgetBytes - (this.hostUsed - this.freeingHost + this.hostReserved);
    // Only idle stores go, and only if enough of them go: evicting some and still refusing would lose them for nothing.
    let free = room(), hostFree = hostRoom();
    for (const e of this.lru.values()) if (helps(e, free, hostFree)) (free += e.bytes), (hostFree += e.hostBytes);
    if (free < bytes || hostFree < host) return false;
    for (const [key, e] of this.lru) {
      if (!helps(e, room(), hostRoom())) continue;
      this.lru.delete(key);
      this.free(e);
      this.evictions++;
    }
    return room() >= bytes && hostRoom() >= host;
  }

  stats(): DeviceWaveStats {
    let stores = 0, creating = 0;
    for (const e of this.lru.values()) if (e.state === 'live') stores++;
    else creating++;
    return { budgetBytes: this.budgetBytes, usedBytes: this.used, stores, refused: this.refused, evictions: this.evictions, rests: this.rests,
      creating, freeing: this.freeingStores, cacheShare: this.cacheShare, pageCapBytes: this.cacheShare > 0 ? this.pageCapBytes : 0, overCache: this.overCache, hostBudgetBytes: this.hostBudgetBytes, hostUsedBytes: this.hostUsed };
  }

  /**
   * The backend's end: live stores no step reads are freed now, on this
   * thread (the process is stopping, nothing else to serve); those being
   * made or read, as they are made or released.
   */
  close(): void {
    this.closed = true;
    for (const e of [...this.lru.values(), ...this.draining]) {
      if (e.state === 'live' && e.pins === 0) {
        e.store!.close();
        e.store = undefined;
        e.state = 'freed';
        this.used -= e.bytes;
        this.hostUsed -= e.hostBytes;
        this.draining.delete(e);
      } else if (e.state !== 'freeing' && e.state !== 'freed' && !e.dropped) this.retire(e);
    }
    this.lru.clear();
  }
}

export interface DocumentStepArgs {
  q: Float32Array;
  qHeads: number;
  scale: number;
  /** Per kv head: ids searched for (the kept ones plus the rows the static ranges cover), as staticPlusRetrieved asks. */
  searchK: number;
  /** Per kv head: ids kept after those inside `ranges` are dropped. */
  keep: number;
  /** Sinks and window in the document's rows (attended exactly, never retrieved). */
  ranges: [number, number][];
  /** Their rows (rangeRows(ranges)), where the caller has them already; made here otherwise. */
  exact?: Int32Array;
  estimate: boolean;
  /** The session's ef: candidate tokens rescored per kv head (0: the default). */
  ef: number;
  /** Read the kept ids back (a caller asked for the selection); otherwise only their counts. */
  ids: boolean;
  /** The session's own tokens, attended in the same native call and merged (WaveGpuStepArgs.own). */
  own?: { k: Uint16Array[]; v: Uint16Array[]; tokens: number };
}

/**
 * Whether a step's rows fit its store: always for a dense one; for a paged
 * one, when the cache holds every row the step can read (the device would
 * fail the step otherwise; the caller then runs the host path): per kv head,
 * the clusters the cut takes (fewer than target + the largest cluster's
 * rows) and the exact rows' clusters. waveCacheRowsBound counts a cluster
 * per exact row; where that is more than the cache, the exact rows' clusters
 * are counted once each (a window's rows share few clusters).
 */
export function pagedStepFits(held: Pick<HeldWaveStore, 'cacheRows' | 'largestCluster'>, a: Pick<DocumentStepArgs, 'searchK' | 'ef' | 'estimate' | 'ranges'>,
                              heads: ClusterIndex[], tokens: number): boolean {
  if (!(held.cacheRows > 0)) return true;
  const exactRows = a.ranges.reduce((n, [lo, hi]) => n + Math.max(0, Math.min(hi, tokens) - Math.max(lo, 0)), 0);
  const target = candidateTokens(a.searchK, a.ef, a.estimate);
  const largestCluster = held.largestCluster;
  if (waveCacheRowsBound({ kvHeads: heads.length, tokens, target, largestCluster, exactRows }) <= held.cacheRows) return true;
  let need = 0;
  for (const h of heads) {
    const seen = new Set<number>();
    let rows = 0;
    for (const [lo, hi] of a.ranges) {
      for (let t = Math.max(lo, 0); t < Math.min(hi, tokens); t++) {
        const c = h.arrays.tokenCluster[t];
        if (!seen.has(c)) seen.add(c), (rows += h.arrays.counts[c]);
      }
    }
    need += Math.min(tokens, target + largestCluster + rows);
  }
  return need <= held.cacheRows;
}

/**
 * The document's part of a wave layer-step on the device: the same ids,
 * estimate and attention as the host path (staticPlusRetrieved over
 * ClusterIndex.searchHeads, the cache's exact attention, estimateRest), in
 * one call.
 */
export function stepDocument(store: WaveGpuStore, a: DocumentStepArgs): Promise<WaveGpuStepResult> {
  const kvHeads = store.options.kvHeads;
  return store.step({
    q: a.q, qHeads: a.qHeads, scale: a.scale,
    budget: new Array<number>(kvHeads).fill(a.searchK), probe: PROBE, target: new Array<number>(kvHeads).fill(candidateTokens(a.searchK, a.ef, a.estimate)), ranking: SPREAD_RANKING,
    exact: a.exact ?? rangeRows(a.ranges), skip: a.ranges, keep: new Array<number>(kvHeads).fill(a.keep),
    estimate: a.estimate, attend: true, rest: 'rows', ids: a.ids, stages: false, own: a.own,
  });
}

/** index/wave's ranking, one object for every step (the binding reads its two fields). */
const SPREAD_RANKING: WaveGpuRanking = { kind: 'spread', spread: SPREAD };

/** The rows of [lo, hi) ranges, written straight into the id array the binding copies (no JS number array between). */
export function rangeRows(ranges: [number, number][]): Int32Array {
  const exact = new Int32Array(ranges.reduce((n, [lo, hi]) => n + Math.max(0, hi - lo), 0));
  let at = 0;
  for (const [lo, hi] of ranges) for (let t = lo; t < hi; t++) exact[at++] = t;
  return exact;
}
