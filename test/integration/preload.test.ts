// `kvrecall preload` reads a safetensors file and uploads it through the API
// with progress; GET /v1/documents/:doc reports the build phase and fraction.
import { execFile } from 'node:child_process';
import { statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { preload } from '../../clients/ts/preload.js';
import type { Tensor } from '../../core/tensor.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const run = promisify(execFile);
const CLI = join(import.meta.dirname, '..', '..', 'dist', 'cli', 'cli.js');
const seed = freshSeed();
const rng = new Rng(seed);
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;

/** Writes tensors in the safetensors layout (independent of clients/ts/safetensors.ts). */
function writeSafetensors(path: string, tensors: Record<string, Tensor>): void {
  const names = { f16: 'F16', bf16: 'BF16', f32: 'F32', i32: 'I32' } as const;
  const header: Record<string, unknown> = { __metadata__: { format: 'kvrecall-test' } };
  let at = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: names[t.dtype], shape: t.shape, data_offsets: [at, at + t.data.byteLength] };
    at += t.data.byteLength;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, ...Object.values(tensors).map((t) => Buffer.from(t.data))]));
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe('preload', () => {
  it('uploads a safetensors file with a progress bar and seals it', async () => {
    const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16 };
    const n = 1234;
    const layers = [0, 1].map(() => randomKv(rng, 'f16', 2, n, 16));
    const tensors: Record<string, Tensor> = {};
    layers.forEach((c, l) => {
      tensors[`k.${l}`] = c.k;
      tensors[`v.${l}`] = c.v;
      const q = randomQ(rng, 4 * n, 16);
      tensors[`q.${l}`] = tensor('f32', [4, n, 16], q);
    });
    const file = join(tmp.dir, 'doc.safetensors');
    writeSafetensors(file, tensors);
    const { stdout, stderr } = await run(process.execPath, [CLI, 'preload', file, '--id', 'st', '--url', server.url, '--chunk', '500', '--methods', 'hnsw']);
    expect(stdout).toMatch(/ready: 1234 tokens × 2 layers/);
    expect(stderr).toMatch(/100\.0% 2468\/2468/);
    expect(await client.getDocument('st')).toMatchObject({ status: 'ready', tokens: n, methods: ['hnsw'], model: { ...model, dtype: 'f16' } });
    const s = await client.createSession({ model, documents: ['st'] });
    // Every layer's K and V, every head, as the file holds them: the reader fills two sets of buffers in turn
    // (chunk i+1 read while chunk i is sent), and a buffer reused too early would show here.
    for (const layer of [0, 1]) {
      const r = await client.attend(s.id, { layer, q: tensor('f32', [4, 16], randomQ(rng, 4, 16)), return: ['kv'] });
      for (const h of [0, 1]) {
        expect(Buffer.from(r.kv!.k[h].data)).toEqual(Buffer.from(layers[layer].k.data.subarray(h * n * 16 * 2, (h + 1) * n * 16 * 2)));
        expect(Buffer.from(r.kv!.v[h].data)).toEqual(Buffer.from(layers[layer].v.data.subarray(h * n * 16 * 2, (h + 1) * n * 16 * 2)));
      }
    }
  });

  it('refuses a chunk that is not a positive integer before creating anything', async () => {
    const file = join(tmp.dir, 'small.safetensors');
    const c = randomKv(rng, 'f16', 2, 10, 16);
    writeSafetensors(file, { 'k.0': c.k, 'v.0': c.v, 'q.0': tensor('f32', [4, 10, 16], randomQ(rng, 40, 16)) });
    for (const chunk of ['0', 'abc', '-5']) {
      const id = `chunk${chunk}`;
      const failed = run(process.execPath, [CLI, 'preload', file, '--id', id, '--url', server.url, '--chunk', chunk]);
      await expect(failed).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining(`--chunk takes a positive integer, not ${chunk}`) });
      await expect(client.getDocument(id)).rejects.toMatchObject({ status: 404 });
    }
    const failed = run(process.execPath, [CLI, 'preload', file, '--id', 'window0', '--url', server.url, '--window', '0']);
    await expect(failed).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining('--window takes a positive integer, not 0') });
    await expect(client.getDocument('window0')).rejects.toMatchObject({ status: 404 });
  });

  it('deletes the document it created when an upload fails, so a rerun starts clean', async () => {
    const file = join(tmp.dir, 'nan.safetensors');
    const good = randomKv(rng, 'f16', 2, 300, 16), bad = randomKv(rng, 'f16', 2, 300, 16);
    // A NaN (f16 0x7e00) in layer 1's second chunk: refused with 422 after layer 0 and a chunk of layer 1 were stored.
    new Uint16Array(bad.k.data.buffer, bad.k.data.byteOffset, bad.k.data.byteLength / 2)[250 * 16 + 3] = 0x7e00;
    writeSafetensors(file, { 'k.0': good.k, 'v.0': good.v, 'k.1': bad.k, 'v.1': bad.v });
    const failed = run(process.execPath, [CLI, 'preload', file, '--id', 'nan', '--url', server.url, '--chunk', '200', '--q-heads', '4']);
    await expect(failed).rejects.toMatchObject({ code: 1, stderr: expect.stringMatching(/422 invalid: k holds a NaN/) });
    await expect(client.getDocument('nan')).rejects.toMatchObject({ status: 404 });
  });

  it('after a failure, leaves alone a document made again under the id while it ran', async () => {
    const file = join(tmp.dir, 'race.safetensors');
    const c = [0, 1].map(() => randomKv(rng, 'f16', 2, 300, 16));
    writeSafetensors(file, { 'k.0': c[0].k, 'v.0': c[0].v, 'k.1': c[1].k, 'v.1': c[1].v });
    const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
    const { documents } = server.engine;
    let theirs: Promise<unknown> | undefined;
    const failed = preload({
      file, id: 'race', url: server.url, methods: [], chunk: 100, qHeads: 4,
      progress: () => {
        if (theirs) return;
        // After our first upload is answered: ours deleted and the id made again by someone else, queued on the
        // document ahead of our later uploads (at most the window's 2 are queued before). A later createdAt (ms).
        for (const t = Date.now(); Date.now() - t < 3; );
        theirs = Promise.all([documents.remove('race'), documents.create('race', { model })]);
      },
    });
    await expect(failed).rejects.toMatchObject({ status: 409 });
    const [, made] = (await theirs) as [unknown, { createdAt: string }];
    expect(await client.getDocument('race')).toMatchObject({ status: 'loading', createdAt: made.createdAt });
    await client.deleteDocument('race');
  });

  it('after a failure, leaves alone a document made again under the id just before its delete', async () => {
    const file = join(tmp.dir, 'late.safetensors');
    const bad = randomKv(rng, 'f16', 2, 300, 16);
    new Uint16Array(bad.k.data.buffer, bad.k.data.byteOffset, bad.k.data.byteLength / 2)[10] = 0x7e00; // NaN: 422
    writeSafetensors(file, { 'k.0': bad.k, 'v.0': bad.v });
    const { documents } = server.engine;
    const remove = documents.remove.bind(documents);
    let theirs: { createdAt: string } | undefined;
    // Another client deletes the preload's document and makes it again after the preload decided to delete it,
    // before its DELETE is served: ahead of it in the document's queue. A later createdAt (ms).
    documents.remove = async (id, expect) => {
      if (id === 'late' && !theirs) {
        for (const t = Date.now(); Date.now() - t < 3; );
        await remove(id);
        theirs = await documents.create(id, { model: { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16 } });
      }
      return remove(id, expect);
    };
    try {
      await expect(preload({ file, id: 'late', url: server.url, methods: [], chunk: 100, qHeads: 4, progress: () => undefined })).rejects.toMatchObject({ status: 422 });
    } finally {
      documents.remove = remove;
    }
    expect(theirs).toBeDefined();
    expect(await client.getDocument('late')).toMatchObject({ status: 'loading', createdAt: theirs!.createdAt });
    await client.deleteDocument('late');
  });

  it('fails with the read error when the file is cut short mid-way, and deletes what it made', async () => {
    const file = join(tmp.dir, 'cut.safetensors');
    const c = [0, 1].map(() => randomKv(rng, 'f16', 2, 400, 16));
    writeSafetensors(file, { 'k.0': c[0].k, 'v.0': c[0].v, 'k.1': c[1].k, 'v.1': c[1].v });
    // Layer 1's rows gone once the first upload is answered: a read ahead (off the event loop) fails while an
    // upload is in flight; the preload rejects with it (no unhandled rejection) and deletes its document.
    const keep = statSync(file).size - c[1].k.data.byteLength - c[1].v.data.byteLength;
    let cut = false;
    const failed = preload({
      file, id: 'cut', url: server.url, methods: [], chunk: 50, qHeads: 4,
      progress: () => {
        if (!cut) truncateSync(file, keep);
        cut = true;
      },
    });
    await expect(failed).rejects.toThrow(/tensor [kv]\.1: the file ended inside its rows/);
    expect(cut).toBe(true);
    await expect(client.getDocument('cut')).rejects.toMatchObject({ status: 404 });
  });

  it('refused at create (the id taken), fails with 409 and leaves the other document alone (its stream and first read start beside the create)', async () => {
    const file = join(tmp.dir, 'taken.safetensors');
    const c = randomKv(rng, 'f16', 2, 300, 16);
    writeSafetensors(file, { 'k.0': c.k, 'v.0': c.v });
    const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
    const theirs = await client.createDocument('taken', model);
    await expect(preload({ file, id: 'taken', url: server.url, methods: [], chunk: 100, qHeads: 4, progress: () => undefined })).rejects.toMatchObject({ status: 409 });
    expect(await client.getDocument('taken')).toMatchObject({ status: 'loading', createdAt: theirs.createdAt });
    await client.deleteDocument('taken');
  });

  it('--timings 1 prints where the time went, in order; --window 3 uploads the same bytes', async () => {
    const file = join(tmp.dir, 'timed.safetensors');
    const c = [0, 1].map(() => randomKv(rng, 'f16', 2, 600, 16));
    writeSafetensors(file, { 'k.0': c[0].k, 'v.0': c[0].v, 'k.1': c[1].k, 'v.1': c[1].v });
    const { stderr } = await run(process.execPath, [CLI, 'preload', file, '--id', 'timed', '--url', server.url, '--chunk', '200', '--q-heads', '4', '--window', '3', '--timings', '1']);
    expect(stderr).toMatch(/100\.0% 1200\/1200/);
    const t = JSON.parse(/kvrecall timings (\{.*\})/.exec(stderr)![1]) as Record<string, number>;
    const order = ['main', 'clientLoaded', 'created', 'firstSent', 'uploaded', 'sealed'].map((k) => t[k]);
    expect(order.every((x, i) => x > 0 && (i === 0 || x >= order[i - 1]))).toBe(true);
    expect(t.ready).toBeGreaterThanOrEqual(t.clientLoaded);
    expect(t.ready).toBeLessThanOrEqual(t.firstSent);
    for (const k of ['readWait', 'reads', 'send', 'drain']) expect(t[k]).toBeGreaterThanOrEqual(0);
    expect(t.reads).toBeGreaterThan(0);
    await expect(run(process.execPath, [CLI, 'preload', file, '--id', 'timed2', '--url', server.url, '--timings', 'yes'])).rejects.toMatchObject({ stderr: expect.stringContaining('--timings is 0 or 1') });
    await expect(client.getDocument('timed2')).rejects.toMatchObject({ status: 404 });
    // Three uploads unanswered, the two buffer sets still taken in turn: every row as the file holds it.
    const sess = await client.createSession({ model: { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16 }, documents: ['timed'] });
    for (const layer of [0, 1]) {
      const r = await client.attend(sess.id, { layer, q: tensor('f32', [4, 16], randomQ(rng, 4, 16)), return: ['kv'] });
      for (const h of [0, 1]) {
        expect(Buffer.from(r.kv!.k[h].data)).toEqual(Buffer.from(c[layer].k.data.subarray(h * 600 * 16 * 2, (h + 1) * 600 * 16 * 2)));
        expect(Buffer.from(r.kv!.v[h].data)).toEqual(Buffer.from(c[layer].v.data.subarray(h * 600 * 16 * 2, (h + 1) * 600 * 16 * 2)));
      }
    }
    await client.deleteSession(sess.id);
    await client.deleteDocument('timed');
  });

  it("stores a BF16 file as bf16 without --dtype, its words unchanged", async () => {
    const file = join(tmp.dir, 'bf16.safetensors');
    const c = randomKv(rng, 'bf16', 2, 70, 16);
    writeSafetensors(file, { 'k.0': c.k, 'v.0': c.v });
    await run(process.execPath, [CLI, 'preload', file, '--id', 'bf', '--url', server.url, '--q-heads', '4']);
    const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'bf16' as const };
    expect(await client.getDocument('bf')).toMatchObject({ status: 'ready', tokens: 70, model });
    const s = await client.createSession({ model, documents: ['bf'] });
    const r = await client.attend(s.id, { layer: 0, q: tensor('f32', [4, 16], randomQ(rng, 4, 16)), return: ['kv'] });
    expect(Buffer.from(r.kv!.k[1].data)).toEqual(Buffer.from(c.k.data.subarray(70 * 16 * 2)));
  });

  it('reports the build phase and its fraction while sealing', async () => {
    const model = { layers: 1, qHeads: 2, kvHeads: 2, headDim: 16 };
    await client.createDocument('slow', model, { methods: ['hnsw'] });
    const c = randomKv(rng, "f16", 2, 6000, 16);
    await client.uploadDocumentKv('slow', { layer: 0, start: 0, k: c.k, v: c.v });
    expect(await client.getDocument('slow')).toMatchObject({ phase: 'loading', tokens: 6000 });
    const sealing = client.sealDocument('slow');
    const seen: { phase: string; progress?: number }[] = [];
    for (let i = 0; i < 400; i++) {
      const d = await client.getDocument('slow');
      seen.push(d);
      if (d.phase === 'ready') break;
      await new Promise((r) => setTimeout(r, 10));
    }
    await sealing;
    const building = seen.filter((s) => s.phase === 'building');
    expect(building.length).toBeGreaterThan(0);
    for (const b of building) expect(b.progress).toBeGreaterThanOrEqual(0), expect(b.progress).toBeLessThanOrEqual(1);
    expect((await client.getDocument('slow')).phase).toBe('ready');
  });
});
