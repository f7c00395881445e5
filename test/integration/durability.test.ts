// Restarts and crashes against a server process over real LMDB files: a
// sealed document survives a restart bit for bit; a document cut off by
// SIGKILL mid-preload is never served as ready, and nothing else is lost.
import { afterAll, describe, expect, it } from 'vitest';
import { KvrecallClient, KvrecallRequestError } from '../../clients/ts/client.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { answerBytes } from '../helpers/answer-bytes.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startChild, tempDataDir, type ChildServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`durability: seed ${seed}`);
const tmp = tempDataDir();
const model = { layers: 3, qHeads: 8, kvHeads: 2, headDim: 64, dtype: 'bf16' as const, blockSize: 16 };
const children: ChildServer[] = [];

afterAll(async () => {
  for (const c of children) await c.stop('SIGKILL');
  tmp.cleanup();
});

async function start(): Promise<{ server: ChildServer; client: KvrecallClient }> {
  const server = await startChild(tmp.dir);
  children.push(server);
  return { server, client: new KvrecallClient({ url: server.url }) };
}

async function preload(client: KvrecallClient, id: string, rng: Rng, tokens: number, seal = true): Promise<void> {
  await client.createDocument(id, model);
  for (let layer = 0; layer < model.layers; layer++) {
    for (let start = 0; start < tokens; ) {
      const n = Math.min(tokens - start, 37 + rng.int(200));
      const c = randomKv(rng, model.dtype, model.kvHeads, n, model.headDim);
      await client.uploadDocumentKv(id, { layer, start, k: c.k, v: c.v });
      start += n;
    }
  }
  if (seal) await client.sealDocument(id);
}

const answer = (client: KvrecallClient, doc: string, q: Float32Array) => answerBytes(client, model, doc, q);

describe('durability', () => {
  const rng = new Rng(seed);
  const q = randomQ(rng, model.qHeads, model.headDim);
  let before: string[];

  it('a sealed document is ready after a restart and answers bit for bit the same', async () => {
    const a = await start();
    await preload(a.client, 'kept', rng, 1001);
    before = await answer(a.client, 'kept', q);
    await a.server.stop('SIGTERM');

    const b = await start();
    const doc = await b.client.getDocument('kept');
    expect(doc.status).toBe('ready');
    expect(doc.tokens).toBe(1001);
    expect(await answer(b.client, 'kept', q)).toEqual(before);
    await b.server.stop('SIGTERM');
  });

  it('SIGKILL mid-preload: that document is not ready after restart, every other document is intact', async () => {
    const a = await start();
    await preload(a.client, 'other', rng, 300);
    await preload(a.client, 'victim', rng, 700, false);
    // Kill while an upload is in flight.
    const big = randomKv(rng, model.dtype, model.kvHeads, 4000, model.headDim);
    const inflight = a.client.uploadDocumentKv('victim', { layer: 0, start: 700, k: big.k, v: big.v }).catch((e: Error) => e);
    await new Promise((r) => setTimeout(r, 5));
    await a.server.stop('SIGKILL');
    await inflight;

    const b = await start();
    const victim = await b.client.getDocument('victim');
    expect(victim.status).toBe('incomplete');
    expect((await b.client.health()) as unknown).toMatchObject({ recovered: ['victim'] });
    await expect(b.client.createSession({ model, documents: ['victim'] })).rejects.toMatchObject({ status: 409, message: expect.stringMatching(/victim is incomplete .*PUT it again/) });
    expect((await b.client.getDocument('kept')).status).toBe('ready');
    expect((await b.client.getDocument('other')).status).toBe('ready');
    expect(await answer(b.client, 'kept', q)).toEqual(before);
    // The cut-off document can be preloaded again from scratch.
    await preload(b.client, 'victim', rng, 100);
    expect((await b.client.getDocument('victim')).status).toBe('ready');
    await b.server.stop('SIGTERM');
  });

  it('errors carry the HTTP status and code', async () => {
    const a = await start();
    const err = await a.client.getDocument('missing').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(KvrecallRequestError);
    expect(err).toMatchObject({ status: 404, code: 'not_found' });
    await a.server.stop('SIGTERM');
  });
});
