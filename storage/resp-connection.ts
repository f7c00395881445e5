// A bare RESP2 connection to one Redis node, for the store's bulk traffic:
// commands are written as views of the caller's buffers (no copy into one
// command buffer), and a multi-bulk reply (MGET) is parsed straight into
// the caller's memory — each element's bytes copied once, from the socket's
// chunks into the views the caller names for it. Everything else about the
// cluster (slots, redirections, failover, scripts) stays with ioredis; a
// command that fails here is retried there.
import { connect, type Socket } from 'node:net';

export type Reply = string | number | null | Buffer | ReplyError | Reply[];

export class ReplyError extends Error {
  override readonly name = 'ReplyError';
}

/** Where the elements of an array reply go. */
export interface BulkSink {
  /** Views to fill, in order, with element i's `length` bytes (their lengths sum to it), or undefined to collect them into a new Buffer. */
  target(i: number, length: number): Uint8Array[] | undefined;
  /** Element i is in: `length` -1 is nil; `collected` holds the bytes when target gave no views. */
  done(i: number, length: number, collected?: Buffer): void;
}

const READ_BUFFER = 1 << 20;

interface Pending {
  resolve(r: Reply): void;
  reject(e: Error): void;
  sink?: BulkSink;
}


export class RespConnection {
  private readonly socket: Socket;
  private readonly pending: Pending[] = [];
  private readonly ready: Promise<void>;
  private failed?: Error;
  private rejectReady?: (e: Error) => void;
  // Parser state.
  private line = '';
  /** An array reply being read: its elements so far and how many there are. */
  private array?: { items: Reply[]; count: number };
  /** A bulk string being read: bytes left (CRLF included) and where they go. */
  private bulk?: { length: number; left: number; views: Uint8Array[]; view: number; at: number; collect?: Buffer };

  /**
   * `silenceMs`: a node that sends nothing this long while a reply is owed
   * (or while connecting) fails the connection, so that a hung node (paused,
   * partitioned) sends the command back to ioredis instead of holding it.
   */
  constructor(
    readonly host: string,
    readonly port: number,
    silenceMs = 0,
  ) {
    // Replies are read into one reused buffer (no allocation per read) and parsed out of it at once.
    this.socket = connect({
      host,
      port,
      noDelay: true,
      onread: {
        buffer: Buffer.allocUnsafe(READ_BUFFER),
        callback: (n: number, buf: Uint8Array) => {
          try {
            this.parse(Buffer.from(buf.buffer, buf.byteOffset, n));
          } catch (e) {
            this.fail(e as Error);
          }
          return true;
        },
      },
    });
    this.ready = new Promise((resolve, reject) => {
      this.rejectReady = reject;
      this.socket.once('connect', () => resolve());
      this.socket.once('error', reject);
    });
    this.ready.catch(() => undefined);
    this.socket.on('error', (e) => this.fail(e));
    this.socket.on('close', () => this.fail(new Error(`connection to ${host}:${port} closed`)));
    if (silenceMs > 0) {
      this.socket.setTimeout(silenceMs);
      this.socket.on('timeout', () => {
        if (this.pending.length > 0 || this.socket.connecting) this.fail(new Error(`${host}:${port} sent nothing for ${silenceMs} ms`));
      });
    }
  }

  get broken(): boolean {
    return this.failed !== undefined;
  }

  /**
   * Sends one command; its reply resolves the promise (a Redis error reply
   * rejects it with a ReplyError). An argument given as parts is sent as one
   * bulk string, the parts written as they are.
   */
  async send(args: (string | Uint8Array | Uint8Array[])[], sink?: BulkSink): Promise<Reply> {
    await this.ready;
    if (this.failed) throw this.failed;
    const done = new Promise<Reply>((resolve, reject) => this.pending.push({ resolve, reject, sink }));
    let text = `*${args.length}\r\n`;
    this.socket.cork();
    for (const a of args) {
      if (typeof a === 'string') {
        text += `$${Buffer.byteLength(a)}\r\n${a}\r\n`;
        continue;
      }
      const parts = Array.isArray(a) ? a : [a];
      this.socket.write(`${text}$${parts.reduce((n, p) => n + p.byteLength, 0)}\r\n`, 'latin1');
      for (const p of parts) this.socket.write(p);
      text = '\r\n';
    }
    this.socket.write(text, 'latin1');
    this.socket.uncork();
    return done;
  }

