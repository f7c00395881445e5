// Typed wrapper for the RetrievalAttention graph index of the addon
// (native/indexes/ra_graph*, native/bindings/ra_graph_binding.cc): an attention-aware
// graph over one kv head's keys, built from the prefill queries' exact top
// keys, searched greedily by a decode query group.
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

/** Build parameters the wrapper fills in when absent (native/indexes/ra_graph.h's RaGraphParams). */
export const RA_GRAPH_DEFAULTS = { degree: 16, kBuild: 64, maxQueries: 8192, seed: 1, positional: 1, keyNeighbors: 8, keyEf: 48 } as const;

export interface RaGraphBuildArgs {
  /** [tokens, headDim] 16-bit words of one kv head. Not copied: searches pass them again. */
  keys: Uint16Array;
  tokens: number;
  headDim: number;
  dtype: KvDtype;
  /**
   * Prefill query rows [queryCount, headDim] f32 (the q heads of the GQA
   * group are just separate rows). Absent or empty: a key-to-key graph (the
   * keys are the build queries), which loses the point of the method on
   * out-of-distribution decode queries.
   */
  queries?: Float32Array;
  /** Rows of `queries` used; default queries.length / headDim, or 0. */
  queryCount?: number;
  /** Out-degree bound (bridging edges may add a few), in [1, 1024]. */
  degree?: number;
  /** Exact top keys per build query, in [1, 4096]. */
  kBuild?: number;
  /**
   * Build queries are subsampled (seeded) to at most this many. Build cost is
   * ~2·min(queryCount, maxQueries)·tokens·headDim flops (the exact top-k scan).
   */
  maxQueries?: number;
  /** In [0, 2^53). */
  seed?: number;
  /**
   * Positional neighbours linked each side, beyond `degree`, in [0, 64]
   * (default 1): a search walks along a span it reached, and every key stays
   * reachable, also keys no build query retrieved.
   */
  positional?: number;
  /**
   * Key-key edges per key, beyond `degree` and the positional ones, in
   * [0, 1024] (default 8): the key's nearest keys by cosine after centring,
   * found by a beam search of width `keyEf` (in [1, 4096], default 48) over
   * the graph being built (RoarGraph's connectivity enhancement). A decode
   * query's top keys that no prefill query predicted are mostly keys whose
   * content aligns with it; their centred neighbours do too.
   */
  keyNeighbors?: number;
  keyEf?: number;
}

