// The stream's own WebSocket framing (api/websocket.ts) against a real
// server on 127.0.0.1, spoken byte by byte over a raw socket: the handshake
// (and its refusals), masked frames with random keys cut at every kind of
// boundary, fragmented messages with a ping between the fragments, 16- and
// 64-bit lengths, messages over the limit refused with 1009 before they are
// read, protocol errors closed with 1002, the close handshake, and text or
// empty messages answered with error frames on a connection that survives.
import { createHash, randomBytes } from 'node:crypto';
import type { Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { unpackView } from '../../core/msgpack-parts-decode.js';
import { joinParts, packParts } from '../../core/msgpack-parts.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { openRawWs, RawWsClient, WS_TEST_KEY, type RawFrame } from '../helpers/ws-raw.js';

const seed = freshSeed();
console.log(`websocket: seed ${seed}`);
const rng = new Rng(seed);
const LIMIT = 1 << 17;
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
let sid: string;

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { bodyLimit: LIMIT });
  client = new KvrecallClient({ url: server.url });
  sid = (await client.createSession({ model })).id;
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

/** The shared raw client, asserting every server frame is unmasked, with writes in random pieces. */
class Raw extends RawWsClient {
  constructor(socket: Socket) {
    super(socket, (f) => expect(f.masked, 'a server frame is masked').toBe(false));
  }

  /** Sends bytes in random pieces (1 byte up to all of them), each its own write. */
  async write(bytes: Buffer, split = true): Promise<void> {
    let at = 0;
    while (at < bytes.length) {
      const n = split ? Math.min(bytes.length - at, rng.next() < 0.3 ? 1 + rng.int(3) : 1 + rng.int(bytes.length)) : bytes.length;
      this.socket.write(bytes.subarray(at, at + n));
      at += n;
      if (split) await new Promise((r) => setImmediate(r));
    }
  }
}

function open(path = '/v1/stream', headers: Record<string, string> = {}): Promise<Raw> {
  return openRawWs(Number(new URL(server.url).port), { path, headers, make: (socket) => new Raw(socket) });
}

/** A client frame: masked with `key` (random unless given; null: unmasked), the length in its smallest form unless `wide`. */
function frame(opcode: number, payload: Uint8Array, o: { fin?: boolean; key?: Buffer | null; rsv?: number; wide?: boolean } = {}): Buffer {
  const n = payload.length;
  const key = o.key === undefined ? randomBytes(4) : o.key;
  const head = [((o.fin ?? true) ? 0x80 : 0) | (o.rsv ?? 0) | opcode];
  const m = key ? 0x80 : 0;
  if (n < 126 && !o.wide) head.push(m | n);
  else if (n < 0x10000 && !o.wide) head.push(m | 126, n >> 8, n & 0xff);
  else {
    const len = Buffer.alloc(8);
    len.writeBigUInt64BE(BigInt(n));
    head.push(m | 127, ...len);
  }
  const body = Buffer.from(payload);
  if (key) for (let i = 0; i < n; i++) body[i] ^= key[i & 3];
  return Buffer.concat([Buffer.from(head), ...(key ? [key] : []), body]);
}

const pack = (v: unknown) => {
  const parts = packParts(v);
  return joinParts(parts, new Uint8Array(parts.byteLength));
};
const closeCode = (f: RawFrame) => f.payload.readUInt16BE(0);
const hex = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');

