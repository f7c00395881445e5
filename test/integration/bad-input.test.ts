// Bad input gets the documented 4xx, loses nothing, and the server keeps
// serving: every case below is followed by a check that a valid request
// still gets the same answer as before.
import { pack } from 'msgpackr';
import { cudaAvailable } from '../../addon/cuda.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { asStep, f32Tensor, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const TOKEN = 'secret-token';
const LIMIT = 1 << 20;
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const seed = freshSeed();
const rng = new Rng(seed);
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
let sid: string;
let baseline: Float32Array;
const q = randomQ(rng, model.qHeads, model.headDim);

async function send(method: string, path: string, body?: Uint8Array | string, headers: Record<string, string> = {}) {
  const res = await fetch(server.url + path, {
    method,
    body: body as BodyInit | undefined,
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': typeof body === 'string' ? 'application/json' : 'application/msgpack', ...headers },
  });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as { error?: { code: string; message: string } }) : {} };
}

const msg = (x: unknown) => new Uint8Array(pack(x));

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { token: TOKEN, bodyLimit: LIMIT });
  client = new KvrecallClient({ url: server.url, token: TOKEN });
  await client.createDocument('doc', model);
  for (let layer = 0; layer < 2; layer++) {
    const c = randomKv(rng, 'f16', 2, 50, 16);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
  await client.createDocument('open', model);
  sid = (await client.createSession({ model, documents: ['doc'] })).id;
  baseline = (await client.attend(sid, { layer: 1, q: tensor('f32', [4, 16], q) })).out;
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

const good = () => randomKv(rng, 'f16', 2, 3, 16);
const nanK = () => {
  const a = new Float32Array(2 * 3 * 16).fill(0.5);
  a[40] = NaN;
  return f32Tensor([2, 3, 16], a);
};

interface Case {
  name: string;
  method: string;
  path: () => string;
  body?: () => Uint8Array | string;
  headers?: Record<string, string>;
  status: number;
  code: string;
  message?: RegExp;
}

const CASES: Case[] = [
  { name: 'malformed msgpack', method: 'POST', path: () => '/v1/documents/open/kv', body: () => Uint8Array.of(0xc1, 0x00), status: 400, code: 'malformed' },
  { name: 'truncated msgpack', method: 'POST', path: () => `/v1/sessions/${sid}/attend`, body: () => msg({ layer: 0, q: 'x' }).subarray(0, 5), status: 400, code: 'malformed' },
  { name: 'malformed JSON', method: 'PUT', path: () => '/v1/documents/x', body: () => '{"model":', status: 400, code: 'malformed' },
  { name: 'body that is not a map', method: 'POST', path: () => '/v1/sessions', body: () => msg([1, 2, 3]), status: 400, code: 'malformed' },
  { name: 'unknown dtype', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 0, start: 0, k: { ...c.k, dtype: 'f64' }, v: c.v }); }, status: 422, code: 'invalid', message: /k\.dtype must be one of f16, bf16, f32, got "f64"/ },
  { name: 'integer dtype for keys', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 0, start: 0, k: { dtype: 'i32', shape: [2, 3, 8], data: c.k.data }, v: c.v }); }, status: 422, code: 'invalid', message: /k\.dtype must be one of f16, bf16, f32, got "i32"/ },
  { name: 'wrong shape', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = randomKv(rng, 'f16', 2, 3, 8); return msg({ layer: 0, start: 0, k: { ...c.k, shape: [2, 6, 8] }, v: c.v }); }, status: 422, code: 'invalid', message: /shape/ },
  { name: 'data shorter than its shape', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 0, start: 0, k: { ...c.k, data: c.k.data.subarray(2) }, v: c.v }); }, status: 422, code: 'invalid', message: /bytes/ },
  { name: 'huge declared shape', method: 'POST', path: () => '/v1/documents/open/kv', body: () => msg({ layer: 0, start: 0, k: { dtype: 'f16', shape: [2, 2 ** 40, 16], data: new Uint8Array(8) }, v: good().v }), status: 422, code: 'invalid' },
  { name: 'NaN in k', method: 'POST', path: () => '/v1/documents/open/kv', body: () => msg({ layer: 0, start: 0, k: nanK(), v: good().v }), status: 422, code: 'invalid', message: /NaN/ },
  { name: 'Inf in q', method: 'POST', path: () => `/v1/sessions/${sid}/attend`, body: () => msg({ layer: 0, q: f32Tensor([4, 16], new Float32Array(64).fill(Infinity)) }), status: 422, code: 'invalid', message: /NaN or infinite/ },
  { name: 'prefill q at a stride other than the document\'s', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 0, start: 0, k: c.k, v: c.v, queryStride: 2, q: f32Tensor([4, 2, 16], new Float32Array(128)) }); }, status: 422, code: 'invalid', message: /queryStride must be the document's, 4/ },
  { name: 'prefill q at the stride with the wrong number of rows', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 0, start: 0, k: c.k, v: c.v, queryStride: 4, q: f32Tensor([4, 3, 16], new Float32Array(192)) }); }, status: 422, code: 'invalid', message: /shape \[4, 1, 16\]/ },
  { name: 'kv for a layer out of range', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 2, start: 0, k: c.k, v: c.v }); }, status: 422, code: 'invalid', message: /layer/ },
  { name: 'attend for a layer out of range', method: 'POST', path: () => `/v1/sessions/${sid}/attend`, body: () => msg({ layer: -1, q: tensor('f32', [4, 16], q) }), status: 422, code: 'invalid' },
  { name: 'kv after seal', method: 'POST', path: () => '/v1/documents/doc/kv', body: () => { const c = good(); return msg({ layer: 0, start: 50, k: c.k, v: c.v }); }, status: 409, code: 'conflict', message: /sealed/ },
  { name: 'kv out of order (gap)', method: 'POST', path: () => '/v1/documents/open/kv', body: () => { const c = good(); return msg({ layer: 0, start: 7, k: c.k, v: c.v }); }, status: 409, code: 'conflict', message: /start/ },
  { name: 'session kv out of order', method: 'POST', path: () => `/v1/sessions/${sid}/kv`, body: () => { const c = good(); return msg({ layer: 0, start: 3, k: c.k, v: c.v }); }, status: 409, code: 'conflict' },
  { name: 'seal with nothing uploaded', method: 'POST', path: () => '/v1/documents/open/seal', body: () => msg({}), status: 409, code: 'conflict' },
  { name: 'unknown session', method: 'POST', path: () => '/v1/sessions/nope/attend', body: () => msg({ layer: 0, q: tensor('f32', [4, 16], q) }), status: 404, code: 'not_found' },
  { name: 'unknown document', method: 'GET', path: () => '/v1/documents/nope', status: 404, code: 'not_found' },
  { name: 'session over an unknown document', method: 'POST', path: () => '/v1/sessions', body: () => msg({ model, documents: ['nope'] }), status: 404, code: 'not_found' },
  { name: 'session over a document still loading', method: 'POST', path: () => '/v1/sessions', body: () => msg({ model, documents: ['open'] }), status: 409, code: 'conflict' },
  { name: 'session whose model differs from its document', method: 'POST', path: () => '/v1/sessions', body: () => msg({ model: { ...model, headDim: 32 }, documents: ['doc'] }), status: 409, code: 'conflict' },
  { name: 'unknown method', method: 'POST', path: () => '/v1/sessions', body: () => msg({ model, method: 'magic' }), status: 422, code: 'invalid' },
  { name: 'session naming a document twice', method: 'POST', path: () => '/v1/sessions', body: () => msg({ model, documents: ['doc', 'doc'], method: 'wave' }), status: 422, code: 'invalid', message: /documents names "doc" twice/ },
  { name: 'GQA shape that does not divide', method: 'PUT', path: () => '/v1/documents/odd', body: () => msg({ model: { ...model, qHeads: 5 } }), status: 422, code: 'invalid' },
  { name: 'id escaping its namespace', method: 'PUT', path: () => '/v1/documents/..%2Fetc', body: () => msg({ model }), status: 422, code: 'invalid' },
  { name: 'document created twice', method: 'PUT', path: () => '/v1/documents/doc', body: () => msg({ model }), status: 409, code: 'conflict' },
  { name: 'oversized body', method: 'POST', path: () => '/v1/documents/open/kv', body: () => new Uint8Array(LIMIT + 1), status: 413, code: 'too_large', message: /limit of 1048576 bytes \(the server's --body-limit\)/ },
  { name: 'missing token', method: 'GET', path: () => '/v1/documents', headers: { authorization: '' }, status: 401, code: 'unauthorized' },
  { name: 'wrong token', method: 'POST', path: () => `/v1/sessions/${sid}/attend`, body: () => msg({ layer: 0, q: tensor('f32', [4, 16], q) }), headers: { authorization: 'Bearer nope' }, status: 401, code: 'unauthorized' },
  { name: 'unknown route', method: 'GET', path: () => '/v2/anything', status: 404, code: 'not_found' },
];

describe('bad input', () => {
  for (const c of CASES)
    it(`${c.name} → ${c.status}, and the server keeps serving`, async () => {
      const res = await send(c.method, c.path(), c.body?.(), c.headers);
      expect(res.status).toBe(c.status);
      expect(res.body.error?.code).toBe(c.code);
      if (c.message) expect(res.body.error?.message).toMatch(c.message);
      const again = await client.attend(sid, { layer: 1, q: tensor('f32', [4, 16], q) });
      expect(again.out).toEqual(baseline);
    });

  it('health needs no token; nothing was lost', async () => {
    const res = await fetch(`${server.url}/v1/health`);
    expect(res.status).toBe(200);
    const health = (await res.json()) as { backend: string; gpu: { available?: boolean; built?: boolean; device?: string; error?: string } };
    // No GPU on CI machines: the CPU backend answers, and says why there is no GPU (in error: device is only ever a name).
    const info = cudaAvailable();
    expect(health.backend).toBe(info.ok ? 'cuda' : 'cpu');
    if (info.ok) expect(health.gpu).toMatchObject({ device: info.device });
    else {
      expect(health.gpu).toMatchObject({ available: false, error: info.error });
      expect(health.gpu.error).not.toBe('');
      expect(health.gpu).not.toHaveProperty('device');
    }
    expect(await client.getDocument('doc')).toMatchObject({ status: 'ready', tokens: 50 });
    expect(await client.getDocument('open')).toMatchObject({ status: 'loading', tokens: 0 });
    // The open document still accepts the upload it expects.
    const c = randomKv(rng, 'f16', 2, 3, 16);
    await expect(client.uploadDocumentKv('open', { layer: 0, start: 0, k: c.k, v: c.v })).resolves.toMatchObject({ tokens: 3 });
    // A session over the ready document still appends and attends.
    const step = asStep(randomKv(rng, 'f16', 2, 1, 16));
    await expect(client.attend(sid, { layer: 0, q: tensor('f32', [4, 16], q), ...step })).resolves.toMatchObject({ stats: { tokens: 51 } });
  });
});