export interface RaGraphSearchArgs {
  /** The keys the graph was built over: [tokens, headDim] 16-bit words. */
  keys: Uint16Array;
  /** Must equal the graph's tokens; headDim must equal its headDim. */
  tokens: number;
  headDim: number;
  dtype: KvDtype;
  /** [group, headDim] f32: the query heads that share this kv head; `aggregate` says how their scores combine. */
  q: Float32Array;
  group: number;
  k: number;
  /** Beam width (raised to k). ef >= tokens visits every key (without a margin): the exact top-k. */
  ef: number;
  /**
   * The quality bound, in score units, >= 0: stop once the best unexpanded
   * candidate scores below the k-th best so far minus `margin` (then ef
   * only caps the work). Score units: q·k unscaled for 'max', logits for
   * 'attention'. Absent: the fixed beam alone.
   */
  margin?: number;
  /**
   * How the group's rows rank a key (native/indexes/ra_graph.h, RaAggregate):
   * 'max' (default) the largest q·k over the rows, an exhaustive search then
   * equals `topk`; 'attention' the key's softmax probability summed over the
   * rows, each row's log-partition estimated from a strided sample of the
   * keys (n/512 of them, 64..4096, counted as scanned) and refined from the
   * keys scored: the ranking of the set the group attends (an exhaustive
   * search returns the exact top-k by mean probability). group <= 64.
   */
  aggregate?: RaAggregate;
  /** Softmax scale for 'attention' (default 1/√headDim). */
  scale?: number;
  /**
   * A cap on the keys scored (0 or absent: none): the walk stops expanding
   * once it has scored this many ('attention''s sample included), whatever
   * ef and margin say; it may pass the cap by one neighbour list.
   */
  maxScanned?: number;
  /**
   * Candidates the walk expands a round, their new neighbours scored as one
   * stream (1..1024; absent: 1, native/indexes/ra_graph.h: the walk one
   * candidate at a time, the ids it returned before the option; 8 paid on
   * the 2-core VM, not on the 16-core GPU host).
   */
  expandWidth?: number;
  /** Report where an 'attention' search's time went (result.profile); timing each key costs ~10%. */
  profile?: boolean;
  /** Report the 'attention' beam walk's shape (result.walk; not the code walk's); counting costs nothing measurable. */
  walkStats?: boolean;
  /** The 'attention' beam walk's candidates cut to their best P after every round (a GPU walk's fixed pool; an experiment, bench/ra-gpu-walk.ts); 0 or absent: unbounded. */
  poolCap?: number;
  /**
   * The code-gated walk ('attention' only; native/indexes/ra_graph.h, RaSearchOptions::codeWalk) instead of
   * the beam walk: each key met is read first as its 4-bit code (made from `keys` on the graph's first such
   * search: 0.34 s and 64 MB a head at 1M keys, d = 128, held until the graph is disposed or searched with
   * another keys array) and scored exactly only if the code's approximate walk score is >= τ − codeDelta,
   * τ the strided sample's (codeQuantile × 1%)-quantile of it; the rest are queued by the approximate score.
   * ef, margin and expandWidth do not apply: `maxScanned` (keys scored exactly) and `maxCodes` (codes read)
   * stop it, or else every reachable key is met. codeQuantile, codeDelta, codeAdapt, maxCodes and codeWidth are errors
   * without it.
   */
  codeWalk?: boolean;
  /** q in (0, 100] (default 1). */
  codeQuantile?: number;
  /** δ in logits, >= 0 (default 1; Infinity: every key met is scored exactly). */
  codeDelta?: number;
  /**
   * Logits, finite, >= 0 (default 2; 0: the cutoff stays τ − δ): each round's cutoff is τ − δ + codeAdapt × (the share
   * of maxScanned the walk has used − the share of maxCodes read), where both caps are given, so that the walk meets
   * both caps near together (native/indexes/ra_graph.h says why; index/retrieval-attention.ts DEFAULT_CODE_ADAPT).
   */
  codeAdapt?: number;
  /** A cap on the codes read (0 or absent: none); passed by at most one round's neighbour lists. */
  maxCodes?: number;
  /**
   * Candidates the code walk expands a round (1..1024; absent: 16): their lists and codes are fetched side by side.
   * At 1M keys on the 2-core VM 8 took ~half the CPU of 1 and 16 0.86-0.92 of 8, the same recall (native/indexes/ra_graph.h).
   */
  codeWidth?: number;
  /**
   * The code scan ('attention' only; native/indexes/ra_graph_code_scan.h) instead of either walk: every key's 4-bit
   * code (the code walk's, made and held as it makes them) is scored in the int8 form, ρ = max over the group's rows
   * of (approximate logit − the row's log-partition estimated from the strided sample), and exactly the best
   * `maxScanned` − (the sample's size) keys by ρ are scored exactly (ties towards the lower id; the graph's entry
   * points and the seeds first, free keys never). Needs `maxScanned` > 0; not with codeWalk; ef and margin do not
   * apply. The result's codesRead is `tokens` (0 where the entry points and seeds fill the cap alone).
   */
  codeScan?: boolean;
  /**
   * The code scan's pass split into pool tasks of this many keys (0 or absent: one pass on the searching thread),
   * for searches that leave cores idle (fewer kv heads than cores); the same ids either way. Only with codeScan.
   */
  scanChunk?: number;
  /**
   * The code scan's first pass on product-quantized codes (native/indexes/ra_pq_codes.h: 4 bits per 4 channels,
   * 1/16 of an f16 key's bytes; made and held beside the 4-bit codes on the first search that asks): every key's PQ
   * code ranked by ρ, the best max(scanKeep · tokens, maxScanned − the sample's size) ranked again by their 4-bit
   * codes, the best of those scored exactly. In (0, 1]; absent: every key's 4-bit code (the scan above). Only with
   * codeScan; the result then has codesKept.
   */
  scanKeep?: number;
  /**
   * At least min(k, tokens) entries each; best first (score desc, id asc).
   * Scores: q·k for 'max'; for 'attention' the log of the group's mean
   * probability as estimated.
   */
  outIds: Int32Array;
  outScores: Float32Array;
  /**
   * Extra keys to start from besides the graph's entry points, each in
   * [0, tokens): e.g. the previous decode step's ids (queries change little
   * from step to step; on workload/ this lifted recall@100 at ef=100
   * from 0.63 to 0.70 at the same scanned count). Seeds are scored (and count
   * as scanned).
   */
  seeds?: Int32Array;
  /**
   * Free start keys, each in [0, tokens): keys the caller attends in full
   * anyway (a session's sinks and window, whose attention computes their
   * scores). The walk starts from them too; they are not counted in
   * `scanned` nor against `maxScanned`, and the result leaves them out: it
   * is the top k of the other keys (exhaustively, exactly that). On
   * kvrecall-code-13M a third to three quarters of a layer's top 1% lies in
   * sinks + window (bench/results/retrieval-seeds-vm.md).
   */
  freeSeeds?: Int32Array;
}