  close(): void {
    this.failed ??= new Error('closed');
    this.socket.destroy();
  }

  private fail(e: Error): void {
    this.failed ??= e;
    this.rejectReady?.(this.failed);
    for (const p of this.pending.splice(0)) p.reject(this.failed);
    this.socket.destroy();
  }

  private parse(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.bulk) {
        at = this.readBulk(chunk, at);
        continue;
      }
      const nl = chunk.indexOf(10, at);
      if (nl < 0) {
        this.line += chunk.toString('latin1', at);
        return;
      }
      const line = this.line + chunk.toString('latin1', at, nl - 1 >= at ? nl - 1 : at);
      // A CR split from its LF across chunks sits at the end of this.line.
      this.line = '';
      at = nl + 1;
      this.onLine(line.endsWith('\r') ? line.slice(0, -1) : line);
    }
  }

  private onLine(line: string): void {
    const type = line[0], rest = line.slice(1);
    if (type === '+') return this.value(rest);
    if (type === '-') return this.value(new ReplyError(rest));
    if (type === ':') return this.value(Number(rest));
    if (type === '*') {
      const count = Number(rest);
      if (this.array) throw new Error('nested arrays are not expected on a bulk connection');
      if (count <= 0) return this.value(count < 0 ? null : []);
      this.array = { items: [], count };
      return;
    }
    if (type === '$') {
      const length = Number(rest);
      if (length < 0) return this.value(null);
      const sink = this.array ? this.pending[0]?.sink : undefined;
      const views = sink?.target(this.array!.items.length, length);
      this.bulk = views ? { length, left: length + 2, views, view: 0, at: 0 } : { length, left: length + 2, views: [], view: 0, at: 0, collect: Buffer.allocUnsafe(length) };
      if (length === 0) this.bulk.views = [];
      return;
    }
    throw new Error(`unexpected reply line from ${this.host}:${this.port}: ${line.slice(0, 40)}`);
  }

  private readBulk(chunk: Buffer, at: number): number {
    const b = this.bulk!;
    const dataLeft = b.left - 2;
    if (dataLeft > 0) {
      const n = Math.min(dataLeft, chunk.length - at);
      if (b.collect) chunk.copy(b.collect, b.length - dataLeft, at, at + n);
      else {
        let copied = 0;
        while (copied < n) {
          const view = b.views[b.view];
          const m = Math.min(view.byteLength - b.at, n - copied);
          view.set(chunk.subarray(at + copied, at + copied + m), b.at);
          copied += m;
          b.at += m;
          if (b.at === view.byteLength) {
            b.view++;
            b.at = 0;
          }
        }
      }
      b.left -= n;
      return at + n;
    }
    // The trailing CRLF, possibly split across chunks.
    const n = Math.min(b.left, chunk.length - at);
    b.left -= n;
    if (b.left === 0) {
      this.bulk = undefined;
      this.bulkDone(b.length, b.collect);
    }
    return at + n;
  }

  private bulkDone(length: number, collect?: Buffer): void {
    if (!this.array) return this.value(collect ?? Buffer.alloc(0));
    const sink = this.pending[0]?.sink;
    const i = this.array.items.length;
    if (sink) {
      sink.done(i, length, collect);
      this.element(null);
    } else this.element(collect ?? Buffer.alloc(0));
  }

  /** A complete value: an array element, or a whole reply. */
  private value(v: Reply): void {
    if (this.array) {
      if (v === null && this.pending[0]?.sink) this.pending[0].sink.done(this.array.items.length, -1);
      return this.element(v);
    }
    this.settle(v);
  }

  private element(v: Reply): void {
    const a = this.array!;
    a.items.push(v);
    if (a.items.length === a.count) {
      this.array = undefined;
      this.settle(a.items);
    }
  }

  private settle(v: Reply): void {
    const p = this.pending.shift();
    if (!p) throw new Error(`a reply from ${this.host}:${this.port} that nothing asked for`);
    if (v instanceof ReplyError) p.reject(v);
    else p.resolve(v);
  }
}

