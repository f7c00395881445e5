// DELETE of a document gives its memory back to the budget at once, also
// while sessions that attached it are open (their steps are refused from
// then on): the memory itself must go too, not stay held by those sessions
// until they end, or the budget admits new documents into memory that is
// still taken. Measured as the process's array-buffer bytes after a full
// GC, the document's K/V being ~20 MiB of them (the noise: a few KiB).
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

setFlagsFromString('--expose_gc');
const gc = runInNewContext('gc') as () => void;
const MIB = 2 ** 20;
const arrayBuffers = () => {
  gc();
  gc();
  return process.memoryUsage().arrayBuffers;
};

const seed = freshSeed();
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
const TOKENS = 20000;
const KV_BYTES = model.layers * model.kvHeads * TOKENS * model.headDim * 2 * 2;
const live = useServer();

describe(`a deleted document's memory with sessions still open on it (seed ${seed})`, () => {
  it.each(['exact', 'wave'])('is freed at DELETE (%s session)', async (method) => {
    const client = live.client();
    const rng = new Rng(seed);
    const id = `held-${method}`;
    await client.createDocument(id, model, { methods: method === 'wave' ? ['wave'] : [] });
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
      await client.uploadDocumentKv(id, { layer, start: 0, k: c.k, v: c.v });
    }
    await client.sealDocument(id);
    const sid = (await client.createSession({ model, documents: [id], method })).id;
    const q = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
    await client.attend(sid, { layer: 0, q });
    const held = arrayBuffers();
    await client.deleteDocument(id);
    const freed = held - arrayBuffers();
    expect(freed / MIB).toBeGreaterThan((0.9 * KV_BYTES) / MIB);
    // The session stays: its steps are refused, it is described and deleted as before.
    const e = await client.attend(sid, { layer: 0, q }).then(() => undefined, (err: unknown) => err);
    expect(e).toBeInstanceOf(KvrecallRequestError);
    expect((e as KvrecallRequestError).status).toBe(409);
    expect((await (await fetch(`${live.server().url}/v1/sessions/${sid}`)).json()) as { documents: string[] }).toMatchObject({ documents: [id] });
    await client.deleteSession(sid);
  });
});
