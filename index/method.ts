// The interface every retrieval method implements. A method sees one layer's
// context (documents, then the session's own tokens) and the step's query
// heads, and answers which tokens attention should read. It never computes
// the attention itself: engine/decode-step.ts does, the same way for every method.
//
// Methods that index documents also implement HeadIndexBuilder: an index per
// (document, layer, kv head), built once at seal from the keys (and the
// prefill queries when the LLM server sent them), saved as bytes in LMDB
// next to the document, and loaded, not rebuilt, when a session attaches it.
import type { HeadTopBlocks } from '../addon/block-scores.js';
import type { AttendSegment, KvDtype } from '../addon/kernels.js';
import type { RaGraph } from '../addon/ra-graph.js';
import type { KvSegment } from '../storage/kv-segment.js';

export interface LayerContext {
  layer: number;
  /** Documents in order, then the session's own tokens. */
  segments: KvSegment[];
  /** Position of each segment's first token in the context. */
  offsets: number[];
  /** Per segment: one loaded index per kv head, where the method indexes it. */
  indexes: (HeadIndex[] | undefined)[];
  /**
   * The query rows of the session's own prefill tokens (the question) for
   * one kv head's group, [queryCount, headDim]; empty when none were sent.
   */
  question(head: number): { queries: Float32Array; queryCount: number };
  /** Per (session, layer) memory a method may keep between steps. */
  memo: Map<string, unknown>;
  /** Tokens in the whole context. */
  tokens: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /**
   * Block scoring on the device, offered to GPU sessions only: block
   * methods score their summaries through it when present, on the host
   * otherwise (the same blocks either way).
   */
  blockScorer?: BlockScorer;
  /**
   * Retrieval-attention's code scan on the device, offered to GPU sessions
   * whose backend holds a budget for it: the method scans there when
   * present and able, on the host otherwise.
   */
  keyScanner?: KeyScanner;
}

/** One kv head's block means, as a block scorer reads them (index/block-summary.ts's BlockSummary is one). */
export interface BlockMeans {
  readonly blocks: number;
  readonly headDim: number;
  readonly dtype: KvDtype;
  /** [blocks, headDim] storage-dtype words. */
  readonly means: Uint16Array;
}

/** One kv head as a key scanner takes it: the keys and the graph built over them. */
export interface ScanHead extends HeadKeys {
  graph: RaGraph;
}

/** Retrieval-attention's code scan (RaGraph search with codeScan) for every kv head of a step in one call. */
export interface KeyScanner {
  /**
   * Per kv head h (query rows h*group ..): the best k keys by the group's
   * attention, as the host's code scan of that head with this cap, seeds
   * (the head's last ids) and free keys finds them, up to near-ties at its
   * cuts; the ids come as a set (in no order). `scanKeep` below 1: the
   * host's PQ first pass (SearchParams.scanKeep), the same keys kept.
   * Undefined when it cannot take these heads now (the caller searches on
   * the host).
   */
  scan(heads: readonly ScanHead[], q: Float32Array, group: number, k: number, maxScanned: number, seeds: readonly (Int32Array | undefined)[], free?: Int32Array, scanKeep?: number): Promise<SearchResult[] | undefined>;
}

/**
 * One document layer's keys and values as a device store holds them (a key
 * scanner's, where it holds values): the cache attends a part's listed rows
 * there (`SelectionPart.device`) rather than gathering them on the host.
 */
export interface DeviceRows {
  /**
   * Each q row's attention over its kv head's rows: those of `ranges` ([begin, end) pairs, every head's,
   * ascending and disjoint, and disjoint from the ids: a document's sinks and window) and `ids[h]` (q
   * [kvHeads * group, headDim]): out and lse per q row, a head with no rows -Infinity; undefined where the
   * store no longer holds them (the host attends). The lists are read until the promise settles.
   */
  attend(ids: readonly Int32Array[], q: Float32Array, group: number, scale: number, ranges?: Int32Array): Promise<{ out: Float32Array; lse: Float32Array } | undefined>;
}

