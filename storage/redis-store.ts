// The Redis Cluster store (`--store redis://HOST:PORT[,HOST:PORT...]`):
// documents shared by every kvrecall server that names the same cluster.
// One server preloads and seals a document; the others see it `ready` and
// attach it, reading its blocks into their own host memory (within their
// host budget) on first use, each block checked against its checksum.
//
// Key layout and checksums: redis-format.ts. The cluster connection lives in
// a worker thread (redis-worker.ts); this class stages writes for it and
// blocks on it for the reads the engine makes synchronously (get, list,
// load: as an LMDB read blocks the thread), via redis-bridge.ts.
//
// A preload that dies leaves its document `loading` with a lease that
// nobody renews: once the lease's TTL passes, the next server to read the
// document marks it `incomplete` (and drops its blocks), on every server.
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore, OpenedStore } from './document-store.js';
import type { HostBudget } from './host-budget.js';
import { KvSegment } from './kv-segment.js';
import { WorkerBridge } from './redis-bridge.js';
import { parseRedisLocation, type RedisLocation, type StagedArtifact, type StagedBlock } from './redis-format.js';

/** Block bytes of one document handed to the cluster and not yet acknowledged, at most (beyond one upload's). */
const IN_FLIGHT = 64 * 2 ** 20;

/** A synchronous read (load) waits this long at most, plus its bytes' time (a failover takes failoverMs). */
const META_TIMEOUT_MS = 120_000;

export class RedisStore implements DocumentStore {
  readonly name = 'the Redis Cluster';
  /** Loading documents' segments are shared: the worker reads their blocks in place. */
  readonly sharedSegments = true;
  /** Bytes of one K (or V) row, per document this server creates. */
  private readonly rowBytes = new Map<string, number>();
  /** Per loading document: block writes not yet acknowledged, and the first failure. */
  private readonly writing = new Map<string, { pending: { done: Promise<void>; bytes: number }[]; error?: Error }>();

  private constructor(
    private readonly bridge: WorkerBridge,
    readonly location: RedisLocation,
  ) {}

  /**
   * Connects to the cluster and marks documents whose loader is gone
   * incomplete. `loseReply` (tests) names scripts whose first reply the
   * worker drops after the script ran, as a reset connection would, so that
   * it runs them again.
   */
  static async open(url: string, faults: { loseReply?: ('kvrCreate' | 'kvrSeal' | 'kvrRemove')[] } = {}): Promise<OpenedStore & { store: RedisStore }> {
    const location = parseRedisLocation(url);
    const owner = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
    const bridge = new WorkerBridge({ location, owner, loseReply: faults.loseReply });
    const store = new RedisStore(bridge, location);
    try {
      await bridge.call('open', undefined);
      const recovered = await bridge.call<string[]>('recover', undefined);
      return { store, recovered };
    } catch (e) {
      await bridge.close().catch(() => undefined);
      throw new Error(`cannot use the Redis Cluster at ${url}: ${(e as Error).message}`);
    }
  }

  // Metadata reads answer asynchronously: a round trip (or a failover's
  // retries, up to failoverMs) stalls only the request that waits for it.
  list(): Promise<DocumentMeta[]> {
    return this.bridge.call<DocumentMeta[]>('list', undefined);
  }

  get(id: string): Promise<DocumentMeta | undefined> {
    return this.bridge.call<DocumentMeta | undefined>('get', { id });
  }

  create(meta: DocumentMeta): Promise<void> {
    this.rowBytes.set(meta.id, meta.model.headDim * 2);
    this.writing.delete(meta.id);
    return this.bridge.call('create', { meta });
  }

  /**
   * Hands blocks to the worker and resolves once fewer than IN_FLIGHT bytes
   * of the document's writes are still unacknowledged by the cluster: the
   * next upload is read and appended while these are written. A write that
   * fails rejects the next writeBlocks (or the seal) of the document.
   */
  async writeBlocks(doc: string, writes: BlockWrite[]): Promise<void> {
    if (writes.length === 0) return;
    const rowBytes = this.rowBytes.get(doc);
    if (rowBytes === undefined) throw new Error(`document ${doc} was not created by this server`);
    const w = this.writing.get(doc) ?? { pending: [] };
    this.writing.set(doc, w);
    if (w.error) throw w.error;
    const bytes = writes.reduce((n, x) => n + x.k.byteLength + x.v.byteLength, 0);
    // Views of shared segments go as they are (the worker reads the rows in place: full blocks never change); others are copied.
    const inPlace = writes.every((x) => x.k.buffer instanceof SharedArrayBuffer && x.v.buffer instanceof SharedArrayBuffer);
    const call = inPlace
      ? this.bridge.call<void>('write', { id: doc, blocks: writes.map((x) => ({ layer: x.layer, head: x.head, block: x.block, n: x.k.byteLength / rowBytes, k: x.k, v: x.v })), rowBytes })
      : (() => {
          const { staging, blocks } = stageBlocks(writes, rowBytes, 0);
          return this.bridge.call<void>('write', { id: doc, staging: staging.buffer, blocks, rowBytes }, [staging.buffer as ArrayBuffer]);
        })();
    const done = call.catch((e: Error) => {
      w.error ??= e;
    });
    w.pending.push({ done, bytes });
    while (w.pending.reduce((n, p) => n + p.bytes, 0) > IN_FLIGHT) await w.pending.shift()!.done;
    if (w.error) throw w.error;
  }

