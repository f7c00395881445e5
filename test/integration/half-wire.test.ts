// 16-bit q and out on the decode routes, through the real server on
// 127.0.0.1 (a model holds q and its attention output in f16 or bf16):
// q sent in 16 bits answers exactly as the f32 q holding the same values;
// `outDtype` set to the model's dtype gives out as the f32 answer rounded to
// nearest even (checked against an independent encoder), bit-identical over
// the single route (direct and Hono), the batch route and the stream; a
// wrong dtype or shape is refused (422) and changes nothing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Packr } from 'msgpackr';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor, type AttendReply, type BatchResult, type OutArray } from '../../clients/ts/client.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`half-wire: seed ${seed}`);
const shape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32 };
const DOC_TOKENS = 600;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
const packr = new Packr({ useRecords: false });

const hex = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');
const ok = <O extends OutArray>(r: BatchResult<O>): AttendReply<O> => {
  if ('error' in r) throw new Error(`step failed: ${r.error.code} ${r.error.message}`);
  return r;
};

/** A q drawn at random, rounded to dt: its words and the same values as f32 (exact). */
function halfQ(dt: Dt): { words: Uint16Array; values: Float32Array } {
  const raw = randomQ(rng, shape.qHeads, shape.headDim);
  const words = Uint16Array.from(raw, (x) => bitsOf(dt)(x));
  return { words, values: Float32Array.from(words, (w) => valueOf(dt)(w)) };
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  for (const dt of ['f16', 'bf16'] as const) {
    await client.createDocument(`doc-${dt}`, { ...shape, dtype: dt }, { methods: ['topk-blocks'] });
    for (let layer = 0; layer < shape.layers; layer++) {
      const c = randomKv(rng, dt, shape.kvHeads, DOC_TOKENS, shape.headDim);
      await client.uploadDocumentKv(`doc-${dt}`, { layer, start: 0, k: c.k, v: c.v });
    }
    await client.sealDocument(`doc-${dt}`);
  }
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe.each(['f16', 'bf16'] as const)('16-bit q and out, %s model', (dt) => {
  const model = { ...shape, dtype: dt };
  const session = async () => (await client.createSession({ model, documents: [`doc-${dt}`], method: 'topk-blocks', budget: 128 })).id;
  const qShape = [shape.qHeads, shape.headDim];

  it('q sent in the model dtype answers exactly as the f32 q holding the same values, appends included', async () => {
    const [a, b] = [await session(), await session()];
    for (let s = 0; s < 3; s++) {
      const q = halfQ(dt);
      const kv = asStep(randomKv(rng, dt, shape.kvHeads, 1, shape.headDim));
      const half = await client.attend(a, { layer: s % 2, q: tensor(dt, qShape, q.words), ...kv, position: s >> 1 });
      const wide = await client.attend(b, { layer: s % 2, q: tensor('f32', qShape, q.values), ...kv, position: s >> 1 });
      expect([hex(half.out), hex(half.lse)]).toEqual([hex(wide.out), hex(wide.lse)]);
      expect(half.outDtype).toBe('f32');
    }
  });

  it(`outDtype "${dt}": out is the f32 answer rounded to nearest even, bit-identical over every route`, async () => {
    const sids = await Promise.all(Array.from({ length: 6 }, session));
    const stream = await client.openStream();
    try {
      for (let s = 0; s < 3; s++) {
        const q = halfQ(dt);
        const kv = asStep(randomKv(rng, dt, shape.kvHeads, 1, shape.headDim));
        const step = { q: tensor(dt, qShape, q.words), ...kv, position: s };
        const half = { ...step, outDtype: dt };
        // The same step on six sessions that hold the same tokens: each route once.
        const wide = await client.attend(sids[0], { layer: 0, ...step });
        const single = await client.attend(sids[1], { layer: 0, ...half });
        const [batched] = (await client.attendBatch(0, [{ session: sids[2], ...half }])).map(ok);
        const streamed = await stream.attend(sids[3], { layer: 0, ...half });
        const [streamBatched] = (await stream.attendBatch(0, [{ session: sids[4], ...half }])).map(ok);
        // The Hono route (a JSON answer, tensors in base64) serves the same bytes.
        const res = await fetch(`${server.url}/v1/sessions/${sids[5]}/attend`, {
          method: 'POST',
          headers: { 'content-type': 'application/msgpack', accept: 'application/json' },
          body: new Uint8Array(packr.pack({ layer: 0, ...half })),
        });
        expect(res.status).toBe(200);
        const viaHono = (await res.json()) as { out: { dtype: string; shape: number[]; data: string }; lse: { data: string } };

        const expected = Uint16Array.from(wide.out, (x) => bitsOf(dt)(x));
        expect(single.outDtype).toBe(dt);
        expect(single.out).toBeInstanceOf(Uint16Array);
        expect(hex(single.out)).toBe(hex(expected));
        for (const r of [batched, streamed, streamBatched]) {
          expect(r.outDtype).toBe(dt);
          expect(hex(r.out)).toBe(hex(single.out));
          expect(hex(r.lse)).toBe(hex(wide.lse));
        }
        expect(viaHono.out.dtype).toBe(dt);
        expect(viaHono.out.shape).toEqual(qShape);
        expect(Buffer.from(viaHono.out.data, 'base64').toString('hex')).toBe(hex(single.out));
        expect(Buffer.from(viaHono.lse.data, 'base64').toString('hex')).toBe(hex(wide.lse));
        // outDtype "f32" said aloud is the default's answer.
        const explicit = await client.attend(sids[0], { layer: 0, q: step.q, outDtype: 'f32' });
        const again = await client.attend(sids[0], { layer: 0, q: step.q });
        expect(hex(explicit.out)).toBe(hex(again.out));
      }
    } finally {
      stream.close();
    }
  });

  it('a wrong dtype or shape is refused (422) on every route and changes nothing', async () => {
    const a = await session();
    const other = dt === 'f16' ? 'bf16' : 'f16';
    const q = halfQ(dt);
    const kv = asStep(randomKv(rng, dt, shape.kvHeads, 1, shape.headDim));
    const good = { q: tensor(dt, qShape, q.words), ...kv, position: 0 };
    const bad: Record<string, unknown>[] = [
      { ...good, outDtype: other },
      { ...good, outDtype: 'f64' },
      { ...good, outDtype: 16 },
      { ...good, q: tensor('i32', qShape, new Int32Array(q.words)) },
      { ...good, q: { dtype: 'f64', shape: qShape, data: new Uint8Array(q.words.length * 8) } },
      { ...good, q: tensor(dt, [shape.qHeads - 1, shape.headDim], q.words.subarray(shape.headDim)) },
      { ...good, q: tensor(dt, qShape, q.words.subarray(1)) },
      { ...good, return: ['out', 'timings'] },
      { ...good, return: ['out', 7] },
    ];
    const stream = await client.openStream();
    try {
      for (const body of bad) {
        const e = await client.attend(a, { layer: 0, ...body } as never).catch((x: unknown) => x);
        expect((e as KvrecallRequestError).status).toBe(422);
        await expect(stream.attend(a, { layer: 0, ...body } as never)).rejects.toMatchObject({ status: 422 });
      }
      // In a batch each bad step fails alone; the good one is answered (and appends: position 0).
      const results = await client.attendBatch(0, [...bad.map((b) => ({ session: a, ...b }) as never), { session: a, ...good, outDtype: dt, return: ['out', 'timing'] }]);
      expect(results.slice(0, bad.length).map((r) => ('error' in r ? r.error.code : 'ok'))).toEqual(bad.map(() => 'invalid'));
      const last = ok(results[bad.length]);
      expect(last.stats.tokens).toBe(DOC_TOKENS + 1);
      expect(last.outDtype).toBe(dt);
      // 'timing' is accepted; only a device wave step has host stages to give (test/integration/gpu-wave).
      expect((last.stats as { gpu?: unknown }).gpu).toBeUndefined();
    } finally {
      stream.close();
    }
  });
});
