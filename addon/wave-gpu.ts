// Typed wrapper of the wave decode step on the GPU (native/cuda/wave_step,
// native/bindings/wave_gpu_binding.cc): a device-resident cluster store per
// (segment, layer) with every kv head's clusters and rows, and one call per
// layer-step that selects the retrieval zone (clusters by an optimistic
// score until probe × budget tokens, their members rescored exactly, the best
// `budget` kept) and estimates the rest from the clusters, as a partial
// (out, lse) per q head. With ranking 'spread' (index/wave's default path)
// the selection is index/wave/cluster-index.ts's searchHeads bit for bit and
// the estimate is addon/estimate.ts's estimateClusters, second order, over
// every cluster minus the rows attended exactly (the selection plus
// `exact`), a partly attended cluster's remaining rows by their own logits
// (estimateArgs(ids), 'rows': rest 'rows', the default) or by their moments
// (rest 'moments': estimateArgs(ids, 'moments')); with 'radius', searchHeads(..., 'radius') and the first-order
// estimate (estimateArgs(ids, 'first')). The estimate is f32 with tiles merged
// in float64. WaveGpuStore.create throws without a device or a CUDA build.
import { nativeAddon } from './addon.js';
import { deviceCall, DeviceTimer } from './device-calls.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

/**
 * Whether a call's GQA group fits the device: step and rest hold the
 * group's query rows, group · (headDim + 8) floats, in shared memory (the
 * binding refuses more than 12288, native/cuda/wave_step_kernels.cuh's
 * kMaxQueryFloats).
 */
export function waveGroupFits(qHeads: number, kvHeads: number, headDim: number): boolean {
  return (qHeads / kvHeads) * (headDim + 8) <= 12288;
}

/** One kv head's wave clusters (index/wave/cluster-codec.ts's arrays) and its rows. */
export interface WaveGpuHead {
  /** [clusters, headDim + 8]: centroid, radius, padding. */
  centroids: Uint16Array;
  /** [clusters, headDim]. */
  valueMeans: Uint16Array;
  /** [clusters, headDim]: principal axes scaled by the standard deviation along them (ranking 'spread'), int8 codes (index/wave/moment-code.ts). */
  keyAxes: Int8Array;
  /** [clusters]: the axes' scales. */
  axisScales: Float32Array;
  /** [clusters, headDim]: per-channel key variances (ranking 'spread' and its second-order estimate), uint8 codes. */
  keyVars: Uint8Array;
  /** [clusters]: the variances' scales. */
  varScales: Float32Array;
  /** The share of the second-order term this head takes (its artifact's calibrated share; default 1, all of it). */
  varianceShare?: number;
  /** [clusters]: must be tokenCluster's histogram. */
  counts: Int32Array;
  /** [tokens]. */
  tokenCluster: Int32Array;
  /** [tokens, headDim]: rescored on the device. */
  keys: Uint16Array;
  /** [tokens, headDim]: what exact rows remove from their cluster's estimate. */
  values: Uint16Array;
}

export interface WaveGpuStoreOptions {
  kvHeads: number;
  /** A multiple of 8, at most 1024. */
  headDim: number;
  dtype: KvDtype;
  tokens: number;
  heads: WaveGpuHead[];
  /**
   * 0 or unset: the dense store, every head's K and V on the device. > 0: the
   * paged store (native/cuda/wave_cache.cuh): K and V in pinned, mapped host
   * memory and this many (head, row) slots cached on the device, shared by
   * the heads; a step copies the rows it lacks. A step whose rows exceed the
   * cache rejects (waveCacheRowsBound sizes it); `rest` rejects on a paged store.
   */
  cacheRows?: number;
  /**
   * The paged store only: > 0, the bytes (K and V) a step may copy into the
   * cache from step `pageCapFrom` (default 16) on, each kv head an equal
   * share (native/cuda/wave_page_cap.cuh): what the cache lacks past it is not
   * rescored and is left to the estimate. 0 or unset: every row the step
   * reads is paged (the store's behaviour before the cap, bit for bit).
   */
  pageCapBytes?: number;
  pageCapFrom?: number;
}

