// Typed wrapper around retrieval-attention's device code scan
// (native/bindings/ra_scan_binding.cc, kernels in native/cuda/ra_scan*.{cu,cuh}):
// one (document, layer)'s keys, their 4-bit codes and each graph's entry
// points resident on the GPU, and per decode step one native call that
// searches every kv head: every key's code scored, the best scored exactly,
// the best k of those by the group's attention, as the host's code scan
// (RaGraph search with codeScan) does. native/cuda/ra_scan.h says how.
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';
import { RaGraph } from './ra-graph.js';
import { deviceCall, DeviceTimer } from './device-calls.js';

/** Where the last search's time went, milliseconds (CUDA events; the stages only with stageTimes). */
export interface RaScanTimes {
  totalMs: number;
  sampleMs: number;
  scanMs: number;
  cutMs: number;
  exactMs: number;
  finalMs: number;
  /** The call's wall time on the host (staging, the wait, the copy out). */
  hostMs: number;
  /** The last attend on the device (events). */
  attendMs: number;
}

/** A search's host stages, milliseconds. */
export interface RaScanHostMs {
  /** The arguments read and copied (the binding, on the loop's thread). */
  parseMs: number;
  /** The query's int8 weights for the codes (RaKeyCodes::Prepare, every head), and its PQ tables with scanKeep. */
  prepareMs: number;
  /** The store's Search on the host: staging, launch, the wait for the device, the answer copied out. */
  searchMs: number;
}

export interface RaScanSearchArgs {
  /** [heads * group, headDim]: head h searches with rows h*group .. (h+1)*group. */
  q: Float32Array;
  group: number;
  /** Ids wanted per head. */
  k: number;
  /** Keys scored exactly per head, the strided sample included (the host's maxScanned). */
  maxScanned: number;
  /** Softmax scale; default 1/√headDim. */
  scale?: number;
  /** Per kv head: extra start keys (the last step's ids), scored exactly. */
  seeds?: Int32Array[];
  /** Per kv head: the free keys (sinks, window): in the partitions, never in the answer. */
  free?: Int32Array[];
  /**
   * A share in (0, 1]: a first pass on the keys' PQ codes keeps at least ceil(scanKeep * tokens) of them, and the
   * PQ codes' outliers, for the 4-bit codes (the host's scanKeep: the same keys); absent, every key's 4-bit code.
   */
  scanKeep?: number;
  stageTimes?: boolean;
}

export interface RaScanHeadResult {
  /** The head's ids, a set in no order. */
  ids: Int32Array;
  /** Their scores: ln of the group's mean probability, as estimated. */
  scores: Float32Array;
  /** Keys scored exactly (the sample and the candidates, each once). */
  scanned: number;
  /** With scanKeep: the keys whose 4-bit code was read (the entry points and seeds not counted). */
  codesKept?: number;
}

/** A head's answer without its scores (RaScanStore.searchIds). */
export type RaScanHeadIds = Omit<RaScanHeadResult, 'scores'>;

interface NativeRaScan {
  search(a: {
    q: Float32Array;
    group: number;
    k: number;
    maxScanned: number;
    scale?: number;
    seeds?: Int32Array[];
    free?: Int32Array[];
    scanKeep?: number;
    outIds: Int32Array;
    outScores?: Float32Array;
    /**
     * [3 * heads + 4]: ids written per head, keys scored exactly per head, the call's device ms, its host stages
     * (RaScanHostMs), the 4-bit codes read per head (scanKeep).
     */
    meta: Float64Array;
    stageTimes?: boolean;
    sync: boolean;
  }): Promise<undefined>;
  attend(a: { q: Float32Array; group: number; scale: number; ids: readonly Int32Array[]; ranges?: Int32Array; out: Float32Array; lse: Float32Array; meta: Float64Array; sync: boolean }): Promise<undefined>;
  hasValues(): boolean;
  hasPq(): boolean;
  addPq(a: { keys: Uint16Array[] }): Promise<undefined>;
  bytes(): number;
  lastTimes(): RaScanTimes;
  close(): void;
}

interface Addon {
  raScanSupported(headDim: number, group: number): boolean;
  RaScanStore: { open(o: { graphs: object[]; keys: Uint16Array[]; values?: Uint16Array[]; tokens: number; headDim: number; dtype: number; maxGroup: number; pq?: boolean }): Promise<NativeRaScan> };
}

const addon = nativeAddon<Addon>();

/** Whether this build and host can scan keys of headDim for groups of `group` rows. */
export function raScanSupported(headDim: number, group: number): boolean {
  return addon.raScanSupported(headDim, group);
}

export class RaScanStore {
  /** The last search's and attend's device times: where the next one runs (addon/device-calls.ts). */
  private readonly timer = new DeviceTimer();
  private readonly attendTimer = new DeviceTimer();
  /** The last search's host stages and its time on the device (a bench's question). */
  readonly lastHost: RaScanHostMs = { parseMs: 0, prepareMs: 0, searchMs: 0 };
  lastDeviceMs = 0;

  private constructor(
    private readonly native: NativeRaScan,
    readonly graphs: RaGraph[],
    private readonly keys: Uint16Array[],
    readonly tokens: number,
    readonly headDim: number,
    readonly dtype: KvDtype,
    readonly maxGroup: number,
  ) {}

