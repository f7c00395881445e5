// GET /v1/stream: a WebSocket per client connection for decode steps. Each
// binary frame is msgpack: one attend `{id, session, layer, q, k?, v?,
// scale?, position?, return?}` or one batch `{id, layer, steps: [...]}`;
// each gets one answer frame with the same id, in the order the frames came
// (work on different sessions runs side by side; only the answers queue). A
// bad frame gets an error frame with its id when it has one; the connection
// and the sessions survive it, and a client that goes away leaves its
// sessions as they are.
//
// Hono's Node WebSocket helper (@hono/node-ws) needs @hono/node-server 1.x;
// this server runs 2.x, so the upgrade is handled here with `ws`, as the
// helper itself does.
import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, WebSocket, type RawData } from 'ws';
import { malformed } from '../core/errors.js';
import { joinParts, packParts } from '../core/msgpack-parts.js';
import { unpackView } from '../core/msgpack-parts-decode.js';
import { BufferPool } from '../storage/buffer-pool.js';
import type { Sessions } from '../engine/sessions.js';
import { attendAnswer, batchAnswer } from './attend-answer.js';
import { tokenAccepted } from './auth.js';
import { errorOf } from './errors.js';
import type { Metrics } from './metrics.js';

/** Answer frames from this size up are joined into a warm buffer, given back once the socket took it. */
const POOLED_FRAME = 1 << 16;
const frames = new BufferPool(8);

export interface StreamOptions {
  token?: string;
  /** Largest frame accepted (the body limit of the HTTP routes). */
  maxFrame: number;
}

/** Serves the stream on `server`; close() ends every open stream (their sessions stay). */
export function attachStream(server: Server, sessions: Sessions, metrics: Metrics, opts: StreamOptions): { close(): void } {
  const wss = new WebSocketServer({ noServer: true, maxPayload: opts.maxFrame, perMessageDeflate: false });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const path = new URL(req.url ?? '/', 'http://localhost').pathname;
    if (path !== '/v1/stream') return refuse(socket, 404, 'Not Found');
    if (!tokenAccepted(opts.token, req.headers.authorization)) return refuse(socket, 401, 'Unauthorized');
    wss.handleUpgrade(req, socket, head, (ws) => serve(ws, sessions, metrics));
  });
  return { close: () => wss.clients.forEach((ws) => ws.terminate()) };
}

function refuse(socket: Duplex, status: number, reason: string): void {
  socket.end(`HTTP/1.1 ${status} ${reason}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n`);
}

function serve(ws: WebSocket, sessions: Sessions, metrics: Metrics): void {
  let answered: Promise<void> = Promise.resolve();
  ws.on('message', (data: RawData, isBinary: boolean) => {
    const answer = handle(data, isBinary, sessions, metrics);
    answered = answered
      .then(() => answer)
      .then((frame) => {
        if (ws.readyState === WebSocket.OPEN) send(ws, frame);
      });
  });
  // A socket error ends this connection only; in-flight steps finish and their answers are dropped.
  ws.on('error', () => ws.terminate());
}

/**
 * One answer frame: its parts (tensors as the result's own arrays) copied
 * once into one buffer; a large one into a pooled, already mapped buffer
 * (a batch of 32 answers is 0.5 MB: packed by msgpackr into fresh buffers
 * it cost 0.75 ms on the 2-core VM).
 */
function send(ws: WebSocket, frame: Record<string, unknown>): void {
  const parts = packParts(frame);
  if (parts.byteLength < POOLED_FRAME) return ws.send(joinParts(parts, Buffer.allocUnsafe(parts.byteLength)));
  const buf = frames.take(parts.byteLength);
  ws.send(joinParts(parts, buf), () => frames.give(buf));
}

async function handle(data: RawData, isBinary: boolean, sessions: Sessions, metrics: Metrics): Promise<Record<string, unknown>> {
  let id: unknown;
  try {
    if (!isBinary || !(data instanceof Buffer)) throw malformed('frames are binary msgpack');
    let frame: unknown;
    try {
      frame = unpackView(data);
    } catch (e) {
      throw malformed(`frame is not valid msgpack: ${(e as Error).message}`);
    }
    if (typeof frame !== 'object' || frame === null || Array.isArray(frame) || frame instanceof Uint8Array) throw malformed('a frame is a map');
    const body = frame as Record<string, unknown>;
    id = body.id;
    if (body.steps !== undefined) {
      const { results, ms } = await sessions.attendBatch(body);
      for (const r of results) if (r.status === 'fulfilled') metrics.observeAttend(r.value.stats.ms);
      return { id, results: results.map((r) => batchAnswer(r, errorOf)), stats: { ms } };
    }
    if (typeof body.session !== 'string') throw malformed('an attend frame names its session');
    const res = await sessions.attend(body.session, body);
    metrics.observeAttend(res.stats.ms);
    return { id, ...attendAnswer(res) };
  } catch (e) {
    const { code, message } = errorOf(e);
    return { id, error: { code, message } };
  }
}
