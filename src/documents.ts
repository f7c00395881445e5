// Fixed-context documents: created `loading`, filled layer by layer, sealed
// `ready` once (indexes built, everything durable in one transaction), then
// shared read-only by every session that attaches them.
import { findMethod } from '../index/registry.js';
import type { HeadIndex } from '../index/method.js';
import type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore } from '../storage/store.js';
import type { HostBudget } from '../storage/host-budget.js';
import { KvSegment } from '../storage/kv-segment.js';
import { buildArtifacts, loadIndexes, PrefillQueries } from './document-indexes.js';
import { conflict, invalid, notFound } from './errors.js';
import { checkId } from './ids.js';
import { parseKvUpload } from './kv-input.js';
import { parseModel } from './model.js';
import { KeyedQueue } from './serial.js';
import { toF32 } from './tensor.js';

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
  /** Per layer: blocks already written to LMDB. */
  written: number[];
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
    const stride = body.queryStride ?? DEFAULT_QUERY_STRIDE;
    if (typeof stride !== 'number' || !Number.isInteger(stride) || stride < 1) throw invalid('queryStride must be a positive integer');
    return this.queue.run(id, async () => {
      const existing = this.store.get(id);
      if (existing && existing.status !== 'incomplete')
        throw conflict(`document ${id} already exists (${existing.status}); DELETE it first`);
      // Memory first: a document refused for its size leaves nothing behind.
      const layers: KvSegment[] = [];
      try {
        for (let l = 0; l < model.layers; l++) layers.push(new KvSegment(model.kvHeads, model.headDim, model.dtype, undefined, this.budget));
      } catch (e) {
        for (const s of layers) s.release();
        throw e;
      }
      const meta: DocumentMeta = { id, model, status: 'loading', tokens: 0, methods, createdAt: new Date().toISOString() };
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
        queries: new PrefillQueries(model, stride),
        phase: 'loading',
        progress: 0,
      });
      return this.get(id);
    });
  }

  appendKv(idRaw: string, body: Record<string, unknown>): Promise<{ layer: number; tokens: number }> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      const doc = this.loadingDoc(id);
      const up = parseKvUpload(body, doc.meta.model);
      const seg = doc.layers[up.layer];
      if (up.start !== seg.tokens)
        throw conflict(`layer ${up.layer} of document ${id} holds ${seg.tokens} tokens; the next upload must start there, not at ${up.start}`);
      seg.append(up.k.data, up.v.data, up.k.dtype, up.tokens);
      if (up.q) doc.queries.add(up.layer, up.start, toF32(up.q), up.tokens);
      const full = Math.floor(seg.tokens / doc.meta.model.blockSize);
      await this.store.writeBlocks(id, blockWrites(seg, up.layer, doc.written[up.layer], full, doc.meta.model.blockSize));
      doc.written[up.layer] = full;
      return { layer: up.layer, tokens: seg.tokens };
    });
  }

  seal(idRaw: string): Promise<DocumentView> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      const doc = this.loadingDoc(id);
      const counts = doc.layers.map((s) => s.tokens);
      if (counts[0] === 0) throw conflict(`document ${id} has no tokens to seal`);
      const odd = counts.findIndex((c) => c !== counts[0]);
      if (odd >= 0) throw conflict(`document ${id}: layer ${odd} holds ${counts[odd]} tokens, layer 0 holds ${counts[0]}`);
      for (const s of doc.layers) s.shrinkToFit();

      doc.phase = 'building';
      const artifacts: ArtifactWrite[] = [];
      const total = doc.meta.methods.length * doc.meta.model.layers * doc.meta.model.kvHeads;
      for (const name of doc.meta.methods) {
        const builder = findMethod(name)?.builder;
        if (!builder) continue;
        const before = artifacts.length;
        artifacts.push(...(await buildArtifacts(name, builder, doc.layers, doc.queries, (n) => (doc.progress = (before + n) / total))));
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
    return this.store.list().map((m) => this.get(m.id));
  }

  remove(idRaw: string): Promise<void> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      if (!this.store.get(id)) throw notFound(`document ${id} does not exist`);
      await this.store.remove(id);
      for (const s of this.loading.get(id)?.layers ?? this.ready.get(id)?.layers ?? []) s.release();
      this.loading.delete(id);
      this.ready.delete(id);
    });
  }

  /** A ready document's KV, read from LMDB on first use after a restart. */
  acquire(idRaw: string): LoadedDocument {
    const id = checkId(idRaw, 'document');
    const cached = this.ready.get(id);
    if (cached) return cached;
    const meta = this.loading.get(id)?.meta ?? this.store.get(id);
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
      let artifacts = this.store.loadArtifacts(doc.meta.id, method, layers, kvHeads);
      if (!artifacts) {
        const built = await buildArtifacts(method, builder, doc.layers, undefined, () => undefined);
        await this.store.addArtifacts(doc.meta.id, method, built);
        artifacts = doc.layers.map((_, layer) => built.filter((a) => a.layer === layer).map((a) => a.bytes));
        this.buildsAfterSeal++;
      }
      const loaded = loadIndexes(builder, doc.layers, artifacts);
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

function blockWrites(seg: KvSegment, layer: number, from: number, to: number, B: number): BlockWrite[] {
  const writes: BlockWrite[] = [];
  for (let block = from; block < to; block++)
    for (let head = 0; head < seg.kvHeads; head++) {
      const rows = seg.rows(head, block * B, Math.min(seg.tokens, (block + 1) * B));
      writes.push({ layer, head, block, ...rows });
    }
  return writes;
}
