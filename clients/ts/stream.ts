// The client end of GET /v1/stream: one WebSocket (clients/ts/websocket.ts),
// msgpack frames, each request answered by the frame with its id, in order.
// A request's parts (the caller's tensors as they are) are copied once,
// straight after the frame header, into a warm buffer; an answer's arrays
// are views of its frame (read once from the socket into a buffer of its
// own), not copies.
import { joinParts, packParts, unpackView } from './msgpack-parts.js';
import { attendReply, batchResults, KvrecallRequestError, type AttendBody, type AttendReply, type BatchResult, type BatchStep, type OutOf, type WireAnswer, type WireResult } from './client.js';
import { HandshakeRefused, WsClient, type WsOptions } from './websocket.js';

/** Request frames from this size up go through `spare`, a buffer kept warm (fresh ones cost their page faults each time). */
const POOLED_FRAME = 1 << 16;

type Pending = { resolve: (frame: Record<string, unknown>) => void; reject: (e: Error) => void };

export class KvrecallStream {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed?: Error;
  private spare?: Buffer;
  private ws!: WsClient;

  private constructor() {}

  /** `opts.maxMessage`: the largest answer taken (256 MiB unless given); a larger one fails every pending request. */
  static async open(url: string, authorization?: string, opts: WsOptions = {}): Promise<KvrecallStream> {
    const s = new KvrecallStream();
    try {
      s.ws = await WsClient.open(url + '/v1/stream', authorization ? { authorization } : {}, {
        message: (data) => s.onMessage(data),
        closed: (e) => s.fail(e),
      }, opts);
    } catch (e) {
      if (e instanceof HandshakeRefused) throw new KvrecallRequestError(e.status, 'refused', `stream refused: ${e.status}`);
      throw e;
    }
    return s;
  }

  async attend<B extends AttendBody>(session: string, body: B): Promise<AttendReply<OutOf<B>>> {
    const frame = await this.request({ ...(body as AttendBody), session });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return attendReply<OutOf<B>>(frame as unknown as WireAnswer);
  }

  /** Results in order (out and lse views of the answer frame); `ms` is the server's time for the whole batch. */
  async attendBatch<S extends BatchStep>(layer: number, steps: S[]): Promise<BatchResult<OutOf<S>>[] & { ms?: number }> {
    const frame = await this.request({ layer, steps });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return Object.assign(batchResults<OutOf<S>>(frame.results as WireResult[]), { ms: (frame.stats as { ms: number } | undefined)?.ms });
  }

  /** Sends raw bytes as one frame (for tests of bad frames). */
  sendRaw(bytes: Uint8Array): void {
    this.ws.sendBytes(bytes);
  }

  close(): void {
    this.ws.close();
    this.fail(new Error('stream closed'));
  }

  private onMessage(data: Uint8Array): void {
    let frame: unknown;
    try {
      frame = unpackView(data);
    } catch (e) {
      return this.protocolError(`undecodable answer: ${(e as Error).message}`);
    }
    if (typeof frame !== 'object' || frame === null || Array.isArray(frame) || frame instanceof Uint8Array) return this.protocolError('an answer is not a map');
    this.answer(frame as Record<string, unknown>);
  }

  /** The server broke the protocol: every request fails with why, and the connection closes (1002). */
  private protocolError(why: string): void {
    this.fail(new Error(`stream: protocol error: ${why}`));
    this.ws.close(1002);
  }

  private answer(frame: Record<string, unknown>): void {
    const p = this.pending.get(frame.id as number);
    if (!p) return;
    this.pending.delete(frame.id as number);
    p.resolve(frame);
  }

  private request(body: Record<string, unknown>): Promise<Record<string, unknown>> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const parts = packParts({ ...body, id });
      const fill = (payload: Uint8Array) => void joinParts(parts, payload);
      try {
        if (parts.byteLength < POOLED_FRAME) return this.ws.send(parts.byteLength, fill);
        const room = this.spare;
        this.spare = undefined;
        this.ws.send(parts.byteLength, fill, room ?? Buffer.allocUnsafeSlow(2 ** Math.ceil(Math.log2(parts.byteLength + 14))), (buf) => {
          if (!this.spare || this.spare.byteLength < buf.byteLength) this.spare = buf;
        });
      } catch (e) {
        this.pending.delete(id);
        reject(e as Error);
      }
    });
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
