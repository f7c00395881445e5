// GET /v1/stream: a WebSocket per client connection for decode steps. Each
// binary frame is msgpack: one attend `{id, session, layer, q, k?, v?,
// scale?, position?, return?}`, one batch `{id, layer, steps: [...]}` (or
// stacked, its tensors whole arrays in the segment: `{id, layer, sessions,
// q, k?, v?, positions?, into}`, api/stacked.ts), or
// one document upload `{id, document, layer, start, k, v, q?, queryStride?}`
// (the body of POST /v1/documents/:doc/kv, answered as it is: `{id, layer,
// tokens, stats}`; a preload sends its uploads one behind another here, and
// a large one is read straight from the socket: api/websocket.ts);
// each gets one answer frame with the same id, in the order the frames came
// (work on different sessions runs side by side; only the answers queue).
// `{id, shm: {name, bytes}}` attaches a shared-memory segment to the stream
// (answered `{id, shm: {bytes}}`): the frames' tensors may then be in it
// and answers written into it (api/shm.ts; DESIGN.md "Wire protocol"). A
// bad frame gets an error frame with its id when it has one; the connection
// and the sessions survive it, and a client that goes away leaves its
// sessions as they are.
//
// The WebSocket itself is api/websocket.ts (our own framing; Hono's Node
// helper needs @hono/node-server 1.x, and `ws` gathered every message into
// a fresh buffer). A request's tensors are read as views of its message;
// its answer is packed straight into its frame.
import type { IncomingMessage, Server } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { DEFAULTS } from '../core/config.js';
import { malformed, notFound } from '../core/errors.js';
import { joinParts, packParts } from '../core/msgpack-parts.js';
import { MsgpackError, unpackView } from '../core/msgpack-parts-decode.js';
import type { Documents } from '../engine/documents.js';
import type { Sessions } from '../engine/sessions.js';
import { attendAnswer, batchAnswer } from './attend-answer.js';
import { attendBatchFramed, HEADER_ROOM, packAttendAnswer, PackedFrame, ReadyFrame, STEP_TENSORS } from './batch-pack.js';
import { SharedFrame, ShmPool, ShmStream } from './shm.js';
import { attendStacked, runStacked, StackedForms } from './stacked.js';
import { tokenAccepted } from './auth.js';
import { errorOf } from './errors.js';
import type { Metrics } from './metrics.js';
import { LoopPoller } from './loop-poll.js';
import { CLOSE_ERROR, WsConnection, type WsLimits } from './websocket.js';
import { acceptHandshake, handshakeProblem } from './ws-handshake.js';

export interface StreamOptions {
  token?: string;
  /** Largest message accepted (the body limit of the HTTP routes). */
  maxFrame: number;
  /** A message begun must progress within this long (default 30 s). */
  progressMs?: number;
  /** Open streams at most; more are refused with 503 (default 1024). */
  maxConnections?: number;
  /** Per connection: messages awaiting answers, and answer bytes unsent, above which reading pauses (defaults 16, 4 MiB). */
  maxInFlight?: number;
  highWater?: number;
  /** Where document upload frames go (without it they are answered not_found). */
  documents?: Pick<Documents, 'appendKv'>;
  /** Where clients make their shared-memory segments (--shm-dir); undefined: attaching one is refused. */
  shmDir?: string;
  /** Bytes of segments mapped at most for one stream and for all (--shm-stream-bytes, --shm-total-bytes; default: core/config.ts's). */
  shmStreamBytes?: number;
  shmTotalBytes?: number;
  /** Microseconds the event loop keeps polling after an answer goes out (--poll-us; api/loop-poll.ts); 0 or absent: it sleeps. */
  pollUs?: number;
}

export interface StreamHandle {
  close(): void;
  /** What keeps the loop polling after answers (--poll-us). */
  readonly poller: LoopPoller;
  /** The open connections (for tests). */
  connections(): ReadonlySet<WsConnection>;
}

