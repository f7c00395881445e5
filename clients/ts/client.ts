// A typed client for the v1 wire protocol (msgpack over HTTP).
//
//   const kv = new KvrecallClient({ url: 'http://127.0.0.1:8700' });
//   await kv.createDocument('manual', model);
//   await kv.uploadDocumentKv('manual', { layer, start: 0, k: tensor('f16', [8, n, 128], kBytes), v: ... });
//   await kv.sealDocument('manual');
//   const { id } = await kv.createSession({ model, documents: ['manual'], method: 'exact' });
//   const { out, lse } = await kv.attend(id, { layer, q: tensor('f32', [32, 128], q) });
//   // A model that holds q in f16 sends it as is, and may ask for out in f16 (half the bytes each way):
//   const r = await kv.attend(id, { layer, q: tensor('f16', [32, 128], qWords), outDtype: 'f16' }); // r.out: Uint16Array
//
// K/V uploads go out through node:http as the msgpack header bytes and the
// caller's tensor bytes themselves (no body is assembled); the caller keeps
// those arrays unchanged until the upload's promise settles.
import type { IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { Packr } from 'msgpackr';
import type { UploadStats } from '../../core/upload-stats.js';
import type { ModelShape } from '../../core/model.js';
import { Http1Pool, type Http1Answer } from './http1.js';
import { packParts, unpackView } from './msgpack-parts.js';
import { KvrecallStream, type StreamOptions } from './stream.js';
import { keptTokens } from '../../core/query-stride.js';
import type { Tensor, WireDtype } from '../../core/tensor.js';

export type { Tensor, WireDtype, ModelShape };
export type { StackedError, StackedOptions, StackedReply } from './stacked.js';
export { keptTokens };

const packr = new Packr({ useRecords: false });

/** Wraps a typed array as a wire tensor (no copy). */
export function tensor(dtype: WireDtype, shape: number[], data: ArrayBufferView): Tensor {
  return { dtype, shape, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

export class KvrecallRequestError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(`${status} ${code}: ${message}`);
    this.name = 'KvrecallRequestError';
  }
}

export interface KvUploadBody {
  layer: number;
  start: number;
  k: Tensor;
  v: Tensor;
  /** [qHeads, n, d], or with queryStride only the rows the document keeps (see stridedQueries). */
  q?: Tensor;
  /** Document uploads: q holds only the tokens t of [start, start + n) with t % queryStride == 0; must be the document's stride. */
  queryStride?: number;
}

/** What the server spent on one document upload (ms), and the bytes it read (the server's own type; erased at run time). */
export type KvUploadStats = UploadStats;

/**
 * The rows of a prefill q [qHeads, n, d] for tokens start.. that a document
 * with this queryStride keeps: [qHeads, count, d] (one copy of those rows).
 */
export function stridedQueries(q: Tensor, start: number, stride: number): Tensor {
  const [heads, n, d] = q.shape;
  const { first, count } = keptTokens(start, n, stride);
  const row = (q.data.byteLength / (heads * n)) | 0;
  const out = new Uint8Array(heads * count * row);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < count; i++) {
      const src = (h * n + first + i * stride) * row;
      out.set(q.data.subarray(src, src + row), (h * count + i) * row);
    }
  return { dtype: q.dtype, shape: [heads, count, d], data: out };
}

