// What the engine needs of a document store, and the records it keeps.
// Two stores implement it: LMDB in a local folder (`lmdb-store.ts`, the
// embedded default) and a Redis Cluster shared by several servers
// (`redis-store.ts`, `--store redis://…`).
//
// Every store keeps, per document: its metadata and status on one record,
// its K/V in blocks of `blockSize` tokens per (layer, kv head) (K bytes then
// V bytes, storage dtype), and the index artifacts of its methods per
// (method, layer, kv head). A document is `ready` only once every block and
// artifact is durable; a preload cut off midway is `incomplete`, never ready.
import type { ModelShape } from '../core/model.js';
import type { HostBudget } from './host-budget.js';
import type { KvSegment } from './kv-segment.js';

/** An answer a local store gives at once and a remote store later. */
export type MaybePromise<T> = T | Promise<T>;

export type DocumentStatus = 'loading' | 'ready' | 'incomplete';

export interface DocumentMeta {
  id: string;
  model: ModelShape;
  status: DocumentStatus;
  /** Tokens per layer (all equal once ready). */
  tokens: number;
  methods: string[];
  /** Prefill queries kept: one token in queryStride (absent in documents stored before it was recorded). */
  queryStride?: number;
  /** Tokens per cluster of the wave index (absent: the default). */
  clusterSize?: number;
  createdAt: string;
  sealedAt?: string;
}

export interface BlockWrite {
  layer: number;
  head: number;
  block: number;
  k: Uint8Array;
  v: Uint8Array;
}

export interface ArtifactWrite {
  method: string;
  layer: number;
  head: number;
  bytes: Uint8Array;
}

/** An artifact rewritten in place of the bytes it was read as (`was`). */
export interface ArtifactReplace extends ArtifactWrite {
  was: Uint8Array;
}

export interface DocumentStore {
  /** What the store is, for messages: "LMDB", "the Redis Cluster". */
  readonly name: string;
  /**
   * Whether loading documents' segments should be SharedArrayBuffer-backed:
   * the store then reads the blocks it is given in place, from another
   * thread, instead of copying them first.
   */
  readonly sharedSegments?: boolean;

  /** Every document's metadata (a remote store answers asynchronously: the thread serves other requests meanwhile). */
  list(): MaybePromise<DocumentMeta[]>;
  /** One document's metadata, as the store holds it now. */
  get(id: string): MaybePromise<DocumentMeta | undefined>;
  /** Records a new loading document, replacing any incomplete one of that id (conflict if another exists). */
  create(meta: DocumentMeta): Promise<void>;
  /**
   * Writes blocks of a loading document; resolves when the store has them
   * (a loading document is not durable until seal). The writes' views must
   * not change until it settles (they are a layer's appended rows, which
   * never do): a store may copy them off the event loop.
   */
  writeBlocks(doc: string, writes: BlockWrite[]): Promise<void>;
  /**
   * Writes the last blocks and the index artifacts, then the ready metadata,
   * and resolves only once all of it is durable.
   */
  seal(meta: DocumentMeta, tail: BlockWrite[], artifacts: ArtifactWrite[]): Promise<void>;
  /** Adds artifacts of a method built after seal (and its name to the metadata). */
  addArtifacts(id: string, method: string, artifacts: ArtifactWrite[]): Promise<void>;
  /**
   * Optional: rewrites artifacts of a ready document (an older format
   * converted: HeadIndexBuilder.upgrade) atomically, each only where the
   * store still holds the bytes it was read as; durable when it resolves,
   * to how many it wrote. A store without it keeps the older format (each
   * load converts it again).
   */
  replaceArtifacts?(id: string, method: string, artifacts: ArtifactReplace[]): Promise<number>;
  /** A method's artifacts for every (layer, head), or undefined if any is missing. */
  loadArtifacts(id: string, method: string, layers: number, heads: number): MaybePromise<Uint8Array[][] | undefined>;
  /**
   * Removes the document, its blocks and its artifacts (for every server
   * sharing the store). With `expect.createdAt`, only the document created
   * then: a store shared by servers compares and removes in one atomic step
   * (precondition_failed for another, not_found for none), where the
   * engine's check before it, in the document's queue, covers only requests
   * to this server; a local store may ignore it.
   */
  remove(id: string, expect?: { createdAt?: string }): Promise<void>;
  /** Reads a ready document's KV into one segment per layer, reserving its bytes in `budget`. */
  load(meta: DocumentMeta, budget: HostBudget): KvSegment[];
  /**
   * Optional: reads one layer of a ready document into `into` (capacity ≥
   * its tokens; shared when `sharedSegments`) without blocking the thread,
   * every block checked. A store that has it lets a server keep only some of
   * a document's layers in host memory and read the others on use (a remote
   * store, where a document may be larger than one server's budget).
   */
  readLayer?(meta: DocumentMeta, layer: number, into: KvSegment): Promise<void>;
  close(): Promise<void>;
}

/** A store once opened, and the documents it found cut off mid-preload and marked incomplete. */
export interface OpenedStore {
  store: DocumentStore;
  recovered: string[];
}
