// The server end of a WebSocket (RFC 6455), our own, for GET /v1/stream.
//
// Why not `ws`: it gathers each message into a fresh buffer of its size and
// frames each answer with writes of its own; for a batch of 32 decode steps
// (0.27–0.53 MB each way) the fresh buffers cost their page faults and
// garbage collection on every call. Here a message that arrives whole in
// one socket read is a view of that read (no copy); a larger one is copied
// once into a pooled buffer, already mapped, that the caller gives back
// when nothing holds views of it any more; an answer is written by the
// caller straight after its frame header in a pooled buffer, one socket
// write.
//
// What it does (the handshake is ws-handshake.ts: version 13; no extensions
// or subprotocols are agreed, so frames carry none): client frames must be masked (a zero
// key is a key: the payload is then as sent); 7, 16 and 64-bit lengths;
// fragmented messages put together, control frames allowed between the
// fragments; ping answered by pong; a close answered by a close and the end
// of the connection. A protocol error closes with 1002, a message over the
// limit with 1009 (before any of it is buffered). Text messages are passed
// on as they are (the stream answers them with an error frame).
//
// A large message in one frame (a document's K/V upload) is read past
// node's socket stream: its first bytes from the read that brought its
// header, the rest straight from the socket into a pooled buffer on a
// thread of the addon's (addon/socket-read.ts), node's reading stopped
// meanwhile. Through the stream, every 64 KiB read was a fresh buffer,
// copied again and collected: most of an upload's cost to the event loop.
// The thread also reads what has already come after the message (up to
// AHEAD bytes): parsed as the message is handed on, a next large message
// starts its own direct read at once, not once the event loop comes round
// to the socket behind the work this message set off.
import type { Socket } from 'node:net';
import { canReadDirect, readSocketInto, type SocketRead } from '../addon/socket-read.js';
import { BufferPool } from '../storage/buffer-pool.js';

const OP_CONT = 0x0, OP_TEXT = 0x1, OP_BINARY = 0x2, OP_CLOSE = 0x8, OP_PING = 0x9, OP_PONG = 0xa;
export const CLOSE_NORMAL = 1000, CLOSE_PROTOCOL = 1002, CLOSE_POLICY = 1008, CLOSE_TOO_BIG = 1009, CLOSE_ERROR = 1011;
/** The largest frame header: 2 bytes, a 64-bit length, no mask (server frames). */
export const MAX_HEADER = 10;
/** Messages and answers from this size up live in pooled buffers; smaller ones are fresh (cheap, and no pool round trip). */
const POOLED = 1 << 16;
/** Nor larger ones: the pool keeps what it is given for a while, and a batch's frames are well under this. */
const POOLED_MAX = 32 << 20;
const pooledSize = (n: number) => n >= POOLED && n <= POOLED_MAX;
/** A connection's warm answer buffer: at least this large, and frames up to its largest size go through it. */
const SPARE_MIN = 1 << 14;
const SPARE_MAX = POOLED;
/** How long a closing connection waits for the peer's close before dropping it. */
const CLOSE_WAIT_MS = 1000;
/**
 * A message's buffer starts at most this large and grows (doubling, up to
 * its declared length) as its bytes come: a header alone claiming 256 MiB
 * pins no more than this. A batch (0.27–0.53 MB) still fits the first buffer.
 */
const FIRST_BUFFER = 1 << 20;
/**
 * Single-frame messages from DIRECT_MIN to DIRECT_MAX bytes are read
 * straight from the socket (smaller ones come in a read or two anyway) into
 * a buffer of the declared size taken at once: a pooled one up to
 * POOLED_MAX, else one of their own, which commits memory only as bytes come
 * into it. Larger messages are gathered as they come (FIRST_BUFFER).
 */
const DIRECT_MIN = 1 << 20;
const DIRECT_MAX = 64 << 20;
/** Bytes a direct read reads on past its message (the next one's header and first bytes), as node's reads are. */
const AHEAD = 1 << 16;
/** Direct reads in progress, process-wide: each holds a thread (a slow peer for up to progressMs). */
let directReads = 0;
const MAX_DIRECT_READS = 64;
/** Messages read directly and their bytes, process-wide (for tests and benches: whether the path was taken). */
export const directReadTotals = { messages: 0, bytes: 0, aheadBytes: 0 };

