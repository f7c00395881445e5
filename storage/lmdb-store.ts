// The LMDB store (the embedded default): document metadata, KV blocks and
// index artifacts in one local folder.
//
// Records:
//   meta   doc id                      -> DocumentMeta (msgpack)
//   blocks [doc, layer, head, block]   -> K bytes then V bytes of up to
//                                         blockSize tokens, storage dtype
//   artifacts [doc, method, layer, head] -> a retrieval method's index bytes
// Metadata is in the main environment. A document's blocks are in
// environments of its own (`lmdb-doc-envs.ts`: `docs/<key>/<i>/`, spread
// over several writers) and its artifacts in one more
// (`docs/<key>/artifacts/`), removed whole with it; a store written before
// that keeps blocks in the main environment and `blocks-<i>/` shards
// (`lmdb-shards.ts`) and artifacts in the main environment, read and
// dropped there, never written. A document is `ready` only once every one
// of its blocks and artifacts is committed and flushed, and then the
// transaction that writes its ready metadata has been. A document still
// `loading` when the store opens was cut off by a crash: its blocks are
// dropped and it is reported `incomplete`.
//
// Every environment commits without syncing (noSync) and syncs once where a
// change must be durable (open's recovery, seal, added artifacts, delete):
// a loading document's block writes need no fsync of their own (it is not
// durable before seal), and a sync per commit held them to 0.26–0.28 GB/s
// on the 2-core VM against 0.83–1.06 GB/s without (16 MiB batches). A
// process crash loses no commit. A system crash (power) can undo the commits
// after the last sync, and LMDB's own documentation of MDB_NOSYNC allows
// worse where the file system does not keep write order: the syncs bound
// what a system crash can reach, not make every unsynced commit safe.
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { open, type Database, type RootDatabase } from 'lmdb';
import { copyViews } from '../addon/copy-ranges.js';
import { writeBackDrop } from '../addon/file-pages.js';
import { crashPoint } from '../core/crash-point.js';
import { BufferPool } from './buffer-pool.js';
import type { ArtifactReplace, ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore } from './document-store.js';
import type { HostBudget } from './host-budget.js';
import { KvSegment } from './kv-segment.js';
import { ArtifactEnv, DocumentEnvs, documentFolder, documentKey, documentKeys, removeDocumentFolder, type ArtifactKey } from './lmdb-doc-envs.js';
import { BlockShards, blockShard, checkShardCount, documentBlocks, syncEnv, type BlockKey } from './lmdb-shards.js';

export interface LmdbStoreOptions {
  /** Environments a new document's blocks are spread over. Default: defaultShards(). */
  shards?: number;
  /** Threads of libuv's pool (UV_THREADPOOL_SIZE as the process started), for the default shard count. */
  threadPool?: number;
  /**
   * Bytes of a loading document's blocks committed between write-backs of
   * its files (written, waited for and dropped from the page cache; one at
   * a time a document); 0 (the default): none, every block stays in the
   * page cache until seal. WRITE_BACK_BYTES is the value measured.
   */
  writeBack?: number;
}

/**
 * With `writeBack` set (this is the value measured), a loading document's
 * files are written back and dropped from the page cache each time this
 * much more of its blocks is committed. It is off by default: on the
 * 16-core GPU host it slowed the upload (1M tokens x 2 layers: 1.96-2.68
 * GB/s against 2.49-3.01 without; 262K: 1.85-2.33 against 2.41-3.18;
 * bench/results/preload-h100-rounds-*wb*.md), where its disk writes
 * compete with the upload's; it pays on a host whose freshly touched
 * memory is dear, as the 2-core VM's is. Without it a
 * preload's blocks sat in the page cache until the seal's sync, a fresh
 * page cache as large as the document (8.6 GB at 1M tokens x 2 layers),
 * and past the first few GB each page's first write cost 2-3 s of system
 * CPU a GB on the 2-core VM (memory its balloon had reported free to the
 * host: bench/results/preload-writeback-vm.md), in the LMDB commit the next
 * upload waits for. The seal's sync then has little left to flush.
 */
export const WRITE_BACK_BYTES = 2 ** 28;

