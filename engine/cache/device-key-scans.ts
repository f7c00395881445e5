// The key scanner GPU sessions offer retrieval-attention (issue #15): a
// session with `codeScan` searches every kv head of a layer-step in one
// device call (addon/ra-scan.ts: every key's 4-bit code scored, the best
// scored exactly, the best k by the group's attention) instead of the host
// scan on the native pool (at 1M keys on the 16-core H100 host, milliseconds
// a layer-step; bench/results/ra-scan-gpu-*.md).
//
// A (document, layer)'s store holds every kv head's keys, their codes, their
// values and the graph's entry points on the device: 4.5 bytes a key
// channel, ~4.7 GB a layer at 1M keys, 8 kv heads, d = 128. With the values
// there the step's selected rows are attended on the device too
// (index/method.ts DeviceRows): gathered on the host they were ~86K rows of
// 512 bytes a layer-step at 1M. Stores live within a device
// budget of their own (GpuBackendOptions.scanBudgetBytes), shared by every
// session of the document, the least recently used evicted first, never one
// a step is reading. A store is made off the event loop on the first step
// that asks (the codes, where the graph has none yet, and the upload: about
// a second a layer at 1M); until it is made, and where it cannot be (the
// budget, the device's memory, a shape the kernels do not take), that
// layer's searches run on the host, which finds the same keys up to
// near-ties at the cuts. A session with scanKeep needs the PQ codes too
// (1/8 byte a key channel, ~1.3 s a head to make at 1M on the 2-core VM):
// made with the store where such a session makes it, else added when one
// asks (the host searches meanwhile), or never where the budget has no room.
import { RaScanStore, raScanSupported, type RaScanHeadIds, type RaScanSearchArgs } from '../../addon/ra-scan.js';
import type { RaGraph } from '../../addon/ra-graph.js';
import type { DeviceRows, KeyScanner, ScanHead, SearchResult } from '../../index/method.js';

/** What the scanner needs of a store: the addon's RaScanStore, or a bench's stand-in. */
export interface ScanStore {
  /** The answer's ids (RaScanStore.searchIds: no scores, which a session does not read). */
  searchIds(a: RaScanSearchArgs): Promise<RaScanHeadIds[]>;
  /** Attention over listed rows (a store opened with values; RaScanStore.attend). */
  attend?(a: { q: Float32Array; group: number; scale: number; ids: readonly Int32Array[]; ranges?: Int32Array }): Promise<{ out: Float32Array; lse: Float32Array }>;
  readonly hasValues?: boolean;
  /** Whether searches may take scanKeep (the store holds the PQ codes), and how to add them to one made without. */
  readonly hasPq?: boolean;
  addPq?(): Promise<void>;
  /** The last search's time on the device, ms (where the store measures it). */
  readonly lastDeviceMs?: number;
  bytes(): number;
  close(): void;
}

/** How stores are made and which shapes they take. */
export interface ScanStoreBackend {
  /** `pq`: with the PQ codes a search with scanKeep reads. */
  open(heads: readonly ScanHead[], maxGroup: number, pq: boolean): Promise<ScanStore>;
  supported(headDim: number, group: number): boolean;
}

const MAX_GROUP = 16;  // native/cuda/ra_scan.h kMaxGroup: a store takes every group a session may bring

const ADDON_BACKEND: ScanStoreBackend = {
  open: (heads, maxGroup, pq) => {
    const { tokens, headDim, dtype } = heads[0];
    const values = withValues(heads) ? heads.map((h) => h.values!) : undefined;
    return RaScanStore.open(heads.map((h) => h.graph), heads.map((h) => h.keys), tokens, headDim, dtype, maxGroup, values, pq);
  },
  supported: raScanSupported,
};

/** Whether every head brings its values: the store then holds them and attends the rows a step selects. */
const withValues = (heads: readonly ScanHead[]) => heads.every((h) => h.values !== undefined && h.values.length >= h.tokens * h.headDim);

/**
 * Device bytes a store of these heads takes before its per-step buffers: a head's codes and keys (2.5 bytes a
 * channel), its values where it holds them (2 more), four bitmaps, 24 bytes a key for what a step's scan keeps and
 * its cut's bin (native/cuda/ra_scan.cu), and with `pq` the PQ codes and their outliers' bitmap (scanPqBytes).
 */
export function scanStoreBytes(heads: readonly ScanHead[], pq = false): number {
  const { tokens, headDim } = heads[0];
  return heads.length * (tokens * headDim * (withValues(heads) ? 4.5 : 2.5) + 4 * Math.ceil(tokens / 8) + 24 * tokens) + (pq ? scanPqBytes(heads) : 0);
}

/** The PQ codes' device bytes (1/8 byte a key channel) and their outliers' bitmap. */
export function scanPqBytes(heads: readonly ScanHead[]): number {
  const { tokens, headDim } = heads[0];
  return heads.length * (tokens * (headDim / 8) + Math.ceil(tokens / 8));
}