export interface SessionSpec {
  model: Partial<ModelShape> & Omit<ModelShape, 'dtype' | 'blockSize'>;
  documents?: string[];
  method?: string;
  /** Tokens attended exactly beyond sinks and window, or a fraction (< 1) of the context. */
  budget?: number;
  sinks?: number;
  window?: number;
  ef?: number;
  chunk?: number;
  span?: number;
  /**
   * retrieval-attention only: search over the keys' 4-bit codes (more recall
   * for several times the CPU a step), reading at most `codeShare` of a
   * document's tokens as codes (default 0.4); `scanShare` caps the keys scored
   * exactly (either walk; the code walk's default: 3%, or 3× the keys asked).
   */
  codeWalk?: boolean;
  /** retrieval-attention only, not with codeWalk: read every key's code, then score the best `scanShare` exactly. */
  codeScan?: boolean;
  codeShare?: number;
  scanShare?: number;
  /**
   * codeScan only, in (0, 1]: a first pass on PQ codes (1/16 of a key's bytes) keeps this share of the keys for
   * the 4-bit codes (at 1M keys 0.08 read 11.2% of the keys' bytes). Such a session searches on the host, not
   * the device (a server's --gpu-scan-budget), unless it is 1. Absent: one pass over every key's 4-bit code.
   */
  scanKeep?: number;
  /** Estimate what the method leaves out from the documents' clusters (default: on for `wave`). */
  estimate?: boolean;
  /**
   * A per-layer policy: one entry per model layer, each overriding the
   * session's budget and/or estimate in that layer (e.g. the first layers of
   * a model, which attend broadly, with more budget).
   */
  layers?: LayerPolicy[];
}

/** One layer's overrides of a session's budget and estimate (absent: the session's). */
export interface LayerPolicy {
  budget?: number;
  estimate?: boolean;
}

/** The dtypes a float tensor travels in. */
export type FloatDtype = 'f32' | 'f16' | 'bf16';

export interface AttendBody {
  layer: number;
  /** [qHeads, headDim]: f32, or 16-bit (f16 or bf16) as a model holds it. */
  q: Tensor;
  k?: Tensor;
  v?: Tensor;
  scale?: number;
  return?: ('out' | 'kv' | 'selection' | 'timing')[];
  /** Position of the appended token among the session's own tokens: a repeat or a skip is refused (409). */
  position?: number;
  /**
   * The answer's out in the model's 16-bit dtype (its raw words, rounded to
   * nearest even from the f32 result) instead of f32, the default; any
   * other dtype is refused (422).
   */
  outDtype?: FloatDtype;
}

/** An answer's out: f32 values, or the 16-bit words asked for with outDtype. */
export type OutArray = Float32Array | Uint16Array;

/** The out array a body's outDtype brings back (either, when its type does not say which). */
export type OutOf<B> = B extends { outDtype?: infer D } ? OutFor<D> : Float32Array;
type OutFor<D> = [D] extends [undefined] ? Float32Array : [D] extends ['f32' | undefined] ? Float32Array : [D] extends ['f16' | 'bf16' | undefined] ? Uint16Array : OutArray;

export interface AttendReply<Out extends OutArray = Float32Array> {
  /** [qHeads, headDim]: f32 values, or with outDtype f16/bf16 the 16-bit words (outDtype says which). */
  out: Out;
  outDtype: FloatDtype;
  lse: Float32Array;
  selection?: Int32Array[];
  kv?: { k: Tensor[]; v: Tensor[] };
  stats: { tokens: number; attended: number; estimated?: number; scanned: number; codes?: number; ms: number; selectMs: number; attendMs: number; backend: 'cpu' | 'cuda'; blocks?: { selected: number; hits: number; bytesIn: number } };
}

export interface DocumentInfo {
  id: string;
  status: 'loading' | 'ready' | 'incomplete';
  /** Prefill queries kept: one token in queryStride. */
  queryStride?: number;
  phase: 'loading' | 'building' | 'ready' | 'incomplete';
  progress?: number;
  tokens: number;
  bytes: number;
  model: ModelShape;
  methods: string[];
  /** When this document was created: tells it from one made again under its id (deleteDocument's createdAt). */
  createdAt: string;
  sealedAt?: string;
}

/** GET /v1/health. */
export interface Health {
  ok: boolean;
  version: string;
  backend: 'cpu' | 'cuda';
  threads: number;
  documents: number;
  resident: { residentBytes: number; residentLayers: number; reads: number; evictions: number };
  sessions: number;
  /** Documents found mid-preload at start, marked incomplete. */
  recovered: string[];
  memory: { used: number; budget: number };
  gpu: GpuInUse | GpuUnused;
}

