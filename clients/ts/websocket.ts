// The client end of a WebSocket (RFC 6455), our own, for KvrecallStream.
//
// Why not `ws`: it gathers every message into a buffer of its own and then
// the stream copied a batch's tensors out of it again; its sender frames
// each message with writes of its own. Here a message is read once: a view
// of the socket read it came in (when it came whole in one, 4-byte aligned)
// or copied once into a fresh buffer of its size, which the caller may keep
// (answers are read as views of it, no copy); a request is packed straight
// after its frame header, one write.
//
// Frames are masked with a zero key (a valid key: the payload goes as it
// is; masking guards proxies against script-driven browsers, and a fresh
// masked copy of every frame would cost what the views save). No
// extensions or subprotocols are asked for. A ping is answered, a close is
// answered and ends the connection; a masked or malformed server frame
// closes it with 1002.
import { createHash, randomBytes } from 'node:crypto';
import { connect as tcpConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const OP_CONT = 0x0, OP_BINARY = 0x2, OP_CLOSE = 0x8, OP_PING = 0x9, OP_PONG = 0xa;
/** Largest handshake answer head read. */
const MAX_HEAD = 64 << 10;
/** The warm read buffer of a plain TCP connection. */
const READ_BUFFER = 1 << 20;
const EMPTY = Buffer.alloc(0);
/** A client frame header at most: 2 bytes, a 64-bit length, the mask key. */
const MAX_CLIENT_HEADER = 14;
/** sendPacked's first warm buffer (a decode step's request is 8-17 KB). */
const SPARE_MIN = 1 << 15;
/** The largest server message taken unless told otherwise (the server's own default body limit is this order). */
export const MAX_MESSAGE = 256 << 20;

export interface WsOptions {
  /** A server message over this many bytes closes the connection with 1009 (from its header, before any of it is buffered). */
  maxMessage?: number;
}

/** The server answered the handshake with something other than 101. */
export class HandshakeRefused extends Error {
  constructor(
    readonly status: number,
    readonly body: string,
  ) {
    super(`stream refused: ${status}${body ? ` ${body}` : ''}`);
  }
}

export interface WsEvents {
  /** One whole binary (or text) message; `data` stays valid (the caller may keep views of it), its offset a multiple of 4. */
  message(data: Uint8Array): void;
  /**
   * A whole message that came in one read, as a view of the warm read
   * buffer: valid only until this call and the microtasks it sets off are
   * done (the next read overwrites it), its offset any. True when taken;
   * false to have it copied and given to message() instead.
   */
  messageView?(data: Uint8Array): boolean;
  /** The connection is gone, and why. */
  closed(e: Error): void;
}

/** A frame header for `length` payload bytes, masked with the zero key (`room`: payload bytes allocated after it). */
function header(opcode: number, length: number, fin = true, room = 0): Buffer {
  const n = length < 126 ? 2 : length < 0x10000 ? 4 : 10;
  const h = Buffer.alloc(n + 4 + room); // the key's 4 bytes are 0
  h[0] = (fin ? 0x80 : 0) | opcode;
  if (n === 2) h[1] = 0x80 | length;
  else if (n === 4) {
    h[1] = 0x80 | 126;
    h.writeUInt16BE(length, 2);
  } else {
    h[1] = 0x80 | 127;
    h.writeUInt32BE(Math.floor(length / 2 ** 32), 2);
    h.writeUInt32BE(length >>> 0, 6);
  }
  return h;
}

export class WsClient {
  private events?: WsEvents;
  private gone?: Error;
  private closing = false;
  /** Why the server closed, from its close frame: what the pending calls fail with. */
  private closedBy?: Error;
  /** Bytes of a frame header not yet complete. */
  private pending: Buffer = EMPTY;
  /** The frame being read. */
  private opcode = 0;
  private fin = true;
  private left = 0;
  private inPayload = false;
  /** The message being put together and bytes in it. */
  private msg?: Buffer;
  private msgLength = 0;
  private control: Buffer[] = [];
  /** The warm buffer sendPacked packs requests into (absent while the socket holds it). */
  private spare?: Buffer;
  /** Pings awaiting their pong, oldest first, by the number each carries; the last number sent. */
  private pings: { n: number; settle: (e?: Error) => void }[] = [];
  private pingCount = 0;

  private constructor(
    private readonly socket: Socket,
    private readonly maxMessage: number,
  ) {}

  /** Connects and upgrades; `url` is http(s)/ws(s) with the path to upgrade. */
  static open(url: string, headers: Record<string, string>, events: WsEvents, opts: WsOptions = {}): Promise<WsClient> {
    const u = new URL(url.replace(/^ws/, 'http'));
    const tls = u.protocol === 'https:';
    const port = Number(u.port) || (tls ? 443 : 80);
    const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
    // Plain TCP reads into one warm buffer of ours, as much as has come per read (a batch's answer in one
    // or two reads, not 64 KiB reads into fresh buffers); what is kept is copied out of it. TLS reads as usual.
    let onBytes: (bytes: Buffer, reused: boolean) => void = () => undefined;
    const socket = tls
      ? tlsConnect({ host, port, servername: host })
      : tcpConnect({ port, host, onread: { buffer: Buffer.allocUnsafeSlow(READ_BUFFER), callback: (n: number, buf: Uint8Array) => (onBytes(Buffer.from(buf.buffer, buf.byteOffset, n), true), true) } });
    if (tls) socket.on('data', (c: Buffer) => onBytes(c, false));
    socket.setNoDelay(true);
    const key = randomBytes(16).toString('base64');
    const extra = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('');
    const path = u.pathname + u.search;
    return new Promise((resolve, reject) => {
      let head = Buffer.alloc(0);
      const fail = (e: Error) => {
        socket.destroy();
        reject(e);
      };
      onBytes = (chunk) => {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) {
          if (head.byteLength > MAX_HEAD) fail(new Error('stream: handshake answer too long'));
          return;
        }
        onBytes = () => undefined;
        socket.off('error', fail);
        const lines = head.subarray(0, end).toString('latin1').split('\r\n');
        const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(lines[0])?.[1] ?? 0);
        if (status !== 101) return fail(new HandshakeRefused(status, head.subarray(end + 4).toString('utf8')));
        const accept = lines.find((l) => /^sec-websocket-accept:/i.test(l))?.split(':')[1]?.trim();
        if (accept !== createHash('sha1').update(key + GUID).digest('base64')) return fail(new Error('stream: wrong Sec-WebSocket-Accept'));
        const ws = new WsClient(socket, opts.maxMessage ?? MAX_MESSAGE);
        ws.events = events;
        onBytes = (c, reused) => ws.onData(c, reused);
        // After the server's close frame, a reset (it closed with our bytes unread) is not the reason: its close is.
        socket.on('error', (e) => ws.end(ws.closedBy ?? e));
        socket.on('close', () => ws.end(ws.closedBy ?? new Error('stream closed')));
        resolve(ws);
        const rest = head.subarray(end + 4);
        if (rest.byteLength > 0) ws.onData(rest, false);
      };
      socket.once('error', fail);
      socket.once('close', () => fail(new Error('stream: connection closed during the handshake')));
      socket.write(`GET ${path} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n${extra}\r\n`);
    });
  }

  /**
   * Sends one binary message of `length` bytes written by `fill` straight
   * after the frame header in `room` (a buffer the caller keeps warm; a
   * fresh one when absent or too small), one write; `written` once the
   * socket has taken it (room may be reused then).
   */
  send(length: number, fill: (payload: Uint8Array) => void, room?: Buffer, written?: (buf: Buffer) => void): void {
    if (this.gone || this.closing) throw this.gone ?? this.closedBy ?? new Error('stream closed');
    const h = header(OP_BINARY, length);
    const total = h.byteLength + length;
    const buf = room && room.byteLength >= total ? room : Buffer.allocUnsafeSlow(total);
    h.copy(buf, 0);
    fill(buf.subarray(h.byteLength, total));
    this.socket.write(buf.subarray(0, total), () => written?.(buf));
  }

  /**
   * Sends one binary message that `pack` writes into a warm buffer of this
   * connection's, straight after room for the frame header: pack(target,
   * at) writes the payload from `at` and returns its end, or -1 when it
   * does not fit (it is then called again with a buffer twice as large, up
   * to `max` bytes; past that this returns false and sends nothing). The
   * buffer stays warm while each write is taken whole by the kernel at once;
   * one the socket still holds is left to it and the next message takes a
   * new one.
   */
  sendPacked(pack: (target: Uint8Array, at: number) => number, max: number): boolean {
    if (this.gone || this.closing) throw this.gone ?? this.closedBy ?? new Error('stream closed');
    for (;;) {
      const buf = (this.spare ??= Buffer.allocUnsafeSlow(SPARE_MIN));
      const end = pack(buf, MAX_CLIENT_HEADER);
      if (end < 0) {
        if (buf.byteLength * 2 > max) return false;
        this.spare = Buffer.allocUnsafeSlow(buf.byteLength * 2);
        continue;
      }
      const length = end - MAX_CLIENT_HEADER;
      const n = length < 126 ? 2 : length < 0x10000 ? 4 : 10;
      const start = MAX_CLIENT_HEADER - n - 4;
      buf[start] = 0x80 | OP_BINARY;
      if (n === 2) buf[start + 1] = 0x80 | length;
      else if (n === 4) {
        buf[start + 1] = 0x80 | 126;
        buf.writeUInt16BE(length, start + 2);
      } else {
        buf[start + 1] = 0x80 | 127;
        buf.writeUInt32BE(Math.floor(length / 2 ** 32), start + 2);
        buf.writeUInt32BE(length >>> 0, start + 6);
      }
      buf.writeUInt32BE(0, MAX_CLIENT_HEADER - 4); // the zero mask key
      this.socket.write(buf.subarray(start, end));
      if (this.socket.writableLength > 0) this.spare = undefined;
      return true;
    }
  }

  /**
   * Sends one binary message whose payload is `parts` one after another,
   * written as they are (one corked writev, no copy into a frame buffer);
   * `written` once the socket has taken them all: until then the parts'
   * bytes must not change.
   */
  sendParts(parts: Uint8Array[], length: number, written: (e?: Error | null) => void): void {
    if (this.gone || this.closing) throw this.gone ?? this.closedBy ?? new Error('stream closed');
    const s = this.socket;
    s.cork();
    s.write(header(OP_BINARY, length));
    const last = parts.reduce((at, p, i) => (p.byteLength > 0 ? i : at), -1);
    parts.forEach((p, i) => {
      if (p.byteLength > 0) s.write(p, i === last ? written : undefined);
    });
    if (last < 0) s.write(new Uint8Array(0), written);
    s.uncork();
  }

  /** Sends raw bytes as one binary message (tests of bad frames). */
  sendBytes(bytes: Uint8Array): void {
    this.send(bytes.byteLength, (p) => p.set(bytes));
  }

  /**
   * A ping frame; resolves on its pong: the bare round trip on this
   * connection (bench/transport-gap compares a decode step's overhead with
   * it). A pong settles every ping up to the number it carries (RFC 6455
   * lets a peer answer only the latest of several).
   */
  ping(): Promise<void> {
    if (this.gone || this.closing) return Promise.reject(this.gone ?? this.closedBy ?? new Error('stream closed'));
    const n = (this.pingCount = (this.pingCount + 1) >>> 0);
    const frame = header(OP_PING, 4, true, 4);
    frame.writeUInt32BE(n, frame.byteLength - 4);
    return new Promise((resolve, reject) => {
      this.pings.push({ n, settle: (e) => (e ? reject(e) : resolve()) });
      this.socket.write(frame);
    });
  }

  /** The close handshake: a close frame, then the socket ends (dropped after a second if the server does not). */
  close(code = 1000): void {
    if (this.gone || this.closing) return;
    this.closing = true;
    const h = header(OP_CLOSE, 2);
    this.socket.end(Buffer.concat([h, Buffer.from([code >> 8, code & 0xff])]));
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  private end(e: Error): void {
    if (this.gone) return;
    this.gone = e;
    this.socket.destroy();
    for (const p of this.pings.splice(0)) p.settle(e);
    this.events?.closed(e);
  }

  private protocolError(why: string, code = 1002): void {
    const h = header(OP_CLOSE, 2);
    this.socket.end(Buffer.concat([h, Buffer.from([code >> 8, code & 0xff])]));
    this.end(new Error(`stream: ${why}`));
  }

  /**
   * `reused`: chunk is the warm read buffer (the next read overwrites it), so
   * nothing kept may be a view of it. Never throws: this runs in the socket's
   * read callback, where a throw would be uncaught in the caller's process.
   */
  private onData(chunk: Buffer, reused: boolean): void {
    try {
      this.parse(chunk, reused);
    } catch (e) {
      this.protocolError(`reading a server message failed: ${(e as Error).message}`, 1011);
    }
  }

  private parse(chunk: Buffer, reused: boolean): void {
    let at = 0;
    while (at < chunk.byteLength && !this.gone) {
      if (this.left === 0 && !this.inPayload) {
        // A header: from the pending bytes and this chunk.
        const src = this.pending.byteLength > 0 ? Buffer.concat([this.pending, chunk.subarray(at, at + 14)]) : chunk.subarray(at);
        if (src.byteLength < 2) return void (this.pending = Buffer.from(src));
        const len7 = src[1] & 0x7f;
        const n = len7 === 126 ? 4 : len7 === 127 ? 10 : 2;
        if (src.byteLength < n) return void (this.pending = Buffer.from(src));
        if (src[1] & 0x80) return this.protocolError('a server frame is masked');
        if (src[0] & 0x70) return this.protocolError('reserved bits set');
        if (len7 === 127 && src.readUInt32BE(2) >= 0x200000) return this.protocolError('a frame length over 2^53');
        const length = len7 === 126 ? src.readUInt16BE(2) : len7 === 127 ? src.readUInt32BE(2) * 2 ** 32 + src.readUInt32BE(6) : len7;
        const op = src[0] & 0x0f;
        if (op >= 0x8 && (length > 125 || !(src[0] & 0x80))) return this.protocolError('control frames are whole and at most 125 bytes');
        const before = op === OP_CONT ? this.msgLength : 0;
        if (op < 0x8 && before + length > this.maxMessage)
          return this.protocolError(`a server message of ${before + length} bytes or more is over the limit of ${this.maxMessage} (maxMessage)`, 1009);
        at += n - this.pending.byteLength;
        this.pending = EMPTY;
        this.fin = (src[0] & 0x80) !== 0;
        this.opcode = src[0] & 0x0f;
        this.left = length;
        this.inPayload = true;
        if (this.opcode < 0x8 && this.opcode !== OP_CONT) this.msgLength = 0;
        if (length === 0) {
          // An empty frame: a control frame, or a message (or its last fragment) ending here.
          const whole = this.opcode < 0x8 && this.fin ? (this.msg?.subarray(0, this.msgLength) ?? new Uint8Array(0)) : new Uint8Array(0);
          if (this.opcode < 0x8 && this.fin) this.msg = undefined;
          this.endFrame(this.opcode < 0x8 && !this.fin ? undefined : whole);
        }
        continue;
      }
      const n = Math.min(this.left, chunk.byteLength - at);
      const bytes = chunk.subarray(at, at + n);
      at += n;
      if (this.opcode >= 0x8) {
        this.control.push(Buffer.from(bytes));
        this.left -= n;
        if (this.left === 0) this.endFrame(Buffer.concat(this.control.splice(0)));
        continue;
      }
      // The whole message in the warm read buffer: offered as a view of it first (no copy, no buffer of its own).
      if (reused && this.left === n && this.fin && this.opcode !== OP_CONT && !this.msg && this.events?.messageView?.(bytes)) {
        this.left = 0;
        this.inPayload = false;
        this.msgLength = 0;
        continue;
      }
      // The whole message in this read, aligned: a view of it.
      if (!reused && this.left === n && this.fin && this.opcode !== OP_CONT && !this.msg && (bytes.byteOffset & 3) === 0) {
        this.left = 0;
        this.endFrame(bytes);
        continue;
      }
      this.grow(this.msgLength + this.left);
      this.msg!.set(bytes, this.msgLength);
      this.msgLength += n;
      this.left -= n;
      if (this.left === 0) {
        const msg = this.msg!;
        if (this.fin) this.msg = undefined;
        this.endFrame(this.fin ? msg.subarray(0, this.msgLength) : undefined);
      }
    }
  }

  /** Room for `n` bytes of message: a fresh buffer (the caller keeps views of it), the bytes so far copied over. */
  private grow(n: number): void {
    if (this.msg && this.msg.byteLength >= n) return;
    const next = Buffer.allocUnsafeSlow(this.fin && !this.msg ? n : Math.max(n, 2 * (this.msg?.byteLength ?? 0)));
    if (this.msg) this.msg.copy(next, 0, 0, this.msgLength);
    this.msg = next;
  }

  /** A frame's end; `data` is the whole message (or a control frame's payload) when there is one. */
  private endFrame(data: Uint8Array | undefined): void {
    this.inPayload = false;
    const op = this.opcode;
    if (op === OP_PING) {
      if (!this.closing) this.socket.write(Buffer.concat([header(OP_PONG, data!.byteLength), data!]));
    } else if (op === OP_CLOSE) {
      const code = data && data.byteLength >= 2 ? (data[0] << 8) | data[1] : 1000;
      // The server's code and reason (1009: a message over its --body-limit) are what the caller can act on; 'stream closed' said neither.
      const reason = data && data.byteLength > 2 ? Buffer.from(data.buffer, data.byteOffset + 2, data.byteLength - 2).toString('utf8') : '';
      if (!this.closing) this.closedBy ??= new Error(`stream closed by the server (${code}${reason ? `: ${reason}` : ''})`);
      this.close(code);
    } else if (op === OP_PONG) {
      // Unasked pongs (or ones not carrying our numbers) are allowed and ignored.
      const n = data && data.byteLength === 4 ? ((data[0] << 24) | (data[1] << 16) | (data[2] << 8) | data[3]) >>> 0 : -1;
      const upTo = this.pings.findIndex((p) => p.n === n);
      if (upTo >= 0) for (const p of this.pings.splice(0, upTo + 1)) p.settle();
    } else if (op > OP_BINARY) this.protocolError(`unknown opcode ${op}`);
    else if (this.fin && data) {
      this.msgLength = 0;
      this.events?.message(data);
    }
  }
}