export type RaAggregate = 'max' | 'attention';
const AGGREGATE_CODE: Record<RaAggregate, number> = { max: 0, attention: 1 };

export interface RaGraphSearchResult {
  /** Ids written: min(k, tokens). */
  count: number;
  /** Keys whose score was computed exactly (scanned fraction = scanned / tokens). */
  scanned: number;
  /** With codeWalk or codeScan: the keys read as 4-bit codes, not counted in `scanned`. */
  codesRead?: number;
  /** With scanKeep: the keys whose 4-bit code was read after their PQ code (among codesRead). */
  codesKept?: number;
  /** With `walkStats`, the 'attention' ranking and the beam walk: its shape. */
  walk?: RaWalkStats;
  /** With `profile` and the 'attention' ranking: where the search's time went. */
  profile?: RaSearchProfile;
}

/**
 * The 'attention' beam walk's shape (native/indexes/ra_graph.h, RaSearchResult):
 * what a walk on the device would run in (bench/ra-gpu-walk.ts).
 */
export interface RaWalkStats {
  /** Rounds of up to expandWidth expansions after the start: the walk's sequential depth. */
  rounds: number;
  /** Candidates expanded (neighbour lists read). */
  expanded: number;
  /** Keys scored before the first round (entry points, seeds; the strided sample is apart). */
  startKeys: number;
  /** The candidate heap's largest size after a round's scores. */
  peakCandidates: number;
}

/** Milliseconds per phase of one 'attention' search (native/indexes/ra_graph.h, RaSearchProfile). */
export interface RaSearchProfile {
  /** The strided sample scored, the partitions estimated, its best keys picked as seeds. */
  sampleMs: number;
  /** The beam search, scoring included. */
  walkMs: number;
  /** Of walkMs: reading and scoring keys. */
  scoreMs: number;
  refineMs: number;
  /** The bound, the final scores and the sort. */
  finalMs: number;
  /** Keys given a final score (the rest ruled out by the bound). */
  finalScored: number;
}

export interface RaGraphBuildStats {
  /** Build queries after subsampling (pseudo-queries when none were given). */
  queriesUsed: number;
  /** Keys in no build query's top-kBuild list. */
  unretrieved: number;
  /** Edges added so that every key is reachable from the entry points. */
  bridged: number;
  knnSeconds: number;
  projectSeconds: number;
  /** The key-key edges' beam searches. */
  keySeconds: number;
  connectSeconds: number;
}

/** The keys' 4-bit codes as the code walk reads them (native/indexes/ra_key_codes.h). */
export interface RaKeyCodes {
  /** [tokens, ceil(headDim/2)] bytes: byte i of a row holds channel i (low nibble) and channel i + ceil(headDim/2). */
  codes: Uint8Array;
  /** [headDim]: level c of channel j stands for low[j] + (c + 0.5)·step[j]; low = mean − 3σ, step = 6σ/16. */
  low: Float32Array;
  step: Float32Array;
}

export interface RaKeyCodesArgs {
  keys: Uint16Array;
  tokens: number;
  headDim: number;
  dtype: KvDtype;
}

/** The keys' PQ codes as the code scan's first pass reads them (scanKeep; native/indexes/ra_pq_codes.h). */
export interface RaPqCodes {
  /** [tokens, ceil(ceil(headDim/4)/2)] bytes: byte i of a row holds subspace 2i (low nibble) and 2i + 1. */
  codes: Uint8Array;
  /** [ceil(headDim/4), 16, 4]: subspace s's centroids over channels 4s..4s+3 (those past headDim 0). */
  centroids: Float32Array;
  /** Keys with a channel more than 5σ from its mean over the keys (ascending): the first pass keeps them whatever their code. */
  outliers: Int32Array;
}

