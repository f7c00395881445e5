// The document upload path against a real server and real LMDB files:
// prefill queries sent only at the document's stride keep exactly the rows
// that q for every token keeps; bodies are read whole (declared length or
// chunked), refused past the limit, and leave keep-alive connections open;
// uploads in flight on several layers and documents land intact; a tokens
// hint reserves the memory at PUT; a failed block write is never sealed.
import { request } from 'node:http';
import { connect } from 'node:net';
import { pack } from 'msgpackr';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { blockSummaryBuilder } from '../../index/block-select.js';
import { methodNames } from '../../index/registry.js';
import { KvrecallClient, keptTokens, stridedQueries, tensor } from '../../clients/ts/client.js';
import { Documents } from '../../engine/documents.js';
import { KvrecallError } from '../../core/errors.js';
import type { Tensor } from '../../core/tensor.js';
import { HostBudget } from '../../storage/host-budget.js';
import { DocumentStore } from '../../storage/store.js';
import { f16Bits } from '../helpers/half.js';
import { f32Tensor, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`upload: seed ${seed}`);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const, blockSize: 16 };
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { bodyLimit: 1 << 20 });
  client = new KvrecallClient({ url: server.url });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

const words = (t: Tensor) => new Uint16Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength));
/** Byte equality (vitest's toEqual walks large typed arrays element by element, for seconds). */
const same = (a: Uint16Array, b: Uint16Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

/** Every token's K/V of a ready document, read back through an exact session: [layer][head] words. */
async function readBack(doc: string): Promise<{ k: Uint16Array[][]; v: Uint16Array[][] }> {
  const s = await client.createSession({ model, documents: [doc], method: 'exact' });
  const k: Uint16Array[][] = [], v: Uint16Array[][] = [];
  for (let layer = 0; layer < model.layers; layer++) {
    const r = await client.attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim)), return: ['kv'] });
    k.push(r.kv!.k.map(words));
    v.push(r.kv!.v.map(words));
  }
  await client.deleteSession(s.id);
  return { k, v };
}

