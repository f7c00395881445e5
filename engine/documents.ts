// Fixed-context documents: created `loading`, filled layer by layer, sealed
// `ready` once (indexes built, everything durable in one transaction), then
// shared read-only by every session that attaches them.
import type { UploadStats } from '../core/upload-stats.js';
import { findMethod } from '../index/registry.js';
import { isStaleArtifact, type HeadIndex, type HeadIndexBuilder } from '../index/method.js';
import type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore } from '../storage/document-store.js';
import type { HostBudget } from '../storage/host-budget.js';
import { KvSegment } from '../storage/kv-segment.js';
import { buildArtifacts, loadIndexes, PrefillQueries } from './document-indexes.js';
import { conflict, invalid, notFound } from '../core/errors.js';
import { checkId } from '../core/ids.js';
import { parseKvUpload, type KvUpload } from './kv-input.js';
import { parseModel } from '../core/model.js';
import { keptTokens } from '../core/query-stride.js';
import { KeyedQueue } from '../core/serial.js';
import { elementBytes, toF32 } from '../core/tensor.js';

export interface LoadedDocument {
  meta: DocumentMeta;
  /** One read-only segment per layer. */
  layers: KvSegment[];
  /** Loaded indexes by method: [layer][kv head]. */
  indexes: Map<string, HeadIndex[][]>;
}

interface LoadingDocument {
  meta: DocumentMeta;
  layers: KvSegment[];
  /** Per layer: blocks handed to the store (committed once `writing` settles). */
  written: number[];
  /** The last batch of block writes, behind the upload that made it (never rejects). */
  writing: Promise<void>;
  /** Set when a block write failed: the document cannot be sealed. */
  writeError?: Error;
  queries: PrefillQueries;
  phase: 'loading' | 'building';
  /** Fraction of the index build done, while building. */
  progress: number;
}

export interface DocumentView extends DocumentMeta {
  bytes: number;
  phase: 'loading' | 'building' | 'ready' | 'incomplete';
  progress?: number;
}

export const DEFAULT_QUERY_STRIDE = 4;

const MAX_TOKENS_HINT = 2 ** 31;
const now = () => performance.now();

export class Documents {
  private readonly loading = new Map<string, LoadingDocument>();
  private readonly ready = new Map<string, LoadedDocument>();
  private readonly queue = new KeyedQueue();

  constructor(
    private readonly store: DocumentStore,
    private readonly knownMethods: ReadonlySet<string>,
    private readonly budget: HostBudget,
  ) {}

  create(idRaw: string, body: Record<string, unknown>): Promise<DocumentView> {
    const id = checkId(idRaw, 'document');
    const model = parseModel(body.model);
    const methods = this.parseMethods(body.methods);
    const clusterSize = body.clusterSize;
    if (clusterSize !== undefined && (typeof clusterSize !== 'number' || !Number.isInteger(clusterSize) || clusterSize < 1 || clusterSize > 4096))
      throw invalid('clusterSize must be an integer in [1, 4096]');
    const stride = body.queryStride ?? DEFAULT_QUERY_STRIDE;
    if (typeof stride !== 'number' || !Number.isInteger(stride) || stride < 1) throw invalid('queryStride must be a positive integer');
    const hint = body.tokens ?? 0;
    if (typeof hint !== 'number' || !Number.isInteger(hint) || hint < 0 || hint > MAX_TOKENS_HINT)
      throw invalid(`tokens (the tokens per layer to reserve memory for) must be an integer in [0, ${MAX_TOKENS_HINT}]`);
    return this.queue.run(id, async () => {
      const existing = this.store.get(id);
      if (existing && existing.status !== 'incomplete')
        throw conflict(`document ${id} already exists (${existing.status}); DELETE it first`);
      // Memory first: a document refused for its size leaves nothing behind.
      const layers: KvSegment[] = [];
      try {
        // With a tokens hint the memory is reserved now, whole (no regrowth while uploading, no trim at seal).
        for (let l = 0; l < model.layers; l++) layers.push(new KvSegment(model.kvHeads, model.headDim, model.dtype, hint || undefined, this.budget, this.store.sharedSegments));
      } catch (e) {
        for (const s of layers) s.release();
        throw e;
      }
      const meta: DocumentMeta = { id, model, status: 'loading', tokens: 0, methods, queryStride: stride, ...(clusterSize !== undefined && { clusterSize }), createdAt: new Date().toISOString() };
      try {
        await this.store.create(meta);
      } catch (e) {
        for (const s of layers) s.release();
        throw e;
      }
      this.loading.set(id, {
        meta,
        layers,
        written: new Array<number>(model.layers).fill(0),
        writing: Promise.resolve(),
        queries: new PrefillQueries(model, stride),
        phase: 'loading',
        progress: 0,
      });
      return this.get(id);
    });
  }