type NativeCodesArgs = Omit<RaKeyCodesArgs, 'dtype'> & { dtype: number };

type NativeSearchArgs = Omit<RaGraphSearchArgs, 'dtype' | 'aggregate'> & { dtype: number; aggregate: number };

interface NativeRaGraph {
  readonly tokens: number;
  readonly headDim: number;
  readonly degree: number;
  readonly kBuild: number;
  readonly maxQueries: number;
  readonly seed: number;
  readonly queriesUsed: number;
  readonly edges: number;
  readonly maxDegree: number;
  readonly entryPoints: number;
  readonly positional: number;
  readonly keyNeighbors: number;
  readonly memoryBytes: number;
  readonly buildStats: RaGraphBuildStats | null;
  save(): Uint8Array;
  keyCodes(a: NativeCodesArgs & { pq?: boolean }): RaKeyCodes | RaPqCodes;
  codeLogits(a: NativeCodesArgs & { q: Float32Array; group: number; ids: Int32Array; scale?: number; quantized?: boolean; pq?: boolean }): Float32Array;
  search(a: NativeSearchArgs): Promise<RaGraphSearchResult>;
  searchSync(a: NativeSearchArgs): RaGraphSearchResult;
  dispose(): void;
}

interface RaGraphAddon {
  RaGraph: {
    build(
      a: Omit<RaGraphBuildArgs, 'dtype'> & { dtype: number; queryCount: number; degree: number; kBuild: number; maxQueries: number; seed: number },
    ): Promise<NativeRaGraph>;
    load(bytes: Uint8Array): NativeRaGraph;
    searchBatch(items: (NativeSearchArgs & { graph: NativeRaGraph })[]): Promise<RaGraphSearchResult[]>;
  };
}

const addon = nativeAddon<RaGraphAddon>();

function nativeSearch(a: RaGraphSearchArgs): NativeSearchArgs {
  const aggregate = AGGREGATE_CODE[a.aggregate ?? 'max'];
  if (aggregate === undefined) throw new TypeError(`aggregate must be 'max' or 'attention', got ${String(a.aggregate)}`);
  return { ...a, dtype: DTYPE_CODE[a.dtype], aggregate };
}

/**
 * RetrievalAttention's attention-aware graph over one kv head's keys. Holds
 * only the graph (CSR, ~4·(degree+keyNeighbors+2)·tokens bytes), not the keys; dispose()
 * frees it at once, otherwise the garbage collector does.
 */
export class RaGraph {
  private constructor(private readonly native: NativeRaGraph) {}

  /** The addon's object behind `g`, for the bindings that take a graph (addon/ra-scan.ts). */
  static nativeOf(g: RaGraph): object {
    return g.native;
  }

  /** Exact top-kBuild keys of the (subsampled) queries, projected onto the keys; off the main thread. */
  static async build(args: RaGraphBuildArgs): Promise<RaGraph> {
    const queryCount = args.queryCount ?? (args.queries ? Math.floor(args.queries.length / args.headDim) : 0);
    return new RaGraph(
      await addon.RaGraph.build({
        ...args,
        dtype: DTYPE_CODE[args.dtype],
        queryCount,
        degree: args.degree ?? RA_GRAPH_DEFAULTS.degree,
        kBuild: args.kBuild ?? RA_GRAPH_DEFAULTS.kBuild,
        maxQueries: args.maxQueries ?? RA_GRAPH_DEFAULTS.maxQueries,
        seed: args.seed ?? RA_GRAPH_DEFAULTS.seed,
        positional: args.positional ?? RA_GRAPH_DEFAULTS.positional,
        keyNeighbors: args.keyNeighbors ?? RA_GRAPH_DEFAULTS.keyNeighbors,
        keyEf: args.keyEf ?? RA_GRAPH_DEFAULTS.keyEf,
      }),
    );
  }

  /**
   * Parses bytes from save(); throws on bytes that are not an intact graph,
   * and on a blob of an older version ("... is stale ...": rebuild it; see
   * isStaleRaGraph). Synchronous.
   */
  static load(bytes: Uint8Array): RaGraph {
    return new RaGraph(addon.RaGraph.load(bytes));
  }

