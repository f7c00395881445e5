// The TypeScript stream client against a peer that answers as the server
// does when it cannot decode a frame: an error without an id, in its turn.
// The request it answers fails with that error instead of waiting forever,
// the ones after it get their own answers, and a raw frame without an id
// (sendRaw, for tests of bad frames) keeps its place, so its id-less
// answer is not taken for a real request's.
import { createHash } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { pack, unpack } from 'msgpackr';
import { afterEach, describe, expect, it } from 'vitest';
import { tensor } from '../../clients/ts/client.js';
import { KvrecallStream } from '../../clients/ts/stream.js';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

/** Unmasked binary frame of `payload` (a server never masks). */
function serverFrame(payload: Uint8Array): Buffer {
  const n = payload.byteLength;
  const head = n < 126 ? Buffer.from([0x82, n]) : Buffer.from([0x82, 126, n >> 8, n & 0xff]);
  return Buffer.concat([head, payload]);
}

/**
 * A peer that completes the upgrade, then answers each client frame in
 * order: the frames `undecodable` names (0-based) with an id-less error,
 * the others with {id, layer, tokens: 1} as an upload answer would.
 */
function fakeServer(undecodable: Set<number>): Promise<{ server: Server; url: string }> {
  return new Promise((resolve) => {
    const server = createServer((socket: Socket) => {
      let buf = Buffer.alloc(0), upgraded = false, seen = 0;
      socket.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk]);
        if (!upgraded) {
          const end = buf.indexOf('\r\n\r\n');
          if (end < 0) return;
          const key = /sec-websocket-key:\s*(\S+)/i.exec(buf.subarray(0, end).toString())![1];
          const accept = createHash('sha1').update(key + GUID).digest('base64');
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
          upgraded = true;
          buf = buf.subarray(end + 4);
        }
        // Client frames: masked, FIN, lengths below 64 KiB here.
        while (buf.byteLength >= 2) {
          let n = buf[1] & 0x7f, at = 2;
          if (n === 126) {
            if (buf.byteLength < 4) return;
            n = buf.readUInt16BE(2);
            at = 4;
          }
          if (buf.byteLength < at + 4 + n) return;
          const mask = buf.subarray(at, at + 4), payload = Buffer.from(buf.subarray(at + 4, at + 4 + n));
          for (let i = 0; i < n; i++) payload[i] ^= mask[i & 3];
          buf = buf.subarray(at + 4 + n);
          if (undecodable.has(seen++)) socket.write(serverFrame(pack({ error: { code: 'malformed', message: 'undecodable frame' } })));
          else {
            const body = unpack(payload) as { id: number; layer: number };
            socket.write(serverFrame(pack({ id: body.id, layer: body.layer, tokens: 1 })));
          }
        }
      });
    });
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      resolve({ server, url: `http://127.0.0.1:${port}` });
    });
  });
}

let open: Server | undefined;
afterEach(() => {
  open?.close();
  open = undefined;
});

const upload = (stream: KvrecallStream, layer: number) =>
  stream.uploadDocumentKv('d', { layer, start: 0, k: tensor('f16', [1, 1, 2], new Uint16Array(2)), v: tensor('f16', [1, 1, 2], new Uint16Array(2)) });

describe('stream answers in order', () => {
  it('an id-less error fails the request it answers; the next ones get their own answers', async () => {
    const { server, url } = await fakeServer(new Set([1]));
    open = server;
    const stream = await KvrecallStream.open(url);
    const [a, b, c] = [upload(stream, 0), upload(stream, 1).catch((e: unknown) => e), upload(stream, 2)];
    expect(await a).toMatchObject({ layer: 0 });
    expect(await b).toMatchObject({ status: 400, code: 'malformed' });
    expect(await c).toMatchObject({ layer: 2 });
    stream.close();
  });

  it('a raw frame without an id keeps its place: its id-less answer is not a real request\'s', async () => {
    const { server, url } = await fakeServer(new Set([0]));
    open = server;
    const stream = await KvrecallStream.open(url);
    stream.sendRaw(Uint8Array.of(0xc1));
    expect(await upload(stream, 3)).toMatchObject({ layer: 3 });
    stream.close();
  });
});