  /**
   * Appends one upload to a layer. Its full blocks are written to the store
   * behind the answer: the next upload of the document (or the seal) waits
   * for them, so one batch is in flight while the next request is read and
   * checked. A loading document is not durable before seal anyway.
   */
  appendKv(idRaw: string, body: Record<string, unknown>, times?: { bytes: number; readMs: number; decodeMs: number }): Promise<{ layer: number; tokens: number; stats: UploadStats }> {
    const id = checkId(idRaw, 'document');
    const t0 = now();
    return this.queue.run(id, async () => {
      const t1 = now();
      const doc = this.loadingDoc(id);
      if (doc.writeError) throw doc.writeError;
      const up = parseKvUpload(body, doc.meta.model, doc.queries.stride);
      const t2 = now();
      const seg = doc.layers[up.layer];
      if (up.start !== seg.tokens)
        throw conflict(`layer ${up.layer} of document ${id} holds ${seg.tokens} tokens; the next upload must start there, not at ${up.start}`);
      seg.append(up.k.data, up.v.data, up.k.dtype, up.tokens);
      if (up.q) keepQueries(doc.queries, up);
      const t3 = now();
      await doc.writing;
      if (doc.writeError) throw doc.writeError;
      const B = doc.meta.model.blockSize;
      const full = Math.floor(seg.tokens / B);
      doc.writing = this.store.writeBlocks(id, blockWrites(seg, up.layer, doc.written[up.layer], full, B)).catch((e: Error) => {
        doc.writeError = new Error(`document ${id}: writing its blocks to ${this.store.name} failed (${e.message}); DELETE it and upload it again`);
      });
      doc.written[up.layer] = full;
      const stats: UploadStats = {
        bytes: times?.bytes ?? 0,
        readMs: times?.readMs ?? 0,
        decodeMs: times?.decodeMs ?? 0,
        queueMs: t1 - t0,
        checkMs: t2 - t1,
        appendMs: t3 - t2,
        writeMs: now() - t3,
      };
      return { layer: up.layer, tokens: seg.tokens, stats };
    });
  }

  seal(idRaw: string): Promise<DocumentView> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      const doc = this.loadingDoc(id);
      await doc.writing;
      if (doc.writeError) throw doc.writeError;
      const counts = doc.layers.map((s) => s.tokens);
      if (counts[0] === 0) throw conflict(`document ${id} has no tokens to seal`);
      const odd = counts.findIndex((c) => c !== counts[0]);
      if (odd >= 0) throw conflict(`document ${id}: layer ${odd} holds ${counts[odd]} tokens, layer 0 holds ${counts[0]}`);
      for (const s of doc.layers) s.shrinkToFit();

      doc.phase = 'building';
      const artifacts: ArtifactWrite[] = [];
      const total = doc.meta.methods.length * doc.meta.model.layers * doc.meta.model.kvHeads;
      // Methods that share a builder (nosa and topk-blocks: block summaries) share its artifacts:
      // build() sees only the keys and queries, so one build serves every such method.
      const built = new Map<HeadIndexBuilder, ArtifactWrite[]>();
      for (const name of doc.meta.methods) {
        const builder = findMethod(name)?.builder;
        if (!builder) continue;
        const before = artifacts.length;
        const same = built.get(builder);
        const mine = same
          ? same.map((a) => ({ ...a, method: name }))
          : await buildArtifacts(name, builder, doc.layers, doc.queries, (n) => (doc.progress = (before + n) / total), doc.meta.clusterSize);
        if (!same) built.set(builder, mine);
        artifacts.push(...mine);
        doc.progress = artifacts.length / total;
      }

