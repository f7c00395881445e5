// Which prefill queries a document keeps: those of the tokens t with
// t % queryStride == 0. Shared by the server (documents, kv-input) and the
// client, which may send only those rows.

/** Tokens t of [start, start + n) with t % stride == 0: the first one's offset from start, and how many. */
export function keptTokens(start: number, n: number, stride: number): { first: number; count: number } {
  const first = (stride - (start % stride)) % stride;
  return { first, count: first < n ? Math.ceil((n - first) / stride) : 0 };
}