/**
 * One writer per 4 cores, at most 8, and 2 fewer than libuv's pool has
 * threads (`pool`: UV_THREADPOOL_SIZE as the process started, default 4):
 * a shard's commit holds a pool thread while it runs, and an upload's
 * copies and the segments' prefault need theirs beside the writers.
 */
export function defaultShards(cores = availableParallelism(), pool = 4): number {
  return Math.max(1, Math.min(8, Math.floor(cores / 4), pool - 2));
}

export class LmdbStore implements DocumentStore {
  readonly name = 'LMDB';
  private readonly root: RootDatabase;
  private readonly meta: Database<DocumentMeta, string>;
  private readonly blocks: Database<Buffer, BlockKey>;
  /** Artifacts as a store written before per-document environments holds them. */
  private readonly artifacts: Database<Buffer, ArtifactKey>;
  /** Blocks as a store written before per-document environments holds them. */
  private readonly shards: BlockShards;
  /** Environments of the documents being loaded (opened at their first write, closed at seal or delete). */
  private readonly writing = new Map<string, DocumentEnvs>();
  /**
   * By document: its environments being closed (and its artifact environment in use), awaited before its folder
   * may go or open again. Per document, so a new document's first write does not wait for another's artifacts
   * (a 256 MiB artifact write held a create + first write ~1 s on the 2-core VM).
   */
  private readonly closing = new Map<string, Set<Promise<void>>>();
  /** Block writes not yet committed, and the staging buffers their values sit in. */
  private readonly inflight = new Set<Promise<void>>();
  private readonly staging = new BufferPool(4);
  /** By loading document: bytes committed since its files' last write-back, and whether one runs. */
  private readonly unwritten = new Map<string, { bytes: number; running: boolean }>();
  /** Write-backs done (every file written and dropped), for tests and benches. */
  private writeBacksDone = 0;

  private constructor(
    private readonly path: string,
    /** Environments a new document's blocks are spread over. */
    readonly shardCount: number,
    /** Bytes between a loading document's write-backs (0: none). */
    private readonly writeBack = 0,
  ) {
    checkShardCount(shardCount);
    // noSubdir: false, or a folder name with a dot is taken for a file name.
    this.root = open({ path, maxDbs: 8, mapSize: 2 ** 40, noSubdir: false, noSync: true });
    this.meta = this.root.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' });
    this.blocks = this.root.openDB<Buffer, BlockKey>({ name: 'blocks', encoding: 'binary' });
    this.artifacts = this.root.openDB<Buffer, ArtifactKey>({ name: 'artifacts', encoding: 'binary' });
    try {
      this.shards = BlockShards.open(path, this.blocks);
    } catch (e) {
      void this.root.close();
      throw e;
    }
  }

  /**
   * Opens (or creates) the store and marks crash-interrupted documents
   * incomplete; removes document folders no metadata names (a delete the
   * file system lost). A store written before per-document environments
   * opens as it is: its blocks are read where they are.
   */
  static async open(path: string, opts: LmdbStoreOptions = {}): Promise<{ store: LmdbStore; recovered: string[] }> {
    const store = new LmdbStore(path, opts.shards ?? defaultShards(undefined, opts.threadPool), opts.writeBack);
    const recovered: string[] = [];
    try {
      for (const { value } of store.meta.getRange()) {
        if (value.status === 'loading') {
          recovered.push(value.id);
          await store.dropBlocks(value.id, { ...value, status: 'incomplete', tokens: 0 });
        } else if (value.status === 'incomplete' && store.hasBlocks(value.id)) await store.dropBlocks(value.id); // a delete cut off by a crash
      }
      const named = new Set(Array.from(store.meta.getKeys(), (id) => documentKey(id)));
      for (const key of documentKeys(path)) if (!named.has(key)) await removeDocumentFolder(path, key);
      await store.durable();
    } catch (e) {
      await store.close(); // every environment, so that a retry can open them again
      throw e;
    }
    return { store, recovered };
  }