/** Per head, the chunks' words concatenated. */
function headWords(chunks: KvChunk[], which: 'k' | 'v', h: number): Uint16Array {
  const parts = chunks.map((c) => {
    const n = c.k.shape[1], d = c.k.shape[2];
    return new Uint16Array(c[which].data.buffer, c[which].data.byteOffset + h * n * d * 2, n * d);
  });
  const out = new Uint16Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Rows of q [heads, n, d] (f32) for the tokens of [start, start + n) that `pick` selects, replaced by fresh values. */
function replaceRows(rng: Rng, q: Float32Array, heads: number, n: number, d: number, start: number, pick: (t: number) => boolean): Float32Array {
  const out = q.slice();
  for (let h = 0; h < heads; h++) for (let i = 0; i < n; i++) if (pick(start + i)) for (let j = 0; j < d; j++) out[(h * n + i) * d + j] = rng.normal() * 3;
  return out;
}

describe('prefill queries at the document stride', () => {
  const STRIDE = 3;
  const CHUNKS = [101, 250, 1, 2, 346]; // starts 0, 101, 351, 352, 354: every offset modulo the stride
  const H = model.qHeads, d = model.headDim;

  it('q for the kept tokens only, declared with queryStride, keeps the rows q for every token keeps', async () => {
    const rng = new Rng(seed ^ 0x11);
    const variants = ['every', 'strided', 'strided-f16', 'other-rows', 'kept-rows'] as const;
    for (const id of variants) await client.createDocument(id, model, { methods: ['nosa'], queryStride: STRIDE });
    for (let layer = 0; layer < model.layers; layer++) {
      let start = 0;
      for (const [i, n] of CHUNKS.entries()) {
        const c = randomKv(rng, 'f16', model.kvHeads, n, d);
        // Queries exactly representable in f16, so the f16 upload keeps the same values.
        const q = Float32Array.from(randomQ(rng, H * n, d), (x) => Math.fround(Math.round(x * 64) / 64));
        const full = f32Tensor([H, n, d], q);
        const f16 = tensor('f16', [H, n, d], halfOf(q));
        const send = (id: string, body: { q?: Tensor; queryStride?: number }) => client.uploadDocumentKv(id, { layer, start, k: c.k, v: c.v, ...body });
        await send('every', { q: full });
        const { count } = keptTokens(start, n, STRIDE);
        // A chunk that keeps no token may leave q out.
        await send('strided', count > 0 ? { q: stridedQueries(full, start, STRIDE), queryStride: STRIDE } : {});
        await send('strided-f16', count > 0 ? { q: stridedQueries(f16, start, STRIDE), queryStride: STRIDE } : {});
        await send('other-rows', { q: f32Tensor([H, n, d], replaceRows(rng, q, H, n, d, start, (t) => t % STRIDE !== 0)) });
        await send('kept-rows', { q: f32Tensor([H, n, d], i === 1 ? replaceRows(rng, q, H, n, d, start, (t) => t % STRIDE === 0) : q) });
        start += n;
      }
    }
    const artifacts: Record<string, string> = {};
    for (const id of variants) {
      expect(await client.sealDocument(id)).toMatchObject({ status: 'ready', tokens: 700, queryStride: STRIDE });
      const a = (await server.engine.store.loadArtifacts(id, 'nosa', model.layers, model.kvHeads))!;
      artifacts[id] = a.flat().map((b) => Buffer.from(b).toString('hex')).join('|');
    }
    expect(artifacts.strided).toBe(artifacts.every);
    expect(artifacts['strided-f16']).toBe(artifacts.every);
    // The server keeps the rows of t % stride == 0 and only those.
    expect(artifacts['other-rows']).toBe(artifacts.every);
    expect(artifacts['kept-rows']).not.toBe(artifacts.every);
  });

  it('refuses a stride other than the document\'s, or a strided q of the wrong size, and applies nothing', async () => {
    const rng = new Rng(seed ^ 0x12);
    await client.createDocument('strict', model, { queryStride: STRIDE });
    const c = randomKv(rng, 'f16', model.kvHeads, 10, d);
    const q = f32Tensor([H, 10, d], randomQ(rng, H * 10, d));
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ q: stridedQueries(q, 0, 2), queryStride: 2 }, /queryStride must be the document's, 3/],
      [{ q: stridedQueries(q, 1, STRIDE), queryStride: STRIDE }, /q \(the 4 tokens of 10 kept at queryStride 3\) must have shape \[8, 4, 32\], got \[8, 3, 32\]/],
      [{ q, queryStride: STRIDE }, /must have shape \[8, 4, 32\]/],
      [{ q: stridedQueries(q, 0, STRIDE), queryStride: '3' }, /queryStride must be the document's/],
    ];
    const nan = stridedQueries(q, 0, STRIDE);
    new Float32Array(nan.data.buffer, nan.data.byteOffset, nan.data.byteLength / 4)[5] = NaN;
    cases.push([{ q: nan, queryStride: STRIDE }, /q holds a NaN/]);
    for (const [extra, message] of cases) {
      const res = await fetch(`${server.url}/v1/documents/strict/kv`, {
        method: 'POST',
        headers: { 'content-type': 'application/msgpack', accept: 'application/json' },
        body: new Uint8Array(pack({ layer: 0, start: 0, k: c.k, v: c.v, ...extra })),
      });
      const body = (await res.json()) as { error: { code: string; message: string } };
      expect(res.status, body.error.message).toBe(422);
      expect(body.error.message).toMatch(message);
      expect((await client.getDocument('strict')).tokens).toBe(0);
    }
    await expect(client.uploadDocumentKv('strict', { layer: 0, start: 0, k: c.k, v: c.v, q: stridedQueries(q, 0, STRIDE), queryStride: STRIDE })).resolves.toMatchObject({ tokens: 10 });
  });

  it("a session's kv route does not read queryStride: q must hold every token", async () => {
    const rng = new Rng(seed ^ 0x13);
    const s = await client.createSession({ model });
    const c = randomKv(rng, 'f16', model.kvHeads, 6, d);
    const q = f32Tensor([H, 6, d], randomQ(rng, H * 6, d));
    await expect(client.uploadSessionKv(s.id, { layer: 0, start: 0, k: c.k, v: c.v, q: stridedQueries(q, 0, 3), ...{ queryStride: 3 } })).rejects.toMatchObject({ status: 422 });
    await expect(client.uploadSessionKv(s.id, { layer: 0, start: 0, k: c.k, v: c.v, q })).resolves.toMatchObject({ tokens: 6 });
  });

  it('tells a k of the wrong rank the shape it needs, not one made from its own dims', async () => {
    const rng = new Rng(seed ^ 0x14);
    await client.createDocument('rank', model);
    const s = await client.createSession({ model });
    // One token sent as [kvHeads, d], as an attend's k is: read as tokens = d, the old message asked for [2, 32, 32].
    const flat = randomKv(rng, 'f16', model.kvHeads, 1, d);
    const k2 = { ...flat.k, shape: [model.kvHeads, d] }, v2 = { ...flat.v, shape: [model.kvHeads, d] };
    const need = /k must have shape \[kvHeads, tokens, headDim\] = \[2, tokens, 32\], got \[2, 32\]/;
    await expect(client.uploadDocumentKv('rank', { layer: 0, start: 0, k: k2, v: v2 })).rejects.toMatchObject({ status: 422, message: expect.stringMatching(need) });
    await expect(client.uploadSessionKv(s.id, { layer: 0, start: 0, k: k2, v: v2 })).rejects.toMatchObject({ status: 422, message: expect.stringMatching(need) });
    expect((await client.getDocument('rank')).tokens).toBe(0);
  });
});

