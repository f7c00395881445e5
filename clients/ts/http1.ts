// The client's HTTP/1.1 for requests that carry tensors (attends, K/V
// uploads) to an http: server: kept-alive sockets of its own, a request
// written as one corked write of its head and its body's parts, the answer
// framed here by its content-length (or chunks) and handed back as a view
// of the bytes the socket delivered when they came in one read.
//
// Why not node:http: its request and response objects, agent and streams
// cost ~0.3 ms of CPU per decode call on the 2-core VM, more than the
// call's transport itself (a decode call's overhead fell from 1.5x a bare
// GET /v1/health to about 1x without them: bench/results/transport-vm.md).
import { connect, type Socket } from 'node:net';

export interface Http1Answer {
  status: number;
  statusText: string;
  contentType: string;
  body: Uint8Array;
}

/** Kept-alive sockets idle longer than this are not reused (the server closes them at 5 s: reusing one could race its close). */
const IDLE_MS = 4000;
const CRLF2 = Buffer.from('\r\n\r\n');

/** One request in flight on a connection: its answer is parsed as the bytes come. */
interface InFlight {
  resolve(a: Http1Answer): void;
  reject(e: Error): void;
  head?: { status: number; statusText: string; contentType: string; close: boolean; length?: number; chunked: boolean };
  /** Bytes of the answer not parsed yet (the head not complete, or a chunked body's next chunk). */
  pending: Buffer[];
  body?: Buffer;
  at: number;
  chunks?: Buffer[];
}

class Connection {
  idleSince = 0;
  private current?: InFlight;
  closed = false;

  constructor(
    readonly socket: Socket,
    private readonly done: (c: Connection, reusable: boolean) => void,
  ) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (e) => this.fail(e));
    socket.on('close', () => this.fail(new Error('socket closed before the answer')));
  }

  send(head: string, parts: Uint8Array[]): Promise<Http1Answer> {
    return new Promise((resolve, reject) => {
      this.current = { resolve, reject, pending: [], at: 0 };
      const s = this.socket;
      s.cork();
      s.write(head, 'latin1');
      for (const p of parts) s.write(p);
      s.uncork();
    });
  }

  private fail(e: Error): void {
    this.closed = true;
    const r = this.current;
    this.current = undefined;
    r?.reject(e);
    this.done(this, false);
  }

  private onData(chunk: Buffer): void {
    const r = this.current;
    if (!r) return this.protocolError('bytes from the server with no request in flight');
    if (!r.head) {
      r.pending.push(chunk);
      const all = r.pending.length === 1 ? chunk : Buffer.concat(r.pending);
      const end = all.indexOf(CRLF2);
      if (end < 0) {
        r.pending = [all];
        if (all.byteLength > 64 * 1024) this.protocolError('answer head longer than 64 KiB');
        return;
      }
      r.pending = [];
      const head = parseHead(all.toString('latin1', 0, end));
      if (!head) return this.protocolError('malformed answer head');
      r.head = head;
      chunk = all.subarray(end + 4);
      if (head.length === undefined && !head.chunked) return this.protocolError('answer without a content-length or chunks');
    }
    if (r.head.chunked) return this.onChunked(r, chunk);
    const length = r.head.length!;
    if (length === 0 && chunk.byteLength === 0) return this.finish(r, chunk);
    // The whole body in this read: a view of it, no copy.
    if (!r.body && chunk.byteLength === length) return this.finish(r, chunk);
    r.body ??= Buffer.allocUnsafe(length);
    if (r.at + chunk.byteLength > length) return this.protocolError('answer longer than its content-length');
    r.body.set(chunk, r.at);
    r.at += chunk.byteLength;
    if (r.at === length) this.finish(r, r.body);
  }

  /** A chunked body: `size\r\n bytes \r\n` ... `0\r\n\r\n` (no trailers expected, any skipped). */
  private onChunked(r: InFlight, chunk: Buffer): void {
    r.pending.push(chunk);
    let buf = r.pending.length === 1 ? chunk : Buffer.concat(r.pending);
    r.chunks ??= [];
    for (;;) {
      const line = buf.indexOf('\r\n');
      if (line < 0) break;
      const size = parseInt(buf.toString('latin1', 0, line), 16);
      if (!Number.isFinite(size) || size < 0) return this.protocolError('malformed chunk size');
      if (size === 0) {
        if (buf.indexOf(CRLF2, line) < 0) break;
        return this.finish(r, Buffer.concat(r.chunks));
      }
      if (buf.byteLength < line + 2 + size + 2) break;
      r.chunks.push(buf.subarray(line + 2, line + 2 + size));
      buf = buf.subarray(line + 2 + size + 2);
    }
    r.pending = buf.byteLength > 0 ? [buf] : [];
  }

  private finish(r: InFlight, body: Uint8Array): void {
    const { status, statusText, contentType, close } = r.head!;
    this.current = undefined;
    if (close) {
      this.closed = true;
      this.socket.destroy();
    }
    this.done(this, !close);
    r.resolve({ status, statusText, contentType, body });
  }

  private protocolError(message: string): void {
    this.socket.destroy();
    this.fail(new Error(`HTTP answer: ${message}`));
  }
}

function parseHead(text: string): InFlight['head'] | undefined {
  const lines = text.split('\r\n');
  const m = /^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/.exec(lines[0]);
  if (!m) return undefined;
  let length: number | undefined, chunked = false, close = m[1] === '0', contentType = '';
  for (let i = 1; i < lines.length; i++) {
    const colon = lines[i].indexOf(':');
    if (colon < 0) return undefined;
    const name = lines[i].slice(0, colon).trim().toLowerCase(), value = lines[i].slice(colon + 1).trim();
    if (name === 'content-length') {
      if (!/^\d+$/.test(value)) return undefined;
      length = Number(value);
    } else if (name === 'transfer-encoding') chunked = /chunked/i.test(value);
    else if (name === 'connection') close = /close/i.test(value);
    else if (name === 'content-type') contentType = value;
  }
  const status = Number(m[2]);
  // These never have a body, whatever the head says.
  if (status === 204 || status === 304) return { status, statusText: m[3] ?? '', contentType, close, chunked: false, length: 0 };
  return { status, statusText: m[3] ?? '', contentType, close, chunked, length: chunked ? undefined : length };
}

/** Kept-alive connections to one http: server; a request takes an idle one or opens one. */
export class Http1Pool {
  private readonly idle: Connection[] = [];

  constructor(
    private readonly host: string,
    private readonly port: number,
    /** Header lines every request carries (host, content type, authorization), each ending in \r\n. */
    private readonly headers: string,
  ) {}

  async request(method: string, path: string, parts: Uint8Array[], byteLength: number): Promise<Http1Answer> {
    const conn = this.take() ?? (await this.open());
    conn.socket.ref();
    return conn.send(`${method} ${path} HTTP/1.1\r\n${this.headers}content-length: ${byteLength}\r\n\r\n`, parts);
  }

  private take(): Connection | undefined {
    const now = performance.now();
    for (let c = this.idle.pop(); c; c = this.idle.pop()) {
      if (!c.closed && now - c.idleSince < IDLE_MS) return c;
      c.socket.destroy();
    }
    return undefined;
  }

  private open(): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: this.host, port: this.port });
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(
          new Connection(socket, (c, reusable) => {
            const i = this.idle.indexOf(c);
            if (i >= 0) this.idle.splice(i, 1);
            if (!reusable) return;
            c.idleSince = performance.now();
            // An idle socket does not keep the process alive (as node:http's agent does).
            c.socket.unref();
            this.idle.push(c);
          }),
        );
      });
    });
  }
}
