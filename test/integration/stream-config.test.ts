// The stream's limits from the service's Config (--max-streams,
// --stream-idle-ms): a server started with maxStreams 1 refuses a second
// stream with 503 while the first is open, and closes a stream whose begun
// message stalls past streamIdleMs with 1008 (the limits themselves are
// tested in websocket-limits.test.ts; this checks they reach the server).
import { connect, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { takeFrames, type RawFrame } from '../helpers/ws-frames.js';

const tmp = tempDataDir();
let server: RunningServer;
beforeAll(async () => {
  server = await startInProcess(tmp.dir, { maxStreams: 1, streamIdleMs: 200 });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

/** Opens a raw upgrade; resolves with the answer's status line and a reader of later frames. */
async function upgrade(): Promise<{ status: string; socket: Socket; frames: () => RawFrame[]; closed: () => boolean }> {
  const { port } = new URL(server.url);
  const socket = connect(Number(port), '127.0.0.1');
  let buf = Buffer.alloc(0), head = '', closed = false;
  const frames: RawFrame[] = [];
  socket.on('error', () => undefined);
  socket.on('close', () => (closed = true));
  const status = await new Promise<string>((resolve) => {
    socket.on('data', (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      if (!head) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        head = buf.subarray(0, end).toString('latin1');
        buf = buf.subarray(end + 4);
        resolve(head.split('\r\n')[0]);
      }
      const got = takeFrames(buf);
      frames.push(...got.frames);
      buf = got.rest;
    });
    socket.write(
      'GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
        'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
    );
  });
  return { status, socket, frames: () => frames, closed: () => closed };
}

async function until(ok: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !ok(); i++) await new Promise((r) => setTimeout(r, 10));
}

describe('stream limits from Config', () => {
  it('maxStreams: a second stream is refused with 503 while one is open', async () => {
    const first = await upgrade();
    expect(first.status).toBe('HTTP/1.1 101 Switching Protocols');
    const second = await upgrade();
    expect(second.status).toMatch(/^HTTP\/1\.1 503/);
    second.socket.destroy();
    // streamIdleMs: a message whose header claims 100 bytes and then stalls after one is closed with 1008.
    first.socket.write(Buffer.from([0x82, 0x80 | 100, 1, 2, 3, 4, 0x55]));
    await until(() => first.frames().some((f) => f.opcode === 8));
    const close = first.frames().find((f) => f.opcode === 8);
    expect(close?.payload.readUInt16BE(0)).toBe(1008);
    first.socket.destroy();
    await until(first.closed);
    // Its place is free again (once the server has seen the close).
    let third = await upgrade();
    for (let i = 0; i < 50 && third.status.includes('503'); i++) {
      third.socket.destroy();
      await new Promise((r) => setTimeout(r, 20));
      third = await upgrade();
    }
    expect(third.status).toBe('HTTP/1.1 101 Switching Protocols');
    third.socket.destroy();
  });
});
