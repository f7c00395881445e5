// The client end of GET /v1/stream: one WebSocket (clients/ts/websocket.ts),
// msgpack frames, each request answered by the frame with its id, in order.
// A request's parts (the caller's tensors as they are) are copied once,
// straight after the frame header, into a warm buffer; an answer's arrays
// are views of its frame (read once from the socket into a buffer of its
// own), not copies.
import { joinParts, packInto, packParts, unpackView } from './msgpack-parts.js';
import { attendReply, batchResults, KvrecallRequestError, type AttendBody, type AttendReply, type BatchResult, type BatchStep, type KvUploadBody, type KvUploadStats, type OutOf, type WireAnswer, type WireResult } from './client.js';
import { HandshakeRefused, WsClient, type WsOptions } from './websocket.js';

/** Request frames from this size up go through `spares`, buffers kept warm (fresh ones cost their page faults each time). */
const POOLED_FRAME = 1 << 16;
/** Warm frame buffers kept: one per upload a preload keeps in flight. */
const SPARES = 4;

/**
 * `view`: the request copies out all it keeps of its answer as soon as it is
 * resolved (in the same turn of microtasks), so the answer may be read as a
 * view of the warm read buffer.
 */
type Pending = { resolve: (frame: Record<string, unknown>) => void; reject: (e: Error) => void; view?: boolean };

export interface StreamOptions extends WsOptions {
  /**
   * After each request, keep this process's event loop polling for up to
   * this many ms while an answer is owed (a setImmediate per turn, so libuv
   * polls the socket with a zero timeout) before letting it sleep: an
   * answer that lands within it is read at once, not after the thread is
   * woken from idle. Costs one core busy for the wait; for a decode loop
   * whose calls take about a millisecond, on a host with a core to spare.
   * 0 (the default): sleep at once. A wait longer than this sleeps as
   * before, so a long call does not keep a core spinning.
   */
  spinMs?: number;
}

export class KvrecallStream {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  /** Places of raw frames without an id among the pending (negative, so never a request's id). */
  private rawId = -1;
  private closed?: Error;
  private spares: Buffer[] = [];
  private ws!: WsClient;
  /** Whether a setImmediate chain polls now (opts.spinMs), and until when (performance.now()). */
  private spinning = false;
  private spinUntil = 0;

  private constructor(private readonly spinMs: number) {}

  /** `opts.maxMessage`: the largest answer taken (256 MiB unless given); a larger one fails every pending request. `opts.spinMs`: see StreamOptions. */
  static async open(url: string, authorization?: string, opts: StreamOptions = {}): Promise<KvrecallStream> {
    const s = new KvrecallStream(Math.max(0, opts.spinMs ?? 0));
    try {
      s.ws = await WsClient.open(url + '/v1/stream', authorization ? { authorization } : {}, {
        message: (data) => void s.onMessage(data, false),
        messageView: (data) => s.onMessage(data, true),
        closed: (e) => s.fail(e),
      }, opts);
    } catch (e) {
      if (e instanceof HandshakeRefused) throw new KvrecallRequestError(e.status, 'refused', `stream refused: ${e.status}`);
      throw e;
    }
    return s;
  }

  async attend<B extends AttendBody>(session: string, body: B): Promise<AttendReply<OutOf<B>>> {
    // Its answer's out, lse and selection are copied out straight after the await (attendReply); kv tensors are passed on as views, so not then.
    const view = !(body.return as unknown[] | undefined)?.includes('kv');
    const frame = await this.request({ ...(body as AttendBody), session }, { view, small: true });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return attendReply<OutOf<B>>(frame as unknown as WireAnswer);
  }

  /** Results in order (out and lse views of the answer frame); `ms` is the server's time for the whole batch. */
  async attendBatch<S extends BatchStep>(layer: number, steps: S[]): Promise<BatchResult<OutOf<S>>[] & { ms?: number }> {
    const frame = await this.request({ layer, steps });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return Object.assign(batchResults<OutOf<S>>(frame.results as WireResult[]), { ms: (frame.stats as { ms: number } | undefined)?.ms });
  }

  /**
   * One document upload, the body of KvrecallClient.uploadDocumentKv. Its
   * tensors are copied into the frame before this returns, so the caller
   * may reuse them at once and send the next upload before this one's
   * answer (answers come in order; the server appends in order).
   */
  async uploadDocumentKv(document: string, body: KvUploadBody): Promise<{ layer: number; tokens: number; stats?: KvUploadStats }> {
    const frame = await this.request({ ...body, document });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return { layer: frame.layer as number, tokens: frame.tokens as number, stats: frame.stats as KvUploadStats | undefined };
  }

  /**
   * As uploadDocumentKv, the tensors written to the socket as they are (no
   * copy into the frame): `written` settles once the socket has taken
   * them, and until then they must not change; `answer` is the server's.
   */
  sendDocumentKv(document: string, body: KvUploadBody): { written: Promise<void>; answer: Promise<{ layer: number; tokens: number; stats?: KvUploadStats }> } {
    let written: Promise<void> = Promise.resolve();
    const write = (parts: ReturnType<typeof packParts>) => {
      let done!: (e?: Error | null) => void;
      written = new Promise((resolve, reject) => (done = (e) => (e ? reject(e) : resolve())));
      try {
        this.ws.sendParts(parts.parts, parts.byteLength, done);
      } catch (e) {
        done(e as Error);
        throw e;
      }
    };
    const answer = this.request({ ...body, document }, { write }).then((frame) => {
      if (frame.error) throw requestError(frame.error as { code: string; message: string });
      return { layer: frame.layer as number, tokens: frame.tokens as number, stats: frame.stats as KvUploadStats | undefined };
    });
    return { written, answer };
  }

