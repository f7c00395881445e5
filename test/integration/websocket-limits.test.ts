// The stream WebSocket's limits against a real HTTP server on 127.0.0.1,
// spoken over raw sockets: a peer that resets after a refused upgrade does
// not crash the server; a peer that sends and never reads is paused, so the
// server's unsent answers stay bounded; a header claiming a huge message
// pins only what has come, and a message that stops progressing is closed
// with 1008; an answer that cannot be packed closes that connection with
// 1011 (no unhandled rejection); a peer's FIN still gets the answers owed.
// The sessions are stubs: these are the transport's tests (the engine's
// answers over the stream are in websocket.test.ts).
import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Metrics } from '../../api/metrics.js';
import { attachStream, type StreamHandle } from '../../api/stream.js';
import type { WsConnection } from '../../api/websocket.js';
import { unpackView } from '../../core/msgpack-parts-decode.js';
import { joinParts, packParts } from '../../core/msgpack-parts.js';
import type { Sessions } from '../../engine/sessions.js';
import { openRawWs, RawWsClient } from '../helpers/ws-raw.js';

const TOKEN = 'secret';
const HIGH_WATER = 1 << 20;
const MAX_IN_FLIGHT = 16;
let gate: Promise<void> = Promise.resolve();
/** Stub sessions: attend waits on `gate`, then fails (its error answer carries the id); a batch answers with what cannot be packed. */
const sessions = {
  attend: async () => {
    await gate;
    throw new Error('no such session here');
  },
  attendBatch: async () => ({ results: [], ms: () => 0 }),
} as unknown as Sessions;
const metrics = { observeAttend: () => undefined, gauges: new Map() } as unknown as Metrics;

let server: Server;
let stream: StreamHandle;
let port: number;
const upgraded: Socket[] = [];

beforeAll(async () => {
  server = createServer((_req, res) => res.end('ok'));
  stream = attachStream(server, sessions, metrics, { token: TOKEN, maxFrame: 256 << 20, progressMs: 200, maxInFlight: MAX_IN_FLIGHT, highWater: HIGH_WATER });
  server.on('upgrade', (_req, socket: Socket) => upgraded.push(socket));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  port = (server.address() as AddressInfo).port;
});
afterAll(async () => {
  stream.close();
  await new Promise((r) => server.close(r));
});

/** Polls `ok` until it holds, for at most 10 s (then the test's own expectations fail). */
async function until(ok: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!ok() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
}

async function open(): Promise<{ raw: RawWsClient; conn: WsConnection }> {
  const before = new Set(stream.connections());
  const raw = await openRawWs(port, { headers: { Authorization: `Bearer ${TOKEN}` } });
  const conn = [...stream.connections()].find((c) => !before.has(c))!;
  return { raw, conn };
}

