// The TS client's own HTTP/1.1 (clients/ts/http1.ts) against node:http
// servers on 127.0.0.1: a request's parts arrive as one body; answers framed
// by content-length in any split, by chunks, or closing the connection;
// concurrent requests each get their own answer; a connection the server
// closed (idle timeout, or a bad answer) is never reused.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { Http1Pool } from '../../clients/ts/http1.js';

const servers: Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

async function serve(handler: (req: IncomingMessage, body: Buffer, res: ServerResponse) => void): Promise<{ pool: Http1Pool; sockets: Set<Socket>; server: Server; port: number }> {
  const sockets = new Set<Socket>();
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => handler(req, Buffer.concat(chunks), res));
  });
  server.on('connection', (s: Socket) => sockets.add(s));
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  return { pool: new Http1Pool('127.0.0.1', port, `host: 127.0.0.1:${port}\r\ncontent-type: application/octet-stream\r\n`), sockets, server, port };
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const text = (b: Uint8Array) => Buffer.from(b).toString();
const random = (n: number) => {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 2654435761) >>> 24;
  return b;
};

describe('Http1Pool', () => {
  it('sends the parts as one body and reads an answer split at every kind of boundary', async () => {
    const { port } = await serve((req, body, res) => {
      // The answer in pieces of `piece` bytes, each its own write a tick apart (the head split too).
      const piece = Number(req.headers['x-piece']);
      const answer = Buffer.concat([Buffer.from(`HTTP/1.1 201 Made\r\ncontent-type: text/x-hash\r\ncontent-length: ${body.byteLength + 64}\r\n\r\n`), Buffer.from(sha(body)), body]);
      const socket = res.socket!;
      res.detachSocket(socket);
      let at = 0;
      const next = () => {
        socket.write(answer.subarray(at, (at += piece)));
        if (at < answer.byteLength) setImmediate(next);
      };
      next();
    });
    const big = random(3 << 20);
    for (const piece of [1, 7, 4096, 1 << 30]) {
      const parts = [Buffer.from('head:'), big.subarray(0, 1 << 20), Buffer.from(':mid:'), big.subarray(1 << 20)];
      const whole = Buffer.concat(parts);
      const body = piece < 4096 ? whole.subarray(0, 3000) : whole;
      const sent = piece < 4096 ? [body] : parts;
      // The piece size rides in a header line of the pool's own.
      const a = await new Http1Pool('127.0.0.1', port, `host: x\r\nx-piece: ${piece}\r\n`).request('POST', '/echo', sent, body.byteLength);
      expect(a.status).toBe(201);
      expect(a.statusText).toBe('Made');
      expect(a.contentType).toBe('text/x-hash');
      expect(text(a.body.subarray(0, 64))).toBe(sha(body));
      expect(Buffer.from(a.body.subarray(64)).equals(body)).toBe(true);
    }
  });

  it('reads chunked answers and answers that close the connection, then opens a new one', async () => {
    const { pool, sockets } = await serve((req, body, res) => {
      if (req.url === '/chunked') {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.write('one,');
        setImmediate(() => {
          res.write(Buffer.alloc(70_000, 'x'));
          res.end(',three');
        });
      } else if (req.url === '/close') {
        res.writeHead(200, { connection: 'close', 'content-length': 2 });
        res.end('ok');
      } else if (req.url === '/empty') {
        res.writeHead(204);
        res.end();
      } else res.end(`len ${body.byteLength}`);
    });
    const chunked = await pool.request('GET', '/chunked', [], 0);
    expect(text(chunked.body)).toBe(`one,${'x'.repeat(70_000)},three`);
    expect(text((await pool.request('POST', '/n', [Buffer.alloc(10)], 10)).body)).toBe('len 10');
    expect(sockets.size).toBe(1);
    expect(text((await pool.request('GET', '/close', [], 0)).body)).toBe('ok');
    expect((await pool.request('GET', '/empty', [], 0)).status).toBe(204);
    expect(text((await pool.request('POST', '/n', [Buffer.alloc(3)], 3)).body)).toBe('len 3');
    expect(sockets.size).toBe(2);
  });

  it('answers concurrent requests each with its own answer, on as many connections as were in flight', async () => {
    const { pool, sockets } = await serve((req, body, res) => setTimeout(() => res.end(`${req.url} ${sha(body)}`), 5));
    const bodies = Array.from({ length: 12 }, (_, i) => random(1000 + i * 5000));
    const answers = await Promise.all(bodies.map((b, i) => pool.request('POST', `/r${i}`, [b], b.byteLength)));
    answers.forEach((a, i) => expect(text(a.body)).toBe(`/r${i} ${sha(bodies[i])}`));
    expect(sockets.size).toBe(12);
    // Afterwards, one at a time: the kept connections are reused, none opened.
    for (let i = 0; i < 5; i++) expect(text((await pool.request('POST', '/again', [bodies[0]], bodies[0].byteLength)).body)).toBe(`/again ${sha(bodies[0])}`);
    expect(sockets.size).toBe(12);
  });

  it('does not reuse a connection the server closed while idle, nor one that sent a bad answer', async () => {
    const { pool, sockets } = await serve((req, _body, res) => {
      if (req.url === '/bad') {
        res.socket!.end('HTTP/1.1 200 OK\r\nno-colon-here\r\n\r\n');
        return;
      }
      res.end('fine');
    });
    expect(text((await pool.request('GET', '/', [], 0)).body)).toBe('fine');
    // The server ends the idle connection (as its keep-alive timeout does).
    for (const s of sockets) s.destroy();
    await new Promise((r) => setTimeout(r, 50));
    expect(text((await pool.request('GET', '/', [], 0)).body)).toBe('fine');
    expect(sockets.size).toBe(2);
    await expect(pool.request('GET', '/bad', [], 0)).rejects.toThrow(/malformed answer head/);
    expect(text((await pool.request('GET', '/', [], 0)).body)).toBe('fine');
  });

  it('rejects when the server cannot be reached', async () => {
    const { server } = await serve((_req, _body, res) => res.end());
    const { port } = server.address() as AddressInfo;
    await new Promise((r) => server.close(r));
    servers.length = 0;
    await expect(new Http1Pool('127.0.0.1', port, 'host: x\r\n').request('GET', '/', [], 0)).rejects.toThrow(/ECONNREFUSED/);
  });
});