const halfOf = (x: Float32Array) => Uint16Array.from(x, f16Bits);

describe('k and v of different dtypes', () => {
  it('are each read as their own dtype on the document and session routes', async () => {
    const rng = new Rng(seed ^ 0x61);
    await client.createDocument('mixed', model);
    await client.createDocument('mixed-ref', model);
    const n = 5, size = model.kvHeads * n * model.headDim;
    const c = randomKv(rng, 'f16', model.kvHeads, n, model.headDim);
    // f32 values exactly representable in f16: stored, they are the f16 words of the same values.
    const v32 = Float32Array.from({ length: size }, () => Math.round(rng.normal() * 64) / 64);
    const v16 = tensor('f16', [model.kvHeads, n, model.headDim], Uint16Array.from(v32, f16Bits));
    const v32t = f32Tensor([model.kvHeads, n, model.headDim], v32);
    const k32t = f32Tensor([model.kvHeads, n, model.headDim], Float32Array.from(c.kValues.flatMap((h) => Array.from(h))));
    for (let layer = 0; layer < model.layers; layer++) {
      await client.uploadDocumentKv('mixed', layer === 0 ? { layer, start: 0, k: c.k, v: v32t } : { layer, start: 0, k: k32t, v: v16 });
      await client.uploadDocumentKv('mixed-ref', { layer, start: 0, k: c.k, v: v16 });
    }
    for (const id of ['mixed', 'mixed-ref']) await client.sealDocument(id);
    const [got, ref] = [await readBack('mixed'), await readBack('mixed-ref')];
    for (let layer = 0; layer < model.layers; layer++)
      for (let h = 0; h < model.kvHeads; h++) {
        expect(same(got.k[layer][h], ref.k[layer][h]), `k ${layer} ${h}`).toBe(true);
        expect(same(got.v[layer][h], ref.v[layer][h]), `v ${layer} ${h}`).toBe(true);
      }
    // A session's own tokens: the same.
    const s = await client.createSession({ model, method: 'exact' });
    await client.uploadSessionKv(s.id, { layer: 0, start: 0, k: c.k, v: v32t });
    const r = await client.attend(s.id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim)), return: ['kv'] });
    for (let h = 0; h < model.kvHeads; h++) expect(same(words(r.kv!.v[h]), ref.v[0][h]), `session v ${h}`).toBe(true);
    // A decode step's own k (f16) and v (f32) appended by attend: the same.
    const d = model.headDim;
    const stepK = new Uint16Array(model.kvHeads * d), stepV = new Float32Array(model.kvHeads * d);
    for (let h = 0; h < model.kvHeads; h++)
      for (let j = 0; j < d; j++) {
        stepV[h * d + j] = Math.round(rng.normal() * 64) / 64;
        stepK[h * d + j] = f16Bits(rng.normal());
      }
    const a = await client.attend(s.id, {
      layer: 0,
      q: tensor('f32', [model.qHeads, d], new Float32Array(model.qHeads * d)),
      k: tensor('f16', [model.kvHeads, d], stepK),
      v: f32Tensor([model.kvHeads, d], stepV),
      return: ['kv'],
    });
    for (let h = 0; h < model.kvHeads; h++) {
      const v = words(a.kv!.v[h]);
      expect(same(v.subarray(n * d), halfOf(stepV.subarray(h * d, (h + 1) * d))), `step v ${h}`).toBe(true);
      expect(same(words(a.kv!.k[h]).subarray(n * d), stepK.subarray(h * d, (h + 1) * d)), `step k ${h}`).toBe(true);
    }
    await client.deleteSession(s.id);
  });
});

