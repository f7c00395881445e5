// Optional bearer token on every route but /v1/health.
import { timingSafeEqual } from 'node:crypto';
import type { MiddlewareHandler } from 'hono';
import { KvrecallError } from '../core/errors.js';

/** Whether an Authorization header carries the token (always, without one); constant time. */
export function tokenAccepted(token: string | undefined, header: string | undefined): boolean {
  if (!token) return true;
  const expected = Buffer.from(`Bearer ${token}`), got = Buffer.from(header ?? '');
  return got.length === expected.length && timingSafeEqual(got, expected);
}

export function bearerAuth(token: string | undefined): MiddlewareHandler {
  return async (c, next) => {
    if (token && c.req.path !== '/v1/health') {
      if (!tokenAccepted(token, c.req.header('authorization'))) {
        c.header('www-authenticate', 'Bearer');
        throw new KvrecallError('unauthorized', 'missing or wrong bearer token');
      }
    }
    await next();
  };
}