  /** Waits for a document's writes in flight; rejects with the first that failed. */
  private async settled(doc: string): Promise<void> {
    const w = this.writing.get(doc);
    if (!w) return;
    await Promise.all(w.pending.map((p) => p.done));
    w.pending = [];
    if (w.error) throw w.error;
  }

  async seal(meta: DocumentMeta, tail: BlockWrite[], artifacts: ArtifactWrite[]): Promise<void> {
    await this.settled(meta.id);
    const extra = artifacts.reduce((n, a) => n + a.bytes.byteLength, 0);
    const rowBytes = meta.model.headDim * 2;
    const { staging, blocks, end } = stageBlocks(tail, rowBytes, extra);
    const staged = stageArtifacts(staging, end, artifacts);
    await this.bridge.call('seal', { meta, staging: staging.buffer, blocks, rowBytes, artifacts: staged }, [staging.buffer as ArrayBuffer]);
    // Only once sealed: a seal that fails leaves the document loading, and its next uploads write blocks as before
    // (forgotten here first, an upload after a failed seal failed the document: 'not created by this server').
    this.writing.delete(meta.id);
    this.rowBytes.delete(meta.id);
  }

  addArtifacts(id: string, method: string, artifacts: ArtifactWrite[]): Promise<void> {
    const staging = new Uint8Array(Math.max(1, artifacts.reduce((n, a) => n + a.bytes.byteLength, 0)));
    const staged = stageArtifacts(staging, 0, artifacts);
    return this.bridge.call('addArtifacts', { id, method, staging: staging.buffer, artifacts: staged }, [staging.buffer as ArrayBuffer]);
  }

  loadArtifacts(id: string, method: string, layers: number, heads: number): Promise<Uint8Array[][] | undefined> {
    return this.bridge.call<Uint8Array[][] | undefined>('loadArtifacts', { id, method, layers, heads });
  }

  /** With `expect.createdAt`, the worker's one script compares and removes: another server's document made again under the id stays (412). */
  async remove(id: string, expect: { createdAt?: string } = {}): Promise<void> {
    // Blocks still being written would land after the removal.
    await this.settled(id).catch(() => undefined);
    await this.bridge.call('remove', { id, createdAt: expect.createdAt });
    this.writing.delete(id);
    this.rowBytes.delete(id);
  }

  /**
   * One layer of a ready document, read by the worker straight into a
   * shared segment, every block checked (a damaged or missing block: 409;
   * the document replaced meanwhile: 409; the cluster unreachable past
   * failoverMs: 503 unavailable). The thread serves other requests meanwhile.
   */
  async readLayer(meta: DocumentMeta, layer: number, into: KvSegment): Promise<void> {
    if (!into.shared || into.capacity < meta.tokens) throw new RangeError(`layer ${layer} of ${meta.id} needs a shared segment of ${meta.tokens} tokens`);
    await this.bridge.call('load', { meta, layers: [layer], segments: [{ k: into.k, v: into.v }] });
  }

  /**
   * Reads a whole ready document into shared segments that the worker fills
   * directly; blocks this thread until every block is in and checked (tools
   * and benchmarks: the server reads layers on use, readLayer).
   */
  load(meta: DocumentMeta, budget: HostBudget): KvSegment[] {
    const { layers, kvHeads, headDim, dtype } = meta.model;
    const segments: KvSegment[] = [];
    try {
      for (let l = 0; l < layers; l++) segments.push(new KvSegment(kvHeads, headDim, dtype, Math.max(1, meta.tokens), budget, true));
      const bytes = meta.tokens * layers * kvHeads * headDim * 4;
      // Generous: the read itself retries through a failover for failoverMs per command.
      const timeout = META_TIMEOUT_MS + this.location.failoverMs * 4 + bytes / 2 ** 20;
      this.bridge.callSync('load', { meta, segments: segments.map((s) => ({ k: s.k, v: s.v })) }, timeout);
    } catch (e) {
      for (const s of segments) s.release();
      throw e;
    }
    for (const s of segments) s.setTokens(meta.tokens);
    return segments;
  }

  async close(): Promise<void> {
    await Promise.allSettled([...this.writing.keys()].map((id) => this.settled(id)));
    await this.bridge.close();
  }
}

/** Copies blocks' K then V into one buffer handed over whole, with `extra` bytes left at the end. */
function stageBlocks(writes: BlockWrite[], rowBytes: number, extra: number): { staging: Uint8Array; blocks: StagedBlock[]; end: number } {
  const total = writes.reduce((n, w) => n + w.k.byteLength + w.v.byteLength, 0);
  // Its own ArrayBuffer (not pooled, not zeroed): it is transferred to the worker.
  const staging = new Uint8Array(Buffer.allocUnsafeSlow(total + extra).buffer, 0, total + extra);
  const blocks: StagedBlock[] = [];
  let at = 0;
  for (const w of writes) {
    staging.set(w.k, at);
    staging.set(w.v, at + w.k.byteLength);
    blocks.push({ layer: w.layer, head: w.head, block: w.block, n: w.k.byteLength / rowBytes, at });
    at += w.k.byteLength + w.v.byteLength;
  }
  return { staging, blocks, end: at };
}

function stageArtifacts(staging: Uint8Array, from: number, artifacts: ArtifactWrite[]): StagedArtifact[] {
  let at = from;
  return artifacts.map((a) => {
    staging.set(a.bytes, at);
    const s = { method: a.method, layer: a.layer, head: a.head, at, bytes: a.bytes.byteLength };
    at += a.bytes.byteLength;
    return s;
  });
}