describe('request bodies', () => {
  function raw(path: string, body: Uint8Array, chunked: boolean): Promise<{ status: number; json: { error?: { code: string }; tokens?: number } }> {
    const { hostname, port } = new URL(server.url);
    return new Promise((resolve, reject) => {
      let answered = false;
      const headers = { 'content-type': 'application/msgpack', accept: 'application/json', ...(chunked ? {} : { 'content-length': body.byteLength }) };
      const req = request({ hostname, port, path, method: 'POST', headers }, (res) => {
        answered = true;
        const parts: Buffer[] = [];
        res.on('data', (b: Buffer) => parts.push(b));
        res.on('end', () => resolve({ status: res.statusCode!, json: JSON.parse(Buffer.concat(parts).toString() || '{}') }));
      });
      // A refused body may be cut off while it is still being written: the answer counts.
      req.on('error', (e) => answered || reject(e));
      // Several writes: a chunked body arrives in pieces.
      for (let at = 0; at < body.byteLength; at += 7000) req.write(body.subarray(at, at + 7000));
      req.end();
    });
  }

  it('a chunked body is read whole; past the limit it is refused 413 and changes nothing', async () => {
    const rng = new Rng(seed ^ 0x21);
    await client.createDocument('chunked', model);
    const c = randomKv(rng, 'f16', model.kvHeads, 300, model.headDim);
    const ok = await raw('/v1/documents/chunked/kv', new Uint8Array(pack({ layer: 0, start: 0, k: c.k, v: c.v })), true);
    expect(ok.status).toBe(200);
    expect(ok.json.tokens).toBe(300);
    // 1 MiB limit: 4200 tokens × 2 heads × 32 × 2 bytes × 2 is 1.03 MiB.
    const big = randomKv(rng, 'f16', model.kvHeads, 4200, model.headDim);
    const refused = await raw('/v1/documents/chunked/kv', new Uint8Array(pack({ layer: 0, start: 300, k: big.k, v: big.v })), true);
    expect(refused.status).toBe(413);
    expect(refused.json.error?.code).toBe('too_large');
    await client.uploadDocumentKv('chunked', { layer: 1, start: 0, k: c.k, v: c.v });
    expect((await client.getDocument('chunked')).tokens).toBe(300);
    await client.sealDocument('chunked');
    const back = await readBack('chunked');
    for (let h = 0; h < model.kvHeads; h++) {
      expect(same(back.k[0][h], headWords([c], 'k', h))).toBe(true);
      expect(same(back.v[0][h], headWords([c], 'v', h))).toBe(true);
    }
  });

  it('an upload answered 200 leaves the connection open for the next request', async () => {
    const rng = new Rng(seed ^ 0x22);
    await client.createDocument('alive', model);
    const bodies = [0, 40].map((start) => {
      const c = randomKv(rng, 'f16', model.kvHeads, 40, model.headDim);
      return Buffer.from(pack({ layer: 0, start, k: c.k, v: c.v }));
    });
    const { hostname, port } = new URL(server.url);
    const text = await new Promise<string>((resolve) => {
      const socket = connect(Number(port), hostname);
      let seen = '';
      socket.on('data', (b: Buffer) => {
        seen += b.toString('latin1');
        if ((seen.match(/HTTP\/1\.1 /g) ?? []).length === 2) setTimeout(() => socket.end(), 100);
      });
      socket.on('close', () => resolve(seen));
      for (const b of bodies) {
        socket.write(`POST /v1/documents/alive/kv HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\nAccept: application/json\r\nContent-Length: ${b.byteLength}\r\n\r\n`);
        socket.write(b);
      }
      setTimeout(() => socket.end(), 5000);
    });
    const statuses = [...text.matchAll(/HTTP\/1\.1 (\d+)/g)].map((m) => m[1]);
    expect(statuses).toEqual(['200', '200']);
    expect(text).not.toMatch(/connection: close/i);
    // Both landed: layer 0 takes its next upload at 80.
    const c = randomKv(rng, 'f16', model.kvHeads, 5, model.headDim);
    await expect(client.uploadDocumentKv('alive', { layer: 0, start: 80, k: c.k, v: c.v })).resolves.toMatchObject({ tokens: 85 });
  });

  it('uploads in flight on several layers and documents at once land intact', async () => {
    const rng = new Rng(seed ^ 0x23);
    const wide = { ...model, layers: 4 };
    const docs = ['par-a', 'par-b'];
    const sent = new Map<string, KvChunk[][]>();
    for (const id of docs) {
      await client.createDocument(id, wide);
      sent.set(id, Array.from({ length: wide.layers }, () => []));
    }
    // Per (document, layer) the chunks go in order; all (document, layer) streams at once, with odd sizes.
    await Promise.all(
      docs.flatMap((id) =>
        Array.from({ length: wide.layers }, async (_, layer) => {
          let start = 0;
          for (let i = 0; i < 4; i++) {
            const n = 50 + rng.int(3000);
            const c = randomKv(rng, 'f16', wide.kvHeads, n, wide.headDim);
            sent.get(id)![layer].push(c);
            await client.uploadDocumentKv(id, { layer, start, k: c.k, v: c.v });
            start += n;
          }
        }),
      ),
    );
    // Layers of a document must hold equal counts to seal: top them up.
    for (const id of docs) {
      const chunks = sent.get(id)!;
      const counts = chunks.map((l) => l.reduce((n, c) => n + c.k.shape[1], 0));
      const most = Math.max(...counts);
      for (let layer = 0; layer < wide.layers; layer++)
        for (let start = counts[layer]; start < most; ) {
          const c = randomKv(rng, 'f16', wide.kvHeads, Math.min(3000, most - start), wide.headDim);
          chunks[layer].push(c);
          await client.uploadDocumentKv(id, { layer, start, k: c.k, v: c.v });
          start += c.k.shape[1];
        }
      await client.sealDocument(id);
      const s = await client.createSession({ model: wide, documents: [id], method: 'exact' });
      for (let layer = 0; layer < wide.layers; layer++) {
        const r = await client.attend(s.id, { layer, q: tensor('f32', [wide.qHeads, wide.headDim], new Float32Array(wide.qHeads * wide.headDim)), return: ['kv'] });
        for (let h = 0; h < wide.kvHeads; h++) {
          expect(same(words(r.kv!.k[h]), headWords(chunks[layer], 'k', h)), `${id} layer ${layer} head ${h} K`).toBe(true);
          expect(same(words(r.kv!.v[h]), headWords(chunks[layer], 'v', h)), `${id} layer ${layer} head ${h} V`).toBe(true);
        }
      }
    }
    // After a restart the same bytes come from LMDB.
    const before = await readBackWide('par-a', wide);
    await server.close();
    server = await startInProcess(tmp.dir, { bodyLimit: 1 << 20 });
    client = new KvrecallClient({ url: server.url });
    expect(await readBackWide('par-a', wide)).toEqual(before);
  });
});

