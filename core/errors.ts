// Typed engine errors. The engine says what went wrong; api/errors.ts alone
// turns the kind into an HTTP status.

export type ErrorKind =
  | 'malformed' // the body cannot be decoded
  | 'unauthorized'
  | 'not_found'
  | 'conflict' // valid request, wrong moment (kv after seal, out-of-order start)
  | 'precondition_failed' // a conditional request whose condition does not hold (a DELETE naming another createdAt)
  | 'too_large'
  | 'invalid' // decoded, but wrong shape, dtype, range or value
  | 'over_budget' // host memory or GPU pool full: admission control
  | 'unavailable'; // a backing service (the Redis Cluster) cannot be reached or failed: try again

export class KvrecallError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'KvrecallError';
  }
}

export const invalid = (message: string) => new KvrecallError('invalid', message);
export const notFound = (message: string) => new KvrecallError('not_found', message);
export const conflict = (message: string) => new KvrecallError('conflict', message);
export const preconditionFailed = (message: string) => new KvrecallError('precondition_failed', message);
export const malformed = (message: string) => new KvrecallError('malformed', message);
export const tooLarge = (message: string) => new KvrecallError('too_large', message);
export const unavailable = (message: string) => new KvrecallError('unavailable', message);
