// The TypeScript client's own WebSocket (clients/ts/websocket.ts) against a
// scripted server on 127.0.0.1 that writes its frames byte by byte or in
// random pieces: the handshake checked (a wrong accept key refused, a
// refusal's status kept), messages put together from fragments of every
// length form with a ping between them (answered with a pong), every
// message handed over at a 4-byte aligned offset, the client's own frames
// masked with the zero key in the smallest length form, a close answered,
// a masked server frame closed with 1002, a message over maxMessage closed
// with 1009 from its header and an answer that is not a map failing the
// pending calls (never a throw in the read callback), the server's close
// code and reason kept for later sends and over a reset after it, pings settled by their pongs; and
// against the real server, a refused handshake surfaces as a KvrecallRequestError with its status, and
// pings are answered.
import { createHash } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { KvrecallStream } from '../../clients/ts/stream.js';
import { HandshakeRefused, WsClient } from '../../clients/ts/websocket.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`client websocket: seed ${seed}`);
const rng = new Rng(seed);

/** A server frame (never masked) in the smallest length form unless `wide`. */
function frame(opcode: number, payload: Uint8Array, fin = true, wide = false, mask = false): Buffer {
  const n = payload.length;
  const head = [(fin ? 0x80 : 0) | opcode];
  const m = mask ? 0x80 : 0;
  if (n < 126 && !wide) head.push(m | n);
  else if (n < 0x10000 && !wide) head.push(m | 126, n >> 8, n & 0xff);
  else {
    const len = Buffer.alloc(8);
    len.writeBigUInt64BE(BigInt(n));
    head.push(m | 127, ...len);
  }
  return Buffer.concat([Buffer.from(head), ...(mask ? [Buffer.from([1, 2, 3, 4])] : []), Buffer.from(payload)]);
}

/** Client frames as the server reads them: opcode, fin, the key, the length's header size, the payload (unmasked). */
function readFrames(bytes: Buffer): { opcode: number; fin: boolean; key: Buffer; headerBytes: number; payload: Buffer }[] {
  const out = [];
  let at = 0;
  while (at + 2 <= bytes.length) {
    const b1 = bytes[at + 1];
    let len = b1 & 0x7f, h = 2;
    if (len === 126) (len = bytes.readUInt16BE(at + 2)), (h = 4);
    else if (len === 127) (len = Number(bytes.readBigUInt64BE(at + 2))), (h = 10);
    if (at + h + 4 + len > bytes.length) break;
    const key = bytes.subarray(at + h, at + h + 4);
    const payload = Buffer.from(bytes.subarray(at + h + 4, at + h + 4 + len));
    for (let i = 0; i < len; i++) payload[i] ^= key[i & 3];
    out.push({ opcode: bytes[at] & 0x0f, fin: (bytes[at] & 0x80) !== 0, key: Buffer.from(key), headerBytes: h, payload });
    at += h + 4 + len;
  }
  return out;
}

