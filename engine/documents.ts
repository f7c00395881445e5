// Fixed-context documents: created `loading`, filled layer by layer, sealed
// `ready` once (indexes built, everything durable in one transaction), then
// shared read-only by every session that attaches them.
import type { UploadStats } from '../core/upload-stats.js';
import { findMethod } from '../index/registry.js';
import { isStaleArtifact, type HeadIndex, type HeadIndexBuilder } from '../index/method.js';
import type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore, MaybePromise } from '../storage/document-store.js';
import type { HostBudget } from '../storage/host-budget.js';
import { KvSegment } from '../storage/kv-segment.js';
import { buildArtifacts, loadIndexes, PrefillQueries, storeUpgraded, upgradeArtifacts } from './document-indexes.js';
import { LayerCache, ResidentLayers } from './resident-layers.js';
import { conflict, invalid, KvrecallError, notFound, preconditionFailed, unavailable } from '../core/errors.js';
import { checkId } from '../core/ids.js';
import { expectUploadFinite, keepQueries, parseKvUpload } from './kv-input.js';
import { parseModel } from '../core/model.js';
import { KeyedQueue } from '../core/serial.js';
import { nonFinite, toStorageDtype } from '../core/tensor.js';

export interface LoadedDocument {
  meta: DocumentMeta;
  /**
   * One read-only segment per layer. Of a partially resident document (with
   * `resident`), only the layers resident now: a step reads a layer only
   * between Documents.pinLayer and its release.
   */
  layers: KvSegment[];
  /** Loaded indexes by method: [layer][kv head] (of a partially resident document, its resident layers'). */
  indexes: Map<string, HeadIndex[][]>;
  /** Set when the store reads layers on use (a shared store): which layers are in host memory. */
  resident?: ResidentLayers;
  /** Of a partially resident document: its methods' stored artifacts, to load a layer's indexes when it is read again. */
  artifacts?: Map<string, Uint8Array[][]>;
  /**
   * Set when the document stops being served (deleted, or replaced through
   * another server): why. Its memory no longer counts against the budget, so
   * sessions that attached it must not read it on: their steps are refused
   * with this (409), as a partially resident document's pins are.
   */
  gone?: string;
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

/** Copies of document layers beyond host memory (the GPU backend's): dropped when their document stops being served, or their layer is evicted from host memory. */
export interface DeviceCopies {
  drop(segments: readonly KvSegment[]): void;
}

const MAX_TOKENS_HINT = 2 ** 31;
const now = () => performance.now();

export class Documents {
  private readonly loading = new Map<string, LoadingDocument>();
  private readonly ready = new Map<string, LoadedDocument>();
  private readonly queue = new KeyedQueue();
  /** Document layers read on use from a shared store, evicted least recently used first. */
  readonly residency: LayerCache;
  /** Documents the store held when last listed (health and metrics do not wait on a remote store). */
  private listed = 0;
  private listing?: Promise<void>;