/** The device attends use, and its block pool (and wave layers held whole, under a wave budget). */
export interface GpuInUse {
  backend: 'cuda';
  device: string;
  memory: number;
  pool: { budgetBytes: number; blockSize: number; reservedBytes: number; failure?: string; [stat: string]: unknown };
  /** rests: layer-steps of other methods whose estimate ran on a wave layer held here. */
  wave?: { budgetBytes: number; usedBytes: number; stores: number; refused: number; evictions: number; rests: number };
}

/** Attends run on the host: a device that answered (`device`, its name) or why none did (`error`). */
export interface GpuUnused {
  available: boolean;
  device?: string;
  error?: string;
  memory: number;
  built: boolean;
}

/** One step of a batch: a session's attend body (the layer is the batch's). */
export type BatchStep = Omit<AttendBody, 'layer'> & { session: string; position?: number };
export type BatchResult<Out extends OutArray = Float32Array> = AttendReply<Out> | { error: { code: string; message: string } };
export type WireAnswer = { out: Tensor; lse: Tensor; selection?: Tensor[]; kv?: AttendReply['kv']; stats: AttendReply['stats'] };
export type WireResult = WireAnswer | { error: { code: string; message: string } };

/** An attend answer off the wire, its arrays copied out of the message buffer (each array's buffer is its own). */
export function attendReply<Out extends OutArray = Float32Array>(r: WireAnswer): AttendReply<Out> {
  return {
    out: (r.out.dtype === 'f32' ? copyOf(Float32Array, r.out) : copyOf(Uint16Array, r.out)) as Out,
    outDtype: r.out.dtype as FloatDtype,
    lse: copyOf(Float32Array, r.lse),
    ...(r.selection && { selection: r.selection.map((t) => copyOf(Int32Array, t)) }),
    ...(r.kv && { kv: r.kv }),
    stats: r.stats,
  };
}

/**
 * A batch's answers off the wire, in order. Every step's out and lse are
 * views of the answer message (`out.buffer` is the whole batch's): no copy
 * and no allocation per step. Where the message's bytes are not aligned
 * for them, they are copied into one array of the batch's own instead.
 */
export function batchResults<Out extends OutArray = Float32Array>(results: WireResult[]): BatchResult<Out>[] {
  let bytes = 0, aligned = true;
  for (const r of results)
    if (!('error' in r)) {
      bytes += align4(r.out.data.byteLength) + align4(r.lse.data.byteLength);
      aligned &&= r.out.data.byteOffset % 4 === 0 && r.lse.data.byteOffset % 4 === 0;
    }
  let place: (t: Tensor) => OutArray;
  if (aligned) place = (t) => (t.dtype === 'f32' ? arrayOf(Float32Array, t) : arrayOf(Uint16Array, t));
  else {
    const all = new Uint8Array(Buffer.allocUnsafeSlow(bytes).buffer, 0, bytes);
    let at = 0;
    place = (t) => {
      all.set(t.data, at);
      const view = t.dtype === 'f32' ? new Float32Array(all.buffer, at, t.data.byteLength / 4) : new Uint16Array(all.buffer, at, t.data.byteLength / 2);
      at += align4(t.data.byteLength);
      return view;
    };
  }
  return results.map((r) => {
    if ('error' in r) return { error: r.error };
    return {
      out: place(r.out) as Out,
      outDtype: r.out.dtype as FloatDtype,
      lse: place(r.lse) as Float32Array,
      ...(r.selection && { selection: r.selection.map((t) => copyOf(Int32Array, t)) }),
      ...(r.kv && { kv: r.kv }),
      stats: r.stats,
    };
  });
}

const align4 = (n: number) => (n + 3) & ~3;

type ArrayType<T> = { new (buffer: ArrayBufferLike, byteOffset: number, length: number): T; new (buffer: ArrayBufferLike): T; BYTES_PER_ELEMENT: number };

/** The tensor's bytes as an array viewing the message (the caller has checked the alignment). */
function arrayOf<T>(Type: ArrayType<T>, t: Tensor): T {
  return new Type(t.data.buffer, t.data.byteOffset, t.data.byteLength / Type.BYTES_PER_ELEMENT);
}

