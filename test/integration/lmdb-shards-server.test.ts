// A server process with its LMDB blocks over 3 shards (`--lmdb-shards 3`):
// SIGKILL mid-preload leaves that document incomplete after a restart, its
// blocks gone from every shard that held them, and the sealed one answering
// bit for bit as before, its blocks read from every shard; a restart with
// one shard reads the same.
import { afterAll, describe, expect, it } from 'vitest';
import { KvrecallClient } from '../../clients/ts/client.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { answerBytes } from '../helpers/answer-bytes.js';
import { artifactCount, blocksPerShard } from '../helpers/lmdb-blocks.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startChild, tempDataDir, type ChildServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`lmdb-shards-server: seed ${seed}`);
const tmp = tempDataDir();
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const, blockSize: 16 };
const children: ChildServer[] = [];

afterAll(async () => {
  for (const c of children) await c.stop('SIGKILL');
  tmp.cleanup();
});

async function start(extra: string[], env: Record<string, string> = {}, dir = tmp.dir): Promise<KvrecallClient> {
  const server = await startChild(dir, extra, env);
  children.push(server);
  return new KvrecallClient({ url: server.url });
}

async function upload(client: KvrecallClient, id: string, rng: Rng, tokens: number): Promise<void> {
  // Chunk sizes and contents from rng alone: the same rng state uploads the same document.
  for (let layer = 0; layer < model.layers; layer++)
    for (let start = 0; start < tokens; ) {
      const n = Math.min(tokens - start, 50 + rng.int(150));
      const c = randomKv(rng, model.dtype, model.kvHeads, n, model.headDim);
      await client.uploadDocumentKv(id, { layer, start, k: c.k, v: c.v });
      start += n;
    }
}

const answer = (client: KvrecallClient, q: Float32Array, doc = 'kept') => answerBytes(client, model, doc, q);

describe('a server over 3 LMDB shards', () => {
  it('SIGKILL mid-preload: that document is incomplete after restart; the sealed one answers bit for bit, with any shard count', async () => {
    const rng = new Rng(seed);
    const q = randomQ(rng, model.qHeads, model.headDim);
    const a = await start(['--lmdb-shards', '3']);
    await a.createDocument('kept', model);
    await upload(a, 'kept', rng, 777);
    await a.sealDocument('kept');
    const before = await answer(a, q);
    await a.createDocument('victim', model);
    await upload(a, 'victim', rng, 500);
    const big = randomKv(rng, model.dtype, model.kvHeads, 3000, model.headDim);
    const inflight = a.uploadDocumentKv('victim', { layer: 0, start: 500, k: big.k, v: big.v }).catch((e: Error) => e);
    await new Promise((r) => setTimeout(r, 5));
    await children[0].stop('SIGKILL');
    await inflight;
    // The victim's committed blocks (its first 500 tokens' full blocks) lie in every shard.
    expect(blocksPerShard(tmp.dir, 'victim', 3).every((n) => n > 0)).toBe(true);

    const b = await start(['--lmdb-shards', '3']);
    expect((await b.getDocument('victim')).status).toBe('incomplete');
    expect((await b.health()) as unknown).toMatchObject({ recovered: ['victim'] });
    expect(blocksPerShard(tmp.dir, 'victim', 3)).toEqual([0, 0, 0]);
    expect(await answer(b, q)).toEqual(before);
    await children[1].stop('SIGTERM');

    const c = await start(['--lmdb-shards', '1']);
    expect(await answer(c, q)).toEqual(before);
    await children[2].stop('SIGTERM');
  });
});

// The store's crash points (core/crash-point.ts): SIGKILL between a seal's
// steps and a delete's, over 3 shards, of a document with an index (its
// artifacts in an environment of its own). After a restart the document is
// ready, answers as the same K/V sealed by a server that did not crash and
// has every artifact, or it is incomplete (or gone) with no block left in
// any shard and no artifact.
describe('a crash at each step of seal and delete, over 3 LMDB shards', () => {
  const cases: [string, 'seal' | 'delete', 'ready' | 'incomplete'][] = [
    ['seal:others-synced', 'seal', 'incomplete'],
    ['seal:committed', 'seal', 'ready'],
    ['drop:marked', 'delete', 'incomplete'],
    ['drop:others-dropped', 'delete', 'incomplete'],
  ];
  for (const [point, op, after] of cases)
    it(`${point}: ${after} after the restart`, async () => {
      const dir = tempDataDir();
      try {
        const docSeed = seed ^ 0x5ea1;
        const a = await start(['--lmdb-shards', '3'], { KVRECALL_CRASH_AT: point }, dir.dir);
        await a.createDocument('d', model, { methods: ['squeezed'] });
        await upload(a, 'd', new Rng(docSeed), 600);
        if (op === 'seal') expect(await a.sealDocument('d').catch((e: Error) => e)).toBeInstanceOf(Error);
        else {
          await a.sealDocument('d');
          expect(blocksPerShard(dir.dir, 'd', 3).every((n) => n > 0)).toBe(true);
          expect(artifactCount(dir.dir, 'd')).toBe(model.layers * model.kvHeads);
          expect(await a.deleteDocument('d').catch((e: Error) => e)).toBeInstanceOf(Error);
        }
        const b = await start(['--lmdb-shards', '3'], {}, dir.dir);
        const status = await b.getDocument('d').then((v) => v.status, (e: { status?: number }) => (e.status === 404 ? 'gone' : 'error'));
        if (after === 'ready') {
          expect(status).toBe('ready');
          await b.createDocument('ref', model);
          await upload(b, 'ref', new Rng(docSeed), 600);
          await b.sealDocument('ref');
          const q = randomQ(new Rng(docSeed + 1), model.qHeads, model.headDim);
          expect(await answer(b, q, 'd')).toEqual(await answer(b, q, 'ref'));
          expect(artifactCount(dir.dir, 'd')).toBe(model.layers * model.kvHeads);
        } else {
          expect(['incomplete', 'gone']).toContain(status);
          expect(blocksPerShard(dir.dir, 'd', 3)).toEqual([0, 0, 0]);
          expect(artifactCount(dir.dir, 'd')).toBe(0);
        }
      } finally {
        for (const c of children.splice(0)) await c.stop('SIGKILL');
        dir.cleanup();
      }
    });
});
