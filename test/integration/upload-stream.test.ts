// Document uploads over the stream (GET /v1/stream), against a real server
// and real LMDB files: uploads large enough to be read straight from the
// socket (api/websocket.ts; in pooled buffers or, past their size, one of
// their own) and small ones, several in flight, store exactly the bytes
// sent, as the HTTP route does; a masked frame is
// unmasked; bad uploads get error frames, change nothing and leave the
// stream usable; a peer that goes away mid-message, or stalls, or a server
// that closes meanwhile, leaves the document loading and usable.
import { randomFillSync } from 'node:crypto';
import { pack, unpack } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { directReadTotals } from '../../api/websocket.js';
import { tensor } from '../../clients/ts/client.js';
import { UploadWindow } from '../../clients/ts/preload.js';
import type { Tensor } from '../../core/tensor.js';
import { randomKv, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir, useServer } from '../helpers/server.js';
import { clientFrame, openRawWs, type RawWsClient } from '../helpers/ws-raw.js';

const seed = freshSeed();
console.log(`upload-stream: seed ${seed}`);
// 512 bytes of K/V per token: 2048 tokens and up are read directly (1 MiB).
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 64, dtype: 'f16' as const, blockSize: 16 };
const { client, port } = useServer({ streamIdleMs: 400 });

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

/** Per layer and head, K and V of a ready document as its exact session returns them. */
async function readBack(doc: string): Promise<{ k: Uint8Array[][]; v: Uint8Array[][] }> {
  const s = await client().createSession({ model, documents: [doc], method: 'exact' });
  const k: Uint8Array[][] = [], v: Uint8Array[][] = [];
  for (let layer = 0; layer < model.layers; layer++) {
    const r = await client().attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim)), return: ['kv'] });
    k.push(r.kv!.k.map((t: Tensor) => t.data));
    v.push(r.kv!.v.map((t: Tensor) => t.data));
  }
  await client().deleteSession(s.id);
  return { k, v };
}

/** Per head, the chunks' bytes of k or v one after another (what the document must hold). */
function expected(chunks: KvChunk[], which: 'k' | 'v', h: number): Buffer {
  return Buffer.concat(chunks.map((c) => {
    const n = c.k.shape[1], d = c.k.shape[2], t = c[which].data;
    return Buffer.from(t.buffer, t.byteOffset + h * n * d * 2, n * d * 2);
  }));
}

async function expectHolds(doc: string, perLayer: KvChunk[][]): Promise<void> {
  const got = await readBack(doc);
  for (let layer = 0; layer < model.layers; layer++)
    for (let h = 0; h < model.kvHeads; h++) {
      expect(same(got.k[layer][h], expected(perLayer[layer], 'k', h)), `k layer ${layer} head ${h}`).toBe(true);
      expect(same(got.v[layer][h], expected(perLayer[layer], 'v', h)), `v layer ${layer} head ${h}`).toBe(true);
    }
}

/** One upload frame as the client packs it, masked with `key` (RFC 6455), split nowhere. */
const frame = (body: Record<string, unknown>, key: number[]): Buffer => clientFrame(0x2, Buffer.from(pack(body)), key);

/** Random finite f16 words (the exponent's top bit clear), made fast: randomKv draws normals one by one. */
function finiteF16(shape: number[]): Tensor {
  const w = new Uint16Array(shape.reduce((a, b) => a * b, 1));
  randomFillSync(w);
  for (let i = 0; i < w.length; i++) w[i] &= 0xbfff;
  return tensor('f16', shape, w);
}