      const B = doc.meta.model.blockSize;
      const tail = doc.layers.flatMap((seg, layer) => blockWrites(seg, layer, doc.written[layer], Math.ceil(seg.tokens / B), B));
      const meta: DocumentMeta = { ...doc.meta, status: 'ready', tokens: counts[0], sealedAt: new Date().toISOString() };
      await this.store.seal(meta, tail, artifacts);
      this.loading.delete(id);
      this.ready.set(id, { meta, layers: doc.layers, indexes: new Map() });
      return this.get(id);
    });
  }

  get(idRaw: string): DocumentView {
    const id = checkId(idRaw, 'document');
    const loading = this.loading.get(id);
    if (loading)
      return {
        ...view(loading.meta),
        tokens: Math.min(...loading.layers.map((s) => s.tokens)),
        phase: loading.phase,
        ...(loading.phase === 'building' && { progress: loading.progress }),
      };
    const meta = this.store.get(id);
    if (!meta) throw notFound(`document ${id} does not exist`);
    return view(meta);
  }

  list(): DocumentView[] {
    return this.store.list().map((m) => (this.loading.has(m.id) ? this.get(m.id) : view(m)));
  }

  remove(idRaw: string): Promise<void> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      if (!this.store.get(id)) throw notFound(`document ${id} does not exist`);
      // Blocks still being written would land after the drop.
      await this.loading.get(id)?.writing;
      await this.store.remove(id);
      for (const s of this.loading.get(id)?.layers ?? this.ready.get(id)?.layers ?? []) s.release();
      this.loading.delete(id);
      this.ready.delete(id);
    });
  }

  /**
   * A ready document's KV: from memory, else read from the store (on first
   * use after a restart, or a document another server sealed in a shared
   * store). What is in memory is checked against the store first: a
   * document deleted or replaced through another server is not served.
   */
  acquire(idRaw: string): LoadedDocument {
    const id = checkId(idRaw, 'document');
    const loading = this.loading.get(id)?.meta;
    const meta = loading ?? this.store.get(id);
    const cached = this.ready.get(id);
    if (cached && meta && meta.status === 'ready' && meta.createdAt === cached.meta.createdAt) return cached;
    if (cached) {
      for (const s of cached.layers) s.release();
      this.ready.delete(id);
    }
    if (!meta) throw notFound(`document ${id} does not exist`);
    if (meta.status !== 'ready') throw conflict(`document ${id} is ${meta.status}, not ready`);
    const doc = { meta, layers: this.store.load(meta, this.budget), indexes: new Map() };
    this.ready.set(id, doc);
    return doc;
  }

  /**
   * A method's indexes of a ready document: from memory, else loaded from
   * LMDB, else (the document was sealed without that method) built now and
   * stored, once.
   */
  indexes(doc: LoadedDocument, method: string): Promise<HeadIndex[][]> {
    return this.queue.run(doc.meta.id, async () => {
      const cached = doc.indexes.get(method);
      if (cached) return cached;
      const builder = findMethod(method)?.builder;
      if (!builder) throw invalid(`method ${method} does not index documents`);
      const { layers, kvHeads } = doc.meta.model;
      const rebuild = async () => {
        const built = await buildArtifacts(method, builder, doc.layers, undefined, () => undefined, doc.meta.clusterSize);
        await this.store.addArtifacts(doc.meta.id, method, built);
        this.buildsAfterSeal++;
        return doc.layers.map((_, layer) => built.filter((a) => a.layer === layer).map((a) => a.bytes));
      };
      const artifacts = this.store.loadArtifacts(doc.meta.id, method, layers, kvHeads) ?? (await rebuild());
      let loaded: HeadIndex[][];
      try {
        loaded = loadIndexes(builder, doc.layers, artifacts);
      } catch (e) {
        // An artifact of an older format (this build reads only its own): rebuilt from the keys and stored once.
        if (!isStaleArtifact(e)) throw e;
        loaded = loadIndexes(builder, doc.layers, await rebuild());
      }
      doc.indexes.set(method, loaded);
      return loaded;
    });
  }

  /** Index builds that happened at attach rather than at seal (for tests and metrics). */
  buildsAfterSeal = 0;

  private loadingDoc(id: string): LoadingDocument {
    const doc = this.loading.get(id);
    if (doc) {
      if (doc.phase === 'building') throw conflict(`document ${id} is being sealed`);
      return doc;
    }
    const meta = this.store.get(id);
    if (!meta) throw notFound(`document ${id} does not exist`);
    if (meta.status === 'ready') throw conflict(`document ${id} is sealed; its KV cannot change`);
    throw conflict(`document ${id} is ${meta.status}; PUT it again to restart its preload`);
  }

  private parseMethods(x: unknown): string[] {
    if (x === undefined) return [];
    if (!Array.isArray(x) || x.some((m) => typeof m !== 'string' || !this.knownMethods.has(m)))
      throw invalid(`methods must be a list of: ${[...this.knownMethods].join(', ')}`);
    return [...new Set(x as string[])];
  }
}

function view(meta: DocumentMeta): DocumentView {
  const m = meta.model;
  return { ...meta, bytes: meta.tokens * m.layers * m.kvHeads * m.headDim * 2 * 2, phase: meta.status };
}

/**
 * Keeps an upload's prefill queries of the tokens t with t % stride == 0,
 * converting only those rows to f32.
 */
function keepQueries(queries: PrefillQueries, up: KvUpload): void {
  const q = up.q!;
  if (up.qStride !== undefined || queries.stride === 1) {
    // q already holds only the kept rows (or every row is kept).
    const rows = q.shape[1];
    if (up.qStride !== undefined) queries.addKept(up.layer, toF32(q), rows);
    else queries.add(up.layer, up.start, toF32(q), up.tokens);
    return;
  }
  const [heads, n, d] = q.shape;
  const { first, count } = keptTokens(up.start, n, queries.stride);
  if (count === 0) return;
  const row = d * elementBytes(q.dtype);
  const picked = new Uint8Array(heads * count * row);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < count; i++) {
      const src = (h * n + first + i * queries.stride) * row;
      picked.set(q.data.subarray(src, src + row), (h * count + i) * row);
    }
  queries.addKept(up.layer, toF32({ dtype: q.dtype, shape: [heads, count, d], data: picked }), count);
}

function blockWrites(seg: KvSegment, layer: number, from: number, to: number, B: number): BlockWrite[] {
  const writes: BlockWrite[] = [];
  for (let block = from; block < to; block++)
    for (let head = 0; head < seg.kvHeads; head++) {
      const rows = seg.rows(head, block * B, Math.min(seg.tokens, (block + 1) * B));
      writes.push({ layer, head, block, ...rows });
    }
  return writes;
}
