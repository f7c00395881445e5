// The client end of GET /v1/stream: one WebSocket (clients/ts/websocket.ts),
// msgpack frames, each request answered by the frame with its id, in order.
// A request's parts (the caller's tensors as they are) are copied once,
// straight after the frame header, into a warm buffer; an answer's arrays
// are views of its frame (read once from the socket into a buffer of its
// own), not copies. With a shared-memory segment attached (attachShm,
// clients/ts/shm.ts) attendStacked sends a running batch's step as one
// stacked frame whose tensors are in the segment (clients/ts/stacked.ts).
import { joinParts, packInto, packParts, unpackView } from './msgpack-parts.js';
import { attendReply, batchResults, KvrecallRequestError, type AttendBody, type AttendReply, type BatchResult, type BatchStep, type KvUploadBody, type KvUploadStats, type OutOf, type Tensor, type WireAnswer, type WireResult } from './client.js';
import { HandshakeRefused, WsClient, type WsOptions } from './websocket.js';
import { AttachRetry, SHM_DIR, ShmFile } from './shm.js';
import { checkStacked, stackedSteps, StackedPlan, stackResults, type StackedOptions, type StackedOut, type StackedReply } from './stacked.js';

/** Request frames from this size up go through `spares`, buffers kept warm (fresh ones cost their page faults each time). */
const POOLED_FRAME = 1 << 16;
/** Warm frame buffers kept: one per upload a preload keeps in flight. */
const SPARES = 4;
/** Stacked frames kept, one per form (layer, sessions, dtypes, shapes); a caller cycling through more starts over. */
const PLANS = 4096;

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
  /** The shared-memory segment attached (attachShm), its stacked frames by form, and the last request that uses it. */
  private seg?: ShmFile;
  private plans = new Map<string, StackedPlan>();
  private segTail: Promise<unknown> = Promise.resolve();
  /** Attaches not yet settled: a stacked call made meanwhile waits its turn for the segment rather than going in bytes. */
  private attaching = 0;
  /** A refused attach, tried again by a later attendStacked (clients/ts/shm.ts). */
  private readonly retry = new AttachRetry();

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
   * Makes a shared-memory segment of `bytes` (a positive multiple of 4) as
   * a file in `dir` (the server's --shm-dir, default /dev/shm; O_EXCL, mode
   * 0600, a random name), attaches it to this stream, and unlinks the file
   * once the server has answered (its mapping and this stream's descriptor
   * keep the pages; the descriptor closes with the stream). A refusal (the
   * server's --shm-dir off or another directory, another host, another
   * owner, over its caps) rejects with KvrecallRequestError (422
   * `invalid`, the server's why) and removes the file; the stream goes on,
   * with the segment it had if any. Where the file cannot be made, the fs
   * error. Either way attendStacked tries the same attach again later, now
   * and then (AttachRetry: 8 requests on, the wait doubling up to 1024),
   * until one of at least that size is attached: a refusal need not last.
   * A second attach replaces the first once the requests using it are
   * answered.
   */
  attachShm(opts: { bytes: number; dir?: string }): Promise<void> {
    this.attaching++;
    return this.onSegment(async () => {
      if (this.closed) throw this.closed;
      const dir = opts.dir ?? SHM_DIR;
      let file: ShmFile;
      try {
        file = ShmFile.create(opts.bytes, dir);
      } catch (e) {
        // A bad size is the caller's to fix; a file that cannot be made now (a full tmpfs) may be made later.
        if (!(e instanceof TypeError)) this.retry.refused(opts.bytes, dir, this.nextId);
        throw e;
      }
      let frame: Record<string, unknown>;
      try {
        frame = await this.request({ shm: { name: file.name, bytes: file.bytes } }, { view: true, small: true });
      } catch (e) {
        file.close();
        throw e;
      }
      // Mapped by both, or refused: the name is no longer needed.
      file.unlink();
      if (frame.error || this.closed) {
        file.close();
        if (!frame.error) throw this.closed;
        this.retry.refused(opts.bytes, dir, this.nextId);
        throw requestError(frame.error as { code: string; message: string });
      }
      this.seg?.close();
      this.seg = file;
      this.plans.clear();
      this.retry.attached(file.bytes);
    }).finally(() => this.attaching--);
  }

  /** The segment attached (its name and size), if any. */
  get shm(): { name: string; bytes: number } | undefined {
    return this.seg && { name: this.seg.name, bytes: this.seg.bytes };
  }

  /**
   * One layer's step of a running batch as whole arrays (clients/ts/stacked.ts):
   * q [n, qHeads, d], k and v [n, kvHeads, d] (or neither), positions n
   * integers (or none), one session per row. Through the segment: q, k, v
   * and the positions written into it, one stacked frame, out [n, qHeads,
   * d] and lse [n, qHeads] read back into `opts.out` and `opts.lse` when
   * given (else new arrays). `errors` lists the failed steps as [index,
   * code, message], their rows NaN; the others are answered. Without a
   * segment, or where the batch does not fit it, the same steps go as
   * attendBatch's, in bytes: the same answers. Where the stream's attach
   * was refused, a call now and then tries it again first (attachShm). Arrays that cannot be the
   * batch reject with a TypeError (or RangeError) before anything is sent;
   * a batch the server refuses whole, with KvrecallRequestError. Requests
   * through the segment run one at a time (each writes its tensors from the
   * segment's start), so calls made at once are sent in turn: a call's
   * arrays are read when its turn comes and its out and lse written when
   * it is answered, so leave them unchanged until it settles.
   */
  async attendStacked<O extends StackedOptions = Record<never, never>>(layer: number, sessions: readonly string[], q: Tensor, k?: Tensor, v?: Tensor, positions?: Int32Array | readonly number[], opts?: O): Promise<StackedReply<StackedOut<O>>> {
    const c = checkStacked(layer, sessions, q, k, v, positions, opts ?? {});
    const again = this.closed ? undefined : this.retry.due(this.nextId, this.seg?.bytes ?? 0);
    // Queued on the segment before this call, which then waits its turn behind it (attaching > 0); a refusal is counted by the retry, and this call goes on as it would have.
    if (again) this.attachShm(again).catch(() => undefined);
    const byBytes = async () => stackResults<StackedOut<O>>(await this.attendBatch(layer, stackedSteps(c)), c, opts?.out, opts?.lse);
    if (!this.seg && this.attaching === 0) return byBytes();
    return this.onSegment(async () => {
      const seg = this.seg;
      if (!seg) return byBytes();
      let plan = this.plans.get(c.key);
      if (!plan || !plan.serves(sessions)) {
        if (this.plans.size >= PLANS) this.plans.clear();
        plan = new StackedPlan(c, seg.bytes);
        this.plans.set(c.key, plan);
      }
      if (!plan.fits) return byBytes();
      plan.write(seg, c);
      const frame = await this.request(plan.body, { view: true, small: true });
      if (frame.error) throw requestError(frame.error as { code: string; message: string });
      return plan.read<StackedOut<O>>(seg, frame, c, opts?.out, opts?.lse);
    });
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

  /** Closes the connection; the segment's descriptor (and its file, if still named) with it. */
  close(): void {
    this.ws.close();
    this.fail(new Error('stream closed'));
    this.seg?.close();
    this.seg = undefined;
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

  /** Runs `f` once the requests before it that use the segment are answered and read (each writes from the segment's start). */
  private onSegment<T>(f: () => Promise<T>): Promise<T> {
    const run = this.segTail.then(f);
    this.segTail = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
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