  /** Sends raw bytes as one frame (for tests of bad frames). */
  sendRaw(bytes: Uint8Array): void {
    // A frame without a numeric id is answered by an error without one, in
    // its turn: it holds a place among the pending requests, so that answer
    // is not taken for the oldest real request's.
    let id: unknown;
    try {
      const frame = unpackView(bytes) as { id?: unknown } | null;
      id = typeof frame === 'object' && frame !== null ? frame.id : undefined;
    } catch {
      id = undefined;
    }
    if (typeof id !== 'number') this.pending.set(this.rawId--, { resolve: () => undefined, reject: () => undefined });
    this.ws.sendBytes(bytes);
  }

  /** A WebSocket ping on this stream, resolved on its pong: the bare round trip, no request handled. */
  ping(): Promise<void> {
    return this.ws.ping();
  }

  close(): void {
    this.ws.close();
    this.fail(new Error('stream closed'));
  }

  /** `view`: data is a view of the warm read buffer (see WsEvents.messageView); false when it must be copied and given again. */
  private onMessage(data: Uint8Array, view: boolean): boolean {
    // Answers come in order: the oldest pending request's is most likely this one.
    if (view && !this.pending.values().next().value?.view) return false;
    let frame: unknown;
    try {
      frame = unpackView(data);
    } catch (e) {
      this.protocolError(`undecodable answer: ${(e as Error).message}`);
      return true;
    }
    if (typeof frame !== 'object' || frame === null || Array.isArray(frame) || frame instanceof Uint8Array) {
      this.protocolError('an answer is not a map');
      return true;
    }
    return this.answer(frame as Record<string, unknown>, view);
  }

  /** The server broke the protocol: every request fails with why, and the connection closes (1002). */
  private protocolError(why: string): void {
    this.fail(new Error(`stream: protocol error: ${why}`));
    this.ws.close(1002);
  }

  /** False (nothing done) when the frame is a view and its request keeps views of it. */
  private answer(frame: Record<string, unknown>, view: boolean): boolean {
    // An error answer without an id is for a frame the server could not
    // decode (so could not read its id); answers come in order, so it is the
    // oldest request's.
    const id = typeof frame.id === 'number' ? frame.id : frame.error !== undefined ? this.pending.keys().next().value : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) return true;
    if (view && !p.view) return false;
    this.pending.delete(id);
    p.resolve(frame);
    return true;
  }

  /**
   * `body` is the caller's own object (its id is set here). `write`: sends
   * the packed frame itself (else it is copied into a warm frame buffer and
   * sent); `small`: a decode step's request, packed straight into the
   * connection's warm buffer when it fits; `view`: see Pending.
   */
  private request(body: Record<string, unknown>, { write, view = false, small = false }: { write?: (parts: ReturnType<typeof packParts>) => void; view?: boolean; small?: boolean } = {}): Promise<Record<string, unknown>> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.nextId++;
    body.id = id;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, view });
      if (this.spinMs > 0) this.poll();
      // No scratch, no parts, no join: the request packed after room for its frame header (its size is not known before).
      if (small)
        try {
          if (this.ws.sendPacked((target, at) => packInto(body, target, at), POOLED_FRAME)) return;
        } catch (e) {
          this.pending.delete(id);
          return reject(e as Error);
        }
      const parts = packParts(body);
      if (write) {
        try {
          write(parts);
        } catch (e) {
          this.pending.delete(id);
          reject(e as Error);
        }
        return;
      }
      const fill = (payload: Uint8Array) => void joinParts(parts, payload);
      try {
        if (parts.byteLength < POOLED_FRAME) return this.ws.send(parts.byteLength, fill);
        const need = parts.byteLength + 14;
        const at = this.spares.findIndex((b) => b.byteLength >= need);
        const room = at >= 0 ? this.spares.splice(at, 1)[0] : Buffer.allocUnsafeSlow(2 ** Math.ceil(Math.log2(need)));
        this.ws.send(parts.byteLength, fill, room, (buf) => {
          this.spares.push(buf);
          if (this.spares.length > SPARES) this.spares.sort((a, b) => b.byteLength - a.byteLength).pop();
        });
      } catch (e) {
        this.pending.delete(id);
        reject(e as Error);
      }
    });
  }

  /** opts.spinMs: one setImmediate per loop turn while an answer is owed, for up to spinMs after the latest request, so the loop polls (zero timeout) rather than sleeps. */
  private poll(): void {
    this.spinUntil = performance.now() + this.spinMs;
    if (this.spinning) return;
    this.spinning = true;
    const turn = () => {
      if (this.pending.size > 0 && performance.now() < this.spinUntil) setImmediate(turn);
      else this.spinning = false;
    };
    setImmediate(turn);
  }

  private fail(e: Error): void {
    this.closed ??= e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}

function requestError(e: { code: string; message: string }): KvrecallRequestError {
  const status = { malformed: 400, unauthorized: 401, not_found: 404, conflict: 409, too_large: 413, invalid: 422, over_budget: 503, unavailable: 503 }[e.code] ?? 500;
  return new KvrecallRequestError(status, e.code, e.message);
}