/** The paged store's default cap (issue #13: <= 2 MiB host->device a layer-step after the first 16 steps). */
export const WAVE_PAGE_CAP_DEFAULT = 2 * 1024 * 1024;

/**
 * Slots a paged store needs so that no step overflows: per kv head, the
 * clusters the cut takes hold fewer than target + the largest cluster's
 * count rows, and each exact row brings its cluster (native/cuda/
 * wave_cache.cuh's CacheRowsBound), summed over the heads (they share the
 * cache).
 */
export function waveCacheRowsBound(a: { kvHeads: number; tokens: number; target: number; largestCluster: number; exactRows: number }): number {
  return a.kvHeads * Math.min(a.tokens, a.target + a.largestCluster + a.exactRows * a.largestCluster);
}

/**
 * native/cuda/wave_sizes.cuh's StepBucket: x rounded up to a multiple of
 * max(256, x's highest power of two / 8), 0 kept. The step's launches (and
 * its CUDA graph's key) take the exact rows' count, the widest budget and the
 * most candidates, each clamped to the tokens, as these buckets: steps whose
 * sizes share the buckets replay one graph.
 */
export function waveStepBucket(x: number): number {
  if (x <= 0) return 0;
  let top = 1;
  while (top <= Math.floor(x / 2)) top *= 2;
  const q = Math.max(256, top / 8);
  return Math.ceil(x / q) * q;
}

/**
 * How clusters are ranked, and with it the estimate's order:
 * 'spread': max over the group of q·mu + spread·sqrt((q·a)² + Σ q_j² var_j)
 * (index/wave's SPREAD), second-order estimate; 'radius': q·mu +
 * radiusShare·‖q‖·radius (index/wave's RADIUS_SHARE), first-order estimate.
 */
export type WaveGpuRanking = { kind: 'spread'; spread: number } | { kind: 'radius'; radiusShare: number };

export interface WaveGpuStepArgs {
  /** [qHeads, headDim]. */
  q: Float32Array;
  qHeads: number;
  scale: number;
  /** Tokens kept per kv head. */
  budget: number[];
  /** Clusters are taken until they hold probe × budget tokens (index/wave's PROBE), or `target` tokens where given. */
  probe: number;
  /** Per kv head: candidate tokens (index/wave's candidateTokens); overrides probe × budget. */
  target?: number[];
  ranking: WaveGpuRanking;
  /** Rows attended exactly besides the selection (sinks, window), for every kv head; segment rows. */
  exact?: Int32Array;
  /**
   * Rows dropped from the kept ids (at most two [lo, hi) ranges: the sinks and
   * window the step attends through `exact` anyway), and per kv head the ids
   * kept at most after that (default: budget): as staticPlusRetrieved keeps
   * a search's ids.
   */
  skip?: [number, number][];
  keep?: number[];
  /** Default true. */
  estimate?: boolean;
  /**
   * Default false. The kept rows and `exact` (a row listed twice once)
   * attended exactly from the store's K and V and merged with the estimate:
   * out/lse are then the attention over the whole segment.
   */
  attend?: boolean;
  /** With 'spread': a partly attended cluster's remaining rows by their own logits ('rows', the default) or their moments. */
  rest?: 'rows' | 'moments';
  /**
   * Default true. False: the kept ids stay on the device (the result has
   * their counts, `kept`, and no `ids`); reading them back was 0.4 ms of
   * the step's host time at 1M tokens (bench/results/wave-gpu-h200-cs16-cdot.md).
   */
  ids?: boolean;
  /** Default true. False: no per-stage event times (`stages` is empty), `ms` only. */
  stages?: boolean;
  /**
   * Default true: with `stages: false`, the step's ~40 launches are replayed
   * from a CUDA graph captured once per shape (one launch from the host).
   * False: launched one by one (a bench's comparison).
   */
  graph?: boolean;
  /**
   * A session's own tokens, rows [0, tokens) of each kv head's arrays (the
   * store's dtype): attended on the step's thread while the device runs it
   * and merged into out/lse by log-sum-exp (host.overlap times it), so the
   * layer-step's whole attention is one native call. The arrays are read,
   * not copied, until the step settles.
   */
  own?: { k: Uint16Array[]; v: Uint16Array[]; tokens: number };
  /** A capped paged store: the result's momentClusters (a test's or a bench's question). */
  detail?: boolean;
}