/** Scores the block means of every kv head of one document's layer in one call. */
export interface BlockScorer {
  /**
   * Per kv head h (query rows h*group ..): the top `k` blocks by max over
   * the group of q·mean, best first, ties towards the lower id, with their
   * scores, and the scores of the blocks extra[h]; exactly what the host's
   * topkHeads computes. With `reps` > 1 the blocks come in groups of reps
   * (a summary's rows of one block): `k` counts groups, each ranked where
   * its best row ranks, answered as its first row's id (so the first k
   * distinct groups of the k·reps best rows, in that order), extra[h]
   * still rows; a scorer that cannot group them answers the k·reps best
   * rows instead (the same groups first). Undefined when it cannot take
   * these summaries (the caller scores them on the host).
   */
  topBlocks(heads: readonly BlockMeans[], q: Float32Array, group: number, k: number, extra: Int32Array[], reps?: number): Promise<HeadTopBlocks[] | undefined>;
}

export interface SearchParams {
  /**
   * Tokens the method may select per kv head, beyond sinks and window. A
   * session may give a fraction below 1 (of the context); the decode step
   * resolves it to tokens (budgetTokens) before a method sees it.
   */
  budget: number;
  /** First tokens of the context always attended. */
  sinks: number;
  /** Last tokens of the context always attended. */
  window: number;
  /** Search effort (beam width, probes); methods scale it to their own knob. */
  ef: number;
  /** Tokens read per chunk by chunked methods (InfiniRetri). */
  chunk: number;
  /** Neighbours kept on each side of a retained token (InfiniRetri's phrase span). */
  span: number;
  /**
   * Set by the decode step: this layer estimates what the method leaves out
   * (the estimation zone), so a method may search less (wave rescores half
   * the candidates).
   */
  estimate?: boolean;
  /**
   * retrieval-attention only (engine/session-params.ts refuses them for other
   * methods): the code-gated walk instead of the beam (index/retrieval-attention.ts,
   * walkOptions), reading at most `codeShare` of a document's tokens as 4-bit codes;
   * `scanShare` caps the keys scored exactly, as a share of the document's tokens,
   * for either walk (absent: the code walk's default, none for the beam).
   * `codeScan`: every key's code scored, then the best scanShare (default as the code
   * walk's) scored exactly (walkOptions; not with codeWalk). `scanKeep` (codeScan
   * only): a first pass on PQ codes keeps that share of the keys (and the PQ codes'
   * outliers) for the 4-bit codes (addon/ra-graph.ts scanKeep); absent, one pass.
   */
  codeWalk?: boolean;
  codeScan?: boolean;
  codeShare?: number;
  scanShare?: number;
  scanKeep?: number;
}

/** The part of a session's parameters a graph search reads besides ef (SearchParams). */
export type WalkParams = Pick<SearchParams, 'codeWalk' | 'codeScan' | 'codeShare' | 'scanShare' | 'scanKeep'>;

/**
 * Whole blocks of one segment, per kv head: block b stands for rows
 * [b * size, min((b + 1) * size, tokens)). The form block-selecting methods
 * answer in, so a GPU block pool can take the blocks as they are.
 */
export interface BlockList {
  size: number;
  /** Per kv head, block ids, ascending. */
  ids: Int32Array[];
  /**
   * Per kv head, aligned with ids: the pool's eviction class for each block
   * (lower is evicted first); absent means 0 (plain LRU).
   */
  priority?: Uint8Array[];
}

/**
 * Part of a selection: a token range of one segment, per-kv-head row ids, or
 * per-kv-head whole blocks.
 */
export type SelectionPart = { segment: KvSegment } & (
  | (Pick<AttendSegment, 'begin' | 'end' | 'ids'> & { blocks?: undefined; device?: DeviceRows })
  | { blocks: BlockList; begin?: undefined; end?: undefined; ids?: undefined; device?: undefined }
);

export interface Selection {
  parts: SelectionPart[];
  /** Keys (or block/centroid representatives) whose score the method computed, averaged over kv heads. */
  scanned: number;
  /**
   * Keys read as 4-bit codes, averaged over kv heads; only a code walk's. Those whose code passed the gate were
   * then scored exactly as well and are in `scanned` too; a code is a quarter of an f16 key's bytes.
   */
  codes?: number;
  /**
   * Puts the context's memo back as it was before this select, for a step
   * that fails after it (the decode step calls it, once, before the next
   * select). A method whose memo is a cache of the context needs none; one
   * whose memo steers its next choice (infiniretri's step rows, nosa's last
   * blocks, a graph search's last results as its start) does. A
   * select that throws leaves its memo as it was itself.
   */
  undo?: () => void;
}

