// A raw WebSocket client for tests: the masked frames it sends, and the
// frames it reads from a server, taken whole off the front of what it has
// received (RFC 6455 framing; the payload as sent).
import { connect, type Socket } from 'node:net';

/** One client frame (RFC 6455): fin, `opcode`, masked with `key` (the payload is copied, not changed). */
export function clientFrame(opcode: number, payload: Buffer, key: number[]): Buffer {
  const n = payload.byteLength;
  const head = Buffer.alloc(n < 126 ? 6 : n < 65536 ? 8 : 14);
  head[0] = 0x80 | opcode;
  if (n < 126) head[1] = 0x80 | n;
  else if (n < 65536) {
    head[1] = 0x80 | 126;
    head.writeUInt16BE(n, 2);
  } else {
    head[1] = 0x80 | 127;
    head.writeBigUInt64BE(BigInt(n), 2);
  }
  Buffer.from(key).copy(head, head.byteLength - 4);
  const body = Buffer.from(payload);
  for (let i = 0; i < n; i++) body[i] ^= key[i & 3];
  return Buffer.concat([head, body]);
}

export interface RawFrame {
  fin: boolean;
  opcode: number;
  /** A server must never mask (RFC 6455 5.1): tests assert this is false. */
  masked: boolean;
  payload: Buffer;
}

/** The whole frames at the front of `buf`, and the bytes after them (a frame not yet whole stays there). */
export function takeFrames(buf: Buffer): { frames: RawFrame[]; rest: Buffer } {
  const frames: RawFrame[] = [];
  for (;;) {
    if (buf.length < 2) break;
    let len = buf[1] & 0x7f, at = 2;
    if (len === 126) {
      if (buf.length < 4) break;
      len = buf.readUInt16BE(2);
      at = 4;
    } else if (len === 127) {
      if (buf.length < 10) break;
      len = Number(buf.readBigUInt64BE(2));
      at = 10;
    }
    const masked = (buf[1] & 0x80) !== 0;
    if (masked) at += 4;
    if (buf.length < at + len) break;
    frames.push({ fin: (buf[0] & 0x80) !== 0, opcode: buf[0] & 0x0f, masked, payload: Buffer.from(buf.subarray(at, at + len)) });
    buf = buf.subarray(at + len);
  }
  return { frames, rest: buf };
}

/**
 * A raw WebSocket client for tests over a plain TCP socket: the handshake's
 * answer head, a refusal's body, then the server's frames as they come.
 * `onFrame` sees each frame first (e.g. to assert a server never masks).
 */
export class RawWsClient {
  frames: RawFrame[] = [];
  ended = false;
  head = '';
  /** The body of a refusal. */
  body = '';
  private buf: Buffer = Buffer.alloc(0);
  private waiters: (() => void)[] = [];

  constructor(
    readonly socket: Socket,
    private readonly onFrame?: (f: RawFrame) => void,
  ) {
    socket.on('data', (c: Buffer) => {
      this.buf = Buffer.concat([this.buf, c]);
      if (!this.head) {
        const end = this.buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        this.head = this.buf.subarray(0, end).toString('latin1');
        this.buf = this.buf.subarray(end + 4);
      }
      if (this.head.startsWith('HTTP/1.1 101')) {
        const { frames, rest } = takeFrames(this.buf);
        for (const f of frames) this.onFrame?.(f);
        this.frames.push(...frames);
        this.buf = rest;
      } else {
        this.body = this.buf.toString('latin1');
      }
      this.wake();
    });
    socket.on('close', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  /** The answer's status line. */
  get status(): string {
    return this.head.split('\r\n')[0];
  }

  /** Waits until `ok()` holds (or the socket closed), for at most `ms`. */
  async until(ok: () => boolean, ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!ok() && !this.ended && Date.now() < deadline) await new Promise<void>((r) => (this.waiters.push(r), setTimeout(r, 50)));
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }
}

export const WS_TEST_KEY = 'dGhlIHNhbXBsZSBub25jZQ==';

/** Connects to 127.0.0.1:port and asks to upgrade `path` (a header given as '' is left out); resolves once the answer's head is in. */
export async function openRawWs<T extends RawWsClient>(
  port: number,
  o: { path?: string; headers?: Record<string, string>; make?: (s: Socket) => T } = {},
): Promise<T> {
  const socket = connect(port, '127.0.0.1');
  await new Promise((r) => socket.once('connect', r));
  const raw = o.make ? o.make(socket) : (new RawWsClient(socket) as T);
  const all = { Host: 'localhost', Upgrade: 'websocket', Connection: 'Upgrade', 'Sec-WebSocket-Key': WS_TEST_KEY, 'Sec-WebSocket-Version': '13', ...o.headers };
  const lines = Object.entries(all).filter(([, v]) => v !== '').map(([k, v]) => `${k}: ${v}\r\n`);
  socket.write(`GET ${o.path ?? '/v1/stream'} HTTP/1.1\r\n${lines.join('')}\r\n`);
  await raw.until(() => raw.head !== '', 10_000);
  return raw;
}