export interface WaveGpuStepResult {
  /** Per kv head: the kept rows (the best by score, then lower id), in cluster order, not rank order; absent with `ids: false`. */
  ids?: Int32Array[];
  /** Per kv head: how many rows were kept. */
  kept: number[];
  /** Per kv head: clusters + members scored (searchHeads' `scanned`); on a capped paged store, members taken by the cut, of which `rescored` were scored. */
  scanned: number[];
  /** [qHeads, headDim] and [qHeads]: the estimate (with attend, merged with the exact rows' attention), -Infinity where empty. */
  out: Float32Array;
  lse: Float32Array;
  /** Per kv head: tokens the estimate covers. */
  estimated: number[];
  /** The whole step on the device's stream (inputs in to outputs out), CUDA events. */
  ms: number;
  /** ms per stage: in, score, clusters, rescore, topk, exact, partial, tiles (the estimate's and the attended rows'), merge, out. */
  stages: Record<string, number>;
  /**
   * Host ms around the stream: parse (the arguments read, on the calling
   * thread), queue (the call to the work's start on a worker thread), prep,
   * launch, overlap (the own tokens, with `own`), wait (the stream), copy
   * (outputs read back), back (the work's end to the answer's writing on the
   * event loop), convert (the answer written into the caller's arrays).
   */
  host: Record<string, number>;
  /** Graphs the store has captured so far: one per shape while the shape holds. */
  graphCaptures: number;
  /** A paged store's rows copied from the host into its cache this step, and their bytes (K and V); 0 for a dense store. */
  misses: number;
  bytesIn: number;
  /**
   * A capped paged store (pageCapBytes > 0), with ids, stages or detail: per
   * kv head, the candidates rescored (those cached or paged; the rest were
   * left to the estimate) and the rows the sinks/window rows' clusters paged.
   */
  rescored?: number[];
  exactMisses?: number[];
  /**
   * With detail on a capped store: per kv head, the partly attended clusters
   * whose rest the estimate took from their moments because the cap left
   * some of their rows unread (the others: their rows' own logits).
   */
  momentClusters?: Int32Array[];
  /** The work's own host ms (queue and back excluded), on whichever thread ran it (addon/device-calls.ts). */
  workMs: number;
}

/**
 * The estimate of what another method's selection leaves out of the
 * store's segment (WaveGpuStore.rest): every cluster minus the rows given
 * per kv head, as estimateClusters over ClusterIndex.estimateArgs(rows,
 * order) computes it; nothing is ranked, rescored or attended.
 */
export interface WaveGpuRestArgs {
  /** [qHeads, headDim]. */
  q: Float32Array;
  qHeads: number;
  scale: number;
  /** Per kv head: [lo, hi) pairs of segment rows attended exactly, flat (one array may serve every head). */
  ranges: Int32Array[];
  /** Per kv head: blocks attended exactly, rows [b·size, (b+1)·size) clamped to the segment. */
  blocks?: { size: number; ids: Int32Array[] };
  /** Per kv head: more rows attended exactly. A row listed twice (here or above) is attended once. */
  ids?: Int32Array[];
  /** estimateArgs' order; default 'rows' (the engine's). */
  order?: 'rows' | 'moments' | 'first';
  /** Default false: per-stage event times. */
  stages?: boolean;
  /** Default true: without stages, the launches replayed from a CUDA graph. */
  graph?: boolean;
  /** The caller overlaps this call with its next GPU call: on libuv's pool, never the loop (device-calls.ts deviceCall). */
  beside?: boolean;
}