interface Entry {
  heads: ScanHead[];
  store?: ScanStore;
  /** Set while the store is being made. */
  opening?: Promise<void>;
  /** The store cannot be made (too large for the budget, or it failed): the host searches. */
  refused?: boolean;
  /** Bytes counted against the budget (the estimate while opening, the store's once made). */
  bytes: number;
  /** Steps reading the store now, and when one last did (performance.now()). */
  busy: number;
  lastUse: number;
  /** The store's rows as the cache attends them (made once the store holds values). */
  rows?: DeviceRows;
  /** Set while the PQ codes are added to a store made without them (its searches and attends go to the host). */
  addingPq?: Promise<void>;
  /** The PQ codes cannot be added (the budget, or it failed): sessions with scanKeep search on the host. */
  pqRefused?: boolean;
}

/**
 * A store read within this many ms is not evicted for another: where the
 * layers a token steps through do not all fit, evicting a warm store to make
 * the next would copy gigabytes a layer-step (device-wave.ts says the same
 * of its stores); the layers left out search on the host instead.
 */
const WARM_MS = 2000;

export interface DeviceKeyScanStats {
  /** Layer-steps searched on the device, and those whose selected rows were attended there. */
  steps: number;
  attends: number;
  /** Stores made, evicted, and refused or failed. */
  opened: number;
  evicted: number;
  failures: number;
  /** Device bytes the stores hold now. */
  bytes: number;
}

export class DeviceKeyScans implements KeyScanner {
  /** By the first head's graph: a (document, layer)'s store. */
  private readonly entries = new WeakMap<RaGraph, Entry>();
  /** Entries holding device bytes (made or being made), least recently used first. */
  private readonly held = new Map<Entry, true>();
  private used = 0;
  /** The last device search: awaited as the method sees it, and on the device (a bench's question). */
  readonly lastSearch = { awaitedMs: 0, deviceMs: NaN };
  readonly stats: DeviceKeyScanStats = { steps: 0, attends: 0, opened: 0, evicted: 0, failures: 0, bytes: 0 };

  constructor(
    readonly budgetBytes: number,
    private readonly backend: ScanStoreBackend = ADDON_BACKEND,
    private readonly warmMs = WARM_MS,
  ) {}

  async scan(heads: readonly ScanHead[], q: Float32Array, group: number, k: number, maxScanned: number, seeds: readonly (Int32Array | undefined)[], free?: Int32Array, scanKeep?: number): Promise<SearchResult[] | undefined> {
    const first = heads[0];
    if (!first || group > MAX_GROUP || !this.backend.supported(first.headDim, group)) return undefined;
    let e = this.entries.get(first.graph);
    if (!e || e.heads.length !== heads.length || e.heads.some((x, h) => x.graph !== heads[h].graph || x.keys !== heads[h].keys)) {
      if (e) this.drop(e);
      e = { heads: [...heads], bytes: 0, busy: 0, lastUse: performance.now() };
      this.entries.set(first.graph, e);
    }
    if (e.refused) return undefined;
    if (!e.store) {
      if (!e.opening) this.open(e, scanKeep !== undefined);
      return undefined;  // the host searches while the store is made
    }
    if (e.addingPq) return undefined;  // the upload holds the store's lock: the host searches meanwhile
    if (scanKeep !== undefined && !e.store.hasPq) {
      // Made for sessions without scanKeep: the PQ codes are added once a session asks (the host searches meanwhile).
      if (!e.pqRefused) this.addPq(e, e.store);
      return undefined;
    }
    this.held.delete(e);
    this.held.set(e, true);
    e.busy++;
    e.lastUse = performance.now();
    const t0 = performance.now();
    try {
      const res = await e.store.searchIds({
        q, group, k, maxScanned,
        ...(seeds.some((s) => s) && { seeds: seeds.map((s) => s ?? new Int32Array(0)) }),
        ...(free && free.length > 0 && { free: heads.map(() => free) }),
        ...(scanKeep !== undefined && { scanKeep }),
      });
      this.stats.steps++;
      this.lastSearch.awaitedMs = performance.now() - t0;
      this.lastSearch.deviceMs = e.store.lastDeviceMs ?? NaN;
      const rows = e.store.hasValues && e.store.attend ? (e.rows ??= this.rowsOf(e)) : undefined;
      return res.map((r) => (rows ? { ids: r.ids, scanned: r.scanned, codes: first.tokens, rows } : { ids: r.ids, scanned: r.scanned, codes: first.tokens }));
    } catch (err) {
      this.stats.failures++;
      warnOnce(`kvrecall: the device code scan failed, searching on the host: ${String(err)}`);
      return undefined;
    } finally {
      e.busy--;
    }
  }