  /**
   * Uploads each graph's keys, 4-bit codes (the graph's own, made now where it has none: ~0.3 s a head at 1M keys),
   * values where given (`attend` needs them), entry points and, with `pq`, the PQ codes searches with scanKeep
   * read (~1.3 s a head to make at 1M on the 2-core VM; addPq adds them later), off the event loop; rejects without
   * a device or its memory.
   */
  static async open(graphs: RaGraph[], keys: Uint16Array[], tokens: number, headDim: number, dtype: KvDtype, maxGroup: number, values?: Uint16Array[], pq = false): Promise<RaScanStore> {
    if (typeof addon.RaScanStore.open !== 'function') throw new Error('RaScanStore: kvrecall was built without CUDA');
    const native = await addon.RaScanStore.open({ graphs: graphs.map((g) => RaGraph.nativeOf(g)), keys, ...(values && { values }), tokens, headDim, dtype: DTYPE_CODE[dtype], maxGroup, pq });
    return new RaScanStore(native, graphs, keys, tokens, headDim, dtype, maxGroup);
  }

  /** Whether searches may take scanKeep (the store holds the PQ codes). */
  get hasPq(): boolean {
    return this.native.hasPq();
  }

  /** Makes (off the event loop) and uploads the PQ codes of a store opened without them; scanKeep is taken after. */
  async addPq(): Promise<void> {
    await this.native.addPq({ keys: this.keys });
  }

  get heads(): number {
    return this.graphs.length;
  }

  async search(a: RaScanSearchArgs): Promise<RaScanHeadResult[]> {
    return (await this.run(a, true)) as RaScanHeadResult[];
  }

  /**
   * The ids alone, as a session takes them: a second array of heads·k a call (344 KB at 1M, k ~10.7K, 8 heads),
   * zeroed and first touched, cost ~0.1-0.25 ms of JS on the 2-core VM where the ids' took ~0.04.
   */
  searchIds(a: RaScanSearchArgs): Promise<RaScanHeadIds[]> {
    return this.run(a, false);
  }

  private async run(a: RaScanSearchArgs, withScores: boolean): Promise<RaScanHeadIds[]> {
    const H = this.heads;
    if (a.seeds && a.seeds.length !== H) throw new RangeError(`expected ${H} seed lists, one per kv head, got ${a.seeds.length}`);
    if (a.free && a.free.length !== H) throw new RangeError(`expected ${H} free lists, one per kv head, got ${a.free.length}`);
    const outIds = new Int32Array(H * a.k);
    const outScores = withScores ? new Float32Array(H * a.k) : undefined;
    const meta = new Float64Array(3 * H + 4);
    // On the loop's thread where the last search's device time fits the turn's cap: the pool's two
    // cross-thread wake-ups were most of the gap between the device's time and the awaited call's.
    await deviceCall(this.timer.expect(), (sync) => this.native.search({
      q: a.q,
      group: a.group,
      k: a.k,
      maxScanned: a.maxScanned,
      ...(a.scale !== undefined && { scale: a.scale }),
      ...(a.seeds && { seeds: a.seeds }),
      ...(a.free && { free: a.free }),
      ...(a.scanKeep !== undefined && { scanKeep: a.scanKeep }),
      outIds,
      ...(outScores && { outScores }),
      meta,
      stageTimes: a.stageTimes ?? false,
      sync,
    }));
    this.timer.record(meta[2 * H]);
    this.lastDeviceMs = meta[2 * H];
    // Written in place: the bench keeps its own copies; a step allocates nothing for it.
    this.lastHost.parseMs = meta[2 * H + 1];
    this.lastHost.prepareMs = meta[2 * H + 2];
    this.lastHost.searchMs = meta[2 * H + 3];
    return Array.from({ length: H }, (_, h) => ({
      ids: outIds.subarray(h * a.k, h * a.k + meta[h]),
      ...(outScores && { scores: outScores.subarray(h * a.k, h * a.k + meta[h]) }),
      scanned: meta[H + h],
      ...(a.scanKeep !== undefined && { codesKept: meta[2 * H + 4 + h] }),
    }));
  }

  /** Whether the store holds values (opened with them): `attend` needs them. */
  get hasValues(): boolean {
    return this.native.hasValues();
  }

  /**
   * Each q row's attention over its kv head's listed rows, from the keys and values the store holds
   * (native/cuda/ra_attend_rows.cuh): the rows of `ranges` ([begin, end) pairs, every head's) and `ids[h]`
   * rows of kv head h, in [0, tokens); q [heads * group, headDim]. out [heads * group, headDim] and lse
   * [heads * group], a head with no rows -Infinity and zeros: merged by log-sum-exp with what else the step
   * attends. The lists are read where they lie until the call settles: leave them unchanged meanwhile.
   */
  async attend(a: { q: Float32Array; group: number; scale: number; ids: readonly Int32Array[]; ranges?: Int32Array }): Promise<{ out: Float32Array; lse: Float32Array }> {
    const H = this.heads;
    if (a.ids.length !== H) throw new RangeError(`expected ${H} id lists, one per kv head, got ${a.ids.length}`);
    const out = new Float32Array(H * a.group * this.headDim), lse = new Float32Array(H * a.group);
    const meta = new Float64Array(1);
    await deviceCall(this.attendTimer.expect(), (sync) => this.native.attend({ q: a.q, group: a.group, scale: a.scale, ids: a.ids, ...(a.ranges && { ranges: a.ranges }), out, lse, meta, sync }));
    this.attendTimer.record(meta[0]);
    return { out, lse };
  }

  bytes(): number {
    return this.native.bytes();
  }

  lastTimes(): RaScanTimes {
    return this.native.lastTimes();
  }

  close(): void {
    this.native.close();
  }
}
