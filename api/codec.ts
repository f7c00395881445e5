// Request and response bodies: msgpack (the wire format) or JSON (for
// debugging; tensor bytes as base64).
//
// A body is read straight from the Node request into one buffer of its
// declared length (no chunk list, no concatenation, no web stream), and
// msgpack binary fields decode as views into that buffer, not copies. The
// upload routes borrow the buffer from a small pool (`withBody`): the views
// are valid until the route's work settles, and nothing may keep them
// longer; other routes get a buffer of their own (`readBody`).
import type { IncomingMessage } from 'node:http';
import type { Context, MiddlewareHandler } from 'hono';
import { malformed, tooLarge } from '../core/errors.js';
import { joinParts, packParts } from '../core/msgpack-parts.js';
import { unpackView } from '../core/msgpack-parts-decode.js';
import { BufferPool } from '../storage/buffer-pool.js';

/** 413 for a body over the server's limit, naming the option that sets it. */
export const bodyTooLarge = (limit: number) => tooLarge(`body exceeds the limit of ${limit} bytes (the server's --body-limit)`);

const MSGPACK = 'application/msgpack';

export type Body = Record<string, unknown>;

export function isMsgpack(contentType: string | undefined): boolean {
  return !!contentType && /application\/(x-)?msgpack/i.test(contentType);
}

/** Per request: the body limit (set by limitBody), and whether the body was read whole. */
const limits = new WeakMap<Context, number>();
const readWhole = new WeakSet<Context>();

/** Refuses (413) a body whose declared length exceeds maxSize before reading it; readBody enforces it on chunked bodies. */
export function limitBody(maxSize: number): MiddlewareHandler {
  return async (c, next) => {
    const declared = c.req.header('content-length');
    if (declared !== undefined && Number(declared) > maxSize) throw bodyTooLarge(maxSize);
    limits.set(c, maxSize);
    await next();
  };
}

/** True when the request has a body that nothing read (the server will drop the connection after answering). */
export function bodyLeftUnread(c: Context): boolean {
  if (readWhole.has(c) || c.req.raw.bodyUsed) return false;
  const incoming = incomingOf(c);
  if (!incoming) return !!c.req.raw.body;
  const length = incoming.headers['content-length'];
  const hasBody = incoming.headers['transfer-encoding'] !== undefined || (length !== undefined && Number(length) > 0);
  return hasBody && !incoming.readableEnded;
}

/** The decoded body, in a buffer of its own. */
export async function readBody(c: Context): Promise<Body> {
  const raw = await readRaw(c, (n) => Buffer.allocUnsafeSlow(n));
  return decode(c, raw);
}

/** How long a body took to arrive (from the route's start) and to decode. */
export interface BodyTimes {
  bytes: number;
  readMs: number;
  decodeMs: number;
}

/**
 * Runs `work` on the decoded body held in a pooled buffer, then returns the
 * buffer: `work` must not keep any part of the body after it settles.
 */
export async function withBody<T>(c: Context, work: (body: Body, times: BodyTimes) => Promise<T>): Promise<T> {
  let lease: Buffer | undefined;
  try {
    const t0 = performance.now();
    const raw = await readRaw(c, (n) => (lease = pool.take(n)).subarray(0, n));
    const t1 = performance.now();
    const body = decode(c, raw);
    return await work(body, { bytes: raw.byteLength, readMs: t1 - t0, decodeMs: performance.now() - t1 });
  } finally {
    if (lease) pool.give(lease);
  }
}

function incomingOf(c: Context): IncomingMessage | undefined {
  const incoming = (c.env as { incoming?: IncomingMessage } | undefined)?.incoming;
  return incoming && typeof incoming.on === 'function' && 'headers' in incoming ? incoming : undefined;
}

async function readRaw(c: Context, alloc: (n: number) => Buffer): Promise<Uint8Array> {
  const limit = limits.get(c) ?? Number.POSITIVE_INFINITY;
  const incoming = incomingOf(c);
  let raw: Uint8Array;
  if (!incoming) {
    raw = new Uint8Array(await c.req.arrayBuffer());
    if (raw.byteLength > limit) throw bodyTooLarge(limit);
  } else {
    const declared = incoming.headers['content-length'];
    const chunked = incoming.headers['transfer-encoding'] !== undefined;
    if (!chunked && declared === undefined) raw = new Uint8Array(0);
    else if (!chunked) {
      const n = Number(declared);
      if (n > limit) throw bodyTooLarge(limit);
      raw = n === 0 ? new Uint8Array(0) : await readInto(incoming, alloc(n));
    } else raw = await readChunks(incoming, limit);
  }
  readWhole.add(c);
  return raw;
}