  /** Write-backs of loading documents' files done so far (every file written and dropped). */
  get writeBacks(): number {
    return this.writeBacksDone;
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
    const kvHeads = this.meta.get(doc)?.model.kvHeads ?? 1;
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
      .then(async () => {
        const envs = await this.writingEnvs(doc);
        return Promise.allSettled(writes.map((w, i) => this.blockDb(envs, w, kvHeads).put([doc, w.layer, w.head, w.block], values[i])));
      })
      .then((results) => {
        const failed = results.find((r) => r.status === 'rejected');
        if (failed) throw failed.reason;
        this.wrote(doc, at);
      })
      .finally(() => {
        this.inflight.delete(done);
        this.staging.give(staging);
      });
    this.inflight.add(done);
    return done;
  }

  /**
   * Writes the last blocks and the index artifacts, and flushes the
   * document's environments (their earlier blocks too); only then the
   * ready metadata in a main transaction, and waits until it is durable. A
   * crash at any point leaves the document `loading` on disk, or ready
   * with every block and artifact. Its environments are closed after.
   */
  async seal(meta: DocumentMeta, tail: BlockWrite[], artifacts: ArtifactWrite[]): Promise<void> {
    const envs = await this.writingEnvs(meta.id);
    const blocks = Promise.all(tail.map((w) => this.blockDb(envs, w, meta.model.kvHeads).put([meta.id, w.layer, w.head, w.block], concat(w.k, w.v)))).then(() => envs.sync());
    // Both settle before a failure is answered: nothing of this seal still writes when a retry (or a delete) begins.
    const written = await Promise.allSettled([blocks, this.writeArtifacts(meta.id, artifacts)]);
    for (const r of written) if (r.status === 'rejected') throw r.reason;
    crashPoint('seal:others-synced');
    await this.meta.put(meta.id, meta);
    crashPoint('seal:committed');
    await this.durable();
    await this.closeEnvs(meta.id);
  }

  /**
   * Adds artifacts of a method built after seal (and its name to the
   * metadata), or rewrites a stale one's: flushed in the document's
   * artifact environment before the metadata names the method. Of a
   * document that is not ready (deleted meanwhile), nothing is written.
   */
  async addArtifacts(id: string, method: string, artifacts: ArtifactWrite[]): Promise<void> {
    if (this.meta.get(id)?.status !== 'ready') return;
    await this.writeArtifacts(id, artifacts);
    const meta = this.meta.get(id);
    if (meta && !meta.methods.includes(method)) {
      await this.meta.put(id, { ...meta, methods: [...meta.methods, method] });
      await this.durable();
    }
  }

  /**
   * Rewrites artifacts in one transaction of the document's artifact
   * environment (a crash leaves every one old or every one new, each
   * loadable), each only where the store still holds `was`: of two rewrites
   * of the same bytes the second writes nothing. Flushed before it resolves.
   */
  async replaceArtifacts(id: string, method: string, artifacts: ArtifactReplace[]): Promise<number> {
    if (this.meta.get(id)?.status !== 'ready' || artifacts.length === 0) return 0;
    const env = ArtifactEnv.create(this.path, id, artifacts.reduce((n, a) => n + a.bytes.byteLength, 0));
    const done = env.db
      .transaction(() => {
        let written = 0;
        for (const a of artifacts) {
          const key: ArtifactKey = [id, method, a.layer, a.head];
          // A store written before per-document environments holds it in the main one: the rewrite goes to the document's, read first.
          const now = env.db.getBinary(key) ?? this.artifacts.getBinary(key);
          if (!now || !Buffer.from(a.was.buffer, a.was.byteOffset, a.was.byteLength).equals(now)) continue;
          crashPoint('artifacts:replacing');
          void env.db.put(key, Buffer.from(a.bytes.buffer, a.bytes.byteOffset, a.bytes.byteLength));
          written++;
        }
        return written;
      })
      .then(async (written) => {
        crashPoint('artifacts:replaced');
        if (written > 0) await env.sync();
        return written;
      });
    this.track(id, done.then(() => env.close(), () => env.close()));
    return done;
  }

