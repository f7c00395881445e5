// openStream({ spinMs }): while an answer is owed, the client's event loop
// keeps turning (setImmediate) instead of sleeping, for up to spinMs after
// the latest request, and stops once nothing is owed. It changes when an
// answer is read, never what is read: decode steps (each appending the new
// token's k/v) over a polling stream and over a plain one, each on a
// session of its own over the same document, answer bit for bit alike (out
// in f32 and f16, selections), one at a time and many in flight; errors
// are mapped as on the plain stream; the polling ends with the last answer,
// with the stream's close, and after spinMs when no answer comes (a peer
// that never answers). Against a real server on 127.0.0.1.
import { createHash } from 'node:crypto';
import { createServer, type AddressInfo, type Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError, tensor, type AttendReply, type OutArray } from '../../clients/ts/client.js';
import { KvrecallStream } from '../../clients/ts/stream.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`stream-spin: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const live = useServer();

const bytesOf = (a: ArrayBufferView) => Buffer.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
const answerBytes = (r: AttendReply<OutArray>) => Buffer.concat([Buffer.from(r.outDtype), bytesOf(r.out), bytesOf(r.lse), ...(r.selection ?? []).map(bytesOf)]);
/** Immediates pending in this process (the polling chain is one while it runs). */
const immediates = () => process.getActiveResourcesInfo().filter((r) => r === 'Immediate').length;
/** Two turns of the loop: a chain that saw nothing owed has stopped by then. */
const turns = async () => {
  for (let i = 0; i < 2; i++) await new Promise<void>((r) => setImmediate(r));
};

async function document(name: string): Promise<void> {
  const client = live.client();
  await client.createDocument(name, model, { methods: ['topk-blocks'] });
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, 700, model.headDim);
    await client.uploadDocumentKv(name, { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument(name);
}

describe('a polling stream (spin)', () => {
  it('answers decode steps bit for bit as a sleeping one, one at a time and many in flight', async () => {
    const client = live.client();
    await document('doc');
    const session = async () => (await client.createSession({ model, documents: ['doc'], method: 'topk-blocks', budget: 64 })).id;
    const [a, b] = [await session(), await session()];
    const plain = await client.openStream();
    const spin = await client.openStream({ spinMs: 1000 });
    try {
      for (let step = 0; step < 12; step++)
        for (let layer = 0; layer < model.layers; layer++) {
          const kv = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
          const body = {
            layer, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)), ...kv,
            ...(step % 3 === 1 && { outDtype: 'f16' as const }),
            ...(step % 3 === 2 && { return: ['out', 'selection'] as ('out' | 'selection')[] }),
          };
          const want = await plain.attend(a, body);
          const got = await spin.attend(b, body);
          expect(answerBytes(got).equals(answerBytes(want)), `step ${step}, layer ${layer}`).toBe(true);
        }
      // Many in flight on each (reads only: the sessions stay alike).
      const qs = Array.from({ length: 24 }, () => tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)));
      const want = await Promise.all(qs.map((q, i) => plain.attend(a, { layer: i % model.layers, q, return: ['out', 'selection'] })));
      const got = await Promise.all(qs.map((q, i) => spin.attend(b, { layer: i % model.layers, q, return: ['out', 'selection'] })));
      for (let i = 0; i < qs.length; i++) expect(answerBytes(got[i]).equals(answerBytes(want[i])), `in flight ${i}`).toBe(true);
    } finally {
      plain.close();
      spin.close();
    }
  });

  it('polls only while an answer is owed, and a sleeping stream never does', async () => {
    const client = live.client();
    await document('doc2');
    const sid = (await client.createSession({ model, documents: ['doc2'], method: 'exact' })).id;
    const q = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
    for (const spin of [false, true]) {
      const stream = await client.openStream({ spinMs: spin ? 1000 : 0 });
      try {
        await turns();
        const before = immediates();
        const call = stream.attend(sid, { layer: 0, q });
        // The request is sent; while its answer is owed a polling stream has its chain queued.
        expect(immediates() - before, `spin ${spin}, owed`).toBe(spin ? 1 : 0);
        await call;
        await turns();
        expect(immediates(), `spin ${spin}, answered`).toBe(before);
      } finally {
        stream.close();
      }
    }
  });

  it('maps errors as a sleeping stream does, and stops polling when closed with answers owed', async () => {
    const client = live.client();
    await document('doc3');
    const sid = (await client.createSession({ model, documents: ['doc3'], method: 'exact' })).id;
    const q = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
    const stream = await client.openStream({ spinMs: 1000 });
    await turns();
    const before = immediates();
    const missing = await stream.attend('no-such-session', { layer: 0, q }).catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(KvrecallRequestError);
    expect([(missing as KvrecallRequestError).status, (missing as KvrecallRequestError).code]).toEqual([404, 'not_found']);
    const bad = await stream.attend(sid, { layer: 5, q }).catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(KvrecallRequestError);
    expect((bad as KvrecallRequestError).status).toBe(422);
    // The stream still answers after the errors.
    expect((await stream.attend(sid, { layer: 0, q })).out.length).toBe(model.qHeads * model.headDim);
    const owed = stream.attend(sid, { layer: 1, q });
    stream.close();
    await expect(owed).rejects.toThrow('stream closed');
    // The closing sockets' own work (both ends are in this process) settles first.
    await new Promise((r) => setTimeout(r, 50));
    await turns();
    expect(immediates()).toBe(before);
  });

  it('sleeps once spinMs has passed with the answer still owed', async () => {
    // A peer that accepts the WebSocket and never answers a frame.
    const sockets: Socket[] = [];
    const peer = createServer((socket) => {
      sockets.push(socket);
      socket.once('data', (head) => {
        const key = /sec-websocket-key: *(\S+)/i.exec(head.toString())![1];
        const accept = createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ${accept}\r\n\r\n`);
        socket.on('data', () => undefined);
      });
    });
    await new Promise<void>((r) => peer.listen(0, '127.0.0.1', r));
    const stream = await KvrecallStream.open(`http://127.0.0.1:${(peer.address() as AddressInfo).port}`, undefined, { spinMs: 200 });
    try {
      await turns();
      const before = immediates();
      const q = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
      const owed = stream.attend('s', { layer: 0, q });
      owed.catch(() => undefined);
      expect(immediates() - before, 'owed, polling').toBe(1);
      await new Promise((r) => setTimeout(r, 5));
      expect(immediates() - before, 'owed, within spinMs').toBe(1);
      await new Promise((r) => setTimeout(r, 300));
      await turns();
      // Still owed, but past spinMs: the loop sleeps.
      expect(immediates(), 'owed, past spinMs').toBe(before);
      // A new request polls again.
      const again = stream.attend('s', { layer: 0, q });
      again.catch(() => undefined);
      expect(immediates() - before, 'a second request').toBe(1);
      stream.close();
      await expect(owed).rejects.toThrow('stream closed');
    } finally {
      stream.close();
      sockets.forEach((x) => x.destroy());
      await new Promise((r) => peer.close(r));
    }
  });
});
