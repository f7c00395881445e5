// The decode transports through the real server on 127.0.0.1: the single
// route, the batch route (POST /v1/attend) and the WebSocket stream give
// bit-identical answers for the same steps; a bad step or frame fails only
// itself and changes nothing; appends out of order are refused; a client
// that disconnects mid-stream leaves its session usable.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Packr } from 'msgpackr';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor, type AttendReply, type BatchResult } from '../../clients/ts/client.js';
import type { KvrecallStream } from '../../clients/ts/stream.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`stream-batch: seed ${seed}`);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
const STEPS = 5;
const steps = Array.from({ length: STEPS }, () => ({ q: randomQ(rng, model.qHeads, model.headDim), kv: asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim)) }));
const qT = (q: Float32Array) => tensor('f32', [model.qHeads, model.headDim], q);

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('doc', model, { methods: ['topk-blocks'] });
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, 700, model.headDim);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

const session = async () => (await client.createSession({ model, documents: ['doc'], method: 'topk-blocks', budget: 128 })).id;
// A batch's out and lse are views of one buffer for the batch: each array's own bytes.
const hex = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');
const bits = (r: AttendReply) => [hex(r.out), hex(r.lse)];
const ok = (r: BatchResult): AttendReply => {
  if ('error' in r) throw new Error(`step failed: ${r.error.code} ${r.error.message}`);
  return r;
};

describe('decode transports', () => {
  it('single, batch and stream give bit-identical answers for the same steps', async () => {
    const [a, b, c, d] = [await session(), await session(), await session(), await session()];
    const stream = await client.openStream();
    try {
      for (let s = 0; s < STEPS; s++)
        for (let layer = 0; layer < model.layers; layer++) {
          const body = { layer, q: qT(steps[s].q), ...steps[s].kv, position: s };
          const single = await client.attend(a, body);
          const [batched, other] = (await client.attendBatch(layer, [{ session: b, ...body }, { session: d, ...body }])).map(ok);
          const streamed = await stream.attend(c, body);
          expect(bits(batched)).toEqual(bits(single));
          expect(bits(other)).toEqual(bits(single));
          expect(batched.out.buffer).toBe(other.lse.buffer); // one buffer for the batch's arrays
          expect(bits(streamed)).toEqual(bits(single));
          const [viaStreamBatch] = (await stream.attendBatch(layer, [{ session: c, q: qT(steps[s].q) }])).map(ok);
          expect(viaStreamBatch.stats.tokens).toBe(streamed.stats.tokens);
        }
    } finally {
      stream.close();
    }
  });

  it('a batch with bad steps answers the good ones, in order, and the bad ones change nothing', async () => {
    const [a, b] = [await session(), await session()];
    const body = { q: qT(steps[0].q), ...steps[0].kv, position: 0 };
    const results = await client.attendBatch(0, [
      { session: a, ...body },
      { session: 'no-such-session', ...body },
      { session: b, ...body, q: tensor('f32', [model.qHeads - 1, model.headDim], steps[0].q.subarray(0, (model.qHeads - 1) * model.headDim)) },
      { session: b, ...body, position: 3 },
    ]);
    expect('error' in results[0]).toBe(false);
    expect(results.slice(1).map((r) => ('error' in r ? r.error.code : 'ok'))).toEqual(['not_found', 'invalid', 'conflict']);
    // Session b appended nothing: its first append is still position 0.
    expect((await client.attend(b, { layer: 0, ...body })).stats.tokens).toBe(701);
    const whole = await client.attendBatch(0, []).catch((e) => e);
    expect((whole as KvrecallRequestError).status).toBe(422);
  });

  it('each answered step of a batch is counted once in /metrics, over the stream and over HTTP', async () => {
    const count = async () => Number(/kvrecall_attend_seconds_count (\d+)/.exec(await (await fetch(`${server.url}/metrics`)).text())?.[1]);
    const [a, b, c] = [await session(), await session(), await session()];
    const body = { q: qT(steps[0].q) };
    const stream = await client.openStream();
    try {
      const before = await count();
      const streamed = await stream.attendBatch(0, [{ session: a, ...body }, { session: 'no-such-session', ...body }, { session: b, ...body }, { session: c, ...body }]);
      expect(streamed.map((r) => ('error' in r ? r.error.code : 'ok'))).toEqual(['ok', 'not_found', 'ok', 'ok']);
      expect(await count()).toBe(before + 3);
      await stream.attendBatch(1, [{ session: a, ...body }, { session: b, ...body }]);
      await client.attendBatch(0, [{ session: c, ...body }, { session: a, ...body }]);
      expect(await count()).toBe(before + 7);
    } finally {
      stream.close();
    }
  });

  it('appends out of order are refused with 409 and change nothing', async () => {
    const a = await session();
    const body = { layer: 0, q: qT(steps[0].q), ...steps[0].kv };
    await client.attend(a, { ...body, position: 0 });
    for (const position of [0, 2]) {
      const e = await client.attend(a, { ...body, position }).catch((x) => x);
      expect((e as KvrecallRequestError).status).toBe(409);
    }
    expect((await client.attend(a, { ...body, position: 1 })).stats.tokens).toBe(702);
  });

  it('malformed frames and unknown sessions get error frames; the stream and the sessions survive', async () => {
    const a = await session();
    const stream: KvrecallStream = await client.openStream();
    try {
      stream.sendRaw(Uint8Array.of(0xc1)); // never valid msgpack: answered with an id-less error frame
      stream.sendRaw(new Packr({ useRecords: false }).pack([1, 2, 3]));
      await expect(stream.attend('nope', { layer: 0, q: qT(steps[0].q) })).rejects.toMatchObject({ status: 404 });
      await expect(stream.attend(a, { layer: 9, q: qT(steps[0].q) })).rejects.toMatchObject({ status: 422 });
      const r = await stream.attend(a, { layer: 0, q: qT(steps[0].q), ...steps[0].kv, position: 0 });
      expect(r.stats.tokens).toBe(701);
    } finally {
      stream.close();
    }
  });

  it('a client that disconnects mid-stream leaves its session usable', async () => {
    const a = await session();
    const stream = await client.openStream();
    const pending = stream.attend(a, { layer: 0, q: qT(steps[0].q), ...steps[0].kv, position: 0 }).catch((e) => e);
    stream.close();
    await pending;
    // Whether or not that step ran before the close, the session answers and counts its tokens right.
    const held = (await client.getSession(a)).ownTokens as number[];
    const r = await client.attend(a, { layer: 0, q: qT(steps[1].q), ...steps[1].kv, position: held[0] });
    expect(r.stats.tokens).toBe(700 + held[0] + 1);
  });
});
