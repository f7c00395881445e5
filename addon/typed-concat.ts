// Typed arrays of one kind back to back, for every layer above: here, at the
// bottom, because addon/ itself joins per-head lists into one call buffer.

/** What concatInto writes into and reads from: one kind of number array. */
interface NumberArray extends ArrayLike<number> {
  set(array: ArrayLike<number>, offset?: number): void;
}

/**
 * Writes `parts` back to back into `out` from `at` (out must have the room,
 * else set throws a RangeError); returns where a next part would go.
 */
export function concatInto<T extends NumberArray>(out: T, parts: readonly T[], at = 0): number {
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return at;
}

/**
 * `parts` back to back in a new array of `Kind`; the one part itself, not a
 * copy, when there is one (callers that keep or write the result and need
 * their own array copy that case).
 */
export function concat<T extends NumberArray>(Kind: new (length: number) => T, parts: readonly T[]): T {
  if (parts.length === 1) return parts[0];
  const all = new Kind(parts.reduce((n, p) => n + p.length, 0));
  concatInto(all, parts);
  return all;
}