  /**
   * e's keys and values as the cache attends them: on e's store while it holds them (read like a search: not
   * evicted meanwhile), else undefined (the host attends; a failed call is counted and warned of once).
   */
  private rowsOf(e: Entry): DeviceRows {
    return {
      attend: async (ids, q, group, scale, ranges) => {
        const store = e.store;
        if (!store?.attend || e.addingPq) return undefined;  // the PQ codes' upload holds its lock: the host attends
        e.busy++;
        e.lastUse = performance.now();
        try {
          const r = await store.attend({ q, group, scale, ids, ...(ranges && ranges.length > 0 && { ranges }) });
          this.stats.attends++;
          return r;
        } catch (err) {
          this.stats.failures++;
          warnOnce(`kvrecall: attending the code scan store's rows failed, attending on the host: ${String(err)}`);
          return undefined;
        } finally {
          e.busy--;
        }
      },
    };
  }

  /** Adds the PQ codes to e's store where the budget allows (idle stores evicted for room), else refuses them for good. */
  private addPq(e: Entry, store: ScanStore): void {
    const extra = scanPqBytes(e.heads);
    if (!store.addPq || !this.room(extra, e)) {
      e.pqRefused = true;
      warnOnce(`kvrecall: a layer's code scan store has no room for its PQ codes (${extra} bytes): sessions with scanKeep search it on the host`);
      return;
    }
    this.used += extra;
    e.bytes += extra;
    this.stats.bytes = this.used;
    e.addingPq = store.addPq().then(
      () => {
        e.addingPq = undefined;
        if (e.store !== store) return;  // dropped meanwhile: its bytes were given back
        this.used += store.bytes() - e.bytes;
        e.bytes = store.bytes();
        this.stats.bytes = this.used;
      },
      (err: unknown) => {
        e.addingPq = undefined;
        e.pqRefused = true;
        if (e.store === store && this.held.has(e)) {
          this.used -= extra;
          e.bytes -= extra;
          this.stats.bytes = this.used;
        }
        this.stats.failures++;
        warnOnce(`kvrecall: a layer's PQ codes were not added, sessions with scanKeep search it on the host: ${String(err)}`);
      },
    );
  }

  /** Whether `bytes` more fit the budget, evicting idle stores (not `keep`) for room. */
  private room(bytes: number, keep?: Entry): boolean {
    const now = performance.now();
    for (const old of [...this.held.keys()]) {
      if (this.used + bytes <= this.budgetBytes) break;
      if (old !== keep && old.busy === 0 && old.store && !old.addingPq && now - old.lastUse >= this.warmMs) this.evict(old);
    }
    return this.used + bytes <= this.budgetBytes;
  }

  /** Starts making e's store (with the PQ codes where the asking session has scanKeep) where the budget allows, evicting idle stores for room. */
  private open(e: Entry, pq: boolean): void {
    const need = scanStoreBytes(e.heads, pq);
    if (need > this.budgetBytes) {
      e.refused = true;
      this.stats.failures++;
      warnOnce(`kvrecall: a layer's code scan store (${need} bytes) exceeds the device scan budget (${this.budgetBytes}): searching it on the host`);
      return;
    }
    if (!this.room(need)) return;  // the others warm or being made: asked again next step
    e.bytes = need;
    this.used += need;
    this.held.set(e, true);
    e.opening = this.backend.open(e.heads, MAX_GROUP, pq).then(
      (store) => {
        e.opening = undefined;
        e.lastUse = performance.now();
        if (!this.held.has(e)) return store.close();  // dropped while being made
        e.store = store;
        this.used += store.bytes() - e.bytes;
        e.bytes = store.bytes();
        this.stats.opened++;
        this.stats.bytes = this.used;
      },
      (err: unknown) => {
        e.opening = undefined;
        e.refused = true;
        this.stats.failures++;
        this.release(e);
        warnOnce(`kvrecall: a layer's code scan store was not made, searching it on the host: ${String(err)}`);
      },
    );
  }

  private evict(e: Entry): void {
    this.stats.evicted++;
    this.drop(e);
  }

  /** Gives e's bytes back and closes its store (a step reading it keeps the native store until it ends). */
  private drop(e: Entry): void {
    e.store?.close();
    e.store = undefined;
    this.release(e);
  }

  private release(e: Entry): void {
    if (!this.held.delete(e)) return;
    this.used -= e.bytes;
    e.bytes = 0;
    this.stats.bytes = this.used;
  }

  /** Frees every store (the backend's close); a step reading one keeps its native store until it ends. */
  close(): void {
    for (const e of [...this.held.keys()]) this.drop(e);
  }

  /** Settles once every store being made now is made or failed (tests, benches). */
  async settled(): Promise<void> {
    await Promise.all([...this.held.keys()].map((e) => e.opening));
  }
}

let warned = false;
function warnOnce(msg: string): void {
  if (warned) return;
  warned = true;
  console.error(msg);
}
