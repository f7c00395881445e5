// A session: the documents it attached (read-only, shared) and its own
// tokens (the question, then each generated token), per layer.
import type { HeadIndex, LayerContext, RetrievalMethod, SearchParams } from '../index/method.js';
import type { HostBudget } from '../storage/host-budget.js';
import type { GpuBackend } from './cache/gpu-pool.js';
import { SessionCache } from './cache/residency.js';
import { deviceBlockScorer } from './cache/device-block-scores.js';
import { KvSegment } from '../storage/kv-segment.js';
import type { LoadedDocument } from './documents.js';
import type { ModelShape } from '../core/model.js';
import { PrefillQueries } from './document-indexes.js';
import type { ClusterIndex } from '../index/wave/cluster-index.js';
import type { LayerParams } from './session-params.js';

export interface SessionStats {
  steps: number;
  attendMs: number;
  selected: number;
  scanned: number;
  /** Keys read as 4-bit codes, summed as scanned is (a code-walk session's; absent otherwise). */
  codes?: number;
  contextTokens: number;
}

export interface SessionOptions {
  id: string;
  model: ModelShape;
  documents: LoadedDocument[];
  method: RetrievalMethod;
  params: SearchParams;
  /** Whether the session estimates what its method leaves out (default: when it has clusters; layers may differ). */
  estimate?: boolean;
  /** Per layer, its budget and whether it estimates: a per-layer policy (default: the session's in every layer). */
  layers?: LayerParams[];
  /** Per document, the method's loaded indexes [layer][kv head] (indexed methods only). */
  documentIndexes: (HeadIndex[][] | undefined)[];
  /** Per document, its wave clusters [layer][kv head], when any layer estimates what its method leaves out. */
  clusterIndexes?: HeadIndex[][][];
  budget: HostBudget;
  /** The GPU pool this session's steps use, when it was admitted to one. */
  gpu?: GpuBackend;
  /** Pool bytes reserved for its working set. */
  gpuReserved?: number;
}

export class Session {
  /** The session's own tokens, one segment per layer. */
  readonly own: KvSegment[];
  readonly stats: SessionStats = { steps: 0, attendMs: 0, selected: 0, scanned: 0, contextTokens: 0 };
  readonly createdAt = new Date().toISOString();
  /** Query rows of the session's own prefill tokens (the question), every token kept. */
  readonly ownQueries: PrefillQueries;
  private readonly memos: Map<string, unknown>[];

  readonly id: string;
  readonly model: ModelShape;
  readonly documents: LoadedDocument[];
  readonly method: RetrievalMethod;
  readonly params: SearchParams;
  readonly estimate: boolean;
  private readonly layers: LayerParams[];
  /** Whether the session was created with a per-layer policy (described back to the client). */
  private readonly layerOverrides: boolean;
  /** Per document, the method's loaded indexes [layer][kv head] (indexed methods only). */
  readonly documentIndexes: (HeadIndex[][] | undefined)[];
  /** Per document, its clusters [layer][kv head], when the session estimates the tokens its method does not select. */
  readonly clusterIndexes?: HeadIndex[][][];
  /** Where the step's selection is made resident: the GPU pool it was admitted to, or the host. */
  readonly cache: SessionCache;
  /** Pool bytes reserved for its working set (returned by release). */
  private readonly gpuReserved: number;

  constructor(o: SessionOptions) {
    this.id = o.id;
    this.model = o.model;
    this.documents = o.documents;
    this.method = o.method;
    this.params = o.params;
    this.estimate = o.estimate ?? o.clusterIndexes !== undefined;
    this.layerOverrides = o.layers !== undefined;
    this.layers = o.layers ?? Array.from({ length: o.model.layers }, () => ({ budget: o.params.budget, estimate: this.estimate }));
    this.documentIndexes = o.documentIndexes;
    this.clusterIndexes = o.clusterIndexes;
    this.gpuReserved = o.gpuReserved ?? 0;
    this.own = [];
    try {
      for (let l = 0; l < o.model.layers; l++) this.own.push(new KvSegment(o.model.kvHeads, o.model.headDim, o.model.dtype, undefined, o.budget));
    } catch (e) {
      for (const s of this.own) s.release();
      o.gpu?.release(this.gpuReserved);
      throw e;
    }
    this.cache = new SessionCache(o.model, this.own, o.gpu);
    this.ownQueries = new PrefillQueries(o.model, 1);
    this.memos = Array.from({ length: o.model.layers }, () => new Map());
  }

  get gpu(): GpuBackend | undefined {
    return this.cache.gpu;
  }

  /** Returns the session's own KV memory to the budget. */
  release(): void {
    for (const s of this.own) s.release();
    this.gpu?.release(this.gpuReserved);
  }

  /** One layer's budget (a per-layer policy may give each layer its own): a step's parameters are the session's with it. */
  budgetFor(layer: number): number {
    return this.layers[layer].budget;
  }

  /** Whether a layer estimates what the method leaves out: clustersFor is defined (without building its array). */
  estimates(layer: number): boolean {
    return this.layers[layer].estimate && this.clusterIndexes !== undefined;
  }

  /** The documents' clusters of one layer, when that layer estimates what the method leaves out. */
  clustersFor(layer: number): ClusterIndex[][] | undefined {
    if (!this.layers[layer].estimate || !this.clusterIndexes) return undefined;
    return this.clusterIndexes.map((perLayer) => perLayer[layer] as ClusterIndex[]);
  }

  documentTokens(): number {
    return this.documents.reduce((n, d) => n + d.meta.tokens, 0);
  }

  /** Made every layer-step: plain loops, no spread arrays or objects (bench/results/wave-step-host-js-vm.md). */
  context(layer: number): LayerContext {
    const docs = this.documents.length;
    const segments: KvSegment[] = [], offsets: number[] = [], indexes: (HeadIndex[] | undefined)[] = [];
    let tokens = 0;
    for (let i = 0; i <= docs; i++) {
      const s = i < docs ? residentLayer(this.documents[i], layer) : this.own[layer];
      segments.push(s);
      offsets.push(tokens);
      tokens += s.tokens;
      indexes.push(i < docs ? this.documentIndexes[i]?.[layer] : undefined);
    }
    const { qHeads, kvHeads, headDim } = this.model;
    const question = (head: number) => this.ownQueries.rows(layer, head);
    const ctx: LayerContext = { layer, segments, offsets, indexes, question, memo: this.memos[layer], tokens, qHeads, kvHeads, headDim };
    // GPU sessions score block summaries on the device (the same blocks as on the host).
    if (this.gpu) ctx.blockScorer = deviceBlockScorer();
    // And retrieval-attention's code scan, where the backend holds a budget for its stores.
    if (this.gpu?.keyScanner) ctx.keyScanner = this.gpu.keyScanner;
    return ctx;
  }

  describe() {
    return {
      id: this.id,
      model: this.model,
      documents: this.documents.map((d) => d.meta.id),
      method: this.method.name,
      backend: this.gpu ? 'cuda' : 'cpu',
      ...this.params,
      estimate: this.estimate,
      ...(this.layerOverrides && { layers: this.layers }),
      documentTokens: this.documentTokens(),
      ownTokens: this.own.map((s) => s.tokens),
      createdAt: this.createdAt,
      stats: this.stats,
    };
  }
}

/** A document's layer, which a partially resident document holds only while a step pins it (Documents.pinLayer). */
function residentLayer(doc: LoadedDocument, layer: number): KvSegment {
  const seg = doc.layers[layer];
  if (!seg) throw new Error(`layer ${layer} of document ${doc.meta.id} is not resident: the step did not pin it`);
  return seg;
}