export interface WsLimits {
  /** Largest message accepted (1009 above it, from its header). */
  maxMessage: number;
  /** A message begun must make progress (some bytes) within this long, or the connection closes with 1008. */
  progressMs: number;
  /** Reading pauses while more messages than this await their answers... */
  maxInFlight: number;
  /** ...or while more than this many answer bytes wait in the socket, and resumes as they go. */
  highWater: number;
}

const pool = new BufferPool(8);

export interface WsHandlers {
  /**
   * One whole message. `data` may live in a pooled buffer: call release()
   * once nothing holds a view of it (after that its bytes are reused).
   * `readMs`: from its first frame's header to its last byte.
   */
  message(data: Uint8Array, binary: boolean, release: () => void, readMs: number): void;
  /** The connection is gone (closed either way, or the socket failed). */
  closed(): void;
}

/** The frame header's length in bytes, as far as its first `have` bytes in `h` tell (2 until they are in). */
function headerLength(h: Uint8Array, have: number): number {
  if (have < 2) return 2;
  const len7 = h[1] & 0x7f;
  return 2 + (len7 === 126 ? 2 : len7 === 127 ? 8 : 0) + (h[1] & 0x80 ? 4 : 0);
}

/** One accepted connection: frames in, messages out, answers framed into pooled buffers. */
export class WsConnection {
  /** The frame header being read (at most 14 bytes) and how much of it has come. */
  private readonly head = new Uint8Array(14);
  private have = 0;
  private inHeader = true;
  /** The frame being read: its opcode, whether it ends its message, its mask, payload bytes still to come. */
  private opcode = 0;
  private fin = false;
  private readonly mask = new Uint8Array(4);
  private masked = false;
  private left = 0;
  /** Payload bytes of the frame read so far (the mask's phase). */
  private read = 0;
  /** The message being put together: its first opcode, its buffer (pooled when `pooled`), bytes in it. */
  private msgOpcode = -1;
  private msg?: Buffer;
  private pooled = false;
  private msgLength = 0;
  /** When the message's first frame header was read (performance.now()). */
  private msgStart = 0;
  /** A control frame's payload (at most 125 bytes). */
  private control = new Uint8Array(125);
  private closeSent = false;
  private gone = false;
  /** Messages handed on whose release() has not come (their answers are not yet written). */
  private inFlight = 0;
  /** The rest of a read left unparsed while reading is paused for backpressure. */
  private backlog?: Buffer;
  /** The peer sent its FIN: the socket ends once the answers in flight are written. */
  private peerEnded = false;
  private progress?: NodeJS.Timeout;
  private peak = 0;
  /** The rest of the current message being read straight from the socket. */
  private direct?: SocketRead;
  /**
   * A warm buffer for answer frames below the pool's sizes (a decode step's
   * 8-17 KB): reused while each write is taken whole by the kernel at once
   * (the socket then holds nothing of it), instead of a fresh buffer per answer.
   */
  private spare?: Buffer;

