// A typed client for the v1 wire protocol (msgpack over HTTP).
//
//   const kv = new KvrecallClient({ url: 'http://127.0.0.1:8700' });
//   await kv.createDocument('manual', model);
//   await kv.uploadDocumentKv('manual', { layer, start: 0, k: tensor('f16', [8, n, 128], kBytes), v: ... });
//   await kv.sealDocument('manual');
//   const { id } = await kv.createSession({ model, documents: ['manual'], method: 'exact' });
//   const { out, lse } = await kv.attend(id, { layer, q: tensor('f32', [32, 128], q) });
import { Packr, Unpackr } from 'msgpackr';
import type { ModelShape } from './model.js';
import type { Tensor, WireDtype } from './tensor.js';

export type { Tensor, WireDtype, ModelShape };

const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false, int64AsType: 'number' });

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
  q?: Tensor;
}

export interface SessionSpec {
  model: Partial<ModelShape> & Omit<ModelShape, 'dtype' | 'blockSize'>;
  documents?: string[];
  method?: string;
  budget?: number;
  sinks?: number;
  window?: number;
  ef?: number;
}

export interface AttendBody {
  layer: number;
  q: Tensor;
  k?: Tensor;
  v?: Tensor;
  scale?: number;
  return?: ('out' | 'kv' | 'selection')[];
}

export interface AttendReply {
  out: Float32Array;
  lse: Float32Array;
  selection?: Int32Array[];
  kv?: { k: Tensor[]; v: Tensor[] };
  stats: { tokens: number; attended: number; scanned: number; ms: number; selectMs: number; attendMs: number; blocks?: { selected: number; hits: number; bytesIn: number } };
}

export interface DocumentInfo {
  id: string;
  status: 'loading' | 'ready' | 'incomplete';
  phase: 'loading' | 'building' | 'ready' | 'incomplete';
  progress?: number;
  tokens: number;
  bytes: number;
  model: ModelShape;
  methods: string[];
}

function copyOut<T extends Float32Array | Int32Array>(make: (n: number) => T, t: Tensor): T {
  const out = make(t.data.byteLength / 4);
  new Uint8Array(out.buffer).set(t.data);
  return out;
}

export class KvrecallClient {
  private readonly url: string;
  private readonly headers: Record<string, string>;

  constructor(opts: { url: string; token?: string }) {
    this.url = opts.url.replace(/\/$/, '');
    this.headers = { 'content-type': 'application/msgpack', accept: 'application/msgpack' };
    if (opts.token) this.headers.authorization = `Bearer ${opts.token}`;
  }

  health(): Promise<{ ok: boolean; version: string; backend: string; threads: number }> {
    return this.call('GET', '/v1/health');
  }

  /** methods: retrieval methods whose indexes are built at seal; queryStride: keep prefill queries of 1 token in N. */
  createDocument(id: string, model: SessionSpec['model'], opts: { methods?: string[]; queryStride?: number } = {}): Promise<DocumentInfo> {
    return this.call('PUT', `/v1/documents/${encodeURIComponent(id)}`, { model, ...opts });
  }

  uploadDocumentKv(id: string, body: KvUploadBody): Promise<{ layer: number; tokens: number }> {
    return this.call('POST', `/v1/documents/${encodeURIComponent(id)}/kv`, body);
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

  deleteDocument(id: string): Promise<unknown> {
    return this.call('DELETE', `/v1/documents/${encodeURIComponent(id)}`);
  }

  createSession(spec: SessionSpec): Promise<{ id: string; method: string; documentTokens: number }> {
    return this.call('POST', '/v1/sessions', spec);
  }

  uploadSessionKv(sid: string, body: KvUploadBody): Promise<{ layer: number; tokens: number }> {
    return this.call('POST', `/v1/sessions/${sid}/kv`, body);
  }

  async attend(sid: string, body: AttendBody): Promise<AttendReply> {
    const r = await this.call<{ out: Tensor; lse: Tensor; selection?: Tensor[]; kv?: AttendReply['kv']; stats: AttendReply['stats'] }>(
      'POST',
      `/v1/sessions/${sid}/attend`,
      body,
    );
    return {
      out: copyOut((n) => new Float32Array(n), r.out),
      lse: copyOut((n) => new Float32Array(n), r.lse),
      ...(r.selection && { selection: r.selection.map((t) => copyOut((n) => new Int32Array(n), t)) }),
      ...(r.kv && { kv: r.kv }),
      stats: r.stats,
    };
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
    const raw = new Uint8Array(await res.arrayBuffer());
    const type = res.headers.get('content-type') ?? '';
    const value = raw.byteLength === 0 ? {} : type.includes('msgpack') ? unpackr.unpack(raw) : JSON.parse(new TextDecoder().decode(raw));
    if (!res.ok) {
      const err = (value as { error?: { code?: string; message?: string } }).error;
      throw new KvrecallRequestError(res.status, err?.code ?? 'unknown', err?.message ?? res.statusText);
    }
    return value as T;
  }
}
