// The LMDB store (the embedded default): document metadata, KV blocks and
// index artifacts in one local folder.
//
// Records:
//   meta   doc id                      -> DocumentMeta (msgpack)
//   blocks [doc, layer, head, block]   -> K bytes then V bytes of up to
//                                         blockSize tokens, storage dtype
//   artifacts [doc, method, layer, head] -> a retrieval method's index bytes
// A document is `ready` only when the transaction that writes its last
// blocks and its ready metadata has committed and been flushed. A document
// still `loading` when the store opens was cut off by a crash: its blocks
// are dropped and it is reported `incomplete`.
//
// The environment commits without syncing (noSync) and syncs once where a
// change must be durable (open's recovery, seal, added artifacts, delete):
// a loading document's block writes need no fsync of their own (it is not
// durable before seal), and a sync per commit held them to 0.26–0.28 GB/s
// on the 2-core VM against 0.83–1.06 GB/s without (16 MiB batches). LMDB
// stays consistent without sync (no write map): a system crash can lose
// only the commits after the last sync, a process crash none.
import { open, type Database, type RootDatabase } from 'lmdb';
import { copyViews } from '../addon/copy-ranges.js';
import { BufferPool } from './buffer-pool.js';
import type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore } from './document-store.js';
import type { HostBudget } from './host-budget.js';
import { KvSegment } from './kv-segment.js';

type BlockKey = [string, number, number, number];
type ArtifactKey = [string, string, number, number];

export class LmdbStore implements DocumentStore {
  readonly name = 'LMDB';
  private readonly root: RootDatabase;
  private readonly meta: Database<DocumentMeta, string>;
  private readonly blocks: Database<Buffer, BlockKey>;
  private readonly artifacts: Database<Buffer, ArtifactKey>;
  /** Block writes not yet committed, and the staging buffers their values sit in. */
  private readonly inflight = new Set<Promise<void>>();
  private readonly staging = new BufferPool(4);

  private constructor(path: string) {
    // noSubdir: false, or a folder name with a dot is taken for a file name.
    this.root = open({ path, maxDbs: 8, mapSize: 2 ** 40, noSubdir: false, noSync: true });
    this.meta = this.root.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' });
    this.blocks = this.root.openDB<Buffer, BlockKey>({ name: 'blocks', encoding: 'binary' });
    this.artifacts = this.root.openDB<Buffer, ArtifactKey>({ name: 'artifacts', encoding: 'binary' });
  }

  /** Opens (or creates) the store and marks crash-interrupted documents incomplete. */
  static async open(path: string): Promise<{ store: LmdbStore; recovered: string[] }> {
    const store = new LmdbStore(path);
    const recovered: string[] = [];
    for (const { value } of store.meta.getRange()) {
      if (value.status !== 'loading') continue;
      recovered.push(value.id);
      await store.dropBlocks(value.id);
      await store.meta.put(value.id, { ...value, status: 'incomplete', tokens: 0 });
    }
    await store.durable();
    return { store, recovered };
  }

  list(): DocumentMeta[] {
    return Array.from(this.meta.getRange(), ({ value }) => value);
  }

  get(id: string): DocumentMeta | undefined {
    return this.meta.get(id);
  }

  /** Records a new loading document, replacing any incomplete one of that id. */
  async create(meta: DocumentMeta): Promise<void> {
    await this.dropBlocks(meta.id);
    await this.meta.put(meta.id, meta);
  }

  /**
   * Writes blocks of a loading document; resolves when they are committed
   * (not yet flushed: a loading document is not durable until seal). The
   * values are laid out K then V in a staging buffer by the native pool;
   * LMDB's write thread copies them into the file from there, and the
   * buffer is reused once they are in.
   */
  writeBlocks(doc: string, writes: BlockWrite[]): Promise<void> {
    if (writes.length === 0) return Promise.resolve();
    const staging = this.staging.take(writes.reduce((n, w) => n + w.k.byteLength + w.v.byteLength, 0));
    const values: Buffer[] = [], src: Uint8Array[] = [], offsets: number[] = [];
    let at = 0;
    for (const w of writes) {
      values.push(staging.subarray(at, at + w.k.byteLength + w.v.byteLength));
      src.push(w.k, w.v);
      offsets.push(staging.byteOffset + at, staging.byteOffset + at + w.k.byteLength);
      at += w.k.byteLength + w.v.byteLength;
    }
    // Laid out off the event loop (a preload's 16 MiB per upload), then put in one batch. Every put
    // settles before the staging buffer is reused, failed ones included.
    // (copyViews checks its plan synchronously: a throw there must become this promise's rejection, the staging buffer given back.)
    const done: Promise<void> = Promise.resolve()
      .then(() => copyViews(src, new Uint8Array(staging.buffer), offsets))
      .then(() => Promise.allSettled(writes.map((w, i) => this.blocks.put([doc, w.layer, w.head, w.block], values[i]))))
      .then((results) => {
        const failed = results.find((r) => r.status === 'rejected');
        if (failed) throw failed.reason;
      })
      .finally(() => {
        this.inflight.delete(done);
        this.staging.give(staging);
      });
    this.inflight.add(done);
    return done;
  }

