// Optional bearer token on every route but /v1/health.
import { timingSafeEqual } from 'node:crypto';
import type { MiddlewareHandler } from 'hono';
import { KvrecallError } from '../core/errors.js';

export function bearerAuth(token: string | undefined): MiddlewareHandler {
  const expected = token ? Buffer.from(`Bearer ${token}`) : undefined;
  return async (c, next) => {
    if (expected && c.req.path !== '/v1/health') {
      const got = Buffer.from(c.req.header('authorization') ?? '');
      if (got.length !== expected.length || !timingSafeEqual(got, expected)) {
        c.header('www-authenticate', 'Bearer');
        throw new KvrecallError('unauthorized', 'missing or wrong bearer token');
      }
    }
    await next();
  };
}