  constructor(
    private readonly socket: Socket,
    private readonly limits: WsLimits,
    private readonly handlers: WsHandlers,
  ) {
    socket.setNoDelay(true);
    socket.setTimeout(0);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => socket.destroy());
    socket.on('drain', () => this.resume());
    // The peer's FIN without a close frame: nothing more will come, but the answers owed are still written (the socket is half-open).
    socket.on('end', () => {
      this.peerEnded = true;
      this.endIfDone();
    });
    socket.on('close', () => this.onGone());
  }

  private get maxMessage(): number {
    return this.limits.maxMessage;
  }

  get open(): boolean {
    return !this.gone && !this.closeSent;
  }

  /** Feeds the bytes that came with the handshake. */
  feed(bytes: Buffer): void {
    if (bytes.byteLength > 0) this.onData(bytes);
  }

  /**
   * Sends one binary message of `length` bytes: `fill` writes them into the
   * view it is given (straight after the frame header, in a pooled buffer
   * for a large message); one socket write.
   */
  sendBinary(length: number, fill: (payload: Uint8Array) => void): void {
    if (!this.open) return;
    const headerBytes = length < 126 ? 2 : length < 0x10000 ? 4 : 10;
    const total = headerBytes + length;
    const pooled = pooledSize(total);
    const spare = !pooled && total <= SPARE_MAX;
    let buf: Buffer;
    if (pooled) buf = pool.take(total);
    else if (spare) buf = this.spare && this.spare.byteLength >= total ? this.spare : (this.spare = Buffer.allocUnsafeSlow(Math.max(SPARE_MIN, 2 ** Math.ceil(Math.log2(total)))));
    else buf = Buffer.allocUnsafe(total);
    writeHeader(buf, OP_BINARY, length, headerBytes);
    fill(buf.subarray(headerBytes, total));
    if (pooled) this.socket.write(buf.subarray(0, total), () => pool.give(buf));
    else this.socket.write(buf.subarray(0, total));
    const queued = this.socket.writableLength;
    // Not all taken by the kernel at once: the socket holds the spare until it is written, and the next answer takes a new one.
    if (spare && queued > 0) this.spare = undefined;
    this.peak = Math.max(this.peak, queued);
  }

  /**
   * Sends one binary message already written at buf[at, at + length), with
   * room for its header before it (at ≥ MAX_HEADER): the header goes in
   * front, one socket write of both. `written` once the socket is done with
   * buf (sent, or failed).
   */
  sendFramed(buf: Buffer, at: number, length: number, written: () => void): void {
    if (!this.open) return written();
    const headerBytes = length < 126 ? 2 : length < 0x10000 ? 4 : 10;
    writeHeader(buf.subarray(at - headerBytes, at), OP_BINARY, length, headerBytes);
    this.socket.write(buf.subarray(at - headerBytes, at + length), () => written());
    this.peak = Math.max(this.peak, this.socket.writableLength);
  }

  /** Starts the close handshake (or answers the peer's): a close frame, then the socket ends. */
  close(code = CLOSE_NORMAL, reason = ''): void {
    if (this.gone || this.closeSent) return;
    this.closeSent = true;
    const why = Buffer.from(reason, 'utf8').subarray(0, 123);
    const frame = Buffer.allocUnsafe(4 + why.byteLength);
    writeHeader(frame, OP_CLOSE, 2 + why.byteLength, 2);
    frame.writeUInt16BE(code, 2);
    why.copy(frame, 4);
    this.socket.end(frame);
    // A peer that never answers or never closes its end is dropped.
    setTimeout(() => this.socket.destroy(), CLOSE_WAIT_MS).unref();
  }

  /** The most answer bytes the socket has held unsent at once (for tests). */
  get peakQueued(): number {
    return this.peak;
  }

  /** Messages handed on whose answers are not yet written. */
  get inFlightCount(): number {
    return this.inFlight;
  }

  /** Bytes held for the message being put together (for tests). */
  get heldBytes(): number {
    return this.msg?.byteLength ?? 0;
  }

  /** Whether reading is paused for backpressure. */
  get paused(): boolean {
    return this.backlog !== undefined || this.socket.isPaused();
  }

  /** Drops the connection at once (server shutdown). */
  terminate(): void {
    this.socket.destroy();
  }

  private onGone(): void {
    if (this.gone) return;
    this.gone = true;
    clearTimeout(this.progress);
    this.backlog = undefined;
    this.dropMessage();
    this.handlers.closed();
  }

  private fail(code: number, reason: string): void {
    this.dropMessage();
    this.close(code, reason);
  }

  private dropMessage(): void {
    // A direct read's thread may still be writing the buffer: it is handed back when the read settles.
    if (this.direct) this.direct.cancel();
    else if (this.msg && this.pooled) pool.give(this.msg);
    this.msg = undefined;
    this.msgOpcode = -1;
    this.msgLength = 0;
  }

  private onData(chunk: Buffer): void {
    // Node's reading is stopped while a direct read runs: bytes here would be out of order.
    if (this.direct) return this.fail(CLOSE_ERROR, 'the server read out of order');
    // Bytes read after a pause took hold wait behind the backlog, in order.
    if (this.backlog) return void (this.backlog = Buffer.concat([this.backlog, chunk]));
    try {
      this.parse(chunk);
    } catch (e) {
      // An allocation that failed, or a handler that threw: this connection closes, the process goes on.
      this.dropMessage();
      this.fail(e instanceof RangeError ? CLOSE_TOO_BIG : CLOSE_ERROR, 'the server could not take this message');
    }
    this.watchProgress();
  }

  /** Too much is waiting on this connection: read no more until answers go. */
  private saturated(): boolean {
    return this.inFlight >= this.limits.maxInFlight || this.socket.writableLength > this.limits.highWater;
  }

  /** Parses the backlog, then reads again, once the connection is no longer saturated. */
  private resume(): void {
    if (this.gone || this.closeSent || this.direct || this.saturated()) return;
    const rest = this.backlog;
    this.backlog = undefined;
    if (rest) this.onData(rest);
    if (!this.backlog && !this.gone) this.socket.resume();
  }

  private endIfDone(): void {
    if (this.peerEnded && this.inFlight === 0 && !this.backlog && !this.gone && !this.closeSent) this.socket.end();
  }

  /** Arms the progress timer while a message is part-way in (and reading is not paused by us), clears it otherwise. */
  private watchProgress(): void {
    const midMessage = this.have > 0 || !this.inHeader || this.msgOpcode >= 0;
    clearTimeout(this.progress);
    this.progress = undefined;
    // A direct read watches its own progress.
    if (midMessage && !this.backlog && !this.direct && !this.closeSent && !this.gone)
      this.progress = setTimeout(() => this.fail(CLOSE_POLICY, `a message must progress within ${this.limits.progressMs} ms`), this.limits.progressMs).unref();
  }

  private parse(chunk: Buffer): void {
    let at = 0;
    while (!this.closeSent && !this.gone && !this.direct) {
      if (this.inHeader && this.have === 0 && at < chunk.byteLength && this.saturated()) {
        // Between frames with too much waiting: keep the rest and stop reading (resume() goes on from here).
        this.backlog = chunk.subarray(at);
        this.socket.pause();
        return;
      }
      if (this.inHeader) {
        // The header, byte by byte until its length is known (at most 14 bytes).
        while (at < chunk.byteLength && this.have < headerLength(this.head, this.have)) this.head[this.have++] = chunk[at++];
        if (this.have < headerLength(this.head, this.have)) return;
        this.inHeader = false;
        if (!this.startFrame()) return;
        if (this.left === 0) {
          this.endFrame();
          continue;
        }
      }
      if (at >= chunk.byteLength) return;
      const n = Math.min(this.left, chunk.byteLength - at);
      this.payload(chunk, at, n);
      at += n;
    }
  }

  /** Checks the header just read and sets up its frame; false when the connection is closing. */
  private startFrame(): boolean {
    const h = this.head;
    this.fin = (h[0] & 0x80) !== 0;
    this.opcode = h[0] & 0x0f;
    this.masked = (h[1] & 0x80) !== 0;
    const len7 = h[1] & 0x7f;
    let length = len7, at = 2;
    if (len7 === 126) {
      length = (h[2] << 8) | h[3];
      at = 4;
    } else if (len7 === 127) {
      const hi = ((h[2] << 24) | (h[3] << 16) | (h[4] << 8) | h[5]) >>> 0;
      length = hi * 2 ** 32 + (((h[6] << 24) | (h[7] << 16) | (h[8] << 8) | h[9]) >>> 0);
      if (hi >= 0x200000) return this.refuse(CLOSE_PROTOCOL, 'frame length over 2^53');
      at = 10;
    }
    if (this.masked) this.mask.set(h.subarray(at, at + 4));
    if ((h[0] & 0x70) !== 0) return this.refuse(CLOSE_PROTOCOL, 'reserved bits set (no extension was agreed)');
    if (!this.masked) return this.refuse(CLOSE_PROTOCOL, 'client frames must be masked');
    const op = this.opcode;
    if (op >= 0x8) {
      if (op !== OP_CLOSE && op !== OP_PING && op !== OP_PONG) return this.refuse(CLOSE_PROTOCOL, `unknown opcode ${op}`);
      if (!this.fin || length > 125) return this.refuse(CLOSE_PROTOCOL, 'control frames are whole and at most 125 bytes');
    } else if (op === OP_CONT) {
      if (this.msgOpcode < 0) return this.refuse(CLOSE_PROTOCOL, 'continuation frame with no message begun');
    } else if (op === OP_TEXT || op === OP_BINARY) {
      if (this.msgOpcode >= 0) return this.refuse(CLOSE_PROTOCOL, 'new message before the last one ended');
      this.msgOpcode = op;
      this.msgStart = performance.now();
    } else return this.refuse(CLOSE_PROTOCOL, `unknown opcode ${op}`);
    if (op < 0x8 && this.msgLength + length > this.maxMessage)
      return this.refuse(CLOSE_TOO_BIG, `message over the limit of ${this.maxMessage} bytes (the server's --body-limit)`);
    this.left = length;
    this.read = 0;
    return true;
  }

  private refuse(code: number, reason: string): false {
    this.fail(code, reason);
    return false;
  }

  /**
   * Room for `n` bytes of message (`declared`: as many as its headers say
   * will come), the bytes so far kept. The buffer grows by doubling as bytes
   * come, never past `declared`, so what a peer pins is what it has sent.
   */
  private reserve(n: number, declared: number): void {
    if (this.msg && this.msg.byteLength >= n) return;
    const size = Math.min(Math.max(declared, n), Math.max(n, FIRST_BUFFER, 2 * (this.msg?.byteLength ?? 0)));
    const pooled = pooledSize(size);
    const next = pooled ? pool.take(size) : Buffer.allocUnsafe(size);
    if (this.msg) {
      this.msg.copy(next, 0, 0, this.msgLength + this.read); // the finished frames and what has come of this one
      if (this.pooled) pool.give(this.msg);
    }
    this.msg = next;
    this.pooled = pooled;
  }

  /** `n` payload bytes of the frame at chunk[at]. */
  private payload(chunk: Buffer, at: number, n: number): void {
    const op = this.opcode;
    if (op >= 0x8) this.control.set(chunk.subarray(at, at + n), this.read);
    else if (this.read === 0 && n === this.left && this.fin && op !== OP_CONT) {
      // The whole message in this read: a view of it (the read's buffer is ours alone), not a copy.
      const data = chunk.subarray(at, at + n);
      unmask(data, this.mask, 0);
      this.read = n;
      this.left = 0;
      return this.endFrame(data);
    } else if (this.read === 0 && this.fin && op !== OP_CONT && this.left >= DIRECT_MIN && this.left <= DIRECT_MAX && directReads < MAX_DIRECT_READS && canReadDirect(this.socket)) {
      return this.readDirect(chunk.subarray(at, at + n));
    } else {
      const declared = this.msgLength + this.read + this.left;
      // A final frame's length is the message's; a fragment's only a floor.
      this.reserve(this.msgLength + this.read + n, this.fin ? declared : this.maxMessage);
      const into = this.msg!.subarray(this.msgLength + this.read, this.msgLength + this.read + n);
      into.set(chunk.subarray(at, at + n));
      unmask(into, this.mask, this.read);
    }
    this.read += n;
    this.left -= n;
    if (this.left === 0) this.endFrame();
  }

  /**
   * The message is this frame, `first` its first bytes: the rest is read
   * straight from the socket into the message's buffer, then the frame ends
   * as if its bytes had come through parse().
   */
  private readDirect(first: Uint8Array): void {
    const total = this.left;
    const pooled = pooledSize(total);
    const buf = pooled ? pool.take(total) : Buffer.allocUnsafeSlow(total);
    buf.set(first);
    unmask(buf.subarray(0, first.byteLength), this.mask, 0);
    this.msg = buf;
    this.pooled = pooled;
    this.read = first.byteLength;
    this.left = total - first.byteLength;
    directReads++;
    // Its own buffer: a small message in it is handed on as a view, as a read of node's is.
    const ahead = Buffer.allocUnsafeSlow(AHEAD);
    const read = (this.direct = readSocketInto(this.socket, buf.subarray(first.byteLength, total), this.mask, first.byteLength, this.limits.progressMs, ahead));
    const settle = (ok: boolean, why?: Error, aheadBytes = 0) => {
      directReads--;
      this.direct = undefined;
      if (!ok || this.msg !== buf || this.gone || this.closeSent) {
        // Failed, or the connection was dropped or closed meanwhile (dropMessage left the buffer to us).
        if (this.msg === buf) this.dropMessage();
        else if (pooled) pool.give(buf);
        if (!ok && !this.gone && !this.closeSent) {
          if (/timeout/.test(why?.message ?? '')) this.fail(CLOSE_POLICY, `a message must progress within ${this.limits.progressMs} ms`);
          else this.socket.destroy();
        }
        return;
      }
      this.read = total;
      this.left = 0;
      directReadTotals.messages++;
      directReadTotals.bytes += total;
      directReadTotals.aheadBytes += aheadBytes;
      this.endFrame();
      // The socket's next bytes, before node reads any (it reads only once this turn of the loop is over).
      if (aheadBytes > 0 && !this.gone && !this.closeSent) this.onData(ahead.subarray(0, aheadBytes));
      this.resume();
      this.watchProgress();
    };
    read.done.then(
      (n) => settle(true, undefined, n - (total - first.byteLength)),
      (e: Error) => settle(false, e),
    );
  }

  /** The frame's payload is all in (`view`: the whole message, as a view of the read). */
  private endFrame(view?: Uint8Array): void {
    this.have = 0;
    this.inHeader = true;
    const op = this.opcode;
    if (op >= 0x8) {
      const payload = this.control.subarray(0, this.read);
      unmask(payload, this.mask, 0);
      return this.onControl(op, payload);
    }
    this.msgLength += this.read;
    if (!this.fin) return;
    const binary = this.msgOpcode === OP_BINARY;
    const msg = this.msg, pooled = this.pooled;
    const data = view ?? (msg ? msg.subarray(0, this.msgLength) : new Uint8Array(0));
    this.msg = undefined;
    this.pooled = false;
    this.msgOpcode = -1;
    this.msgLength = 0;
    let released = false;
    this.inFlight++;
    const readMs = performance.now() - this.msgStart;
    this.handlers.message(data, binary, () => {
      if (released) return;
      released = true;
      if (view === undefined && pooled) pool.give(msg!);
      this.inFlight--;
      this.resume();
      this.endIfDone();
    }, readMs);
  }

  private onControl(op: number, payload: Uint8Array): void {
    if (op === OP_PING) {
      if (!this.open) return;
      const frame = Buffer.allocUnsafe(2 + payload.byteLength);
      writeHeader(frame, OP_PONG, payload.byteLength, 2);
      frame.set(payload, 2);
      this.socket.write(frame);
    } else if (op === OP_CLOSE) {
      if (payload.byteLength === 1) return this.fail(CLOSE_PROTOCOL, 'a close payload is a 2-byte code and a reason');
      const code = payload.byteLength >= 2 ? (payload[0] << 8) | payload[1] : CLOSE_NORMAL;
      if (payload.byteLength >= 2 && !sendableCode(code)) return this.fail(CLOSE_PROTOCOL, `close code ${code} may not be sent`);
      // The peer's close, answered with its code.
      this.close(code);
    }
  }
}

