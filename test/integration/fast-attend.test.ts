// The attend routes' direct path (api/fast-attend.ts: a msgpack body of
// declared length) against the Hono app's path for the same routes (reached
// with a chunked or a JSON body), on the real server over 127.0.0.1: the
// answers are bit-identical, including the batch route's; bad bodies on the
// direct path get the documented 4xx as JSON, change nothing, and the
// connection or the server goes on serving.
import { request } from 'node:http';
import { Packr } from 'msgpackr';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor, type AttendReply, type Tensor } from '../../clients/ts/client.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`fast-attend: seed ${seed}`);
const TOKEN = 't0ken';
const LIMIT = 1 << 18;
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const rng = new Rng(seed);
const tmp = tempDataDir();
const packr = new Packr({ useRecords: false });
let server: RunningServer;
let client: KvrecallClient;
const qT = (q: Float32Array) => tensor('f32', [model.qHeads, model.headDim], q);

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { token: TOKEN, bodyLimit: LIMIT });
  client = new KvrecallClient({ url: server.url, token: TOKEN });
  await client.createDocument('doc', model);
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, 300, model.headDim);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

const session = async () => (await client.createSession({ model, documents: ['doc'], method: 'exact' })).id;

interface Raw {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** One request on a fresh connection: the body with its length declared, or sent chunked (no length: the Hono path). */
function raw(path: string, body: Uint8Array | string, opts: { chunked?: boolean; headers?: Record<string, string> } = {}): Promise<Raw> {
  const json = typeof body === 'string';
  const headers: Record<string, string> = { authorization: `Bearer ${TOKEN}`, 'content-type': json ? 'application/json' : 'application/msgpack', ...opts.headers };
  if (!opts.chunked) headers['content-length'] = String(Buffer.byteLength(body));
  return new Promise((resolve, reject) => {
    const req = request(`${server.url}${path}`, { method: 'POST', headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    if (opts.chunked && !json && body.byteLength > 1) {
      // Two chunks, so the body really arrives in pieces.
      req.write(body.subarray(0, 7));
      req.end(body.subarray(7));
    } else req.end(body);
  });
}

const decoded = (r: Raw) => (/json/.test(String(r.headers['content-type'])) ? JSON.parse(r.body.toString()) : packr.unpack(r.body));
const b64 = (t: Tensor) => ({ ...t, data: Buffer.from(t.data).toString('base64') });
/** out and lse bytes of a wire answer (msgpack binary or JSON base64). */
function wireBits(a: { out: { data: Uint8Array | string }; lse: { data: Uint8Array | string } }): string[] {
  const hex = (d: Uint8Array | string) => (typeof d === 'string' ? Buffer.from(d, 'base64') : Buffer.from(d)).toString('hex');
  return [hex(a.out.data), hex(a.lse.data)];
}
const replyBits = (r: AttendReply) => [Buffer.from(r.out.buffer).toString('hex'), Buffer.from(r.lse.buffer).toString('hex')];

describe('the attend routes served directly', () => {
  it('answers as the Hono route does, bit for bit: single and batch, msgpack and JSON', async () => {
    const [direct, chunked, json, batchDirect, batchChunked] = await Promise.all([session(), session(), session(), session(), session()]);
    for (let position = 0; position < 3; position++)
      for (let layer = 0; layer < model.layers; layer++) {
        const q = qT(randomQ(rng, model.qHeads, model.headDim));
        const step = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
        const body = { layer, q, ...step, position };
        const a = await client.attend(direct, body);
        const viaHono = await raw(`/v1/sessions/${chunked}/attend`, packr.pack(body), { chunked: true });
        expect(viaHono.status).toBe(200);
        expect(wireBits(decoded(viaHono))).toEqual(replyBits(a));
        const viaJson = await raw(`/v1/sessions/${json}/attend`, JSON.stringify({ layer, position, q: b64(q), k: b64(step.k), v: b64(step.v) }));
        expect(viaJson.status).toBe(200);
        expect(wireBits(decoded(viaJson))).toEqual(replyBits(a));
        // The batch route, directly (declared length) and through Hono (chunked).
        const batch = { layer, steps: [{ session: batchDirect, q, ...step, position }, { session: 'nope', q }] };
        const [d, h] = await Promise.all([raw('/v1/attend', packr.pack(batch)), raw('/v1/attend', packr.pack({ ...batch, steps: [{ ...batch.steps[0], session: batchChunked }, batch.steps[1]] }), { chunked: true })]);
        expect([d.status, h.status]).toEqual([200, 200]);
        const [dr, hr] = [decoded(d), decoded(h)];
        expect(wireBits(dr.results[0])).toEqual(replyBits(a));
        expect(wireBits(hr.results[0])).toEqual(replyBits(a));
        expect(dr.results[1]).toEqual({ error: { code: 'not_found', message: expect.stringMatching(/nope/) } });
        expect(hr.results[1]).toEqual(dr.results[1]);
        expect(dr.results[0].stats.tokens).toBe(300 + position + 1);
      }
  });

  it('refuses bad bodies with a 4xx in JSON, changes nothing, and keeps serving', async () => {
    const sid = await session();
    const q = qT(randomQ(rng, model.qHeads, model.headDim));
    const step = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
    const path = `/v1/sessions/${sid}/attend`;
    const cases: [string, () => Promise<Raw>, number, string][] = [
      ['over the body limit', () => raw(path, new Uint8Array(LIMIT + 1)), 413, 'too_large'],
      ['not msgpack', () => raw(path, Uint8Array.of(0xc1, 0x00, 0x01)), 400, 'malformed'],
      ['truncated', () => raw(path, packr.pack({ layer: 0, q, ...step, position: 0 }).subarray(0, 40)), 400, 'malformed'],
      ['not a map', () => raw(path, packr.pack([1, 2])), 400, 'malformed'],
      ['empty', () => raw(path, new Uint8Array(0)), 422, 'invalid'],
      ['a wrong shape of q', () => raw(path, packr.pack({ layer: 0, q: { ...q, shape: [model.qHeads + 1, model.headDim] }, ...step, position: 0 })), 422, 'invalid'],
      ['a layer out of range', () => raw(path, packr.pack({ layer: 2, q, ...step, position: 0 })), 422, 'invalid'],
      ['a repeated position', () => raw(path, packr.pack({ layer: 0, q, ...step, position: 1 })), 409, 'conflict'],
      ['an unknown session', () => raw('/v1/sessions/nope/attend', packr.pack({ layer: 0, q })), 404, 'not_found'],
      ['a wrong token', () => raw(path, packr.pack({ layer: 0, q, ...step, position: 0 }), { headers: { authorization: 'Bearer no' } }), 401, 'unauthorized'],
      ['a batch with no steps', () => raw('/v1/attend', packr.pack({ layer: 0, steps: [] })), 422, 'invalid'],
      ['a batch over the limit', () => raw('/v1/attend', new Uint8Array(LIMIT + 1)), 413, 'too_large'],
      ['a batch that is not msgpack', () => raw('/v1/attend', Uint8Array.of(0xc1)), 400, 'malformed'],
    ];
    for (const [name, send, status, code] of cases) {
      const r = await send();
      expect([name, r.status, JSON.parse(r.body.toString()).error.code]).toEqual([name, status, code]);
      expect(String(r.headers['content-type'])).toMatch(/json/);
    }
    // The body left unread: the server says it drops the connection.
    expect((await cases[0][1]()).headers.connection).toBe('close');
    expect((await cases[9][1]()).headers['www-authenticate']).toBe('Bearer');
    // Nothing was appended: the session's first own token is still position 0.
    const r = await client.attend(sid, { layer: 0, q, ...step, position: 0 });
    expect(r.stats.tokens).toBe(301);
  });

  it('a client that goes away mid-body changes nothing; the route keeps serving', async () => {
    const sid = await session();
    const body = packr.pack({ layer: 0, q: qT(randomQ(rng, model.qHeads, model.headDim)), ...asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim)), position: 0 });
    await new Promise<void>((resolve) => {
      const req = request(`${server.url}/v1/sessions/${sid}/attend`, {
        method: 'POST',
        agent: false,
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/msgpack', 'content-length': String(body.byteLength) },
      });
      req.on('error', () => resolve());
      req.write(body.subarray(0, body.byteLength >> 1), () => setTimeout(() => req.destroy(), 50));
      req.on('close', () => resolve());
    });
    const held = (await client.getSession(sid)).ownTokens as number[];
    expect(held[0]).toBe(0);
    const r = await client.attend(sid, { layer: 0, q: qT(randomQ(rng, model.qHeads, model.headDim)), ...asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim)), position: 0 });
    expect(r.stats.tokens).toBe(301);
  });
});
