// The bare RESP connection the Redis store reads blocks with, against a fake
// server that answers in pieces of random sizes (a CRLF split across reads,
// a bulk string spread over many): replies parse the same however they
// arrive, MGET elements land in the views the sink names, and the cluster
// slot of a key is Redis's. No Redis needed.
import { createServer, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keySlot, parseRedisLocation } from '../../storage/redis-format.js';
import { ReplyError, RespConnection, type BulkSink } from '../../storage/resp-connection.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`resp-connection: seed ${seed}`);
const rng = new Rng(seed);

/** Answers each complete command with the next canned reply, written in pieces of random sizes. */
let replies: Buffer[] = [];
let server: Server;
let port = 0;

/** Length of the first complete RESP command in buf, or 0. */
function commandLength(buf: Buffer): number {
  const line = (at: number) => {
    const nl = buf.indexOf('\r\n', at);
    return nl < 0 ? undefined : { text: buf.toString('latin1', at, nl), next: nl + 2 };
  };
  const head = line(0);
  if (!head) return 0;
  let at = head.next;
  for (let i = 0; i < Number(head.text.slice(1)); i++) {
    const len = line(at);
    if (!len) return 0;
    at = len.next + Number(len.text.slice(1)) + 2;
    if (at > buf.length) return 0;
  }
  return at;
}

beforeAll(async () => {
  server = createServer((sock: Socket) => {
    let pending = Buffer.alloc(0);
    let writing = Promise.resolve();
    sock.on('data', (d) => {
      pending = Buffer.concat([pending, d]);
      for (let n = commandLength(pending); n > 0; n = commandLength(pending)) {
        pending = pending.subarray(n);
        const reply = replies.shift()!;
        writing = writing.then(async () => {
          for (let at = 0; at < reply.length; ) {
            const m = 1 + rng.int(Math.min(7000, reply.length - at));
            sock.write(reply.subarray(at, at + m));
            at += m;
            if (rng.next() < 0.3) await new Promise((r) => setTimeout(r, 1));
          }
        });
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  port = (server.address() as AddressInfo).port;
});
afterAll(() => new Promise<void>((r) => server.close(() => r())));

const bulk = (b: Buffer) => Buffer.concat([Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n')]);

describe('RespConnection', () => {
  it('parses replies however they are split, straight into the sink’s views', async () => {
    const c = new RespConnection('127.0.0.1', port);
    const big = Buffer.from(Array.from({ length: 40000 }, (_, i) => i % 251));
    const small = Buffer.from('hello');
    replies = [
      Buffer.from('+OK\r\n'),
      Buffer.from(':42\r\n'),
      Buffer.from('-MOVED 1234 127.0.0.1:7001\r\n'),
      Buffer.concat([Buffer.from('*4\r\n'), bulk(big), Buffer.from('$-1\r\n'), bulk(small), bulk(Buffer.alloc(0))]),
      bulk(small),
    ];
    expect(await c.send(['SET', 'k', new Uint8Array([1, 2])])).toBe('OK');
    expect(await c.send(['INCR', 'k'])).toBe(42);
    await expect(c.send(['GET', 'k'])).rejects.toBeInstanceOf(ReplyError);
    const head = new Uint8Array(100), rest = new Uint8Array(big.length - 100);
    const seen: [number, number, boolean][] = [];
    const sink: BulkSink = {
      target: (i, length) => (i === 0 ? [head, rest] : undefined),
      done: (i, length, collected) => void seen.push([i, length, collected !== undefined]),
    };
    await c.send(['MGET', 'a', 'b', 'c', 'd'], sink);
    expect(Buffer.concat([head, rest]).equals(big)).toBe(true);
    expect(seen).toEqual([
      [0, 40000, false],
      [1, -1, false],
      [2, 5, true],
      [3, 0, true],
    ]);
    expect(await c.send(['GET', 'x'])).toEqual(small);
    c.close();
  });

  it('a lost connection fails what is pending and says so', async () => {
    const c = new RespConnection('127.0.0.1', 1);
    await expect(c.send(['PING'])).rejects.toThrow();
    expect(c.broken).toBe(true);
  });

  it('a node silent past silenceMs while a reply is owed fails the connection (a hung node); an idle connection stays', async () => {
    const mute = createServer(() => undefined); // accepts, never answers
    await new Promise<void>((r) => mute.listen(0, '127.0.0.1', () => r()));
    try {
      const { port: mutePort } = mute.address() as AddressInfo;
      const c = new RespConnection('127.0.0.1', mutePort, 200);
      await new Promise((r) => setTimeout(r, 400)); // connected and idle past silenceMs: still usable
      expect(c.broken).toBe(false);
      const t0 = performance.now();
      await expect(c.send(['MGET', 'a'])).rejects.toThrow(/sent nothing for 200 ms/);
      expect(performance.now() - t0).toBeGreaterThanOrEqual(150);
      expect(c.broken).toBe(true);
    } finally {
      mute.close();
    }
  });
});

describe('cluster slots and store URLs', () => {
  it('maps keys to Redis Cluster slots (CRC16/XMODEM, hash tags)', () => {
    expect(keySlot('123456789')).toBe(12739); // the CRC16 check value, as Redis documents it
    expect(keySlot('foo')).toBe(12182);
    expect(keySlot('{user1000}.following')).toBe(keySlot('{user1000}.followers'));
    expect(keySlot('a{}b')).toBe(13694); // an empty tag is no tag
  });

  it('parses a seed list and its options; refuses anything else', () => {
    expect(parseRedisLocation('redis://10.0.0.1:7000,10.0.0.2:7001?lease=3000')).toMatchObject({
      seeds: [
        { host: '10.0.0.1', port: 7000 },
        { host: '10.0.0.2', port: 7001 },
      ],
      leaseMs: 3000,
      failoverMs: 20000,
    });
    expect(() => parseRedisLocation('redis://host')).toThrow(/HOST:PORT/);
    expect(() => parseRedisLocation('redis://h:1?leese=5')).toThrow(/leese/);
    expect(() => parseRedisLocation('http://h:1')).toThrow();
  });
});
