// Open sessions, in memory: they hold no durable state of their own.
import { randomUUID } from 'node:crypto';
import { findMethod, methodNames } from '../index/registry.js';
import { WAVE } from '../index/wave/wave.js';
import type { SearchParams } from '../index/method.js';
import type { Documents } from './documents.js';
import type { DocumentMeta } from '../storage/document-store.js';
import { conflict, invalid, notFound } from '../core/errors.js';
import { parseKvUpload } from './kv-input.js';
import { describeModel, parseModel, sameModel, type ModelShape } from '../core/model.js';
import { KeyedQueue } from '../core/serial.js';
import { toF32 } from '../core/tensor.js';
import { Session } from './session.js';
import { largestBudget, parseLayers, parseSearchParams } from './session-params.js';
import { decodeStep, type AttendResult } from './decode-step.js';
import { parseAttendRequest } from './attend-request.js';
import type { HostBudget } from '../storage/host-budget.js';
import type { GpuBackend } from './cache/gpu-pool.js';
import { narrowWords, type FloatDtype } from '../addon/kernels.js';

export const DEFAULT_PARAMS: SearchParams = { budget: 2048, sinks: 16, window: 256, ef: 0, chunk: 2048, span: 2 };

/**
 * Where a method's defaults differ: `wave` reads about 2% of a long context
 * exactly and estimates the rest (issue #13: ≤ 3% exact).
 */
const METHOD_DEFAULTS: Record<string, Partial<SearchParams>> = { [WAVE]: { budget: 0.02, sinks: 16, window: 64 } };

/** An attend's answer with the shape it is read in, and the dtype its `out` goes out in (`outWords`: out in that dtype, when 16-bit). */
export type AttendAnswer = AttendResult & { model: ModelShape; outDtype: FloatDtype; outWords?: Uint16Array };

/** A batch's step results in order, and the server's milliseconds for the whole batch. */
export interface BatchAnswer {
  results: PromiseSettledResult<AttendAnswer>[];
  ms: number;
}

/** Steps one batch may carry (a server's running batch, with room). */
export const MAX_BATCH = 4096;

/** 409 for a session one of whose documents was deleted (LoadedDocument.gone). */
function refuseGone(session: Session, id: string): void {
  for (const d of session.documents) if (d.gone) throw conflict(`${d.gone}: session ${id} cannot attend it any more; create a new session`);
}

/** 409 for a document built for another model than the session's. */
function refuseModel(meta: DocumentMeta, model: ModelShape): void {
  if (!sameModel(meta.model, model)) throw conflict(`document ${meta.id} was built for ${describeModel(meta.model)}, the session for ${describeModel(model)}`);
}

export class Sessions {
  private readonly open = new Map<string, Session>();
  readonly queue = new KeyedQueue();

  constructor(
    private readonly documents: Documents,
    private readonly budget: HostBudget,
    private readonly gpu?: GpuBackend,
  ) {}

