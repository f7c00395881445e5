// A body refused before it is read (413 over the limit) is answered, then
// the connection is half-closed and the rest of the body read and dropped
// (api/linger.ts): a client still writing its body gets the answer and no
// write error. Dropped at once instead, the kernel answers the body's bytes
// with a reset and the client's writes fail (EPIPE/ECONNRESET), sometimes
// before it has read the answer. Over a raw socket on the real server, on a
// Hono route and on the direct attend path.
import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { LINGER_MS } from '../../api/linger.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const LIMIT = 1 << 16;
const tmp = tempDataDir();
let server: RunningServer;

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { bodyLimit: LIMIT });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

interface Outcome {
  answer: string;
  writeError?: string;
  /** Body bytes the client wrote after the whole answer had arrived. */
  writtenAfterAnswer: number;
  ended: boolean;
}

/** Declares an 8 MiB body and keeps writing it in 64 KiB pieces, also after the answer came, until 1 MiB more is out or the socket fails. */
function oversized(path: string): Promise<Outcome> {
  const url = new URL(server.url);
  return new Promise((resolve) => {
    // Half-open: the client keeps writing after the server's FIN, as a client mid-upload does.
    const socket = connect({ host: url.hostname, port: Number(url.port), allowHalfOpen: true });
    const piece = Buffer.alloc(64 << 10, 7);
    let answer = '', writeError: string | undefined, after = 0, answered = false, ended = false, done = false;
    const finish = () => {
      if (done) return;
      done = true;
      socket.destroy();
      resolve({ answer, writeError, writtenAfterAnswer: after, ended });
    };
    socket.on('data', (b: Buffer) => {
      answer += b.toString('latin1');
      const end = answer.indexOf('\r\n\r\n');
      const length = /content-length: *(\d+)/i.exec(answer)?.[1];
      if (end >= 0 && length !== undefined && answer.length >= end + 4 + Number(length)) answered = true;
    });
    socket.on('end', () => (ended = true));
    socket.on('error', (e: NodeJS.ErrnoException) => {
      writeError = e.code ?? e.message;
      finish();
    });
    socket.on('close', finish);
    socket.once('connect', () => {
      socket.write(`POST ${path} HTTP/1.1\r\nhost: ${url.host}\r\ncontent-type: application/msgpack\r\ncontent-length: ${8 << 20}\r\n\r\n`);
      const pump = () => {
        if (done) return;
        if (answered && after >= 1 << 20) return setTimeout(finish, 100);
        socket.write(piece, (e) => {
          if (e) return;
          if (answered) after += piece.byteLength;
          setTimeout(pump, 2);
        });
      };
      pump();
    });
  });
}

describe('lingering close', () => {
  for (const path of ['/v1/documents/doc/kv', '/v1/attend'])
    it(`a body over the limit on ${path}: the 413 arrives, and the body's rest is read and dropped without a write error`, async () => {
      const r = await oversized(path);
      expect(r.answer).toMatch(/^HTTP\/1\.1 413 /);
      expect(r.answer).toMatch(/connection: close/i);
      expect(r.answer).toContain('"too_large"');
      expect(r.writeError).toBeUndefined();
      expect(r.writtenAfterAnswer).toBeGreaterThanOrEqual(1 << 20);
    });

  it('gives up on a client after LINGER_MS: its writes then fail', async () => {
    const url = new URL(server.url);
    const error = await new Promise<string | undefined>((resolve) => {
      const socket = connect({ host: url.hostname, port: Number(url.port), allowHalfOpen: true });
      const piece = Buffer.alloc(64 << 10, 7);
      let failed: string | undefined;
      socket.on('error', (e: NodeJS.ErrnoException) => (failed = e.code ?? e.message));
      socket.once('data', () => {
        // The answer came: wait past the linger, then write until the reset shows (or 3 s).
        setTimeout(() => {
          const until = performance.now() + 3000;
          const pump = () => {
            if (failed || performance.now() > until || socket.destroyed) {
              socket.destroy();
              return resolve(failed);
            }
            socket.write(piece, () => setTimeout(pump, 5));
          };
          pump();
        }, LINGER_MS + 300);
      });
      socket.once('connect', () => socket.write(`POST /v1/attend HTTP/1.1\r\nhost: ${url.host}\r\ncontent-type: application/msgpack\r\ncontent-length: ${8 << 20}\r\n\r\n`));
    });
    expect(error).toMatch(/EPIPE|ECONNRESET/);
  });
});