  constructor(
    private readonly store: DocumentStore,
    private readonly knownMethods: ReadonlySet<string>,
    private readonly budget: HostBudget,
    /** Index builds may use the GPU (BuildInput.device). */
    private readonly deviceBuilds = false,
    private readonly device?: DeviceCopies,
  ) {
    this.residency = new LayerCache(budget);
  }

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
      const existing = await this.store.get(id);
      if (existing && existing.status !== 'incomplete')
        throw conflict(`document ${id} already exists (${existing.status}); DELETE it first`);
      // One this server was loading that the store no longer holds loading (deleted through another
      // server, or incomplete once its lease lapsed): its memory goes before the new one's is reserved.
      await this.dropLoading(id);
      // Likewise one this server attached, deleted through another server since: sessions that attached
      // it are refused from now on and its memory goes (the seal's ready entry would replace it unforgotten).
      const attached = this.ready.get(id);
      if (attached) this.forget(attached, `document ${id} was deleted or replaced since it was attached`);
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
      this.unconfirmedSeals.delete(id);
      this.loading.set(id, {
        meta,
        layers,
        written: new Array<number>(model.layers).fill(0),
        writing: Promise.resolve(),
        queries: new PrefillQueries(model, stride),
        phase: 'loading',
        progress: 0,
      });
      return this.view(id);
    });
  }

  /**
   * Appends one upload to a layer. Its full blocks are written to the store
   * behind the answer: the next upload of the document (or the seal) waits
   * for them, so one batch is in flight while the next request is read and
   * checked. A loading document is not durable before seal anyway. The
   * body's NaN/Inf scan runs off the event loop (with the copy, for a body
   * in the storage dtype), so the next body is read meanwhile; the
   * document's queue still runs its uploads one at a time, each whole or
   * not at all.
   */
  appendKv(idRaw: string, body: Record<string, unknown>, times?: { bytes: number; readMs: number; decodeMs: number }): Promise<{ layer: number; tokens: number; stats: UploadStats }> {
    const id = checkId(idRaw, 'document');
    const t0 = now();
    return this.queue.run(id, async () => {
      const t1 = now();
      const doc = this.loading.get(id) ?? (await this.notLoading(id));
      if (doc.phase === 'building') throw conflict(`document ${id} is being sealed`);
      if (doc.writeError) throw doc.writeError;
      const up = parseKvUpload(body, doc.meta.model, doc.queries.stride, { finite: false });
      const t2 = now();
      const seg = doc.layers[up.layer];
      if (up.start !== seg.tokens) {
        // A body with a NaN is refused for it first, as when the scan came with the shapes.
        await expectUploadFinite(up);
        throw conflict(`layer ${up.layer} of document ${id} holds ${seg.tokens} tokens; the next upload must start there, not at ${up.start}`);
      }
      if (up.k.dtype === seg.dtype && up.v.dtype === seg.dtype) {
        // In the storage dtype (a preload's case): scanned as it is copied, off the event loop.
        const bad = await seg.appendStored(up.k.data, up.v.data, up.tokens, up.q);
        if (bad) throw nonFinite(bad.tensor === 'also' ? 'q' : bad.tensor, bad.at);
      } else {
        await expectUploadFinite(up);
        const k = toStorageDtype(up.k, seg.dtype, 'k'), v = toStorageDtype(up.v, seg.dtype, 'v');
        seg.append(k.data, v.data, seg.dtype, up.tokens);
      }
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
      const sealed = this.ready.get(id);
      if (!this.loading.has(id) && sealed && this.unconfirmedSeals.has(id)) return this.confirmSeal(sealed);
      const doc = this.loading.get(id) ?? (await this.notLoading(id));
      if (doc.phase === 'building') throw conflict(`document ${id} is being sealed`);
      await doc.writing;
      if (doc.writeError) throw doc.writeError;
      const counts = doc.layers.map((s) => s.tokens);
      if (counts[0] === 0) throw conflict(`document ${id} has no tokens to seal`);
      const odd = counts.findIndex((c) => c !== counts[0]);
      if (odd >= 0) throw conflict(`document ${id}: layer ${odd} holds ${counts[odd]} tokens, layer 0 holds ${counts[0]}`);
      for (const s of doc.layers) s.shrinkToFit();

      doc.phase = 'building';
      let meta: DocumentMeta | undefined;
      try {
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
            : await buildArtifacts(name, builder, doc.layers, doc.queries, (n) => (doc.progress = (before + n) / total), doc.meta.clusterSize, this.deviceBuilds);
          if (!same) built.set(builder, mine);
          artifacts.push(...mine);
          doc.progress = artifacts.length / total;
        }

        const B = doc.meta.model.blockSize;
        const tail = doc.layers.flatMap((seg, layer) => blockWrites(seg, layer, doc.written[layer], Math.ceil(seg.tokens / B), B));
        meta = { ...doc.meta, status: 'ready', tokens: counts[0], sealedAt: new Date().toISOString() };
        await this.store.seal(meta, tail, artifacts);
      } catch (e) {
        // An index build or the store's seal failed: the document is still
        // loading (its blocks so far stay), so a later seal can try again.
        doc.phase = 'loading';
        doc.progress = 0;
        // Unless the seal landed and only what followed failed (a shared store's replicas did not acknowledge
        // the ready flip): every server sees it ready, so this one serves it too, and a seal asked again confirms.
        if (meta && (await this.storeHoldsSealed(doc.meta))) {
          this.loading.delete(id);
          this.ready.set(id, { meta, layers: doc.layers, indexes: new Map() });
          this.unconfirmedSeals.add(id);
          // Any error, typed or not (a client library's own): the caller must learn the seal landed, or it retries a whole preload.
          const hint = `document ${id} is sealed and served, but this was not confirmed durable: POST its seal again to confirm`;
          throw e instanceof KvrecallError ? new KvrecallError(e.kind, `${e.message}; ${hint}`) : unavailable(`sealing ${id} failed after its ready flip landed (${e instanceof Error ? e.message : String(e)}); ${hint}`);
        }
        throw e;
      }
      this.loading.delete(id);
      this.ready.set(id, { meta, layers: doc.layers, indexes: new Map() });
      return view(meta);
    });
  }

  /** Documents sealed here whose seal landed in the store but failed after (503): a seal asked again confirms them. */
  private readonly unconfirmedSeals = new Set<string>();

  /** Whether the store holds this loading document ready (its seal landed); false if the store cannot say. */
  private async storeHoldsSealed(loading: DocumentMeta): Promise<boolean> {
    try {
      const held = await this.store.get(loading.id);
      return held?.status === 'ready' && held.createdAt === loading.createdAt;
    } catch {
      return false;
    }
  }

  /** A seal asked again after its ready flip landed: the store confirms it durable (the replicas acknowledge); answered as the seal. */
  private async confirmSeal(doc: LoadedDocument): Promise<DocumentView> {
    try {
      await this.store.seal(doc.meta, [], []);
    } catch (e) {
      if (e instanceof KvrecallError && e.kind === 'conflict') this.unconfirmedSeals.delete(doc.meta.id);
      throw e;
    }
    this.unconfirmedSeals.delete(doc.meta.id);
    return view(doc.meta);
  }

  /** A document as this server loads it, else as the store holds it (a remote store's answer is awaited, not blocked on). */
  async get(idRaw: string): Promise<DocumentView> {
    const id = checkId(idRaw, 'document');
    if (this.loading.has(id)) return this.view(id);
    const meta = await this.store.get(id);
    if (!meta) throw notFound(`document ${id} does not exist`);
    return view(meta);
  }

  async list(): Promise<DocumentView[]> {
    const metas = await this.store.list();
    this.listed = metas.length;
    return metas.map((m) => (this.loading.has(m.id) ? this.view(m.id) : view(m)));
  }

  /**
   * How many documents the store holds: now from a local store; from a
   * remote one, as last listed (refreshed behind the answer), so that
   * health and metrics answer while the store is slow or unreachable.
   */
  count(): number {
    if (this.listing) return this.listed;
    const metas = this.store.list();
    if (Array.isArray(metas)) return metas.length;
    this.listing = metas.then(
      (m) => void (this.listed = m.length),
      () => undefined,
    ).finally(() => (this.listing = undefined));
    return this.listed;
  }

  /** A loading document's view: the tokens every layer holds, and the phase. */
  private view(id: string): DocumentView {
    const loading = this.loading.get(id)!;
    return {
      ...view(loading.meta),
      tokens: Math.min(...loading.layers.map((s) => s.tokens)),
      phase: loading.phase,
      ...(loading.phase === 'building' && { progress: loading.progress }),
    };
  }

  /**
   * Deletes a document; with `createdAt`, only the one created then: a
   * document made again under the id since is left alone (412). The check
   * and the delete are one step of the document's queue, so no request to
   * this server comes between them.
   */
  remove(idRaw: string, expect: { createdAt?: string } = {}): Promise<void> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      const meta = await this.store.get(id);
      // Deleted through another server while this one was loading it (a shared store): the loading
      // document this server still shows goes, with its memory.
      const local = this.loading.get(id);
      if (!meta && local && (expect.createdAt === undefined || expect.createdAt === local.meta.createdAt)) return this.dropLoading(id);
      // Likewise a ready one this server attached: its sessions here are refused from now on, its memory goes.
      const attached = this.ready.get(id);
      if (!meta && attached && (expect.createdAt === undefined || expect.createdAt === attached.meta.createdAt))
        return this.forget(attached, `document ${id} was deleted`);
      if (!meta) throw notFound(`document ${id} does not exist`);
      if (expect.createdAt !== undefined && meta.createdAt !== expect.createdAt) {
        await this.dropReplaced(id, expect.createdAt);
        throw preconditionFailed(`document ${id} was created at ${meta.createdAt}, not ${expect.createdAt}: not deleted`);
      }
      // Blocks still being written would land after the drop.
      await this.loading.get(id)?.writing;
      try {
        // The store checks createdAt again as it removes: through another server the document may have been made again since.
        await this.store.remove(id, expect);
      } catch (e) {
        if (expect.createdAt !== undefined && e instanceof KvrecallError && (e.kind === 'precondition_failed' || e.kind === 'not_found'))
          await this.dropReplaced(id, expect.createdAt);
        throw e;
      }
      this.unconfirmedSeals.delete(id);
      await this.dropLoading(id);
      const ready = this.ready.get(id);
      if (ready) this.forget(ready, `document ${id} was deleted`);
    });
  }

  /** After a conditional delete found the store holding another document (or none): this server's copy of the one named goes. */
  private async dropReplaced(id: string, createdAt: string): Promise<void> {
    if (this.loading.get(id)?.meta.createdAt === createdAt) await this.dropLoading(id);
    const ready = this.ready.get(id);
    if (ready?.meta.createdAt === createdAt) this.forget(ready, `document ${id} was deleted or replaced through another server`);
  }

  /** Forgets a document this server was loading: its block writes in flight settle, then its memory goes back. */
  private async dropLoading(id: string): Promise<void> {
    const doc = this.loading.get(id);
    if (!doc) return;
    await doc.writing;
    for (const s of doc.layers) s.release();
    this.loading.delete(id);
  }

  /**
   * A ready document's KV: from memory, else read from the store (on first
   * use after a restart, or a document another server sealed in a shared
   * store). What is in memory is checked against the store first: a
   * document deleted or replaced through another server is not served.
   * A store that reads layers on use (readLayer) attaches the document
   * partially resident: the layers that fit now, the others on use.
   * In the document's queue: sessions attaching it at once read it once.
   */
  acquire(idRaw: string): Promise<LoadedDocument> {
    const id = checkId(idRaw, 'document');
    return this.queue.run(id, async () => {
      const stored = await this.store.get(id);
      // One this server was loading that the store no longer holds loading (deleted, and perhaps made
      // again and sealed, through another server; or incomplete once its lease lapsed): its memory goes,
      // and the store's document is what a session attaches, not a 409 for the stale one.
      const local = this.loading.get(id);
      if (local && !(stored?.status === 'loading' && stored.createdAt === local.meta.createdAt)) await this.dropLoading(id);
      const meta = this.loading.get(id)?.meta ?? stored;
      const cached = this.ready.get(id);
      if (cached && meta && meta.status === 'ready' && meta.createdAt === cached.meta.createdAt) return cached;
      if (cached) this.forget(cached, `document ${id} was deleted or replaced since it was attached`);
      refuseUnready(id, meta);
      const doc = this.store.readLayer ? await this.attachResident(meta) : { meta, layers: this.store.load(meta, this.budget), indexes: new Map() };
      this.ready.set(id, doc);
      return doc;
    });
  }

  /**
   * A ready document's metadata as the store holds it, refused as acquire
   * refuses it (404, 409), reading nothing into memory. A local store's at
   * once: an attach that follows is queued in the same turn, as without it.
   */
  readyMeta(idRaw: string): MaybePromise<DocumentMeta> {
    const id = checkId(idRaw, 'document');
    const meta = this.store.get(id);
    if (meta instanceof Promise) return meta.then((m) => (refuseUnready(id, m), m));
    refuseUnready(id, meta);
    return meta;
  }

  private async attachResident(meta: DocumentMeta): Promise<LoadedDocument> {
    const resident = new ResidentLayers(this.residency, meta, (layer, into) => this.store.readLayer!(meta, layer, into));
    const doc: LoadedDocument = { meta, layers: resident.layers as KvSegment[], indexes: new Map(), resident, artifacts: new Map() };
    // A layer's indexes hold its keys: they go with it, and are loaded again with the layer. Its device
    // copies (pool blocks, wave store) go as a deleted document's do: a layer read again is a new segment,
    // a new pool client, so they would never hit again and only hold pool room until the pool's LRU took them.
    resident.onEvict = (layer, segment) => {
      for (const perLayer of doc.indexes.values()) delete perLayer[layer];
      this.device?.drop([segment]);
    };
    try {
      await resident.prefetch();
    } catch (e) {
      resident.drop(`document ${meta.id} could not be attached`);
      throw e;
    }
    return doc;
  }

  /** Returns a document's memory (a partially resident one's, once no step reads it) and stops serving it. */
  private forget(doc: LoadedDocument, why: string): void {
    doc.gone ??= why;
    // Its device copies too (block pool pages, wave layers), once no step reads them.
    this.device?.drop(doc.layers.filter((s): s is KvSegment => s !== undefined));
    if (doc.resident) doc.resident.drop(why);
    else {
      for (const s of doc.layers) s.release();
      // Sessions that attached it keep this object (their steps are refused from now on) and its
      // indexes' per-layer arrays: emptied, so its KV and indexes are freed now, not when those
      // sessions end (the budget already counts them free). A step never reads a gone document's
      // layers: it is refused before it reads them, with no await in between (nothing to pin).
      doc.layers.length = 0;
      for (const perLayer of doc.indexes.values()) perLayer.length = 0;
      doc.indexes.clear();
    }
    this.ready.delete(doc.meta.id);
  }

  /**
   * Makes one layer of every partially resident document of a step resident
   * (awaiting the reads of those that are not) and keeps it so until the
   * returned release: a layer is never evicted under a step.
   */
  async pinLayer(docs: readonly LoadedDocument[], layer: number): Promise<() => void> {
    const releases: (() => void)[] = [];
    const release = () => releases.splice(0).forEach((r) => r());
    try {
      for (const doc of docs) {
        if (!doc.resident) continue;
        releases.push(await doc.resident.pin(layer));
        for (const [method, perLayer] of doc.indexes) perLayer[layer] ??= this.layerIndexes(doc, method, layer);
      }
    } catch (e) {
      release();
      throw e;
    }
    return release;
  }

  /** One resident layer's indexes of a method, from the artifacts kept at attach. */
  private layerIndexes(doc: LoadedDocument, method: string, layer: number): HeadIndex[] {
    const builder = findMethod(method)!.builder!;
    return loadIndexes(builder, [doc.layers[layer]], [doc.artifacts!.get(method)![layer]])[0];
  }

  /**
   * A method's indexes of a ready document: from memory, else loaded from the store (an older format
   * the builder reads converted and stored back, once: in this queue, two attaches never both convert),
   * else (the document was sealed without that method) built now and stored, once. Of a partially
   * resident document, the resident layers' now and each other layer's when a step reads it.
   */
  indexes(doc: LoadedDocument, method: string): Promise<HeadIndex[][]> {
    return this.queue.run(doc.meta.id, async () => {
      // A session attaching the document while a delete was queued ahead of this: building would store
      // artifacts of the old keys under the id, where a document made again under it would load them.
      if (doc.gone) throw conflict(`${doc.gone} while a session was attaching it`);
      const cached = doc.indexes.get(method);
      if (cached) return cached;
      const builder = findMethod(method)?.builder;
      if (!builder) throw invalid(`method ${method} does not index documents`);
      const { layers, kvHeads } = doc.meta.model;
      // Layer by layer; of a partially resident document, each read (and held) only while it is used.
      const eachLayer = async <T>(fn: (seg: KvSegment, layer: number) => Promise<T>): Promise<T[]> => {
        const out: T[] = [];
        for (let layer = 0; layer < layers; layer++) {
          const release = await doc.resident?.pin(layer);
          out.push(await fn(doc.layers[layer], layer).finally(() => release?.()));
        }
        return out;
      };
      const rebuild = async () => {
        const perLayer = await eachLayer(async (seg, layer) =>
          (await buildArtifacts(method, builder, [seg], undefined, () => undefined, doc.meta.clusterSize, this.deviceBuilds)).map((a) => ({ ...a, layer })),
        );
        await this.store.addArtifacts(doc.meta.id, method, perLayer.flat());
        this.buildsAfterSeal++;
        return perLayer.map((built) => built.map((a) => a.bytes));
      };
      const load = async (artifacts: Uint8Array[][]): Promise<HeadIndex[][]> => {
        if (!doc.resident) return loadIndexes(builder, doc.layers, artifacts);
        // Partially resident: the resident layers' indexes now (layer 0 read if need be: a stale format shows here), the others with their layer.
        const release = await doc.resident.pin(0);
        try {
          const loaded: HeadIndex[][] = [];
          doc.layers.forEach((seg, layer) => seg && (loaded[layer] = loadIndexes(builder, [seg], [artifacts[layer]])[0]));
          doc.artifacts!.set(method, artifacts);
          return loaded;
        } finally {
          release();
        }
      };
      let loaded: HeadIndex[][];
      try {
        const stored = await this.store.loadArtifacts(doc.meta.id, method, layers, kvHeads);
        const upgraded = stored ? upgradeArtifacts(method, builder, stored) : [];
        loaded = await load(stored ?? (await rebuild()));
        this.artifactsUpgraded += await storeUpgraded(this.store, doc.meta.id, method, upgraded);
      } catch (e) {
        // An artifact of an older format (this build reads only its own): rebuilt from the keys and stored once.
        if (!isStaleArtifact(e)) throw e;
        loaded = await load(await rebuild());
      }
      doc.indexes.set(method, loaded);
      return loaded;
    });
  }

  /** Index builds that happened at attach rather than at seal, and artifacts rewritten from an older format (for tests and metrics). */
  buildsAfterSeal = 0;
  artifactsUpgraded = 0;

  /** Why a document that is not loading here cannot take uploads or a seal. */
  private async notLoading(id: string): Promise<never> {
    const meta = await this.store.get(id);
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

function refuseUnready(id: string, meta: DocumentMeta | undefined): asserts meta is DocumentMeta {
  if (!meta) throw notFound(`document ${id} does not exist`);
  if (meta.status === 'incomplete') throw conflict(`document ${id} is incomplete (its preload was cut off), not ready: PUT it again to restart the preload`);
  if (meta.status !== 'ready') throw conflict(`document ${id} is ${meta.status}, not ready`);
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