export interface WaveGpuRestResult {
  /** [qHeads, headDim] and [qHeads]: the estimate, -Infinity where it covers nothing. */
  out: Float32Array;
  lse: Float32Array;
  /** Per kv head: tokens the estimate covers. */
  estimated: number[];
  /** Per kv head: keys read for the rows partly attended clusters have left (order 'rows'; else 0), as estimateClusters counts them. */
  scanned: number[];
  /** Per kv head: the rows given (a row listed twice counts twice). */
  rows: number[];
  /** On the device's stream, CUDA events. */
  ms: number;
  /** ms per stage (with `stages`): in, score, rows, partial, tiles, merge, out. */
  stages: Record<string, number>;
  /** Host ms around the stream, as WaveGpuStepResult's. */
  host: Record<string, number>;
  /** Graphs the store's rest calls have captured so far. */
  graphCaptures: number;
  /** As WaveGpuStepResult's. */
  workMs: number;
}

export interface WaveGpuBytes {
  /** Centroids, value means, key axes and variances, counts, member lists, token->cluster. */
  summaries: number;
  /** Of `summaries`: the key axes and variances. */
  moments: number;
  /**
   * Of `summaries`: the member lists and token-to-cluster maps, 2 bytes a row each where the clusters
   * were numbered segment by segment (as every build numbers them), else 4 (native/cuda/wave_step_kernels.cuh's ClusterMaps).
   */
  maps: number;
  /** The K and V rows held on the device (0 for a paged store). */
  kv: number;
  /** Per-step buffers. */
  scratch: number;
  /** A paged store's row cache: its slots' K and V, the row-to-slot map, the slots' owners and stamps, the miss list (0 for a dense store). */
  cache: number;
  /** Its slots. */
  cacheRows: number;
}

/**
 * The binding's arguments: the step's and rest's own where they pass as they
 * are, flattened where they do not. A step's per-head counts travel as one
 * Float64Array (`plan`) and its answer comes back in the caller's arrays
 * (`out`, `lse`, `meta`): through N-API each number read or property made is
 * a call, ~40 of them a step, and the answer's objects alone held the loop
 * 0.021 ms (bench/results/decode-prof-h200.md).
 */
type NativeStepArgs = Omit<WaveGpuStepArgs, 'probe' | 'target' | 'ranking' | 'skip' | 'budget' | 'keep'> & {
  ranking: WaveGpuRanking['kind'];
  spread?: number;
  normTerms?: Float32Array;
  /** budget, target, maxClusters[, keep], kvHeads each. */
  plan: Float64Array;
  skip?: number[];
  sync?: boolean;
  out: Float32Array;
  lse: Float32Array;
  /** idCounts, candidates, estimated (kvHeads each), then STEP_META's slots. */
  meta: Float64Array;
};

/** native/bindings/wave_gpu_binding.cc's kStepMeta: meta's slots after the three per-head runs. */
export const STEP_META = ['width', 'ms', 'graphCaptures', 'misses', 'bytesIn', 'workMs', 'parse', 'queue', 'back', 'convert',
  'prep', 'launch', 'overlap', 'wait', 'copy'] as const;
const META_AT = Object.fromEntries(STEP_META.map((k, i) => [k, i])) as Record<(typeof STEP_META)[number], number>;
/** The host phases a step reports (WaveGpuStepResult.host), in meta's order. */
const HOST_PHASES = ['parse', 'queue', 'prep', 'launch', 'overlap', 'wait', 'copy', 'back', 'convert'] as const;
type NativeRestArgs = Omit<WaveGpuRestArgs, 'blocks' | 'beside'> & { blocks?: Int32Array[]; blockSize?: number; sync?: boolean };