async function readBackWide(doc: string, m: typeof model): Promise<string[]> {
  const s = await client.createSession({ model: m, documents: [doc], method: 'exact' });
  const out: string[] = [];
  for (let layer = 0; layer < m.layers; layer++) {
    const r = await client.attend(s.id, { layer, q: tensor('f32', [m.qHeads, m.headDim], new Float32Array(m.qHeads * m.headDim)), return: ['kv'] });
    out.push(...r.kv!.k.map((t) => Buffer.from(t.data).toString('hex')), ...r.kv!.v.map((t) => Buffer.from(t.data).toString('hex')));
  }
  return out;
}

describe('seal', () => {
  it('builds the index of methods that share a builder once, and stores it for each', async () => {
    const rng = new Rng(seed ^ 0x51);
    const calls = { n: 0 };
    const build = blockSummaryBuilder.build;
    blockSummaryBuilder.build = (input) => {
      calls.n++;
      return build(input);
    };
    try {
      await client.createDocument('shared-builder', model, { methods: ['nosa', 'topk-blocks'] });
      for (let layer = 0; layer < model.layers; layer++) {
        const c = randomKv(rng, 'f16', model.kvHeads, 333, model.headDim);
        await client.uploadDocumentKv('shared-builder', { layer, start: 0, k: c.k, v: c.v });
      }
      await client.sealDocument('shared-builder');
    } finally {
      blockSummaryBuilder.build = build;
    }
    expect(calls.n).toBe(model.layers * model.kvHeads);
    const nosa = (await server.engine.store.loadArtifacts('shared-builder', 'nosa', model.layers, model.kvHeads))!;
    const topk = (await server.engine.store.loadArtifacts('shared-builder', 'topk-blocks', model.layers, model.kvHeads))!;
    expect(topk.flat().map((b) => Buffer.from(b).toString('hex'))).toEqual(nosa.flat().map((b) => Buffer.from(b).toString('hex')));
    // Both methods answer from their stored index.
    for (const method of ['nosa', 'topk-blocks']) {
      const s = await client.createSession({ model, documents: ['shared-builder'], method, budget: 64 });
      await expect(client.attend(s.id, { layer: 1, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)) })).resolves.toBeDefined();
    }
    expect(server.engine.documents.buildsAfterSeal).toBe(0);
  });
});