  /** Several searches (e.g. every kv head of a layer) in parallel on the native pool, off the main thread. */
  static searchBatch(items: (RaGraphSearchArgs & { graph: RaGraph })[]): Promise<RaGraphSearchResult[]> {
    return addon.RaGraph.searchBatch(items.map((it) => ({ ...nativeSearch(it), graph: it.graph.native })));
  }

  /** Serialises (versioned, checksummed CSR). Synchronous. */
  save(): Uint8Array {
    return this.native.save();
  }

  /** Best-first beam search from the entry points, off the main thread. */
  search(args: RaGraphSearchArgs): Promise<RaGraphSearchResult> {
    return this.native.search(nativeSearch(args));
  }

  /**
   * The same search on the calling thread. One group takes 0.5–3 ms of CPU at 64K keys and 12–24 ms at 1M (2-core VM,
   * bench/results/ra-search-*-vm.md), so a step's kv heads belong in searchBatch, off the event loop.
   */
  searchSync(args: RaGraphSearchArgs): RaGraphSearchResult {
    return this.native.searchSync(nativeSearch(args));
  }

  dispose(): void {
    this.native.dispose();
  }

  /** The codes the code walk reads for these keys (made now if the graph has none of them). A copy; for tests and tools. */
  keyCodes(args: RaKeyCodesArgs): RaKeyCodes {
    return this.native.keyCodes({ ...args, dtype: DTYPE_CODE[args.dtype] }) as RaKeyCodes;
  }

  /** The PQ codes the code scan's first pass reads (scanKeep; made now if the graph has none of them). A copy; for tests and tools. */
  pqCodes(args: RaKeyCodesArgs): RaPqCodes {
    return this.native.keyCodes({ ...args, dtype: DTYPE_CODE[args.dtype], pq: true }) as RaPqCodes;
  }

  /**
   * Approximate scaled logits of keys `ids` for q [group, headDim] from their codes: [ids.length, group] f32.
   * Those of the dequantized keys, or with `quantized` the int8 form's that the code walk ranks by
   * (native/indexes/ra_key_codes.h, RaCodeQuery); with `pq` the PQ codes' integer form that scanKeep's first pass
   * ranks by (native/indexes/ra_pq_codes.h, RaPqQuery).
   */
  codeLogits(args: RaKeyCodesArgs & { q: Float32Array; group: number; ids: Int32Array; scale?: number; quantized?: boolean; pq?: boolean }): Float32Array {
    return this.native.codeLogits({ ...args, dtype: DTYPE_CODE[args.dtype] });
  }

  get tokens(): number {
    return this.native.tokens;
  }
  get headDim(): number {
    return this.native.headDim;
  }
  get degree(): number {
    return this.native.degree;
  }
  get kBuild(): number {
    return this.native.kBuild;
  }
  get maxQueries(): number {
    return this.native.maxQueries;
  }
  get seed(): number {
    return this.native.seed;
  }
  /** Build queries used after subsampling. */
  get queriesUsed(): number {
    return this.native.queriesUsed;
  }
  get edges(): number {
    return this.native.edges;
  }
  get maxDegree(): number {
    return this.native.maxDegree;
  }
  get entryPoints(): number {
    return this.native.entryPoints;
  }
  /** Positional neighbours linked each side. */
  get positional(): number {
    return this.native.positional;
  }
  /** Key-key edges per key. */
  get keyNeighbors(): number {
    return this.native.keyNeighbors;
  }
  /** Native bytes held (0 after dispose): the graph and, after a code walk or scan, its keys' codes and its lists' slots (64 bytes a key), and after a scan with scanKeep its PQ codes (d/8 bytes a key). */
  get memoryBytes(): number {
    return this.native.memoryBytes;
  }
  /** Timings and counts of the build; null for a loaded graph. */
  get buildStats(): RaGraphBuildStats | null {
    return this.native.buildStats;
  }
}

/** Whether `err` (from RaGraph.load) says the blob is of an older version and its index must be rebuilt. */
export function isStaleRaGraph(err: unknown): boolean {
  return err instanceof Error && /^ra-graph blob version \d+ is stale/.test(err.message);
}
