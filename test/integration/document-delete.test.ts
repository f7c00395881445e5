// Deleting a document that open sessions attached (real server, real LMDB
// files): the delete succeeds and frees the document's budget, and those
// sessions' steps are then refused with 409 (single, batch and stream alike)
// without appending their token, instead of reading memory the budget no
// longer counts; a document made again under the same id is not the one they
// attached; new sessions see the new one. Before the delete the session
// answers exact attention (float64 reference), so the refusal is the change.
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`document-delete: seed ${seed}`);
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const TOKENS = 300;
const rng = new Rng(seed);
const srv = useServer();

async function makeDocument(id: string): Promise<KvChunk[]> {
  const kv = Array.from({ length: model.layers }, () => randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim));
  await srv.client().createDocument(id, model, { methods: ['exact'] });
  for (let layer = 0; layer < model.layers; layer++) await srv.client().uploadDocumentKv(id, { layer, start: 0, k: kv[layer].k, v: kv[layer].v });
  await srv.client().sealDocument(id);
  return kv;
}

const q = () => randomQ(rng, model.qHeads, model.headDim);
const qTensor = (x: Float32Array) => tensor('f32', [model.qHeads, model.headDim], x);
const budgetUsed = async () => ((await srv.client().health()) as unknown as { memory: { used: number } }).memory.used;

describe('a document deleted under open sessions', () => {
  it('frees its budget, and the sessions that attached it are refused with 409 and change nothing', async () => {
    const kv = await makeDocument('doc');
    const { id } = await srv.client().createSession({ model, documents: ['doc'] });
    const q0 = q();
    const before = await srv.client().attend(id, { layer: 0, q: qTensor(q0) });
    const ref = referenceAttention(q0, kv[0].kValues, kv[0].vValues, model.qHeads, model.headDim);
    expect(maxRelError(before.out, ref.out, model.qHeads)).toBeLessThan(1e-5);
    const used = await budgetUsed();

    await srv.client().deleteDocument('doc');
    // The document's K/V (2 layers x 2 heads x 300 tokens x 16 x 2 bytes x 2) left the budget.
    expect(used - (await budgetUsed())).toBeGreaterThanOrEqual(model.layers * model.kvHeads * TOKENS * model.headDim * 2 * 2);

    const own = randomKv(rng, 'f16', model.kvHeads, 1, model.headDim);
    const step = { layer: 1, q: qTensor(q()), k: tensor('f16', [model.kvHeads, model.headDim], own.k.data), v: tensor('f16', [model.kvHeads, model.headDim], own.v.data) };
    const e = await srv.client().attend(id, step).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(KvrecallRequestError);
    expect((e as KvrecallRequestError).status).toBe(409);
    expect((e as KvrecallRequestError).message).toMatch(/document doc was deleted.*create a new session/);
    // The same through a batch (only that step fails) and over the stream.
    const other = await makeDocument('other');
    const { id: live } = await srv.client().createSession({ model, documents: ['other'] });
    const q1 = q();
    const batch = await srv.client().attendBatch(0, [
      { session: id, q: qTensor(q()) },
      { session: live, q: qTensor(q1) },
    ]);
    expect('error' in batch[0] && batch[0].error.code).toBe('conflict');
    const ok = batch[1];
    if ('error' in ok) throw new Error(ok.error.message);
    expect(maxRelError(ok.out, referenceAttention(q1, other[0].kValues, other[0].vValues, model.qHeads, model.headDim).out, model.qHeads)).toBeLessThan(1e-5);
    const stream = await srv.client().openStream();
    try {
      const s = await stream.attend(id, { layer: 0, q: qTensor(q()) }).catch((err: unknown) => err);
      expect((s as KvrecallRequestError).status).toBe(409);
    } finally {
      stream.close();
    }
    // Nothing was appended: the refused step's token is not in the session.
    const info = (await srv.client().getSession(id)) as unknown as { ownTokens: number[] };
    expect(info.ownTokens).toEqual([0, 0]);

    // Made again under the same id: the old session still refuses, a new one reads the new K/V.
    const kv2 = await makeDocument('doc');
    expect(((await srv.client().attend(id, { layer: 0, q: qTensor(q()) }).catch((err: unknown) => err)) as KvrecallRequestError).status).toBe(409);
    const { id: fresh } = await srv.client().createSession({ model, documents: ['doc'] });
    const q2 = q();
    const r = await srv.client().attend(fresh, { layer: 0, q: qTensor(q2) });
    expect(maxRelError(r.out, referenceAttention(q2, kv2[0].kValues, kv2[0].vValues, model.qHeads, model.headDim).out, model.qHeads)).toBeLessThan(1e-5);
    for (const s of [id, live, fresh]) await srv.client().deleteSession(s);
  });

  it('with createdAt deletes only the document created then: another is left whole with 412', async () => {
    const made = await srv.client().createDocument('cond', model, { methods: ['exact'] });
    for (const t of ['2000-01-01T00:00:00.000Z', `${made.createdAt} `]) {
      const e = await srv.client().deleteDocument('cond', { createdAt: t }).catch((err: unknown) => err);
      expect(e).toMatchObject({ status: 412, code: 'precondition_failed' });
      expect((e as KvrecallRequestError).message).toContain(made.createdAt);
    }
    expect(await srv.client().getDocument('cond')).toMatchObject({ status: 'loading', createdAt: made.createdAt });
    // An empty condition is a mistake, not "any": refused, nothing deleted.
    await expect(srv.client().deleteDocument('cond', { createdAt: '' })).rejects.toMatchObject({ status: 422, code: 'invalid' });
    expect(await srv.client().deleteDocument('cond', { createdAt: made.createdAt })).toEqual({ deleted: 'cond' });
    await expect(srv.client().getDocument('cond')).rejects.toMatchObject({ status: 404 });
    await expect(srv.client().deleteDocument('cond', { createdAt: made.createdAt })).rejects.toMatchObject({ status: 404 });
  });
});