/** Serves the stream on `server`; close() ends every open stream (their sessions stay). */
export function attachStream(server: Server, sessions: Sessions, metrics: Metrics, opts: StreamOptions): StreamHandle {
  const open = new Set<WsConnection>();
  const poller = new LoopPoller((opts.pollUs ?? 0) / 1000);
  const shmPool = new ShmPool(opts.shmDir, opts.shmStreamBytes ?? DEFAULTS.shmStreamBytes, opts.shmTotalBytes ?? DEFAULTS.shmTotalBytes);
  // What --shm-total-bytes is measured against: an operator sees how near the cap the streams are (and a client's refused attach why).
  metrics.gauges.set('shm_mapped_bytes', () => shmPool.mapped);
  const limits: WsLimits = {
    maxMessage: opts.maxFrame,
    progressMs: opts.progressMs ?? 30_000,
    maxInFlight: opts.maxInFlight ?? 16,
    highWater: opts.highWater ?? 4 << 20,
  };
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    // Node takes its own 'error' handler off before 'upgrade': without one, a peer's reset (even after a refusal) is an uncaught error.
    socket.on('error', () => socket.destroy());
    if (open.size >= (opts.maxConnections ?? 1024)) return refuse(socket, 503, 'Service Unavailable', 'too many open streams');
    const path = new URL(req.url ?? '/', 'http://localhost').pathname;
    if (path !== '/v1/stream') return refuse(socket, 404, 'Not Found');
    if (!tokenAccepted(opts.token, req.headers.authorization)) return refuse(socket, 401, 'Unauthorized');
    const problem = handshakeProblem(req);
    // A version we do not speak: 426 and the one we do (RFC 6455 4.4), so the client can retry with it.
    if (problem?.startsWith('Sec-WebSocket-Version')) return refuse(socket, 426, 'Upgrade Required', problem, 'sec-websocket-version: 13\r\n');
    if (problem) return refuse(socket, 400, 'Bad Request', problem);
    acceptHandshake(req, socket as Socket);
    const shm = new ShmStream(shmPool);
    const conn: WsConnection = new WsConnection(
      socket as Socket,
      limits,
      serve(() => conn, sessions, opts.documents, metrics, shm, poller, () => {
        // The segment is unmapped once the frames still running are done with it (api/shm.ts).
        shm.close();
        open.delete(conn);
      }),
    );
    open.add(conn);
    conn.feed(head);
  });
  return { close: () => open.forEach((c) => c.terminate()), connections: () => open, poller };
}

function refuse(socket: Duplex, status: number, reason: string, why = '', headers = ''): void {
  socket.end(`HTTP/1.1 ${status} ${reason}\r\nconnection: close\r\n${headers}content-type: text/plain\r\ncontent-length: ${Buffer.byteLength(why)}\r\n\r\n${why}`);
}

function serve(conn: () => WsConnection, sessions: Sessions, documents: StreamOptions['documents'], metrics: Metrics, shm: ShmStream, poller: LoopPoller, closed: () => void): ConstructorParameters<typeof WsConnection>[2] {
  // Answers owed, in the order their frames came: each goes out once it and
  // every one before it are ready. (A promise chain per answer cost a few
  // microtask turns and promises on every decode step.)
  const owed: Owed[] = [];
  // The stacked frames' forms this stream ran (api/stacked.ts).
  const forms = new StackedForms();
  const flush = () => {
    // The client's next call comes soon after an answer: poll for it rather than sleep (--poll-us).
    if (owed.length > 0 && owed[0].ready) poller.extend();
    while (owed.length > 0 && owed[0].ready) {
      const { frame, release, unuse } = owed.shift()!;
      let sent = false;
      try {
        // A rejected handle() (nothing should reject there) or a send that threw: this connection closes, the process and the other streams go on.
        if (frame === undefined) conn().close(CLOSE_ERROR, 'the server failed to send an answer');
        else sent = send(conn(), frame);
      } catch {
        conn().close(CLOSE_ERROR, 'the server failed to send an answer');
      } finally {
        // The frame is packed: nothing holds a view of the request's bytes now (an id may have been one), nor of the segment.
        release();
        unuse?.();
        // A batch's frame not sent (the connection is closing): its buffer goes back.
        if (frame instanceof ReadyFrame && !sent) frame.release();
      }
    }
  };
  return {
    message: (data, binary, release, readMs) => {
      const slot: Owed = { ready: false, release };
      owed.push(slot);
      handle(data, binary, sessions, documents, metrics, readMs, shm, forms, slot).then(
        (frame) => {
          slot.frame = frame;
          slot.ready = true;
          flush();
        },
        () => {
          slot.ready = true;
          flush();
        },
      );
    },
    // In-flight steps finish and their answers are dropped (send skips a closed connection).
    closed,
  };
}

type Answer = Record<string, unknown> | PackedFrame | ReadyFrame;

/** An upload's tensors that may be in shared memory. */
const UPLOAD_TENSORS = ['k', 'v', 'q'] as const;

