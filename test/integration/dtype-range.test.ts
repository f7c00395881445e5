// K and V sent in a wider dtype than the model's (f32, or bf16 for an f16
// model) are stored in the model's dtype: a finite value that dtype cannot
// hold would be stored as ±Inf and turn every later step over it to NaN or
// an lse of -Inf. Such a value is refused (422) by attend, the session's
// and the document's kv upload, and nothing changes: the session answers
// after it bit for bit as a twin that never saw it.
// (Finite keys that a document's clustering cannot hold are seal-key-range.test.ts's.)
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError, tensor, type KvrecallClient } from '../../clients/ts/client.js';
import { bf16Bits } from '../helpers/half.js';
import { asStep, f32Tensor, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
const rng = new Rng(seed);
const f16Model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const bf16Model = { ...f16Model, dtype: 'bf16' as const };
const live = useServer();

/** [2, n, 16] f32 values ~N(0, 1) with one value replaced. */
function withValue(n: number, at: number, x: number) {
  const a = Float32Array.from({ length: 2 * n * 16 }, () => rng.normal());
  a[at] = x;
  return f32Tensor(n === 1 ? [2, 16] : [2, n, 16], a);
}

async function refusal(p: Promise<unknown>): Promise<KvrecallRequestError> {
  const e = await p.then(() => undefined, (err: unknown) => err);
  expect(e).toBeInstanceOf(KvrecallRequestError);
  return e as KvrecallRequestError;
}

/** Two sessions over the same documents that have seen the same steps. */
async function twins(client: KvrecallClient, spec: Parameters<KvrecallClient['createSession']>[0]) {
  const [a, b] = [(await client.createSession(spec)).id, (await client.createSession(spec)).id];
  const q = tensor('f32', [4, 16], randomQ(rng, 4, 16));
  for (let i = 0; i < 3; i++) {
    const step = asStep(randomKv(rng, spec.model.dtype ?? 'f16', 2, 1, 16));
    await client.attend(a, { layer: 0, q, ...step });
    await client.attend(b, { layer: 0, q, ...step });
  }
  return { a, b, q };
}

describe(`values the model's dtype cannot hold (seed ${seed})`, () => {
  it('attend refuses them before the append, and the session answers on as before', async () => {
    const client = live.client();
    const { a, b, q } = await twins(client, { model: f16Model });
    const cases = [
      { k: withValue(1, 5, 1e6), v: withValue(1, 0, 0.5), where: /k holds 1000000 at flat index 5, beyond the range of f16/ },
      { k: withValue(1, 0, 0.5), v: withValue(1, 31, -65520), where: /v holds -65520 at flat index 31, beyond the range of f16/ },
      // bf16 holds 2^17 exactly; f16 does not.
      { k: tensor('bf16', [2, 16], Uint16Array.from({ length: 32 }, (_, i) => bf16Bits(i === 7 ? 131072 : 0.25))), v: withValue(1, 0, 0.5), where: /k holds 131072 at flat index 7/ },
    ];
    for (const c of cases) {
      const e = await refusal(client.attend(a, { layer: 0, q, k: c.k, v: c.v, position: 3 }));
      expect(e.status).toBe(422);
      expect(e.message).toMatch(c.where);
    }
    const [ra, rb] = [await client.attend(a, { layer: 0, q }), await client.attend(b, { layer: 0, q })];
    expect(ra.stats.tokens).toBe(3);
    expect(Buffer.from(ra.out.buffer)).toEqual(Buffer.from(rb.out.buffer));
    expect(ra.lse.every(Number.isFinite)).toBe(true);
    // The token the refused steps would have appended is still the next one.
    const step = { k: withValue(1, 0, 65519), v: withValue(1, 0, 0.5) }; // 65519 rounds to f16's largest, 65504
    const [sa, sb] = [await client.attend(a, { layer: 0, q, ...step, position: 3 }), await client.attend(b, { layer: 0, q, ...step, position: 3 })];
    expect(Buffer.from(sa.out.buffer)).toEqual(Buffer.from(sb.out.buffer));
    expect(sa.lse.every(Number.isFinite)).toBe(true);
  });

  it("a bf16 model refuses an f32 value past bf16's largest", async () => {
    const client = live.client();
    const { a, q } = await twins(client, { model: bf16Model });
    const e = await refusal(client.attend(a, { layer: 0, q, k: withValue(1, 2, 3.4e38), v: withValue(1, 0, 0.5) }));
    expect(e.status).toBe(422);
    expect(e.message).toMatch(/beyond the range of bf16/);
    // 1e38 fits bf16 (not f16): stored.
    await expect(client.attend(a, { layer: 0, q, k: withValue(1, 0, 0.5), v: withValue(1, 2, 1e38), position: 3 })).resolves.toMatchObject({ stats: { tokens: 4 } });
  });

  it("the session's kv upload refuses them and appends nothing", async () => {
    const client = live.client();
    const { a, b, q } = await twins(client, { model: f16Model });
    const e = await refusal(client.uploadSessionKv(a, { layer: 0, start: 3, k: withValue(5, 77, -1e5), v: withValue(5, 0, 0) }));
    expect(e.status).toBe(422);
    expect(e.message).toMatch(/k holds -100000 at flat index 77, beyond the range of f16/);
    const [ra, rb] = [await client.attend(a, { layer: 0, q }), await client.attend(b, { layer: 0, q })];
    expect(ra.stats.tokens).toBe(3);
    expect(Buffer.from(ra.out.buffer)).toEqual(Buffer.from(rb.out.buffer));
    await expect(client.uploadSessionKv(a, { layer: 0, start: 3, k: withValue(5, 0, 1), v: withValue(5, 0, 1) })).resolves.toEqual({ layer: 0, tokens: 8 });
  });

  it("the document's kv upload refuses them and keeps what it holds", async () => {
    const client = live.client();
    await client.createDocument('range', f16Model);
    const first = randomKv(rng, 'f16', 2, 10, 16);
    await client.uploadDocumentKv('range', { layer: 0, start: 0, k: first.k, v: first.v });
    const e = await refusal(client.uploadDocumentKv('range', { layer: 0, start: 10, k: withValue(6, 0, 0.5), v: withValue(6, 100, 7e4) }));
    expect(e.status).toBe(422);
    expect(e.message).toMatch(/v holds 70000 at flat index 100, beyond the range of f16/);
    expect(await client.getDocument('range')).toMatchObject({ tokens: 10 });
    await client.uploadDocumentKv('range', { layer: 0, start: 10, k: withValue(6, 0, 0.5), v: withValue(6, 0, 0.5) });
    await expect(client.sealDocument('range')).resolves.toMatchObject({ tokens: 16 });
    const sid = (await client.createSession({ model: f16Model, documents: ['range'] })).id;
    const r = await client.attend(sid, { layer: 0, q: tensor('f32', [4, 16], randomQ(rng, 4, 16)) });
    expect(r.lse.every(Number.isFinite)).toBe(true);
    expect(r.out.every(Number.isFinite)).toBe(true);
  });
});
