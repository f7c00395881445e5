// Request and response bodies: msgpack (the wire format) or JSON (for
// debugging; tensor bytes as base64). Binary fields decode as views into the
// request body, not copies.
import type { Context } from 'hono';
import { Packr, Unpackr } from 'msgpackr';
import { malformed } from '../src/errors.js';

const MSGPACK = 'application/msgpack';
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false, int64AsType: 'number' });
const packr = new Packr({ useRecords: false });

export type Body = Record<string, unknown>;

function isMsgpack(contentType: string | undefined): boolean {
  return !!contentType && /application\/(x-)?msgpack/i.test(contentType);
}

export async function readBody(c: Context): Promise<Body> {
  const raw = new Uint8Array(await c.req.arrayBuffer());
  if (raw.byteLength === 0) return {};
  let value: unknown;
  if (isMsgpack(c.req.header('content-type'))) {
    try {
      value = unpackr.unpack(Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength));
    } catch (e) {
      throw malformed(`body is not valid msgpack: ${(e as Error).message}`);
    }
  } else {
    try {
      value = JSON.parse(new TextDecoder().decode(raw));
    } catch (e) {
      throw malformed(`body is not valid JSON: ${(e as Error).message}`);
    }
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value) || value instanceof Uint8Array)
    throw malformed('body must be a map');
  return value as Body;
}

/** Answers in msgpack when the client sent or accepts msgpack, else JSON. */
export function reply(c: Context, value: unknown, status: 200 | 201 = 200): Response {
  const wantsMsgpack = isMsgpack(c.req.header('accept')) || (isMsgpack(c.req.header('content-type')) && !/json/i.test(c.req.header('accept') ?? ''));
  if (wantsMsgpack) {
    const body = packr.pack(value);
    return c.body(new Uint8Array(body.buffer as ArrayBuffer, body.byteOffset, body.byteLength), status, { 'content-type': MSGPACK });
  }
  return c.body(JSON.stringify(value, jsonBytes), status, { 'content-type': 'application/json' });
}

function jsonBytes(this: Record<string, unknown>, key: string, value: unknown): unknown {
  const original = this[key];
  return original instanceof Uint8Array ? Buffer.from(original.buffer, original.byteOffset, original.byteLength).toString('base64') : value;
}
