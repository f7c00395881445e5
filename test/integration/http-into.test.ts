// `into` (an answer written into a stream's shared-memory segment) has no
// segment to name over HTTP: an attend that asks for it is refused 422 and
// appends nothing, and in a batch only its own step fails, on the direct
// routes (api/fast-attend.ts) and on the Hono ones (a JSON body) alike.
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError, tensor, type BatchResult } from '../../clients/ts/client.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`http-into: seed ${seed}`);
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const rng = new Rng(seed);
const live = useServer();

const q = () => tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
const step = () => asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));

describe('into over HTTP', () => {
  it('refuses an attend that asks for it (422), appending nothing', async () => {
    const client = live.client();
    const { id } = await client.createSession({ model });
    const e = await client.attend(id, { layer: 0, q: q(), ...step(), into: 0 } as never).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(KvrecallRequestError);
    expect((e as KvrecallRequestError).status).toBe(422);
    expect((e as KvrecallRequestError).message).toMatch(/into.*stream/);
    // Nothing appended: the next append is still position 0.
    const r = await client.attend(id, { layer: 0, q: q(), ...step(), position: 0 });
    expect(r.stats.tokens).toBe(1);
  });

  it('fails only the batch step that asks for it', async () => {
    const client = live.client();
    const a = (await client.createSession({ model })).id, b = (await client.createSession({ model })).id;
    const results: BatchResult[] = await client.attendBatch(0, [{ session: a, q: q(), ...step(), into: 64 } as never, { session: b, q: q(), ...step() }]);
    expect('error' in results[0] && results[0].error.code).toBe('invalid');
    expect('error' in results[1]).toBe(false);
    // Session a appended nothing.
    const r = await client.attend(a, { layer: 0, q: q(), ...step(), position: 0 });
    expect(r.stats.tokens).toBe(1);
  });

  it('refuses it on the Hono route too (a JSON body)', async () => {
    const client = live.client();
    const { id } = await client.createSession({ model });
    const qs = randomQ(rng, model.qHeads, model.headDim);
    const body = { layer: 0, q: { dtype: 'f32', shape: [model.qHeads, model.headDim], data: Buffer.from(qs.buffer).toString('base64') }, into: 0 };
    const res = await fetch(`${live.server().url}/v1/sessions/${id}/attend`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    expect(res.status).toBe(422);
    const batch = await fetch(`${live.server().url}/v1/attend`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ layer: 0, steps: [{ session: id, ...body }] }) });
    expect(batch.status).toBe(200);
    const answer = (await batch.json()) as { results: { error?: { code: string } }[] };
    expect(answer.results[0].error?.code).toBe('invalid');
  });
});
