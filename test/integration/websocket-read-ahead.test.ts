// What a large message's direct read reads on past it (api/websocket.ts,
// `ahead`) is the connection's next bytes: over a real TCP connection on
// 127.0.0.1, a WsConnection with recording handlers must take them before
// anything node reads after them (bytes past the 64 KiB read ahead, sent in
// the same write), through any frame boundary (a header cut after 1, 3, 9 or
// 13 of its 14 bytes), a close frame and the peer's FIN right behind, and
// with reading paused for backpressure (one message in flight at most): every
// message whole, masked with its own key, in order, none twice.
import { once } from 'node:events';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { directReadTotals, WsConnection } from '../../api/websocket.js';
import { Rng } from '../helpers/random.js';
import { clientFrame, takeFrames } from '../helpers/ws-raw.js';

const linux = process.platform === 'linux';
let server: Server;
let port: number;
let onConnection: (s: Socket) => void = () => undefined;
beforeAll(async () => {
  server = createServer((s) => onConnection(s));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  port = (server.address() as { port: number }).port;
});
afterAll(() => server.close());

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const bytes = (rng: Rng, n: number) => Buffer.from(Array.from({ length: n }, () => rng.int(256)));
/** A message read directly (1 MiB and up). */
const large = (rng: Rng) => bytes(rng, (1 << 20) + rng.int(4096));

async function until(ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok() && Date.now() < end) await sleep(5);
}

/** A connection whose messages are kept (copied) as they come; released at once unless `hold`. */
async function open(maxInFlight = 16, hold = false) {
  const got: { data: Buffer; release: () => void }[] = [];
  let conn!: WsConnection;
  const accepted = new Promise<void>((r) => {
    onConnection = (s) => {
      conn = new WsConnection(s, { maxMessage: 64 << 20, progressMs: 5000, maxInFlight, highWater: 4 << 20 }, {
        message: (data, _binary, release) => {
          got.push({ data: Buffer.from(data), release });
          if (!hold) release();
        },
        closed: () => undefined,
      });
      r();
    };
  });
  const client = connect(port, '127.0.0.1');
  client.on('error', () => undefined);
  await once(client, 'connect');
  await accepted;
  let received = Buffer.alloc(0);
  client.on('data', (c: Buffer) => (received = Buffer.concat([received, c])));
  return { got, conn: () => conn, client, frames: () => takeFrames(received).frames };
}

/** Writes `first` but its last byte (its direct read under way), then that byte with `rest` in one write: they come together. */
async function sendBehind(client: Socket, first: Buffer, rest: Buffer, end = false): Promise<void> {
  client.write(first.subarray(0, first.byteLength - 1));
  await sleep(100);
  const tail = Buffer.concat([first.subarray(first.byteLength - 1), rest]);
  if (end) client.end(tail);
  else client.write(tail);
}

describe.skipIf(!linux)('a direct read reading on past its message', () => {
  it('parses what it read ahead before what node reads after it, in the same write', async () => {
    const rng = new Rng(1);
    const { got, client } = await open();
    const a = large(rng);
    // 100 small messages (~120 KiB): more than the 64 KiB read ahead, the rest read by node at once; then a large one.
    const small = Array.from({ length: 100 }, () => bytes(rng, 1 + rng.int(2400)));
    const b = large(rng);
    const ahead0 = directReadTotals.aheadBytes, direct0 = directReadTotals.messages;
    await sendBehind(client, clientFrame(2, a, [1, 2, 3, 4]), Buffer.concat([...small.map((m, i) => clientFrame(2, m, [i, 0x5a, 7, 0xff - i])), clientFrame(2, b, [0xf0, 0x0f, 0x33, 0xcc])]));
    const want = [a, ...small, b];
    await until(() => got.length === want.length);
    expect(directReadTotals.aheadBytes - ahead0).toBeGreaterThan(0);
    expect(directReadTotals.messages - direct0).toBe(2);
    expect(got.length).toBe(want.length);
    want.forEach((m, i) => expect(got[i].data.equals(m), `message ${i}`).toBe(true));
    client.destroy();
  });

  it('takes a header cut anywhere in the bytes read ahead, the rest of it from node', async () => {
    for (const cut of [1, 3, 9, 13]) {
      const rng = new Rng(cut);
      const { got, client } = await open();
      const a = large(rng), b = large(rng);
      const fb = clientFrame(2, b, [5, 6, 7, 8]);
      const ahead0 = directReadTotals.aheadBytes;
      await sendBehind(client, clientFrame(2, a, [1, 2, 3, 4]), fb.subarray(0, cut));
      await sleep(100);
      client.write(fb.subarray(cut));
      await until(() => got.length === 2);
      expect(directReadTotals.aheadBytes - ahead0, `cut ${cut}`).toBe(cut);
      expect(got.map((g) => g.data.equals(g === got[0] ? a : b)), `cut ${cut}`).toEqual([true, true]);
      client.destroy();
    }
  });

  it('answers a close frame read ahead (the peer ending right behind it) with its code, the message before it handed on', async () => {
    const rng = new Rng(2);
    const { got, client, frames } = await open();
    const a = large(rng);
    const closed = once(client, 'close');
    const ahead0 = directReadTotals.aheadBytes;
    await sendBehind(client, clientFrame(2, a, [9, 8, 7, 6]), clientFrame(8, Buffer.from([0x0f, 0xa0]), [1, 1, 2, 3]), true);
    await closed;
    expect(directReadTotals.aheadBytes - ahead0).toBe(8);
    expect(got.length).toBe(1);
    expect(got[0].data.equals(a)).toBe(true);
    expect(frames().map((f) => [f.opcode, f.payload.readUInt16BE(0)])).toEqual([[8, 4000]]);
  });

  it('keeps what it read ahead while reading is paused for backpressure, then hands it on in order', async () => {
    const rng = new Rng(3);
    const { got, client, conn, frames } = await open(1, true);
    const a = large(rng), b = large(rng);
    const small = Array.from({ length: 5 }, () => bytes(rng, 1 + rng.int(3000)));
    const rest = Buffer.concat([clientFrame(9, Buffer.from('ping'), [4, 3, 2, 1]), ...small.map((m, i) => clientFrame(2, m, [i, i, 0x80, 1])), clientFrame(2, b, [2, 7, 1, 8])]);
    const ahead0 = directReadTotals.aheadBytes;
    await sendBehind(client, clientFrame(2, a, [3, 1, 4, 1]), rest);
    const want = [a, ...small, b];
    for (let n = 1; n <= want.length; n++) {
      await until(() => got.length >= n);
      await sleep(20);
      // One in flight at a time: the next waits for this one's release.
      expect(got.length, `after ${n}`).toBe(n);
      expect(conn().inFlightCount).toBe(1);
      got[n - 1].release();
    }
    expect(directReadTotals.aheadBytes - ahead0).toBeGreaterThan(0);
    want.forEach((m, i) => expect(got[i].data.equals(m), `message ${i}`).toBe(true));
    await until(() => frames().length > 0);
    expect(frames().map((f) => [f.opcode, f.payload.toString()])).toEqual([[0xa, 'ping']]);
    client.destroy();
  });
});