  async create(body: Record<string, unknown>): Promise<Session> {
    const model = parseModel(body.model);
    const methodName = body.method ?? 'exact';
    const method = typeof methodName === 'string' ? findMethod(methodName) : undefined;
    if (!method) throw invalid(`method must be one of: ${[...methodNames].join(', ')}`);
    const params = parseSearchParams(body, { ...DEFAULT_PARAMS, ...METHOD_DEFAULTS[method.name] }, method.name);
    const docIds = body.documents ?? [];
    if (!Array.isArray(docIds) || docIds.some((d) => typeof d !== 'string')) throw invalid('documents must be a list of ids');
    // A document's layer is one segment, and a step tells its parts apart by segment: a second copy's
    // selected positions came back as the first's, and its estimate left out the rows either copy attended.
    const twice = (docIds as string[]).find((id, i) => docIds.indexOf(id) !== i);
    if (twice !== undefined) throw invalid(`documents names ${JSON.stringify(twice)} twice; a session attaches each document once`);
    // The rest of the body is checked before any document is read into memory, so a bad body reads none
    // (after a restart a document is read whole at its first attach): layers with a stand-in for the
    // default estimate, which depends on the documents (parsed again below).
    if (body.estimate !== undefined && typeof body.estimate !== 'boolean') throw invalid('estimate must be true or false');
    parseLayers(body.layers, model.layers, params.budget, false);
    // Every document checked likewise before any is read: one missing, not ready or of another model reads none.
    const checked = (docIds as string[]).map((id) => this.documents.readyMeta(id));
    for (const meta of checked.some((m) => m instanceof Promise) ? await Promise.all(checked) : (checked as DocumentMeta[])) refuseModel(meta, model);
    const docs = await Promise.all((docIds as string[]).map((id) => this.documents.acquire(id)));
    for (const d of docs) refuseModel(d.meta, model);
    // Estimating what a method leaves out costs one centroid score per cluster and cut every method's
    // error about tenfold on the real model (bench/results/model-vm.md): on wherever the clusters exist,
    // except for `exact`, which leaves nothing out.
    const estimate = (body.estimate as boolean | undefined) ?? (method.name === WAVE || (method.name !== 'exact' && docs.length > 0 && docs.every((d) => d.meta.methods.includes(WAVE))));
    const layers = parseLayers(body.layers, model.layers, params.budget, estimate);
    const estimating = layers.some((l) => l.estimate);
    if (estimating && method.name !== WAVE)
      for (const d of docs)
        if (!d.meta.methods.includes(WAVE))
          throw conflict(`estimate needs the cluster index of document ${d.meta.id}: PUT it with methods including "${WAVE}" (and optionally clusterSize) to estimate what a method leaves out`);
    const indexes = method.builder ? await Promise.all(docs.map((d) => this.documents.indexes(d, method.name))) : [];
    const clusters = estimating ? await Promise.all(docs.map((d) => this.documents.indexes(d, WAVE))) : undefined;
    // Each attach waited in its own document's queue: one deleted meanwhile would leave a session whose every step is 409.
    const gone = docs.find((d) => d.gone);
    if (gone) throw conflict(`${gone.gone} while a session was attaching it`);
    const docTokens = docs.reduce((n, d) => n + d.meta.tokens, 0);
    // The pool holds the working set of the layer that reads the most.
    const reserved = this.gpu?.admit(model, method.name, { ...params, budget: largestBudget(layers, docTokens) }, docTokens) ?? 0;
    const session = new Session({
      id: randomUUID(), model, documents: docs, method, params, estimate, ...(body.layers !== undefined && { layers }),
      documentIndexes: indexes, clusterIndexes: clusters, budget: this.budget, gpu: reserved > 0 ? this.gpu : undefined, gpuReserved: reserved,
    });
    this.open.set(session.id, session);
    return session;
  }

  /** Appends the session's own prefill tokens (e.g. the question) to one layer. */
  appendKv(id: string, body: Record<string, unknown>): Promise<{ layer: number; tokens: number }> {
    const session = this.get(id);
    return this.queue.run(id, () => {
      // As a step: a session whose document was deleted cannot attend again, so its own tokens are not taken either.
      refuseGone(session, id);
      const up = parseKvUpload(body, session.model);
      const seg = session.own[up.layer];
      if (up.start !== seg.tokens)
        throw conflict(`layer ${up.layer} of session ${id} holds ${seg.tokens} own tokens; the next upload must start there, not at ${up.start}`);
      seg.append(up.k.data, up.v.data, up.k.dtype, up.tokens, up.v.dtype);
      if (up.q) session.ownQueries.add(up.layer, up.start, toF32(up.q), up.tokens);
      return { layer: up.layer, tokens: seg.tokens };
    });
  }