describe('a tokens hint at PUT', () => {
  it('reserves the document\'s memory up front, refuses one that does not fit, and still accepts more tokens', async () => {
    const rng = new Rng(seed ^ 0x31);
    const perToken = model.layers * model.kvHeads * model.headDim * 2 * 2;
    const used = async () => ((await client.health()) as unknown as { memory: { used: number; budget: number } }).memory;
    const before = await used();
    await client.createDocument('hinted', model, { tokens: 5000 });
    expect((await used()).used - before.used).toBe(5000 * perToken);
    const tooMany = Math.floor((before.budget - before.used) / perToken) + 1;
    await expect(client.createDocument('huge', model, { tokens: tooMany })).rejects.toMatchObject({ status: 503, code: 'over_budget' });
    await expect(client.getDocument('huge')).rejects.toMatchObject({ status: 404 });
    await expect(client.createDocument('bad-hint', model, { tokens: -1 })).rejects.toMatchObject({ status: 422 });
    // Past the hint the layer grows.
    for (let layer = 0; layer < model.layers; layer++)
      for (const start of [0, 2550]) {
        const c = randomKv(rng, 'f16', model.kvHeads, 2550, model.headDim);
        await client.uploadDocumentKv('hinted', { layer, start, k: c.k, v: c.v });
      }
    expect(await client.sealDocument('hinted')).toMatchObject({ status: 'ready', tokens: 5100 });
  });
});

