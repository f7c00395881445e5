// The stream's limits from the service's Config (--max-streams,
// --stream-idle-ms): a server started with maxStreams 1 refuses a second
// stream with 503 while the first is open, and closes a stream whose begun
// message stalls past streamIdleMs with 1008 (the limits themselves are
// tested in websocket-limits.test.ts; this checks they reach the server).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { openRawWs } from '../helpers/ws-raw.js';

const tmp = tempDataDir();
let server: RunningServer;
beforeAll(async () => {
  server = await startInProcess(tmp.dir, { maxStreams: 1, streamIdleMs: 200 });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

const upgrade = () => openRawWs(Number(new URL(server.url).port));

describe('stream limits from Config', () => {
  it('maxStreams: a second stream is refused with 503 while one is open', async () => {
    const first = await upgrade();
    expect(first.status).toBe('HTTP/1.1 101 Switching Protocols');
    const second = await upgrade();
    expect(second.status).toMatch(/^HTTP\/1\.1 503/);
    second.socket.destroy();
    // streamIdleMs: a message whose header claims 100 bytes and then stalls after one is closed with 1008.
    first.socket.write(Buffer.from([0x82, 0x80 | 100, 1, 2, 3, 4, 0x55]));
    await first.until(() => first.frames.some((f) => f.opcode === 8));
    const close = first.frames.find((f) => f.opcode === 8);
    expect(close?.payload.readUInt16BE(0)).toBe(1008);
    first.socket.destroy();
    await first.until(() => first.ended);
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