  /**
   * One decode step of a session, after any request already queued on it.
   * Its stats.ms is the step as the server does it: the request checked
   * (q finite, widened to f32), the layer made resident, the decode step,
   * and out in the dtype asked for; reading, decoding and encoding the
   * message around it are the transport's, not in it.
   */
  attend(id: string, body: Record<string, unknown>): Promise<AttendAnswer> {
    // Not an async function: it returns the queue's promise itself (an async one's wrapping cost two more microtask turns per step).
    let session: Session;
    try {
      session = this.get(id);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.queue.runNow(id, async () => {
      const t0 = performance.now();
      // Before anything changes: a document deleted under the session is not read on (LoadedDocument.gone).
      refuseGone(session, id);
      const req = parseAttendRequest(body, session.model);
      const outDtype = req.outDtype ?? 'f32';
      // Documents read on use from a shared store: the step's layer is resident (read if need be) and stays so until it ends.
      const release = session.documents.some((d) => d.resident) ? await this.documents.pinLayer(session.documents, req.layer) : undefined;
      let result: AttendResult;
      try {
        result = await decodeStep(session, req);
      } finally {
        release?.();
      }
      // Rounded here, while the step's out is fresh in cache: done after a batch of 32, it was ~10 µs a step.
      const outWords = outDtype === 'f32' ? undefined : narrowWords(result.out, outDtype);
      result.stats.ms = performance.now() - t0;
      // The step's own result, its keys added in place: a copy (`{ ...result, model, ... }`) took V8's slow
      // path for a spread followed by more keys (~1 µs a step on the 2-core VM). The same keys, in the same order.
      const answer = result as AttendAnswer;
      answer.model = session.model;
      answer.outDtype = outDtype;
      if (outWords) answer.outWords = outWords;
      return answer;
    });
  }

  /**
   * A server's running batch: one layer of several sessions' steps, each
   * `{session, q, k?, v?, scale?, position?}`. Steps settle on their own: a
   * bad or failing step fails only its own result; the order is kept.
   * `done(i, count, answer)`, when given, is called as each step succeeds
   * (in the order they finish), while its answer is fresh in cache: the
   * caller's per-step work (packing the answer) costs least there. It must
   * not throw. `prepare(step, i)`, when given, sees each step (a map with
   * its session) before it runs and may rewrite its fields in place (a
   * stream resolves its shared-memory tensors there); a throw fails that
   * step alone, before anything of it runs.
   */
  async attendBatch(
    body: Record<string, unknown>,
    done?: (i: number, count: number, answer: AttendAnswer) => void,
    prepare?: (step: Record<string, unknown>, i: number) => void,
  ): Promise<BatchAnswer> {
    const t0 = performance.now();
    const { layer, steps } = body;
    if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0) throw invalid('layer must be a non-negative integer');
    if (!Array.isArray(steps) || steps.length === 0 || steps.length > MAX_BATCH) throw invalid(`steps must be a list of 1 to ${MAX_BATCH} steps`);
    const results = await Promise.allSettled(
      steps.map(async (step: unknown, i: number) => {
        if (typeof step !== 'object' || step === null || Array.isArray(step) || typeof (step as Record<string, unknown>).session !== 'string')
          throw invalid('a step is a map with a session id');
        prepare?.(step as Record<string, unknown>, i);
        const { session, ...rest } = step as Record<string, unknown>;
        const answer = this.attend(session as string, { ...rest, layer });
        if (!done) return answer;
        const a = await answer;
        done(i, steps.length, a);
        return a;
      }),
    );
    return { results, ms: performance.now() - t0 };
  }

  get(id: string): Session {
    const s = this.open.get(id);
    if (!s) throw notFound(`session ${id} does not exist`);
    return s;
  }

  remove(id: string): Promise<void> {
    const session = this.get(id);
    this.open.delete(id);
    // After any request already queued on the session has finished with its memory.
    return this.queue.run(id, () => session.release());
  }

  get size(): number {
    return this.open.size;
  }
}
