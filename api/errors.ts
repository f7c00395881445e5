// The one place engine errors become HTTP answers: { error: { code, message } }.
import type { Context } from 'hono';
import { HTTPException } from 'hono/http-exception';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { KvrecallError, type ErrorKind } from '../core/errors.js';

const STATUS: Record<ErrorKind, ContentfulStatusCode> = {
  malformed: 400,
  unauthorized: 401,
  not_found: 404,
  conflict: 409,
  precondition_failed: 412,
  too_large: 413,
  invalid: 422,
  over_budget: 503,
  unavailable: 503,
};

export function errorBody(code: ErrorKind | 'internal', message: string) {
  return { error: { code, message } };
}

/**
 * An error as `{code, message}` and its status: for answers that carry an
 * error without failing the whole request (a batch step, a stream frame).
 */
export function errorOf(err: unknown): { code: ErrorKind | 'internal'; message: string; status: ContentfulStatusCode } {
  if (err instanceof KvrecallError) return { code: err.kind, message: err.message, status: STATUS[err.kind] };
  if (err instanceof TypeError || err instanceof RangeError) return { code: 'invalid', message: err.message, status: 422 };
  console.error('kvrecall: internal error', err);
  return { code: 'internal', message: 'internal error; see the server log', status: 500 };
}

export function onError(err: Error, c: Context): Response {
  // A body refused before it was read leaves bytes on the socket: close it
  // so the client does not reuse a connection the server will drop.
  if (err instanceof KvrecallError && err.kind === 'too_large') c.header('connection', 'close');
  if (err instanceof KvrecallError) return c.json(errorBody(err.kind, err.message), STATUS[err.kind]);
  if (err instanceof HTTPException && err.status === 413) return c.json(errorBody('too_large', err.message), 413);
  if (err instanceof HTTPException) return c.json(errorBody('malformed', err.message), err.status as ContentfulStatusCode);
  // Native argument checks throw TypeError/RangeError: a request the edge let
  // through with a bad shape. Report it as invalid, not as a crash.
  if (err instanceof TypeError || err instanceof RangeError) return c.json(errorBody('invalid', err.message), 422);
  // The client went away mid-body: nothing was applied, and nobody reads this answer.
  if (err.message === 'aborted' || (err as NodeJS.ErrnoException).code === 'ECONNRESET')
    return c.json(errorBody('malformed', 'request body aborted by the client'), 400);
  console.error('kvrecall: internal error', err);
  return c.json(errorBody('internal', 'internal error; see the server log'), 500);
}
