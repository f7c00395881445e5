// POST /v1/sessions/:sid/attend and POST /v1/attend (a batch), served
// straight from node:http for the common case (a msgpack body of declared
// length, answered in msgpack); anything else goes on to the Hono app, which
// serves the same routes with the same answers.
//
// Why: a decode call's overhead beyond the engine's own time was 2× a bare
// GET /v1/health on the 2-core VM, and the web Request/Response layer
// (@hono/node-server builds both for every request), the middleware chain
// and msgpackr's growing of a fresh answer buffer were most of the rest. Here
// the body is read into one buffer of its Content-Length and decoded with
// tensors as views into it; the answer is joined into one buffer and
// written with its head.
import type { IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import { KvrecallError } from '../core/errors.js';
import { joinParts, packParts, type Parts } from '../core/msgpack-parts.js';
import { BufferPool } from '../storage/buffer-pool.js';
import type { Sessions } from '../engine/sessions.js';
import { attendAnswer, batchAnswer } from './attend-answer.js';
import { attendBatchFramed, HEADER_ROOM, packAttendAnswer, PackedFrame, ReadyFrame } from './batch-pack.js';
import { tokenAccepted } from './auth.js';
import { bodyTooLarge, decodeMsgpack, isMsgpack, readInto } from './codec.js';
import { errorBody, errorOf } from './errors.js';
import type { Metrics } from './metrics.js';
import { refuseInto } from './shm.js';

const SINGLE = /^\/v1\/sessions\/([^/?]+)\/attend(?:\?.*)?$/;
const BATCH = /^\/v1\/attend(?:\?.*)?$/;
const MSGPACK = 'application/msgpack';
/** Answers from this size up (a batch's) are joined into pooled buffers, kept warm. */
const POOLED = 1 << 16;
const answers = new BufferPool(4);

export interface FastAttendOptions {
  token?: string;
  bodyLimit: number;
}

/** A request listener that serves the attend routes itself and hands every other request to `next`. */
export function withFastAttend(sessions: Sessions, metrics: Metrics, opts: FastAttendOptions, next: RequestListener): RequestListener {
  return (req, res) => {
    const route = req.method === 'POST' ? routeOf(req.url ?? '') : undefined;
    const h = req.headers;
    if (!route || !isMsgpack(h['content-type']) || h['content-length'] === undefined || h['transfer-encoding'] !== undefined || /json/i.test(h.accept ?? ''))
      return next(req, res);
    void serve(req, res, route, sessions, metrics, opts);
  };
}

function routeOf(url: string): { name: string; sid?: string } | undefined {
  if (BATCH.test(url)) return { name: '/v1/attend' };
  const m = SINGLE.exec(url);
  if (!m) return undefined;
  try {
    return { name: '/v1/sessions/:sid/attend', sid: decodeURIComponent(m[1]) };
  } catch {
    return undefined; // Hono answers a path it cannot decode
  }
}

async function serve(req: IncomingMessage, res: ServerResponse, route: { name: string; sid?: string }, sessions: Sessions, metrics: Metrics, opts: FastAttendOptions): Promise<void> {
  let status = 200, bodyRead = false;
  try {
    if (!tokenAccepted(opts.token, req.headers.authorization)) {
      res.setHeader('www-authenticate', 'Bearer');
      throw new KvrecallError('unauthorized', 'missing or wrong bearer token');
    }
    const n = Number(req.headers['content-length']);
    if (n > opts.bodyLimit) throw bodyTooLarge(opts.bodyLimit);
    const raw = n === 0 ? new Uint8Array(0) : await readInto(req, Buffer.allocUnsafeSlow(n));
    bodyRead = true;
    const body = decodeMsgpack(raw);
    if (route.sid !== undefined) {
      refuseInto(body);
      const r = await sessions.attend(route.sid, body);
      metrics.observeAttend(r.stats.ms);
      // The common answer written straight into the body (the bytes packParts writes: test/api/batch-pack.test.ts).
      send(res, packAttendAnswer(undefined, r) ?? packParts(attendAnswer(r)));
    } else {
      // Each step's answer written into the body as the step finishes (api/batch-pack.ts BatchFrame).
      const { frame, results, ms } = await attendBatchFramed(sessions, body, undefined, metrics);
      send(res, frame ?? packParts({ results: results.map((r) => batchAnswer(r, errorOf)), stats: { ms } }));
    }
  } catch (e) {
    status = fail(res, e, bodyRead);
  }
  metrics.countRequest(route.name, status);
}

/**
 * The answer's parts joined into one buffer (a pooled one when large, given
 * back once written) and ended with the head: one write of two buffers.
 * Written part by part through ServerResponse it cost ~140 µs per answer
 * on the 2-core VM, the join of 16 KB a few.
 */
function send(res: ServerResponse, parts: Parts | PackedFrame | ReadyFrame): void {
  if (parts instanceof ReadyFrame) {
    if (res.destroyed) return parts.release();
    res.writeHead(200, ['content-type', MSGPACK, 'content-length', String(parts.byteLength)]);
    res.end(parts.buf.subarray(HEADER_ROOM, HEADER_ROOM + parts.byteLength), parts.release);
    return;
  }
  if (res.destroyed) return;
  const pooled = parts.byteLength >= POOLED;
  const buf = pooled ? answers.take(parts.byteLength) : Buffer.allocUnsafe(parts.byteLength);
  let body: Uint8Array;
  if (parts instanceof PackedFrame) {
    body = buf.subarray(0, parts.byteLength);
    parts.fill(body);
  } else body = joinParts(parts, buf);
  res.writeHead(200, ['content-type', MSGPACK, 'content-length', String(parts.byteLength)]);
  if (pooled) res.end(body, () => answers.give(buf));
  else res.end(body);
}

/** Answers an error as the Hono app does (JSON `{error}`), closing a connection whose body was left unread. */
function fail(res: ServerResponse, e: unknown, bodyRead: boolean): number {
  // The client went away mid-body: nothing was applied, and nobody reads this answer.
  const aborted = e instanceof Error && !(e instanceof KvrecallError) && (e.message === 'aborted' || (e as NodeJS.ErrnoException).code === 'ECONNRESET');
  const { code, message, status } = aborted ? { code: 'malformed' as const, message: 'request body aborted by the client', status: 400 } : errorOf(e);
  if (res.destroyed || res.headersSent) return status;
  const text = JSON.stringify(errorBody(code, message));
  if (!bodyRead) res.setHeader('connection', 'close');
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
  return status;
}