describe('the stream WebSocket (own framing)', () => {
  it('accepts the handshake with the RFC 6455 accept key, and refuses bad ones with a status and why', async () => {
    const ok = await open();
    expect(ok.head).toMatch(/^HTTP\/1\.1 101 /);
    const accept = /sec-websocket-accept: (\S+)/i.exec(ok.head)?.[1];
    expect(accept).toBe('s3pPLMBiTxaQ9kYGzzhZRbK+xOo='); // RFC 6455 section 1.3's example
    expect(accept).toBe(createHash('sha1').update(WS_TEST_KEY + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64'));
    ok.socket.destroy();
    for (const [headers, status, why] of [
      [{ 'Sec-WebSocket-Version': '8' }, 426, 'Sec-WebSocket-Version must be 13'],
      [{ 'Sec-WebSocket-Key': '' }, 400, 'Sec-WebSocket-Key must be 16 bytes in base64'],
    ] as const) {
      const r = await open('/v1/stream', headers);
      expect(r.head).toMatch(new RegExp(`^HTTP/1\\.1 ${status} `));
      // A version we do not speak is answered with the one we do (RFC 6455 4.4).
      if (status === 426) expect(r.head).toMatch(/\r\nsec-websocket-version: 13(\r\n|$)/i);
      await r.until(() => r.ended);
      expect(r.body).toBe(why);
      r.socket.destroy();
    }
    const missing = await open('/v1/nope');
    expect(missing.head).toMatch(/^HTTP\/1\.1 404 /);
    missing.socket.destroy();
  });

  it('puts together masked, fragmented frames cut at every boundary, answers a ping between them, and answers as HTTP does', async () => {
    const q = randomQ(rng, model.qHeads, model.headDim);
    const body = { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], q) };
    const viaHttp = await client.attend(sid, body);
    const raw = await open();
    const msg = pack({ id: 7, session: sid, ...body });
    const cut = [1 + rng.int(msg.length / 3), msg.length / 2 + rng.int(msg.length / 3)].map(Math.floor);
    await raw.write(frame(0x2, msg.subarray(0, cut[0]), { fin: false }));
    await raw.write(frame(0x9, Buffer.from('are you there')));
    await raw.write(frame(0x0, msg.subarray(cut[0], cut[1]), { fin: false }));
    await raw.write(frame(0x0, msg.subarray(cut[1]), { fin: true }));
    await raw.until(() => raw.frames.length >= 2);
    expect(raw.frames.map((f) => f.opcode)).toEqual([0xa, 0x2]);
    expect(raw.frames[0].payload.toString()).toBe('are you there');
    const answer = unpackView(raw.frames[1].payload) as { id: number; out: { data: Uint8Array }; lse: { data: Uint8Array } };
    expect(answer.id).toBe(7);
    expect(hex(answer.out.data)).toBe(hex(viaHttp.out));
    expect(hex(answer.lse.data)).toBe(hex(viaHttp.lse));
    raw.socket.destroy();
  });

  it('reads 16- and 64-bit lengths (a batch over 64 KiB in one frame, a small one in the 64-bit form)', async () => {
    const raw = await open();
    const q = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
    const big = pack({ id: 1, layer: 0, steps: Array.from({ length: 80 }, () => ({ session: sid, q })) });
    expect(big.length).toBeGreaterThan(0x10000);
    await raw.write(frame(0x2, big));
    await raw.write(frame(0x2, pack({ id: 2, layer: 0, steps: [{ session: sid, q }] }), { wide: true }));
    await raw.write(frame(0x2, pack({ id: 3, session: sid, layer: 0, q }), { key: Buffer.alloc(4) })); // a zero key: sent as is
    await raw.until(() => raw.frames.length >= 3);
    const [a, b, c] = raw.frames.map((f) => unpackView(f.payload) as { id: number; results?: { out: { data: Uint8Array } }[]; out?: { data: Uint8Array } });
    expect([a.id, b.id, c.id]).toEqual([1, 2, 3]);
    expect(a.results).toHaveLength(80);
    // The same step in every form: the same bytes.
    for (const r of a.results!) expect(hex(r.out.data)).toBe(hex(c.out!.data));
    expect(hex(b.results![0].out.data)).toBe(hex(c.out!.data));
    raw.socket.destroy();
  });

  it('answers text and empty messages with error frames, and the connection goes on', async () => {
    const raw = await open();
    await raw.write(frame(0x1, Buffer.from('{"id": 1}')));
    await raw.write(frame(0x2, new Uint8Array(0)));
    // Not msgpack from its q on (0xc1 is no value's first byte): refused, with the id read before it.
    // {id: 8, layer: 0, q: <0xc1>}
    await raw.write(frame(0x2, Uint8Array.of(0x83, 0xa2, 0x69, 0x64, 0x08, 0xa5, 0x6c, 0x61, 0x79, 0x65, 0x72, 0x00, 0xa1, 0x71, 0xc1)));
    await raw.write(frame(0x2, pack({ id: 9, session: sid, layer: 0, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)) })));
    await raw.until(() => raw.frames.length >= 4);
    const [text, empty, cut, ok] = raw.frames.map((f) => unpackView(f.payload) as { id?: number; error?: { code: string }; out?: unknown });
    expect(text.error?.code).toBe('malformed');
    expect(empty.error?.code).toBe('malformed');
    expect(cut.error?.code).toBe('malformed');
    expect(cut.id).toBe(8);
    expect(ok.id).toBe(9);
    expect(ok.out).toBeDefined();
    raw.socket.destroy();
  });

  it('refuses a message over the limit with 1009 from its header alone, and protocol errors with 1002; the server stays up', async () => {
    const over = await open();
    // Only the header of a message one byte over the limit (and a fragmented one that would pass it): refused before its body comes.
    const head = frame(0x2, new Uint8Array(LIMIT + 1)).subarray(0, 14);
    over.socket.write(head);
    await over.until(() => over.ended);
    expect(over.frames.map((f) => [f.opcode, closeCode(f)])).toEqual([[0x8, 1009]]);
    const fragmented = await open();
    await fragmented.write(frame(0x2, new Uint8Array(LIMIT - 10), { fin: false }), false);
    await fragmented.write(frame(0x0, new Uint8Array(11)), false);
    await fragmented.until(() => fragmented.ended);
    expect(fragmented.frames.map((f) => [f.opcode, closeCode(f)])).toEqual([[0x8, 1009]]);
    for (const bad of [
      frame(0x2, pack({ id: 1 }), { key: null }), // unmasked
      frame(0x2, pack({ id: 1 }), { rsv: 0x40 }), // a reserved bit, no extension agreed
      frame(0x0, pack({ id: 1 })), // a continuation with no message begun
      frame(0x9, new Uint8Array(126)), // a control frame over 125 bytes
      frame(0x3, new Uint8Array(1)), // an unknown opcode
    ]) {
      const r = await open();
      await r.write(bad);
      await r.until(() => r.ended);
      expect(r.frames.map((f) => [f.opcode, closeCode(f)])).toEqual([[0x8, 1002]]);
    }
    expect((await fetch(`${server.url}/v1/health`)).status).toBe(200);
    expect((await client.attend(sid, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)) })).out).toHaveLength(model.qHeads * model.headDim);
  });

  it('closes with 1002 a close frame whose code may not be sent (RFC 6455 7.4), and echoes one that may', async () => {
    for (const [code, answer] of [[999, 1002], [1004, 1002], [1005, 1002], [1006, 1002], [1015, 1002], [1016, 1002], [2999, 1002], [5000, 1002], [1001, 1001], [1011, 1011], [3000, 3000], [4999, 4999]]) {
      const raw = await open();
      await raw.write(frame(0x8, Buffer.from([code >> 8, code & 0xff])));
      await raw.until(() => raw.frames.length >= 1);
      expect([code, raw.frames[0].opcode, closeCode(raw.frames[0])]).toEqual([code, 0x8, answer]);
      raw.socket.destroy();
    }
  });

  it('answers a close with a close of the same code and ends the connection', async () => {
    const raw = await open();
    const payload = Buffer.concat([Buffer.from([0x03, 0xe8]), Buffer.from('bye')]);
    await raw.write(frame(0x8, payload));
    await raw.until(() => raw.frames.length >= 1);
    expect(raw.frames[0].opcode).toBe(0x8);
    expect(closeCode(raw.frames[0])).toBe(1000);
    raw.socket.end();
    await raw.until(() => raw.ended);
    expect(raw.ended).toBe(true);
  });
});
