// The stream client reads an answer that came whole in one socket read as a
// view of its warm read buffer, which the next read overwrites: whatever a
// caller keeps must be its own. Many attends in flight at once (their
// answers several to a read), with out in f32 and f16, selections, kv
// (passed on as views, so never read from the warm buffer) and batches
// (views of their own message) between them, against a real server: every
// answer is the HTTP route's, bit for bit, and still is after hundreds of
// later answers have gone through the same buffer. Requests are packed
// straight into a warm frame buffer that is reused: each request's bytes
// are its own (the server's answers follow each one's q).
import { describe, expect, it } from 'vitest';
import { tensor, type AttendReply, type OutArray } from '../../clients/ts/client.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`stream-views: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const live = useServer();

const bytesOf = (a: ArrayBufferView) => Buffer.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
/** An answer's arrays as bytes, copied now (what a later overwrite of its buffer would change). */
function snapshot(r: AttendReply<OutArray>): Buffer[] {
  return [bytesOf(r.out), bytesOf(r.lse), ...(r.selection ?? []).map(bytesOf), ...(r.kv ? [...r.kv.k, ...r.kv.v].map((t) => Buffer.from(t.data)) : [])];
}

describe('stream answers read from the warm read buffer', () => {
  it('keep their values through later answers: out, lse, selection and kv equal the HTTP answers bit for bit', async () => {
    const client = live.client();
    await client.createDocument('doc', model, { methods: ['topk-blocks'] });
    const c = randomKv(rng, 'f16', model.kvHeads, 600, model.headDim);
    await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('doc');
    // Two sessions that only read (their answers are the same on every route); one the stream appends to.
    const sid = (await client.createSession({ model, documents: ['doc'], method: 'topk-blocks', budget: 64 })).id;
    const exact = (await client.createSession({ model, documents: ['doc'], method: 'exact' })).id;
    const stream = await client.openStream();
    try {
      const asks = Array.from({ length: 48 }, (_, i) => {
        const q = randomQ(rng, model.qHeads, model.headDim);
        const kind = i % 4;
        return {
          session: i % 3 === 0 ? exact : sid,
          body: {
            layer: 0,
            q: tensor('f32', [model.qHeads, model.headDim], q),
            ...(kind === 1 && { outDtype: 'f16' as const }),
            ...(kind === 2 && { return: ['out', 'selection'] as ('out' | 'selection')[] }),
            ...(kind === 3 && { return: ['out', 'kv', 'selection'] as ('out' | 'kv' | 'selection')[] }),
          },
        };
      });
      const want = [];
      for (const a of asks) want.push(snapshot(await client.attend(a.session, a.body)));
      // All in flight at once, a batch among them: answers come several to a read.
      const batchQ = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
      const pending = asks.map((a) => stream.attend(a.session, a.body));
      const batch = stream.attendBatch(0, [{ session: exact, q: batchQ }, { session: sid, q: batchQ }]);
      const got = await Promise.all(pending);
      const batched = await batch;
      for (let i = 0; i < asks.length; i++) expect(Buffer.concat(snapshot(got[i])).equals(Buffer.concat(want[i])), `ask ${i}`).toBe(true);
      // Hundreds of answers later, through the same read buffer: nothing kept has changed.
      const other = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
      for (let round = 0; round < 8; round++) await Promise.all(Array.from({ length: 40 }, (_, j) => stream.attend(j % 2 ? sid : exact, { layer: 0, q: other, return: ['out', 'kv'] })));
      for (let i = 0; i < asks.length; i++) expect(Buffer.concat(snapshot(got[i])).equals(Buffer.concat(want[i])), `ask ${i}, later`).toBe(true);
      const batchWant = await client.attendBatch(0, [{ session: exact, q: batchQ }, { session: sid, q: batchQ }]);
      for (let i = 0; i < 2; i++) {
        const [a, b] = [batched[i], batchWant[i]] as AttendReply[];
        expect(bytesOf(a.out).equals(bytesOf(b.out)) && bytesOf(a.lse).equals(bytesOf(b.lse)), `batch step ${i}`).toBe(true);
      }
    } finally {
      stream.close();
    }
  });

  it('large batch answers (each copied into a buffer of its own, which its results view) keep their values through later batches', async () => {
    const client = live.client();
    // 128 q heads x 128: one step's out is 64 KiB, a batch of 6 about 0.4 MB: more than a read, and copied out of the warm read buffer.
    const big = { layers: 1, qHeads: 128, kvHeads: 2, headDim: 128, dtype: 'f16' as const };
    await client.createDocument('big', big);
    const c = randomKv(rng, 'f16', big.kvHeads, 37, big.headDim);
    await client.uploadDocumentKv('big', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('big');
    const sids: string[] = [];
    for (let i = 0; i < 6; i++) sids.push((await client.createSession({ model: big, documents: ['big'], method: 'exact' })).id);
    const stream = await client.openStream();
    try {
      const kept: { got: Buffer[]; want: Buffer[] }[] = [];
      for (let round = 0; round < 5; round++) {
        // Sizes that change from round to round.
        const steps = sids.slice(0, round === 2 ? 3 : 6).map((session) => ({ session, q: tensor('f32', [big.qHeads, big.headDim], randomQ(rng, big.qHeads, big.headDim)) }));
        const got = (await stream.attendBatch(0, steps)) as AttendReply[];
        // Between batches the client's event loop turns, as in a decode loop.
        await new Promise((resolve) => setImmediate(resolve));
        const want = (await client.attendBatch(0, steps)) as AttendReply[];
        kept.push({ got: got.flatMap((r) => [bytesOf(r.out), bytesOf(r.lse)]), want: want.flatMap((r) => [bytesOf(r.out), bytesOf(r.lse)]) });
        for (const [i, k] of kept.entries()) expect(Buffer.concat(k.got).equals(Buffer.concat(k.want)), `round ${round}, batch ${i}`).toBe(true);
        kept[round].got = got.flatMap((r) => [r.out, r.lse].map((a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)));
      }
    } finally {
      stream.close();
    }
  });

  it('sends each request as its own: attends with different q in flight at once get their own answers, appends in order', async () => {
    const client = live.client();
    const sid = (await client.createSession({ model })).id;
    const ref = (await client.createSession({ model })).id;
    const stream = await client.openStream();
    try {
      const steps = Array.from({ length: 30 }, () => ({ q: randomQ(rng, model.qHeads, model.headDim), kv: asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim)) }));
      const body = (s: (typeof steps)[number], position: number) => ({ layer: 0, q: tensor('f32', [model.qHeads, model.headDim], s.q), ...s.kv, position });
      const got = await Promise.all(steps.map((s, i) => stream.attend(sid, body(s, i))));
      for (let i = 0; i < steps.length; i++) {
        const want = await client.attend(ref, body(steps[i], i));
        expect(bytesOf(got[i].out).equals(bytesOf(want.out)) && bytesOf(got[i].lse).equals(bytesOf(want.lse)), `step ${i}`).toBe(true);
      }
    } finally {
      stream.close();
    }
  });
});