describe('a block write that fails', () => {
  it('fails the next upload and the seal; the document is never ready', async () => {
    const dir = tempDataDir();
    const { store } = await DocumentStore.open(dir.dir);
    try {
      const docs = new Documents(store, methodNames, new HostBudget(2 ** 30));
      const rng = new Rng(seed ^ 0x41);
      await docs.create('doomed', { model: { ...model, layers: 1 } });
      const write = store.writeBlocks.bind(store);
      let writes = 0;
      store.writeBlocks = (doc, blocks) => (++writes === 2 ? Promise.reject(new Error('disk full')) : write(doc, blocks));
      const upload = (start: number, n: number) => {
        const c = randomKv(rng, 'f16', model.kvHeads, n, model.headDim);
        return docs.appendKv('doomed', { layer: 0, start, k: c.k, v: c.v });
      };
      await upload(0, 40);
      await upload(40, 40); // its blocks fail behind the answer
      await expect(upload(80, 40)).rejects.toThrow(/writing its blocks to LMDB failed \(disk full\)/);
      expect(await docs.get('doomed')).toMatchObject({ tokens: 80, status: 'loading', phase: 'loading' });
      await expect(docs.seal('doomed')).rejects.toThrow(/writing its blocks to LMDB failed/);
      expect(store.get('doomed')?.status).toBe('loading');
      await docs.remove('doomed');
      expect(store.get('doomed')).toBeUndefined();
    } finally {
      await store.close();
      dir.cleanup();
    }
  });
});

describe('a seal that fails', () => {
  it('leaves the document loading, and the next seal makes it ready', async () => {
    const dir = tempDataDir();
    const { store } = await DocumentStore.open(dir.dir);
    try {
      const docs = new Documents(store, methodNames, new HostBudget(2 ** 30));
      const rng = new Rng(seed ^ 0x53);
      await docs.create('retry', { model: { ...model, layers: 1 } });
      const c = randomKv(rng, 'f16', model.kvHeads, 100, model.headDim);
      await docs.appendKv('retry', { layer: 0, start: 0, k: c.k, v: c.v });
      const seal = store.seal.bind(store);
      let seals = 0;
      store.seal = (meta, tail, artifacts) => (++seals === 1 ? Promise.reject(new Error('disk full')) : seal(meta, tail, artifacts));
      await expect(docs.seal('retry')).rejects.toThrow(/disk full/);
      expect(await docs.get('retry')).toMatchObject({ tokens: 100, status: 'loading', phase: 'loading' });
      expect(store.get('retry')?.status).toBe('loading');
      expect(await docs.seal('retry')).toMatchObject({ status: 'ready', tokens: 100 });
      expect(store.get('retry')?.status).toBe('ready');
    } finally {
      await store.close();
      dir.cleanup();
    }
  });
});

describe('a seal whose ready flip lands and then fails with an untyped error', () => {
  it('is served ready and answers 503 with the hint to seal again, which confirms it', async () => {
    const dir = tempDataDir();
    const { store } = await DocumentStore.open(dir.dir);
    try {
      const docs = new Documents(store, methodNames, new HostBudget(2 ** 30));
      const rng = new Rng(seed ^ 0x5e);
      await docs.create('landed', { model: { ...model, layers: 1 } });
      const c = randomKv(rng, 'f16', model.kvHeads, 100, model.headDim);
      await docs.appendKv('landed', { layer: 0, start: 0, k: c.k, v: c.v });
      const seal = store.seal.bind(store);
      let seals = 0;
      // The store's seal writes the ready flip, then a library error that is not a KvrecallError.
      store.seal = async (meta, tail, artifacts) => {
        await seal(meta, tail, artifacts);
        if (++seals === 1) throw new TypeError('socket closed');
      };
      const e = await docs.seal('landed').catch((err: unknown) => err);
      expect(e).toBeInstanceOf(KvrecallError);
      expect((e as KvrecallError).kind).toBe('unavailable');
      expect((e as Error).message).toMatch(/socket closed.*sealed and served.*POST its seal again/);
      expect(await docs.get('landed')).toMatchObject({ status: 'ready', tokens: 100 });
      expect(await docs.seal('landed')).toMatchObject({ status: 'ready', tokens: 100 });
      expect(seals).toBe(2);
    } finally {
      await store.close();
      dir.cleanup();
    }
  });
});