  /**
   * A method's artifacts for every (layer, head), or undefined if any is
   * missing: from the document's artifact environment, else (a store
   * written before it) the main environment's.
   */
  loadArtifacts(id: string, method: string, layers: number, heads: number): Uint8Array[][] | undefined {
    const own = ArtifactEnv.existing(this.path, id);
    try {
      const out: Uint8Array[][] = [];
      for (let layer = 0; layer < layers; layer++) {
        const row: Uint8Array[] = [];
        for (let head = 0; head < heads; head++) {
          const key: ArtifactKey = [id, method, layer, head];
          // Copied: getBinary's bytes are valid until the next read, and the environment closes.
          const bytes = own?.db.getBinary(key) ?? this.artifacts.getBinary(key);
          if (!bytes) return undefined;
          row.push(new Uint8Array(bytes));
        }
        out.push(row);
      }
      return out;
    } finally {
      if (own) this.track(id, own.close());
    }
  }

  /**
   * The document is marked incomplete (durably) before its blocks go: a
   * crash midway leaves an incomplete document, whose leftover blocks the
   * next open drops, never a ready one missing blocks.
   */
  async remove(id: string): Promise<void> {
    const meta = this.meta.get(id);
    await this.dropBlocks(id, meta && { ...meta, status: 'incomplete', tokens: 0 });
    await this.meta.remove(id);
    await this.durable();
  }

