// The client end of GET /v1/stream: one WebSocket, msgpack frames, each
// request answered by the frame with its id, in order. A request's parts
// (the caller's tensors as they are) are copied once into a warm buffer and
// sent unmasked-in-effect (a zero mask: masking guards browsers' proxies,
// and would cost a fresh copy of every frame); answers are copied out of
// the frame once.
import { WebSocket } from 'ws';
import { joinParts, packParts, unpackView } from './msgpack-parts.js';
import { attendReply, batchResults, KvrecallRequestError, type AttendBody, type AttendReply, type BatchResult, type BatchStep, type OutOf, type WireAnswer, type WireResult } from './client.js';

/** Request frames from this size up go through `spare`, a buffer kept warm (fresh ones cost their page faults each time). */
const POOLED_FRAME = 1 << 16;

type Pending = { resolve: (frame: Record<string, unknown>) => void; reject: (e: Error) => void };

export class KvrecallStream {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed?: Error;
  private spare?: Buffer;

  private constructor(private readonly ws: WebSocket) {
    ws.on('message', (data: Buffer) => {
      let frame: Record<string, unknown>;
      try {
        frame = unpackView(data) as Record<string, unknown>;
      } catch (e) {
        return this.fail(new Error(`stream: undecodable answer: ${(e as Error).message}`));
      }
      const p = this.pending.get(frame.id as number);
      if (!p) return;
      this.pending.delete(frame.id as number);
      p.resolve(frame);
    });
    ws.on('close', () => this.fail(new Error('stream closed')));
    ws.on('error', (e) => this.fail(e));
  }

  static open(url: string, authorization?: string): Promise<KvrecallStream> {
    const ws = new WebSocket(url.replace(/^http/, 'ws') + '/v1/stream', {
      perMessageDeflate: false,
      headers: authorization ? { authorization } : {},
      generateMask: (mask) => void mask.fill(0),
    });
    return new Promise((resolve, reject) => {
      ws.once('open', () => resolve(new KvrecallStream(ws)));
      ws.once('error', reject);
      ws.once('unexpected-response', (_req, res) => reject(new KvrecallRequestError(res.statusCode ?? 0, 'refused', `stream refused: ${res.statusCode}`)));
    });
  }

  async attend<B extends AttendBody>(session: string, body: B): Promise<AttendReply<OutOf<B>>> {
    const frame = await this.request({ ...(body as AttendBody), session });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return attendReply<OutOf<B>>(frame as unknown as WireAnswer);
  }

  /** Results in order (out and lse views of one buffer for the batch); `ms` is the server's time for the whole batch. */
  async attendBatch<S extends BatchStep>(layer: number, steps: S[]): Promise<BatchResult<OutOf<S>>[] & { ms?: number }> {
    const frame = await this.request({ layer, steps });
    if (frame.error) throw requestError(frame.error as { code: string; message: string });
    return Object.assign(batchResults<OutOf<S>>(frame.results as WireResult[]), { ms: (frame.stats as { ms: number } | undefined)?.ms });
  }

  /** Sends raw bytes as one frame and waits for the next answer (for tests of bad frames). */
  sendRaw(bytes: Uint8Array): void {
    this.ws.send(bytes);
  }

  close(): void {
    this.ws.close();
  }

  private request(body: Record<string, unknown>): Promise<Record<string, unknown>> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.send(packParts({ ...body, id }));
    });
  }

  private send(parts: ReturnType<typeof packParts>): void {
    if (parts.byteLength < POOLED_FRAME) return this.ws.send(joinParts(parts, Buffer.allocUnsafe(parts.byteLength)));
    const buf = this.spare && this.spare.byteLength >= parts.byteLength ? this.spare : Buffer.allocUnsafeSlow(2 ** Math.ceil(Math.log2(parts.byteLength)));
    this.spare = undefined;
    this.ws.send(joinParts(parts, buf), () => {
      if (!this.spare || this.spare.byteLength < buf.byteLength) this.spare = buf;
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