interface Owed {
  ready: boolean;
  frame?: Answer;
  release: () => void;
  /** The frame is done with the stream's segment (ShmSegment.use). */
  unuse?: () => void;
}

/**
 * One answer frame: written already (a batch's, its header put in front),
 * packed on demand (an attend's), or its parts (tensors as the result's own
 * arrays) copied once, straight after the frame header. True when a
 * ReadyFrame was handed to the socket (which gives its buffer back).
 */
function send(conn: WsConnection, frame: Answer): boolean {
  if (!conn.open) return false;
  if (frame instanceof ReadyFrame) {
    conn.sendFramed(frame.buf, HEADER_ROOM, frame.byteLength, frame.release);
    return true;
  }
  if (frame instanceof PackedFrame) conn.sendBinary(frame.byteLength, frame.fill);
  else {
    const parts = packParts(frame);
    conn.sendBinary(parts.byteLength, (payload) => joinParts(parts, payload));
  }
  return false;
}

/** A frame's shared memory when the stream has no segment: every reference to one is refused. */
const NO_SHARED = new SharedFrame(undefined);

async function handle(data: Uint8Array, isBinary: boolean, sessions: Sessions, documents: StreamOptions['documents'], metrics: Metrics, readMs: number, shm: ShmStream, forms: StackedForms, slot: Owed): Promise<Answer> {
  let id: unknown;
  try {
    if (!isBinary) throw malformed('frames are binary msgpack');
    const t0 = performance.now();
    // A stacked frame of a form this stream ran before on its segment (the same bytes but the id): run on the form kept.
    const current = shm.segment;
    const known = current && forms.match(data, current);
    if (known) {
      id = known.id;
      slot.unuse = current.use();
      return await runStacked(sessions, known.form, id, metrics);
    }
    let frame: unknown;
    try {
      frame = unpackView(data);
    } catch (e) {
      // What the frame's map held before the bad byte may name its id: the answer carries it, so the client can match it.
      if (e instanceof MsgpackError) id = e.partial?.id;
      throw malformed(`frame is not valid msgpack: ${(e as Error).message}`);
    }
    if (typeof frame !== 'object' || frame === null || Array.isArray(frame) || frame instanceof Uint8Array) throw malformed('a frame is a map');
    const body = frame as Record<string, unknown>;
    id = body.id;
    if (body.shm !== undefined) {
      // Replaces any segment before: frames already running keep theirs (it is unmapped once they are done).
      return { id, shm: { bytes: shm.attach(body.shm).byteLength } };
    }
    // The segment as this frame came (its references resolve synchronously, before anything else can attach another), in use until the answer is sent.
    const seg = shm.segment;
    if (seg) slot.unuse = seg.use();
    const shared = seg ? new SharedFrame(seg) : NO_SHARED;
    if (body.document !== undefined) {
      if (typeof body.document !== 'string') throw malformed('an upload frame names its document');
      if (!documents) throw notFound('document uploads are not served on this stream');
      shared.resolve(body, UPLOAD_TENSORS);
      // The frame's tensors are views of its message, released only once this answer is sent.
      return { id, ...(await documents.appendKv(body.document, body, { bytes: data.byteLength, readMs, decodeMs: performance.now() - t0 })) };
    }
    // A stacked batch (its tensors whole arrays in the segment): api/stacked.ts.
    if (body.sessions !== undefined) return await attendStacked(sessions, body, id, metrics, shared, seg && ((form) => forms.keep(data, seg, form)));
    if (body.steps !== undefined) {
      // Each step's answer is written into the frame (and observed) as the step finishes, while it is fresh in cache.
      const { frame, results, ms, refs } = await attendBatchFramed(sessions, body, id, metrics, shared);
      return frame ?? { id, results: results.map((r, i) => ({ ...batchAnswer(r, errorOf), ...(r.status === 'fulfilled' && refs[i]) })), stats: { ms } };
    }
    if (typeof body.session !== 'string') throw malformed('an attend frame names its session');
    shared.resolve(body, STEP_TENSORS);
    const into = body.into === undefined ? undefined : shared.into(body, sessions.get(body.session).model);
    const res = await sessions.attend(body.session, body);
    metrics.observeAttend(res.stats.ms);
    const refs = into === undefined ? undefined : shared.write(into, res);
    return packAttendAnswer(id, res, refs) ?? { id, ...attendAnswer(res), ...refs };
  } catch (e) {
    const { code, message } = errorOf(e);
    return { id, error: { code, message } };
  }
}