export interface RetrievalMethod {
  readonly name: string;
  /** Set when the method searches a per-head index of each document. */
  readonly builder?: HeadIndexBuilder;
  select(ctx: LayerContext, q: Float32Array, params: SearchParams): Promise<Selection>;
}

export interface HeadKeys {
  /** [tokens, headDim] storage-dtype words of one kv head. */
  keys: Uint16Array;
  /** [tokens, headDim] the head's values, for indexes that summarise them (wave). */
  values?: Uint16Array;
  tokens: number;
  headDim: number;
  dtype: KvDtype;
}

export interface BuildInput extends HeadKeys {
  /** Prefill query rows of the kv head's group, [queryCount, headDim]; may be empty. */
  queries: Float32Array;
  queryCount: number;
  /** Tokens per cluster, for clustered indexes (the document's `clusterSize`). */
  clusterSize?: number;
  /** The server runs on a GPU: a builder may use it (wave's k-means), its artifact the same format. */
  device?: boolean;
}

export interface SearchResult {
  /** Rows of the head's keys, best first (a device scan's: a set, in no order). */
  ids: Int32Array;
  /** Where a device holds the head's keys and values (a key scanner's store): a part of these rows is attended there. */
  rows?: DeviceRows;
  /** Set where no id is in the search memo's steady zone (a search that took it as free start keys): nothing to drop. */
  outsideSteady?: boolean;
  /** Keys scored to find them. */
  scanned: number;
  /** Keys read as 4-bit codes (a code walk's; those then scored exactly are in scanned as well). */
  codes?: number;
}

export interface HeadIndex {
  /**
   * Top-k rows for a query group [group, headDim] (score: max over the group
   * of q·k). `ef` is the method's search effort (beam width, lists probed);
   * 0 asks for the method's default.
   */
  search(q: Float32Array, group: number, k: number, ef: number): SearchResult;
}

export interface HeadIndexBuilder {
  build(input: BuildInput): Promise<Uint8Array>;
  load(bytes: Uint8Array, keys: HeadKeys): HeadIndex;
  /**
   * Optional: an artifact of an older format that load reads (converting it
   * at every load) in this build's format, else undefined; the engine loads
   * and stores that in its place, so the conversion runs once. A throw is
   * as load's (a stale artifact is rebuilt).
   */
  upgrade?(bytes: Uint8Array): Uint8Array | undefined;
  /**
   * Optional: HeadIndex.search for every kv head of a step at once (head h
   * with query rows h*group ..), off the main thread and in parallel; the
   * loaded indexes are this builder's; `scanner`: the session's device
   * key scanner, where it has one.
   */
  searchHeads?(heads: HeadIndex[], q: Float32Array, group: number, k: number[], ef: number, memo?: SearchMemo, estimate?: boolean, walk?: WalkParams, scanner?: KeyScanner): Promise<SearchResult[]>;
  /** Optional: builds a seal may run at once (default 1: one after another). */
  concurrency?: number;
}

/**
 * What a search keeps between one session's steps over one document's
 * layer: the ids the last step found per kv head (a graph search starts
 * from them as well as from its entry points: a decode query changes
 * little from one step to the next).
 */
export interface SearchMemo {
  last?: Int32Array[];
  /**
   * The segment's ids the session attends in full at this step (sinks,
   * window), ascending, set before each search; the k asked counts them. A
   * graph search may start from them for free (the attention over them
   * computes their scores) and return k minus their count of other ids.
   */
  steady?: Int32Array;
}

/** The budget in tokens for a context of `tokens`: a fraction below 1 is a share of it. */
export function budgetTokens(budget: number, tokens: number): number {
  return budget > 0 && budget < 1 ? Math.ceil(budget * tokens) : budget;
}

/**
 * Whether loading an artifact failed because it was written in an older
 * format (each builder versions its bytes and names the version it refuses):
 * the engine rebuilds such an index from the keys instead of failing the session.
 */
export function isStaleArtifact(err: unknown): boolean {
  return err instanceof Error && /\bstale\b|\bversion\b/i.test(err.message);
}