/** The tensor's bytes in an array of their own (an uninitialised copy: a zeroed one cost twice as much per answer). */
function copyOf<T>(Type: ArrayType<T>, t: Tensor): T {
  return new Type(Uint8Array.prototype.slice.call(t.data).buffer);
}

export class KvrecallClient {
  private readonly url: string;
  private readonly headers: Record<string, string>;
  /** http: kept-alive connections of the client's own, Nagle off: a decode call is one small write each way. */
  private readonly http1?: Http1Pool;
  /** https: node's kept-alive agent. */
  private readonly agent?: HttpsAgent;
  /** The URL parsed once (not per call). */
  private readonly target: { https: boolean; host: string; port: number; prefix: string };

  constructor(opts: { url: string; token?: string }) {
    this.url = opts.url.replace(/\/$/, '');
    const u = new URL(this.url);
    this.target = { https: u.protocol === 'https:', host: u.hostname.replace(/^\[(.*)\]$/, '$1'), port: Number(u.port) || (u.protocol === 'https:' ? 443 : 80), prefix: u.pathname.replace(/\/$/, '') };
    this.headers = { 'content-type': 'application/msgpack', accept: 'application/msgpack' };
    if (opts.token) this.headers.authorization = `Bearer ${opts.token}`;
    if (this.target.https) this.agent = new HttpsAgent({ keepAlive: true, noDelay: true });
    else this.http1 = new Http1Pool(this.target.host, this.target.port, Object.entries({ host: u.host, ...this.headers }).map(([k, v]) => `${k}: ${v}\r\n`).join(''));
  }

  health(): Promise<Health> {
    return this.call('GET', '/v1/health');
  }

  /**
   * methods: retrieval methods whose indexes are built at seal; queryStride: keep prefill queries of 1 token in N;
   * tokens: the tokens per layer the document will hold (its host memory is reserved now, 503 if it does not fit).
   */
  createDocument(id: string, model: SessionSpec['model'], opts: { methods?: readonly string[]; queryStride?: number; tokens?: number; clusterSize?: number } = {}): Promise<DocumentInfo> {
    return this.call('PUT', `/v1/documents/${encodeURIComponent(id)}`, { model, ...opts });
  }

  uploadDocumentKv(id: string, body: KvUploadBody): Promise<{ layer: number; tokens: number; stats?: KvUploadStats }> {
    return this.send('POST', `/v1/documents/${encodeURIComponent(id)}/kv`, body);
  }

  sealDocument(id: string): Promise<DocumentInfo> {
    return this.call('POST', `/v1/documents/${encodeURIComponent(id)}/seal`, {});
  }

  getDocument(id: string): Promise<DocumentInfo> {
    return this.call('GET', `/v1/documents/${encodeURIComponent(id)}`);
  }

  async listDocuments(): Promise<DocumentInfo[]> {
    return (await this.call<{ documents: DocumentInfo[] }>('GET', '/v1/documents')).documents;
  }

  /** With `createdAt`, only the document created then: one made again under the id since is left, and 412 says so. */
  deleteDocument(id: string, opts: { createdAt?: string } = {}): Promise<unknown> {
    const only = opts.createdAt === undefined ? '' : `?createdAt=${encodeURIComponent(opts.createdAt)}`;
    return this.call('DELETE', `/v1/documents/${encodeURIComponent(id)}${only}`);
  }

  createSession(spec: SessionSpec): Promise<{ id: string; method: string; documentTokens: number }> {
    return this.call('POST', '/v1/sessions', spec);
  }

  uploadSessionKv(sid: string, body: Omit<KvUploadBody, 'queryStride'>): Promise<{ layer: number; tokens: number }> {
    return this.send('POST', `/v1/sessions/${sid}/kv`, body);
  }

