// Finite bf16 keys too large for the float32 clustering behind ivf, squeezed
// and wave (|k| past 2^50: faiss's sums overflow, its centroids turn NaN, and
// an assertion in its k-means used to abort the whole server) refuse the
// seal: 422 naming the method, layer and kv head; the document stays loading
// with its blocks, a second seal answers the same, the server goes on, and
// the same keys seal under a method that clusters nothing. (Session 33's CI
// crash: dtype-range's wave document of keys ~1e20 reached faiss's k-means,
// which aborted the server for some seeds before the wave build's own check
// of its moments could refuse them.)
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError, type KvrecallClient } from '../../clients/ts/client.js';
import { bf16Bits } from '../helpers/half.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
const rng = new Rng(seed);
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'bf16' as const };
const live = useServer();
const N = 600;

/** Layer 1's keys, with one value of kv head 1 replaced by x (2^70 fits bf16 exactly, not the clustering). */
async function upload(client: KvrecallClient, id: string, x: number) {
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'bf16', model.kvHeads, N, model.headDim);
    if (layer === 1) new Uint16Array(c.k.data.buffer)[(N + 123) * model.headDim + 5] = bf16Bits(x);
    await client.uploadDocumentKv(id, { layer, start: 0, k: c.k, v: c.v });
  }
}

async function refusal(p: Promise<unknown>): Promise<KvrecallRequestError> {
  const e = await p.then(() => undefined, (err: unknown) => err);
  expect(e).toBeInstanceOf(KvrecallRequestError);
  return e as KvrecallRequestError;
}

describe(`keys beyond what clustering holds (seed ${seed})`, () => {
  for (const method of ['ivf', 'squeezed', 'wave']) {
    it(`${method}: the seal is refused, 422, and the document stays loading`, async () => {
      const client = live.client();
      const id = `big-${method}`;
      await client.createDocument(id, model, { methods: [method] });
      await upload(client, id, -(2 ** 70));
      for (let attempt = 0; attempt < 2; attempt++) {
        const e = await refusal(client.sealDocument(id));
        expect(e.status).toBe(422);
        expect(e.message).toMatch(new RegExp(`${method} index of layer 1, kv head 1: keys hold a value of magnitude 1\\.181e\\+21`));
        expect(await client.getDocument(id)).toMatchObject({ status: 'loading', tokens: N });
      }
      // The server goes on: the id deleted and made again with ordinary keys seals with the same method.
      await client.deleteDocument(id);
      await client.createDocument(id, model, { methods: [method] });
      await upload(client, id, 0.5);
      expect(await client.sealDocument(id)).toMatchObject({ status: 'ready', tokens: N });
    });
  }

  it('the same keys seal where nothing is clustered', async () => {
    const client = live.client();
    await client.createDocument('big-exact', model, { methods: [] });
    await upload(client, 'big-exact', -(2 ** 70));
    expect((await client.sealDocument('big-exact')).status).toBe('ready');
  });
});