/**
 * Reads a body of exactly buf.byteLength bytes into buf, done at its last
 * byte (the parser has framed it by its length: nothing of it comes after).
 */
export function readInto(incoming: IncomingMessage, buf: Buffer): Promise<Buffer> {
  let at = 0;
  return stream(incoming, (chunk) => {
    if (at + chunk.byteLength > buf.byteLength) throw malformed('body longer than its content-length');
    buf.set(chunk, at);
    at += chunk.byteLength;
    return at === buf.byteLength;
  }).then(() => {
    if (at !== buf.byteLength) throw new Error('aborted');
    return buf;
  });
}

/** A body without a declared length: its chunks, refused past the limit. */
async function readChunks(incoming: IncomingMessage, limit: number): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  let size = 0;
  await stream(incoming, (chunk) => {
    size += chunk.byteLength;
    if (size > limit) throw bodyTooLarge(limit);
    chunks.push(chunk);
  });
  return chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size);
}

/** Feeds the request's chunks to onChunk until it ends or onChunk returns true; rejects if the client goes away first or onChunk throws. */
function stream(incoming: IncomingMessage, onChunk: (chunk: Buffer) => boolean | void): Promise<void> {
  return new Promise((resolve, reject) => {
    if (incoming.readableEnded || incoming.destroyed) return reject(new Error('aborted'));
    const done = (err?: unknown) => {
      incoming.off('data', onData);
      incoming.off('end', onEnd);
      incoming.off('error', onError);
      incoming.off('close', onClose);
      if (err === undefined) resolve();
      else {
        incoming.pause();
        reject(err);
      }
    };
    const onData = (chunk: Buffer) => {
      try {
        if (onChunk(chunk) === true) done();
      } catch (e) {
        done(e);
      }
    };
    const onEnd = () => done();
    const onError = (e: Error) => done(e);
    const onClose = () => done(new Error('aborted'));
    incoming.on('data', onData);
    incoming.on('end', onEnd);
    incoming.on('error', onError);
    incoming.on('close', onClose);
  });
}

function decode(c: Context, raw: Uint8Array): Body {
  if (raw.byteLength === 0) return {};
  if (isMsgpack(c.req.header('content-type'))) return decodeMsgpack(raw);
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder().decode(raw));
  } catch (e) {
    throw malformed(`body is not valid JSON: ${(e as Error).message}`);
  }
  return asMap(value);
}

/** A msgpack body (binary fields as views into raw); {} when empty. */
export function decodeMsgpack(raw: Uint8Array): Body {
  if (raw.byteLength === 0) return {};
  let value: unknown;
  try {
    value = unpackView(raw);
  } catch (e) {
    throw malformed(`body is not valid msgpack: ${(e as Error).message}`);
  }
  return asMap(value);
}

function asMap(value: unknown): Body {
  if (typeof value !== 'object' || value === null || Object.getPrototypeOf(value) !== Object.prototype) throw malformed('body must be a map');
  return value as Body;
}

/** Body buffers of the upload routes, kept warm between requests. */
const pool = new BufferPool();

/**
 * An answer's msgpack: the encoder of the attend fast path and the stream
 * (core/msgpack-parts.ts), so every route writes the same forms. Integers
 * from 2^32 up (byte counts: a 1M-token document, a device's memory) are
 * uint64/int64, where msgpackr wrote float64 and Python clients read floats.
 */
export function encodeMsgpack(value: unknown): Uint8Array<ArrayBuffer> {
  const parts = packParts(value);
  const body = new Uint8Array(parts.byteLength);
  joinParts(parts, body);
  return body;
}

/** Answers in msgpack when the client sent or accepts msgpack, else JSON. */
export function reply(c: Context, value: unknown, status: 200 | 201 = 200): Response {
  const wantsMsgpack = isMsgpack(c.req.header('accept')) || (isMsgpack(c.req.header('content-type')) && !/json/i.test(c.req.header('accept') ?? ''));
  if (wantsMsgpack) return c.body(encodeMsgpack(value), status, { 'content-type': MSGPACK });
  return c.body(JSON.stringify(value, jsonBytes), status, { 'content-type': 'application/json' });
}

function jsonBytes(this: Record<string, unknown>, key: string, value: unknown): unknown {
  const original = this[key];
  return original instanceof Uint8Array ? Buffer.from(original.buffer, original.byteOffset, original.byteLength).toString('base64') : value;
}