interface NativeStore {
  /** The answer is in a.out, a.lse and a.meta; only the kept ids (asked for) and the stages' times come as objects. */
  step(a: NativeStepArgs): Promise<{ ids?: Int32Array; stages: Record<string, number>; rescored?: number[]; exactMisses?: number[]; momentClusters?: Int32Array[] } | undefined>;
  rest(a: NativeRestArgs): Promise<WaveGpuRestResult>;
  bytes(): WaveGpuBytes;
  close(): void;
  /** With defer: true, makes the device store on libuv's pool. */
  open(): Promise<void>;
  /** Frees the store on libuv's pool (or where the last step reading it lets it go). */
  closeAsync(): Promise<void>;
}

interface Addon {
  WaveGpuStore: new (o: Omit<WaveGpuStoreOptions, 'dtype' | 'heads'> & { dtype: number; heads: (WaveGpuHead & { clusters: number })[]; defer?: boolean }) => NativeStore;
}

const addon = nativeAddon<Addon>();

export class WaveGpuStore {
  /** The last step's and rest's work: where the next one waits (addon/device-calls.ts). */
  private readonly stepTimer = new DeviceTimer();
  private readonly restTimer = new DeviceTimer();

  private constructor(
    private readonly store: NativeStore,
    readonly options: Omit<WaveGpuStoreOptions, 'heads'>,
    /** Clusters per kv head. */
    readonly clusters: number[],
  ) {}

  /** Copies every head's arrays to the device, on the calling thread (a second or more for a 1M-token layer: `open` off a server's loop). */
  static create(o: WaveGpuStoreOptions): WaveGpuStore {
    return WaveGpuStore.made(o, false);
  }

  /**
   * The same store, made on libuv's pool: the arguments are checked on the
   * calling thread (a bad one rejects before anything is copied), the copies
   * run while the event loop serves other requests; rejects where the device
   * refuses (out of memory). The arrays must not change until it settles.
   */
  static async open(o: WaveGpuStoreOptions): Promise<WaveGpuStore> {
    const s = WaveGpuStore.made(o, true);
    await s.store.open();
    return s;
  }

  private static made(o: WaveGpuStoreOptions, defer: boolean): WaveGpuStore {
    const heads = o.heads.map((h) => ({ ...h, clusters: h.counts.length }));
    const cacheRows = o.cacheRows ?? 0;
    if ((o.pageCapBytes ?? 0) > 0 && cacheRows <= 0) throw new RangeError('pageCapBytes needs the paged store (cacheRows > 0)');
    const cap = (o.pageCapBytes ?? 0) > 0 ? { pageCapBytes: o.pageCapBytes, ...(o.pageCapFrom !== undefined && { pageCapFrom: o.pageCapFrom }) } : {};
    const store = new addon.WaveGpuStore({ kvHeads: o.kvHeads, headDim: o.headDim, dtype: DTYPE_CODE[o.dtype], tokens: o.tokens, heads, cacheRows, ...cap, ...(defer && { defer }) });
    return new WaveGpuStore(store, { kvHeads: o.kvHeads, headDim: o.headDim, dtype: o.dtype, tokens: o.tokens, cacheRows, ...cap }, heads.map((h) => h.clusters));
  }

  /** Whether K and V stay on the host with a row cache on the device (cacheRows > 0). */
  get paged(): boolean {
    return (this.options.cacheRows ?? 0) > 0;
  }