/** A scripted server: answers the handshake (with `accept` wrong when asked), then hands the socket and what it received to the test. */
async function scripted(opts: { badAccept?: boolean; status?: number; halfOpen?: boolean } = {}): Promise<{ url: string; server: Server; conn: Promise<{ socket: Socket; received: () => Buffer }> }> {
  let give!: (v: { socket: Socket; received: () => Buffer }) => void;
  const conn = new Promise<{ socket: Socket; received: () => Buffer }>((r) => (give = r));
  // halfOpen: the client's end (after its close frame) does not end the server's side.
  const server = createServer({ allowHalfOpen: opts.halfOpen ?? false }, (socket) => {
    let buf = Buffer.alloc(0), upgraded = false;
    socket.on('data', (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      if (upgraded) return;
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const key = /sec-websocket-key: (\S+)/i.exec(buf.subarray(0, end).toString())![1];
      buf = buf.subarray(end + 4);
      upgraded = true;
      if (opts.status) return void socket.end(`HTTP/1.1 ${opts.status} Nope\r\ncontent-length: 4\r\n\r\nnope`);
      const accept = opts.badAccept ? 'AAAA' : createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
      give({ socket, received: () => buf });
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  return { url: `http://127.0.0.1:${port}/v1/stream`, server, conn };
}

/** Writes bytes in random pieces, each its own write with a pause between (so the client reads them apart). */
async function dribble(socket: Socket, bytes: Buffer): Promise<void> {
  let at = 0;
  while (at < bytes.length) {
    const n = Math.min(bytes.length - at, rng.next() < 0.4 ? 1 + rng.int(3) : 1 + rng.int(40_000));
    socket.write(bytes.subarray(at, at + n));
    at += n;
    await new Promise((r) => setTimeout(r, 1));
  }
}

const until = async (ok: () => boolean) => {
  const deadline = Date.now() + 5000;
  while (!ok() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
};

describe('the client WebSocket (own framing)', () => {
  const servers: Server[] = [];
  afterAll(() => servers.forEach((s) => s.close()));

  it('puts messages together from fragments of every length form with a ping between, and hands them over 4-byte aligned', async () => {
    const s = await scripted();
    servers.push(s.server);
    const got: Uint8Array[] = [];
    const ws = await WsClient.open(s.url, {}, { message: (d) => got.push(d), closed: () => undefined });
    const { socket, received } = await s.conn;
    const big = Buffer.from(Array.from({ length: 70_001 }, () => rng.int(256)));
    const small = Buffer.from([1, 2, 3, 4, 5, 6, 7]);
    // One message in three fragments (16-bit, 64-bit and 7-bit lengths) with a ping between; then a small whole one, and one in the 64-bit form.
    await dribble(socket, Buffer.concat([
      frame(0x2, big.subarray(0, 300), false), frame(0x9, Buffer.from('ping?')), frame(0x0, big.subarray(300, 70_000), false, true), frame(0x0, big.subarray(70_000), true),
      frame(0x2, small), frame(0x2, small, true, true), frame(0x2, new Uint8Array(0)),
    ]));
    await until(() => got.length >= 4);
    expect(got.map((d) => Buffer.from(d).toString('hex'))).toEqual([big, small, small, Buffer.alloc(0)].map((b) => b.toString('hex')));
    for (const d of got) expect(d.byteOffset % 4).toBe(0);
    await until(() => readFrames(received()).length >= 1);
    const [pong] = readFrames(received());
    expect([pong.opcode, pong.payload.toString(), pong.key.toString('hex')]).toEqual([0xa, 'ping?', '00000000']);
    ws.close();
  });

  it('frames what it sends masked with the zero key, in the smallest length form', async () => {
    const s = await scripted();
    servers.push(s.server);
    const ws = await WsClient.open(s.url, {}, { message: () => undefined, closed: () => undefined });
    const { received } = await s.conn;
    const sizes = [0, 125, 126, 65_535, 65_536, 200_000];
    const payloads = sizes.map((n) => Buffer.from(Array.from({ length: n }, () => rng.int(256))));
    for (const p of payloads) ws.sendBytes(p);
    await until(() => readFrames(received()).length >= sizes.length);
    const frames = readFrames(received());
    expect(frames.map((f) => f.headerBytes)).toEqual([2, 2, 4, 4, 10, 10]);
    expect(frames.map((f) => [f.opcode, f.fin, f.key.toString('hex')])).toEqual(sizes.map(() => [0x2, true, '00000000']));
    expect(frames.map((f) => f.payload.toString('hex'))).toEqual(payloads.map((p) => p.toString('hex')));
    ws.close();
  });

  it('answers a close and reports the end; closes a masked server frame with 1002', async () => {
    const s = await scripted();
    servers.push(s.server);
    let closed: Error | undefined;
    const ws = await WsClient.open(s.url, {}, { message: () => undefined, closed: (e) => (closed = e) });
    const { socket, received } = await s.conn;
    socket.write(frame(0x8, Buffer.from([0x03, 0xe9])));
    await until(() => readFrames(received()).length >= 1);
    const [answer] = readFrames(received());
    expect([answer.opcode, answer.payload.readUInt16BE(0)]).toEqual([0x8, 1001]);
    socket.end();
    await until(() => closed !== undefined);
    expect(closed).toBeDefined();
    void ws;

    const m = await scripted();
    servers.push(m.server);
    let why: Error | undefined;
    await WsClient.open(m.url, {}, { message: () => undefined, closed: (e) => (why = e) });
    const c = await m.conn;
    c.socket.write(frame(0x2, Buffer.from('hello'), true, false, true));
    await until(() => why !== undefined);
    expect(why?.message).toMatch(/masked/);
    await until(() => readFrames(c.received()).length >= 1);
    expect(readFrames(c.received()).map((f) => [f.opcode, f.payload.readUInt16BE(0)])).toEqual([[0x8, 1002]]);
  });

  it('refuses a wrong accept key, and keeps a refusal status', async () => {
    const bad = await scripted({ badAccept: true });
    servers.push(bad.server);
    await expect(WsClient.open(bad.url, {}, { message: () => undefined, closed: () => undefined })).rejects.toThrow(/Sec-WebSocket-Accept/);
    const no = await scripted({ status: 403 });
    servers.push(no.server);
    const e = await WsClient.open(no.url, {}, { message: () => undefined, closed: () => undefined }).catch((x) => x);
    expect(e).toBeInstanceOf(HandshakeRefused);
    expect([(e as HandshakeRefused).status, (e as HandshakeRefused).body]).toEqual([403, 'nope']);
  });

  it('closes with 1009 a server message over maxMessage from its header (2^50 bytes claimed), failing the pending call; over 2^53 with 1002', async () => {
    const s = await scripted();
    servers.push(s.server);
    const stream = await KvrecallStream.open(s.url.replace('/v1/stream', ''), undefined, { maxMessage: 1 << 20 });
    const { socket, received } = await s.conn;
    const call = stream.attendBatch(0, []).catch((e: Error) => e);
    // A 64-bit length of 2^50, then one byte of it: taking it would be an allocation that throws inside the read callback.
    socket.write(Buffer.from([0x82, 127, 0, 0x04, 0, 0, 0, 0, 0, 0, 0xc0]));
    expect(((await call) as Error).message).toMatch(/over the limit of 1048576 \(maxMessage\)/);
    await until(() => readFrames(received()).some((f) => f.opcode === 0x8));
    expect(readFrames(received()).filter((f) => f.opcode === 0x8).map((f) => f.payload.readUInt16BE(0))).toEqual([1009]);

    const h = await scripted();
    servers.push(h.server);
    let why: Error | undefined;
    await WsClient.open(h.url, {}, { message: () => undefined, closed: (e) => (why = e) }, { maxMessage: 2 ** 60 });
    const c = await h.conn;
    c.socket.write(Buffer.from([0x82, 127, 0x10, 0, 0, 0, 0, 0, 0, 0, 0xc0]));
    await until(() => why !== undefined);
    expect(why?.message).toMatch(/2\^53/);
    await until(() => readFrames(c.received()).length >= 1);
    expect(readFrames(c.received()).map((f) => [f.opcode, f.payload.readUInt16BE(0)])).toEqual([[0x8, 1002]]);
  });

  it('fails pending calls with a protocol error on an answer that is not a map (msgpack nil), and closes with 1002', async () => {
    const s = await scripted();
    servers.push(s.server);
    const stream = await KvrecallStream.open(s.url.replace('/v1/stream', ''));
    const { socket, received } = await s.conn;
    const call = stream.attendBatch(0, []).catch((e: Error) => e);
    socket.write(frame(0x2, Buffer.from([0xc0])));
    expect(((await call) as Error).message).toMatch(/protocol error: an answer is not a map/);
    await until(() => readFrames(received()).some((f) => f.opcode === 0x8));
    expect(readFrames(received()).filter((f) => f.opcode === 0x8).map((f) => f.payload.readUInt16BE(0))).toEqual([1002]);
  });

  it("fails the calls pending when the real server closes with 1009 with its code and reason, not a bare 'stream closed'", async () => {
    const tmp = tempDataDir();
    const server = await startInProcess(tmp.dir, { bodyLimit: 100_000 });
    try {
      const client = new KvrecallClient({ url: server.url });
      const model = { layers: 1, qHeads: 2, kvHeads: 2, headDim: 64 };
      await client.createDocument('big', model);
      const zeros = new Uint16Array(2 * 1000 * 64);
      const stream = await client.openStream();
      const upload = stream.uploadDocumentKv('big', { layer: 0, start: 0, k: tensor('f16', [2, 1000, 64], zeros), v: tensor('f16', [2, 1000, 64], zeros) });
      await expect(upload).rejects.toThrow(/stream closed by the server \(1009: message over the limit of 100000 bytes \(the server's --body-limit\)\)/);
      expect((await client.getDocument('big')).tokens).toBe(0);
    } finally {
      await server.close();
      tmp.cleanup();
    }
  });

  it("keeps the server's close code and reason for sends after its close frame, and over a reset that follows it", async () => {
    const s = await scripted({ halfOpen: true });
    servers.push(s.server);
    let closed: Error | undefined;
    const ws = await WsClient.open(s.url, {}, { message: () => undefined, closed: (e) => (closed = e) });
    const { socket, received } = await s.conn;
    // The close frame, the socket left open: the client has answered it and waits (up to a second) for the end.
    socket.write(frame(0x8, Buffer.concat([Buffer.from([0x03, 0xf1]), Buffer.from('too big')])));
    await until(() => readFrames(received()).length >= 1);
    await new Promise((r) => setTimeout(r, 50)); // the client's end has reached the server, which stays open
    expect(closed).toBeUndefined();
    expect(() => ws.sendBytes(Buffer.from('more'))).toThrow('stream closed by the server (1009: too big)');
    // Then a reset (a server closing with bytes unread): the end reports the close, not ECONNRESET.
    socket.resetAndDestroy();
    await until(() => closed !== undefined);
    expect(closed?.message).toBe('stream closed by the server (1009: too big)');
  });

  it('ping: a pong settles the pings up to the number it carries; others are ignored; the end fails the rest; the real server answers', async () => {
    const s = await scripted();
    servers.push(s.server);
    let closed: Error | undefined;
    const ws = await WsClient.open(s.url, {}, { message: () => undefined, closed: (e) => (closed = e) });
    const { socket, received } = await s.conn;
    const settled: string[] = [];
    const pings = [0, 1, 2].map((i) => ws.ping().then(() => void settled.push(`ok ${i}`), (e: Error) => void settled.push(`failed ${i}: ${e.message}`)));
    await until(() => readFrames(received()).length >= 3);
    const sent = readFrames(received());
    expect(sent.map((f) => [f.opcode, f.payload.length])).toEqual([[0x9, 4], [0x9, 4], [0x9, 4]]);
    const numbers = sent.map((f) => f.payload.readUInt32BE(0));
    expect(new Set(numbers).size).toBe(3);
    socket.write(frame(0xa, Buffer.from([9, 9]))); // unasked: ignored
    socket.write(frame(0xa, sent[1].payload)); // answers the second, and so the first
    await until(() => settled.length >= 2);
    await new Promise((r) => setTimeout(r, 20));
    expect(settled).toEqual(['ok 0', 'ok 1']);
    socket.destroy();
    await Promise.all(pings);
    expect(settled[2]).toMatch(/^failed 2: /);
    expect(closed).toBeDefined();
    await expect(ws.ping()).rejects.toThrow();

    const tmp = tempDataDir();
    const server = await startInProcess(tmp.dir);
    try {
      const stream = await new KvrecallClient({ url: server.url }).openStream();
      await Promise.all([stream.ping(), stream.ping()]);
      await stream.ping();
      stream.close();
      await expect(stream.ping()).rejects.toThrow();
    } finally {
      await server.close();
      tmp.cleanup();
    }
  });

  it('a stream the real server refuses (no token) fails with 401', async () => {
    const tmp = tempDataDir();
    const server = await startInProcess(tmp.dir, { token: 'secret' });
    try {
      const e = await new KvrecallClient({ url: server.url }).openStream().catch((x) => x);
      expect(e).toMatchObject({ status: 401 });
      const ok = await new KvrecallClient({ url: server.url, token: 'secret' }).openStream();
      ok.close();
    } finally {
      await server.close();
      tmp.cleanup();
    }
  });
});