function frame(opcode: number, payload: Uint8Array): Buffer {
  const n = payload.length;
  const key = randomBytes(4);
  const head = n < 126 ? [0x80 | opcode, 0x80 | n] : n < 0x10000 ? [0x80 | opcode, 0x80 | 126, n >> 8, n & 0xff] : [0x80 | opcode, 0x80 | 127, 0, 0, 0, 0, n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
  const body = Buffer.from(payload);
  for (let i = 0; i < n; i++) body[i] ^= key[i & 3];
  return Buffer.concat([Buffer.from(head), key, body]);
}

const pack = (v: unknown) => {
  const parts = packParts(v);
  return joinParts(parts, new Uint8Array(parts.byteLength));
};

describe('the stream WebSocket under hostile peers', () => {
  it('survives a peer that resets after a refused upgrade', async () => {
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => undefined);
    await new Promise((r) => socket.once('connect', r));
    socket.write(`GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nAuthorization: Bearer wrong\r\n\r\n`);
    // Reset as the refusal comes, before this end's FIN would close the connection cleanly.
    const answer = await new Promise<string>((r) => socket.once('data', (c: Buffer) => (socket.resetAndDestroy(), r(c.toString('latin1')))));
    expect(answer).toMatch(/^HTTP\/1\.1 401 /);
    // An uncaught ECONNRESET would fail this run (vitest reports it) and kill a real server.
    await new Promise((r) => socket.once('close', r));
    expect(await (await fetch(`http://127.0.0.1:${port}/v1/health`)).text()).toBe('ok');
  });

  it('stops reading from a peer that sends and never reads: unsent answers stay bounded, and all come once it reads', async () => {
    const { raw, conn } = await open();
    raw.socket.pause();
    const N = 300, SIZE = 70_000;
    // Each frame's id is 70 KB; its answer (an error: no session named) echoes it.
    for (let i = 0; i < N; i++) {
      const id = new Uint8Array(SIZE).fill(i & 0xff);
      new DataView(id.buffer).setUint32(0, i);
      raw.socket.write(frame(0x2, pack({ id })));
    }
    await until(() => conn.paused && conn.inFlightCount === 0);
    expect(conn.paused).toBe(true);
    expect(conn.inFlightCount).toBe(0);
    // At most the high-water mark, plus the answers in flight when it was crossed (each ~70 KB), unsent at once; without backpressure ~all 21 MB.
    expect(conn.peakQueued).toBeLessThanOrEqual(HIGH_WATER + MAX_IN_FLIGHT * (SIZE + 100));
    raw.socket.resume();
    await until(() => raw.frames.length >= N);
    expect(raw.frames).toHaveLength(N);
    const ids = raw.frames.map((f) => {
      const a = unpackView(f.payload) as { id: Uint8Array; error: { code: string } };
      expect(a.id.byteLength).toBe(SIZE);
      return new DataView(a.id.buffer, a.id.byteOffset).getUint32(0);
    });
    expect(ids).toEqual(Array.from({ length: N }, (_, i) => i));
    raw.socket.destroy();
  });

  it('holds only what has come of a message whose header claims 200 MiB, and closes it with 1008 when it stops', async () => {
    const { raw, conn } = await open();
    const before = process.memoryUsage().arrayBuffers;
    const declared = 200 << 20;
    const head = frame(0x2, new Uint8Array(0)).subarray(0, 6); // opcode, a 7-bit length of 0 and the key: rewritten below
    const header = Buffer.from([0x82, 0x80 | 127, 0, 0, 0, 0, declared >>> 24, (declared >>> 16) & 0xff, (declared >>> 8) & 0xff, declared & 0xff, ...head.subarray(2, 6)]);
    raw.socket.write(Buffer.concat([header, Buffer.from([1])]));
    await until(() => conn.heldBytes > 0);
    expect(conn.heldBytes).toBeGreaterThan(0);
    expect(conn.heldBytes).toBeLessThanOrEqual(1 << 20);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(16 << 20);
    await until(() => raw.ended);
    expect(raw.frames.map((f) => [f.opcode, f.payload.readUInt16BE(0)])).toEqual([[0x8, 1008]]);
  });

  it('closes with 1011 a connection whose answer cannot be packed, and the server goes on', async () => {
    const { raw } = await open();
    raw.socket.write(frame(0x2, pack({ id: 1, layer: 0, steps: [] })));
    await until(() => raw.ended);
    expect(raw.frames.map((f) => [f.opcode, f.payload.readUInt16BE(0)])).toEqual([[0x8, 1011]]);
    const next = await open();
    next.raw.socket.write(frame(0x2, pack({ id: 2, session: 's', layer: 0 })));
    await until(() => next.raw.frames.length >= 1);
    expect((unpackView(next.raw.frames[0].payload) as { id: number }).id).toBe(2);
    next.raw.socket.destroy();
  });

  it("writes the answers owed after the peer's FIN, then ends", async () => {
    let open_!: () => void;
    gate = new Promise((r) => (open_ = r));
    const { raw } = await open();
    const serverSide = upgraded[upgraded.length - 1];
    // The answer is held until the server has seen the FIN.
    serverSide.once('end', () => setImmediate(open_));
    raw.socket.write(frame(0x2, pack({ id: 5, session: 's', layer: 0 })));
    raw.socket.end();
    await until(() => raw.ended);
    gate = Promise.resolve();
    expect(raw.frames).toHaveLength(1);
    expect((unpackView(raw.frames[0].payload) as { id: number }).id).toBe(5);
  });
});