  /**
   * Writes the last blocks, the index artifacts and the ready metadata in
   * one transaction and waits until it is durable.
   */
  async seal(meta: DocumentMeta, tail: BlockWrite[], artifacts: ArtifactWrite[]): Promise<void> {
    await this.root.transaction(() => {
      for (const w of tail) this.blocks.put([meta.id, w.layer, w.head, w.block], concat(w.k, w.v));
      for (const a of artifacts) this.artifacts.put([meta.id, a.method, a.layer, a.head], Buffer.from(a.bytes));
      this.meta.put(meta.id, meta);
    });
    await this.durable();
  }

  /** Adds artifacts of a method built after seal (and its name to the metadata). */
  async addArtifacts(id: string, method: string, artifacts: ArtifactWrite[]): Promise<void> {
    await this.root.transaction(() => {
      for (const a of artifacts) this.artifacts.put([id, a.method, a.layer, a.head], Buffer.from(a.bytes));
      const meta = this.meta.get(id);
      if (meta && !meta.methods.includes(method)) this.meta.put(id, { ...meta, methods: [...meta.methods, method] });
    });
    await this.durable();
  }

  /** A method's artifacts for every (layer, head), or undefined if any is missing. */
  loadArtifacts(id: string, method: string, layers: number, heads: number): Uint8Array[][] | undefined {
    const out: Uint8Array[][] = [];
    for (let layer = 0; layer < layers; layer++) {
      const row: Uint8Array[] = [];
      for (let head = 0; head < heads; head++) {
        const bytes = this.artifacts.getBinary([id, method, layer, head]);
        if (!bytes) return undefined;
        row.push(new Uint8Array(bytes));
      }
      out.push(row);
    }
    return out;
  }

  async remove(id: string): Promise<void> {
    await this.meta.remove(id);
    await this.dropBlocks(id);
    await this.durable();
  }

  /** Reads a ready document's KV into one segment per layer. */
  load(meta: DocumentMeta, budget: HostBudget): KvSegment[] {
    const { layers, kvHeads, headDim, dtype, blockSize } = meta.model;
    const segments = Array.from({ length: layers }, () => new KvSegment(kvHeads, headDim, dtype, Math.max(1, meta.tokens), budget));
    const rowBytes = headDim * 2;
    for (const { key, value } of this.blocks.getRange({ start: [meta.id], end: [meta.id, layers] })) {
      const [, layer, head, block] = key;
      const n = value.byteLength / (2 * rowBytes);
      segments[layer].writeHead(head, value.subarray(0, n * rowBytes), value.subarray(n * rowBytes), n, block * blockSize);
    }
    for (const s of segments) s.setTokens(meta.tokens);
    return segments;
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.inflight);
    await this.root.close();
  }

  /** Every commit so far on disk (the environment does not sync per commit). */
  private async durable(): Promise<void> {
    await this.root.committed;
    // lmdb-js's sync(callback): mdb_env_sync(force) on a worker thread (not in its typings).
    const env = this.root as unknown as { sync(done: (err?: Error | null) => void): void };
    await new Promise<void>((resolve, reject) => env.sync((err) => (err ? reject(err) : resolve())));
  }

  private async dropBlocks(id: string): Promise<void> {
    const blocks = Array.from(this.blocks.getKeys({ start: [id], end: [id, Number.MAX_SAFE_INTEGER] }));
    const artifacts = Array.from(this.artifacts.getKeys({ start: [id], end: [id, '\uffff'] }));
    if (blocks.length + artifacts.length === 0) return;
    await this.root.transaction(() => {
      for (const k of blocks) this.blocks.remove(k);
      for (const k of artifacts) this.artifacts.remove(k);
    });
  }
}

function concat(a: Uint8Array, b: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(a.byteLength + b.byteLength);
  out.set(a, 0);
  out.set(b, a.byteLength);
  return out;
}