  async attend<B extends AttendBody>(sid: string, body: B): Promise<AttendReply<OutOf<B>>> {
    // Our own HTTP/1.1 on kept-alive sockets, tensor bytes written as they are (fetch cost ~1 ms more per call, node:http ~0.3 ms).
    const r = await this.send<WireAnswer>('POST', `/v1/sessions/${sid}/attend`, body);
    return attendReply<OutOf<B>>(r);
  }

  /**
   * One layer of several sessions' steps in one call (a server's running
   * batch); results in order, each an answer or `{error}` for that step alone.
   * The results' out and lse arrays are views of one buffer for the batch.
   */
  async attendBatch<S extends BatchStep>(layer: number, steps: S[]): Promise<BatchResult<OutOf<S>>[] & { ms?: number }> {
    const r = await this.send<{ results: WireResult[]; stats?: { ms: number } }>('POST', '/v1/attend', { layer, steps });
    return Object.assign(batchResults<OutOf<S>>(r.results), { ms: r.stats?.ms });
  }

  /** A WebSocket stream for decode steps (GET /v1/stream): the same answers, one connection, no per-call HTTP. `opts`: see StreamOptions (spinMs: poll a while for each answer instead of sleeping). */
  openStream(opts: StreamOptions = {}): Promise<KvrecallStream> {
    return KvrecallStream.open(this.url, this.headers.authorization, opts);
  }

  getSession(sid: string): Promise<Record<string, unknown>> {
    return this.call('GET', `/v1/sessions/${sid}`);
  }

  deleteSession(sid: string): Promise<unknown> {
    return this.call('DELETE', `/v1/sessions/${sid}`);
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const packed = body === undefined ? undefined : packr.pack(body);
    const res = await fetch(this.url + path, {
      method,
      headers: this.headers,
      body: packed && new Uint8Array(packed.buffer as ArrayBuffer, packed.byteOffset, packed.byteLength),
    });
    return answer<T>(res.status, res.statusText, res.headers.get('content-type') ?? '', new Uint8Array(await res.arrayBuffer()));
  }

  /**
   * A request whose body holds tensors: its parts (msgpack header bytes and
   * the tensors' own bytes) are written to the socket in order, with the
   * length up front (http: through clients/ts/http1.ts, https: node:https).
   * A network failure rejects with a TypeError, as fetch's.
   */
  private async send<T>(method: string, path: string, body: unknown): Promise<T> {
    const { parts, byteLength } = packParts(body);
    const failed = (e: Error) => new TypeError(`${method} ${path} failed: ${e.message}`, { cause: e });
    if (this.http1) {
      let a: Http1Answer;
      try {
        a = await this.http1.request(method, this.target.prefix + path, parts, byteLength);
      } catch (e) {
        throw failed(e as Error);
      }
      return answer<T>(a.status, a.statusText, a.contentType, a.body);
    }
    const target = this.target;
    return new Promise<T>((resolve, reject) => {
      const req = httpsRequest(
        { host: target.host, port: target.port, path: target.prefix + path, method, agent: this.agent, headers: { ...this.headers, 'content-length': String(byteLength) } },
        (res: IncomingMessage) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', (e) => reject(failed(e)));
          res.on('end', () => {
            try {
              resolve(answer<T>(res.statusCode ?? 0, res.statusMessage ?? '', String(res.headers['content-type'] ?? ''), Buffer.concat(chunks)));
            } catch (e) {
              reject(e);
            }
          });
        },
      );
      req.on('error', (e) => reject(failed(e)));
      // Corked: the header and every part leave in one write.
      req.cork();
      for (const p of parts) req.write(p);
      req.end();
    });
  }
}

/** A reply's body decoded; an error reply thrown as KvrecallRequestError. */
function answer<T>(status: number, statusText: string, type: string, raw: Uint8Array): T {
  const value = raw.byteLength === 0 ? {} : type.includes('msgpack') ? unpackView(raw) : JSON.parse(new TextDecoder().decode(raw));
  if (status < 200 || status >= 300) {
    const err = (value as { error?: { code?: string; message?: string } }).error;
    throw new KvrecallRequestError(status, err?.code ?? 'unknown', err?.message ?? statusText);
  }
  return value as T;
}