  /** One layer-step for every kv head. */
  async step(a: WaveGpuStepArgs): Promise<WaveGpuStepResult> {
    const { headDim: d, kvHeads, tokens } = this.options;
    // 'radius': the optimistic query's extra column, as searchHeads computes it
    // (double, then f32). 'spread': the binding computes ‖q‖ as the host's estimate does.
    let normTerms: Float32Array | undefined;
    const rk = a.ranking;
    if (rk.kind === 'radius') {
      normTerms = new Float32Array(a.qHeads);
      for (let r = 0; r < a.qHeads; r++) normTerms[r] = rk.radiusShare * Math.hypot(...a.q.subarray(r * d, (r + 1) * d));
    }
    // Clusters ranked at most: searchHeads' `want` (enough for the budget at
    // the average cluster size, twice over), the same for every head.
    const target = a.target ?? a.budget.map((k) => a.probe * k);
    const want = Math.max(...target.map((t, h) => Math.min(this.clusters[h], Math.ceil((2 * t * this.clusters[h]) / Math.max(1, tokens)) + 8)));
    const H = kvHeads;
    const plan = new Float64Array((a.keep ? 4 : 3) * H);
    for (let h = 0; h < H; h++) {
      plan[h] = a.budget[h];
      plan[H + h] = target[h];
      plan[2 * H + h] = want;
      if (a.keep) plan[3 * H + h] = a.keep[h];
    }
    const out = new Float32Array(a.qHeads * d), lse = new Float32Array(a.qHeads);
    const meta = new Float64Array(3 * H + STEP_META.length);
    const extra = await deviceCall(this.stepTimer.expect(), (sync) => this.store.step({
      q: a.q,
      qHeads: a.qHeads,
      scale: a.scale,
      ranking: rk.kind,
      spread: rk.kind === 'spread' ? rk.spread : undefined,
      normTerms,
      plan,
      exact: a.exact,
      skip: a.skip?.flat(),
      estimate: a.estimate,
      attend: a.attend,
      rest: a.rest,
      ids: a.ids,
      stages: a.stages,
      graph: a.graph,
      own: a.own,
      detail: a.detail,
      sync,
      out,
      lse,
      meta,
    }));
    const m = 3 * H;
    const workMs = meta[m + META_AT.workMs];
    this.stepTimer.record(workMs);
    const kept: number[] = [], scanned: number[] = [], estimated: number[] = [];
    for (let h = 0; h < H; h++) {
      kept.push(meta[h]);
      scanned.push(this.clusters[h] + meta[H + h]);
      estimated.push(meta[2 * H + h]);
    }
    const host: Record<string, number> = {};
    for (const k of HOST_PHASES) host[k] = meta[m + META_AT[k]];
    const width = meta[m + META_AT.width], ids = extra?.ids;
    return {
      ...(ids && { ids: kept.map((n, h) => ids.subarray(h * width, h * width + n)) }),
      kept,
      scanned,
      out,
      lse,
      estimated,
      ms: meta[m + META_AT.ms],
      stages: extra?.stages ?? {},
      host,
      graphCaptures: meta[m + META_AT.graphCaptures],
      misses: meta[m + META_AT.misses],
      bytesIn: meta[m + META_AT.bytesIn],
      ...(extra?.rescored && { rescored: extra.rescored, exactMisses: extra.exactMisses }),
      ...(extra?.momentClusters && { momentClusters: extra.momentClusters }),
      workMs,
    };
  }

  /** The estimate of what a selection leaves out (WaveGpuRestArgs). Bad arguments reject (the binding throws before its work starts). */
  async rest(a: WaveGpuRestArgs): Promise<WaveGpuRestResult> {
    const r = await deviceCall(this.restTimer.expect(), (sync) => this.store.rest({
      q: a.q, qHeads: a.qHeads, scale: a.scale, ranges: a.ranges,
      ...(a.blocks && { blocks: a.blocks.ids, blockSize: a.blocks.size }),
      ids: a.ids, order: a.order, stages: a.stages, graph: a.graph, sync,
    }), a.beside);
    this.restTimer.record(r.workMs);
    return r;
  }

  bytes(): WaveGpuBytes {
    return this.store.bytes();
  }

  /** Frees the device memory now, on the calling thread (it synchronises the device): `closeAsync` on a server. */
  close(): void {
    this.store.close();
  }

  /** Frees it on libuv's pool; a step still reading it keeps it until that step ends. */
  closeAsync(): Promise<void> {
    return this.store.closeAsync();
  }
}