/** Close codes a peer may put in a close frame (RFC 6455 7.4: the defined ones less 1004-1006 and 1015, and 3000-4999). */
function sendableCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

function writeHeader(buf: Uint8Array, opcode: number, length: number, headerBytes: number): void {
  buf[0] = 0x80 | opcode;
  if (headerBytes === 2) buf[1] = length;
  else if (headerBytes === 4) {
    buf[1] = 126;
    buf[2] = length >>> 8;
    buf[3] = length & 0xff;
  } else {
    buf[1] = 127;
    const hi = Math.floor(length / 2 ** 32), lo = length >>> 0;
    buf[2] = hi >>> 24;
    buf[3] = (hi >>> 16) & 0xff;
    buf[4] = (hi >>> 8) & 0xff;
    buf[5] = hi & 0xff;
    buf[6] = lo >>> 24;
    buf[7] = (lo >>> 16) & 0xff;
    buf[8] = (lo >>> 8) & 0xff;
    buf[9] = lo & 0xff;
  }
}

/**
 * XORs `bytes` with the 4-byte key in place, `phase` bytes into the frame's
 * payload (RFC 6455 5.3); a zero key is left alone. Aligned 32-bit words at
 * a time (the key rotated to match): a byte loop would cost ~0.3 ms for a
 * batch's 0.27 MB on the 2-core VM.
 */
export function unmask(bytes: Uint8Array, key: Uint8Array, phase: number): void {
  if ((key[0] | key[1] | key[2] | key[3]) === 0) return;
  const n = bytes.byteLength;
  let i = 0;
  for (; i < n && ((bytes.byteOffset + i) & 3) !== 0; i++) bytes[i] ^= key[(phase + i) & 3];
  const words = (n - i) >>> 2;
  if (words > 0) {
    const p = phase + i;
    // Little-endian words: byte j of the word is the key's byte (p + j) & 3.
    const k = (key[p & 3] | (key[(p + 1) & 3] << 8) | (key[(p + 2) & 3] << 16) | (key[(p + 3) & 3] << 24)) | 0;
    const w = new Int32Array(bytes.buffer, bytes.byteOffset + i, words);
    for (let j = 0; j < words; j++) w[j] ^= k;
    i += words * 4;
  }
  for (; i < n; i++) bytes[i] ^= key[(phase + i) & 3];
}