  /** Reads a ready document's KV into one segment per layer, from its environments (or an older store's shards); refuses one missing blocks. */
  load(meta: DocumentMeta, budget: HostBudget): KvSegment[] {
    const { layers, kvHeads, headDim, dtype, blockSize } = meta.model;
    const segments: KvSegment[] = [];
    const rowBytes = headDim * 2;
    let found = 0;
    let own: DocumentEnvs | undefined;
    try {
      // In the try: a layer refused for the budget (503) gives back the layers reserved before it.
      for (let l = 0; l < layers; l++) segments.push(new KvSegment(kvHeads, headDim, dtype, Math.max(1, meta.tokens), budget));
      own = DocumentEnvs.existing(this.path, meta.id);
      for (const db of [...(own?.all() ?? []), ...this.shards.all()])
        for (const { key, value } of db.getRange({ start: [meta.id], end: [meta.id, layers] })) {
          const [, layer, head, block] = key;
          const n = value.byteLength / (2 * rowBytes);
          segments[layer].writeHead(head, value.subarray(0, n * rowBytes), value.subarray(n * rowBytes), n, block * blockSize);
          found++;
        }
    } catch (e) {
      // A reservation refused, an environment that does not open (or a read that fails): the document's reservation goes back.
      for (const s of segments) s.release();
      throw e;
    } finally {
      if (own) this.track(meta.id, own.close());
    }
    const expected = layers * kvHeads * Math.ceil(meta.tokens / blockSize);
    if (found !== expected) {
      for (const s of segments) s.release();
      const where = own ? `${own.all().length} environment(s) in ${own.folder}` : `no folder ${documentFolder(this.path, meta.id)}`;
      throw new Error(`document ${meta.id}: ${found} of its ${expected} KV blocks are in the LMDB store (${where}: is an environment's folder missing?)`);
    }
    for (const s of segments) s.setTokens(meta.tokens);
    return segments;
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.inflight);
    for (const id of [...this.writing.keys()]) await this.closeEnvs(id);
    await Promise.allSettled([...this.closing.values()].flatMap((c) => [...c]));
    await this.shards.close();
    await this.root.close();
  }

  /** The document's own environments for writing, opened at its first write. */
  private async writingEnvs(id: string): Promise<DocumentEnvs> {
    let envs = this.writing.get(id);
    if (!envs) {
      await this.closed(id); // a reader's close of this folder may be under way
      envs = this.writing.get(id) ?? DocumentEnvs.create(this.path, id, this.shardCount);
      this.writing.set(id, envs);
    }
    return envs;
  }

  /**
   * Counts a document's committed bytes and, past `writeBack` since the
   * last, writes its files back and drops their pages (one at a time a
   * document, not awaited by its uploads). Tracked as its environments'
   * closing is, so no delete removes the folder under it; advisory, so a
   * failure only leaves the pages cached.
   */
  private wrote(id: string, bytes: number): void {
    if (this.writeBack <= 0) return;
    const envs = this.writing.get(id);
    if (!envs) return;
    let u = this.unwritten.get(id);
    if (!u) this.unwritten.set(id, (u = { bytes: 0, running: false }));
    u.bytes += bytes;
    if (u.running || u.bytes < this.writeBack) return;
    const state = u;
    state.bytes = 0;
    state.running = true;
    this.track(
      id,
      writeBackDrop(envs.files()).then(
        (all) => {
          state.running = false;
          if (all) this.writeBacksDone++;
        },
        () => void (state.running = false),
      ),
    );
  }

  /** The database a block is written to: of its document's environments, by the spread of `blockShard`. */
  private blockDb(envs: DocumentEnvs, w: BlockWrite, kvHeads: number): Database<Buffer, BlockKey> {
    return envs.db(blockShard(w.layer, w.head, w.block, kvHeads, this.shardCount));
  }

  private async closeEnvs(id: string): Promise<void> {
    const envs = this.writing.get(id);
    this.writing.delete(id);
    this.unwritten.delete(id);
    if (envs) await envs.close();
  }

  /**
   * Writes artifacts into the document's artifact environment (made at its
   * first) and flushes it; tracked until it is closed, so that no delete
   * removes the folder under it.
   */
  private async writeArtifacts(id: string, artifacts: ArtifactWrite[]): Promise<void> {
    if (artifacts.length === 0) return;
    const env = ArtifactEnv.create(this.path, id, artifacts.reduce((n, a) => n + a.bytes.byteLength, 0));
    // Views, not copies: a build's bytes do not change once it returns.
    const view = (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength);
    const done = Promise.all(artifacts.map((a) => env.db.put([id, a.method, a.layer, a.head], view(a.bytes)))).then(() => env.sync());
    this.track(id, done.then(() => env.close(), () => env.close()));
    await done;
  }

  private track(id: string, closing: Promise<void>): void {
    let of = this.closing.get(id);
    if (!of) this.closing.set(id, (of = new Set()));
    const set = of;
    const p = closing.finally(() => {
      set.delete(p);
      if (set.size === 0 && this.closing.get(id) === set) this.closing.delete(id);
    });
    set.add(p);
  }

  /** Until the document's environments in closing (or in use by an artifact write) are closed. */
  private async closed(id: string): Promise<void> {
    const of = this.closing.get(id);
    if (of) await Promise.allSettled([...of]);
  }

  private hasBlocks(id: string): boolean {
    if (existsSync(documentFolder(this.path, id))) return true;
    // getKeysCount ignores `limit`: the first key found is enough.
    return this.shards.all().some((db) => {
      for (const _ of db.getKeys({ ...documentBlocks(id), limit: 1 })) return true;
      return false;
    });
  }

  /** Every commit so far on disk, every shard's (no environment syncs per commit). */
  private async durable(): Promise<void> {
    await this.shards.syncOthers();
    await syncEnv(this.root);
  }

  /**
   * Drops a document's blocks and artifacts. With `marked`, that metadata
   * is first put and flushed with the main environment's drop, before the
   * document's folder and other shards' blocks go: no crash leaves the old
   * metadata over blocks some environment has lost.
   */
  private async dropBlocks(id: string, marked?: DocumentMeta): Promise<void> {
    const blocks = Array.from(this.blocks.getKeys(documentBlocks(id)));
    const artifacts = Array.from(this.artifacts.getKeys({ start: [id], end: [id, '\uffff'] }));
    if (marked || blocks.length + artifacts.length > 0)
      await this.root.transaction(() => {
        for (const k of blocks) this.blocks.remove(k);
        for (const k of artifacts) this.artifacts.remove(k);
        if (marked) this.meta.put(id, marked);
      });
    if (marked) {
      await syncEnv(this.root);
      crashPoint('drop:marked');
    }
    await this.closeEnvs(id);
    await this.closed(id);
    await removeDocumentFolder(this.path, documentKey(id));
    await this.shards.dropOthers(id);
    if (marked) {
      crashPoint('drop:others-dropped');
      await this.shards.syncOthers();
    }
  }
}

function concat(a: Uint8Array, b: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(a.byteLength + b.byteLength);
  out.set(a, 0);
  out.set(b, a.byteLength);
  return out;
}