const answers = (raw: RawWsClient) => raw.frames.filter((f) => f.opcode === 2).map((f) => unpack(f.payload) as Record<string, unknown>);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('document uploads over the stream', () => {
  it('store exactly the bytes sent, large (read directly) and small, several in flight, as the HTTP route does', async () => {
    const rng = new Rng(seed ^ 0x51);
    const SIZES = [3001, 37, 2500, 1, 2048];
    await client().createDocument('via-stream', model, { methods: ['exact'] });
    await client().createDocument('via-http', model, { methods: ['exact'] });
    const stream = await client().openStream();
    const uploads = new UploadWindow(stream, 3);
    const sent: KvChunk[][] = [];
    const before = { ...directReadTotals };
    const answered: number[] = [];
    for (let layer = 0; layer < model.layers; layer++) {
      sent.push([]);
      let start = 0;
      for (const n of SIZES) {
        const c = randomKv(rng, 'f16', model.kvHeads, n, model.headDim);
        sent[layer].push(c);
        await uploads.send('via-stream', { layer, start, k: c.k, v: c.v }, (r) => answered.push(r.tokens));
        await client().uploadDocumentKv('via-http', { layer, start, k: c.k, v: c.v });
        start += n;
      }
    }
    await uploads.drain();
    stream.close();
    // In order: each answer holds its layer's tokens so far.
    const sums = SIZES.map((_, i) => SIZES.slice(0, i + 1).reduce((a, b) => a + b, 0));
    expect(answered).toEqual([...sums, ...sums]);
    // 3001, 2500 and 2048 tokens per layer are over 1 MiB.
    expect(directReadTotals.messages - before.messages).toBe(3 * model.layers);
    expect(directReadTotals.bytes - before.bytes).toBeGreaterThan(3 * model.layers * (1 << 20));
    for (const doc of ['via-stream', 'via-http']) {
      expect(await client().sealDocument(doc)).toMatchObject({ status: 'ready', tokens: sums[sums.length - 1] });
      await expectHolds(doc, sent);
    }
  });

  it('UploadWindow: one buffer refilled for every chunk once send resolves, three unanswered, stores every chunk as it was', async () => {
    // 10 MB uploads: more than the socket takes at once, so a send resolves before its bytes are all in the kernel only if it is wrong.
    const n = 20_000, shape = [model.kvHeads, n, model.headDim];
    await client().createDocument('reused', model, { methods: ['exact'] });
    const stream = await client().openStream();
    const uploads = new UploadWindow(stream, 3);
    const k = new Uint16Array(model.kvHeads * n * model.headDim), v = new Uint16Array(k.length);
    const sent: KvChunk[][] = [[], []];
    for (let layer = 0; layer < model.layers; layer++)
      for (let i = 0; i < 4; i++) {
        const c = { k: finiteF16(shape), v: finiteF16(shape), kValues: [], vValues: [] };
        sent[layer].push(c);
        // What the socket has not taken yet would change here, as a preload's reused chunk buffers do.
        k.set(new Uint16Array(c.k.data.buffer));
        v.set(new Uint16Array(c.v.data.buffer));
        await uploads.send('reused', { layer, start: i * n, k: tensor('f16', shape, k), v: tensor('f16', shape, v) }, () => undefined);
      }
    await uploads.drain();
    stream.close();
    await client().sealDocument('reused');
    await expectHolds('reused', sent);
  });

  it('reads an upload larger than the pooled buffers (40 MB) directly, into a buffer of its own', async () => {
    const shape = [model.kvHeads, 80_000, model.headDim];
    const chunks: KvChunk[][] = [0, 1].map(() => [{ k: finiteF16(shape), v: finiteF16(shape), kValues: [], vValues: [] }]);
    await client().createDocument('big', model, { methods: ['exact'] });
    const stream = await client().openStream();
    const before = { ...directReadTotals };
    for (let layer = 0; layer < model.layers; layer++) await stream.uploadDocumentKv('big', { layer, start: 0, k: chunks[layer][0].k, v: chunks[layer][0].v });
    stream.close();
    expect(directReadTotals.messages - before.messages).toBe(2);
    expect(directReadTotals.bytes - before.bytes).toBeGreaterThan(2 * 40_000_000);
    await client().sealDocument('big');
    await expectHolds('big', chunks);
  });

  it('unmasks a frame masked with a nonzero key, its bytes coming in pieces', async () => {
    const rng = new Rng(seed ^ 0x52);
    await client().createDocument('masked', model, { methods: ['exact'] });
    const raw = await openRawWs(port());
    const before = directReadTotals.messages;
    const sent: KvChunk[][] = [[], []];
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, 2600, model.headDim);
      sent[layer].push(c);
      const bytes = frame({ id: layer + 1, document: 'masked', layer, start: 0, k: c.k, v: c.v }, [0x12, 0x34, 0x56, 0x78]);
      // The header and a little payload first: the rest is read straight from the socket, at odd offsets.
      for (const [from, to] of [[0, 70_001], [70_001, 900_003], [900_003, bytes.byteLength]]) {
        raw.socket.write(bytes.subarray(from, to));
        await sleep(30);
      }
    }
    await raw.until(() => answers(raw).length === 2);
    expect(answers(raw).map((a) => [a.id, a.tokens, a.error])).toEqual([[1, 2600, undefined], [2, 2600, undefined]]);
    expect(directReadTotals.messages - before).toBe(2);
    raw.socket.destroy();
    await client().sealDocument('masked');
    await expectHolds('masked', sent);
  });

  it('puts together uploads it cannot read directly (fragmented, or one frame past 64 MiB) as they were sent', async () => {
    // Both are gathered chunk by chunk into a buffer that grows as bytes come:
    // each growth must keep the bytes of the frame being read, not only the
    // frames before it.
    const rng = new Rng(seed ^ 0x53);
    await client().createDocument('fragmented', model, { methods: ['exact'] });
    await client().createDocument('past-direct', model, { methods: ['exact'] });
    const raw = await openRawWs(port());
    const before = directReadTotals.messages;
    const fragmented: KvChunk[][] = [];
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, 2600, model.headDim);
      fragmented.push([c]);
      // One upload's payload as two frames, 1.3 MB not final, then the rest as the final continuation (zero mask).
      const payload = frame({ id: layer + 1, document: 'fragmented', layer, start: 0, k: c.k, v: c.v }, [0, 0, 0, 0]).subarray(14);
      const cut = 1_300_000;
      const head = (opcode: number, n: number) => {
        const h = Buffer.alloc(14);
        h[0] = opcode;
        h[1] = 0x80 | 127;
        h.writeBigUInt64BE(BigInt(n), 2);
        return h;
      };
      raw.socket.write(Buffer.concat([head(0x02, cut), payload.subarray(0, cut), head(0x80, payload.byteLength - cut), payload.subarray(cut)]));
    }
    await raw.until(() => answers(raw).length === 2);
    expect(answers(raw).map((a) => [a.id, a.tokens, a.error])).toEqual([[1, 2600, undefined], [2, 2600, undefined]]);
    // One frame of 64 MiB and a little more (bench:decode's 64 MiB uploads with their header); layer 1 over HTTP.
    const n = (64 << 20) / (4 * model.kvHeads * model.headDim) + 16, shape = [model.kvHeads, n, model.headDim];
    const big = { k: finiteF16(shape), v: finiteF16(shape), kValues: [], vValues: [] };
    raw.socket.write(frame({ id: 3, document: 'past-direct', layer: 0, start: 0, k: big.k, v: big.v }, [0x9a, 0xbc, 0xde, 0xf0]));
    await raw.until(() => answers(raw).length === 3, 30_000);
    expect(answers(raw)[2]).toMatchObject({ id: 3, tokens: n });
    expect(directReadTotals.messages - before).toBe(0);
    raw.socket.destroy();
    await client().uploadDocumentKv('past-direct', { layer: 1, start: 0, k: big.k, v: big.v });
    for (const doc of ['fragmented', 'past-direct']) await client().sealDocument(doc);
    await expectHolds('fragmented', fragmented);
    await expectHolds('past-direct', [[big], [big]]);
  }, 60_000);

  it('refuses bad uploads with error frames, changes nothing, and the stream goes on', async () => {
    const rng = new Rng(seed ^ 0x53);
    await client().createDocument('bad', model, { methods: ['exact'] });
    const stream = await client().openStream();
    const good = randomKv(rng, 'f16', model.kvHeads, 2100, model.headDim);
    const nan = randomKv(rng, 'f16', model.kvHeads, 2100, model.headDim);
    new Uint16Array(nan.v.data.buffer, nan.v.data.byteOffset)[2100 * 64 + 77] = 0x7e00; // head 1's first NaN, past the first read
    const tries: [Promise<unknown>, number, string][] = [
      [stream.uploadDocumentKv('bad', { layer: 0, start: 0, k: nan.k, v: nan.v }), 422, 'invalid'],
      [stream.uploadDocumentKv('bad', { layer: 0, start: 5, k: good.k, v: good.v }), 409, 'conflict'],
      [stream.uploadDocumentKv('no-such-doc', { layer: 0, start: 0, k: good.k, v: good.v }), 404, 'not_found'],
      [stream.uploadDocumentKv('bad', { layer: 9, start: 0, k: good.k, v: good.v }), 422, 'invalid'],
    ];
    for (const [p, status, code] of tries) await expect(p).rejects.toMatchObject({ status, code });
    expect((await client().getDocument('bad')).tokens).toBe(0);
    // The same stream takes the good uploads.
    const sent: KvChunk[][] = [[good], []];
    await stream.uploadDocumentKv('bad', { layer: 0, start: 0, k: good.k, v: good.v });
    const other = randomKv(rng, 'f16', model.kvHeads, 2100, model.headDim);
    sent[1].push(other);
    await stream.uploadDocumentKv('bad', { layer: 1, start: 0, k: other.k, v: other.v });
    stream.close();
    await client().sealDocument('bad');
    await expectHolds('bad', sent);
  });

  it('a peer gone mid-message leaves the document loading with what it held; a stalled one is closed with 1008', async () => {
    const rng = new Rng(seed ^ 0x54);
    await client().createDocument('cut', model, { methods: ['exact'] });
    const first = randomKv(rng, 'f16', model.kvHeads, 2200, model.headDim);
    const stream = await client().openStream();
    await stream.uploadDocumentKv('cut', { layer: 0, start: 0, k: first.k, v: first.v });
    stream.close();
    const next = randomKv(rng, 'f16', model.kvHeads, 3000, model.headDim);
    const bytes = frame({ id: 1, document: 'cut', layer: 0, start: 2200, k: next.k, v: next.v }, [0, 0, 0, 0]);

    // Gone: half the message, then the connection drops.
    const gone = await openRawWs(port());
    gone.socket.write(bytes.subarray(0, 200_000));
    await sleep(50);
    gone.socket.write(bytes.subarray(200_000, 800_000));
    await sleep(50);
    gone.socket.destroy();
    await sleep(100);
    expect(await client().getDocument('cut')).toMatchObject({ status: 'loading', tokens: 0 });
    expect((await client().health()).ok).toBe(true);

    // Stalled: part of the message, then nothing for longer than the server's 400 ms.
    const stalled = await openRawWs(port());
    const t0 = Date.now();
    stalled.socket.write(bytes.subarray(0, 300_000));
    await stalled.until(() => stalled.frames.some((f) => f.opcode === 8), 5000);
    const close = stalled.frames.find((f) => f.opcode === 8);
    expect(close?.payload.readUInt16BE(0)).toBe(1008);
    expect(Date.now() - t0).toBeLessThan(3000);
    stalled.socket.destroy();

    // The document goes on from where it was.
    const rest = await openRawWs(port());
    rest.socket.write(bytes);
    await rest.until(() => answers(rest).length === 1);
    expect(answers(rest)[0]).toMatchObject({ id: 1, tokens: 5200 });
    rest.socket.destroy();
    const layer1 = randomKv(rng, 'f16', model.kvHeads, 5200, model.headDim);
    await client().uploadDocumentKv('cut', { layer: 1, start: 0, k: layer1.k, v: layer1.v });
    await client().sealDocument('cut');
    await expectHolds('cut', [[first, next], [layer1]]);
  });

  it('a server closing while a message is read directly closes promptly', async () => {
    const other = tempDataDir();
    const s = await startInProcess(other.dir);
    try {
      const raw = await openRawWs(Number(new URL(s.url).port));
      const c = randomKv(new Rng(seed ^ 0x55), 'f16', model.kvHeads, 2500, model.headDim);
      raw.socket.write(frame({ id: 1, document: 'x', layer: 0, start: 0, k: c.k, v: c.v }, [0, 0, 0, 0]).subarray(0, 400_000));
      await sleep(100);
      const t0 = Date.now();
      await s.close();
      expect(Date.now() - t0).toBeLessThan(2000);
      await raw.until(() => raw.ended, 2000);
      expect(raw.ended).toBe(true);
    } finally {
      other.cleanup();
    }
  });
});
