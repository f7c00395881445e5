// The kept set a document's seal-time reading found (index/infiniretri-read.ts),
// as the bytes stored next to the document: a session attaching it loads the
// evidence instead of reading the document again.
//
// Layout (little-endian u32 words): magic, version, tokens, chunk, span,
// count, then count int32 ids (best first) and count f32 phrase scores.
import type { Kept } from './infiniretri-read.js';

const MAGIC = 0x5452494b; // "KIRT"
export const INFINIRETRI_VERSION = 1;
const HEADER_WORDS = 6;

export interface KeptArtifact extends Kept {
  tokens: number;
  chunk: number;
  span: number;
}

export function encodeKept(a: KeptArtifact): Uint8Array {
  const count = a.ids.length;
  const out = new Uint8Array(4 * (HEADER_WORDS + 2 * count));
  const words = new Uint32Array(out.buffer);
  words.set([MAGIC, INFINIRETRI_VERSION, a.tokens, a.chunk, a.span, count]);
  new Int32Array(out.buffer, 4 * HEADER_WORDS, count).set(a.ids);
  new Float32Array(out.buffer, 4 * (HEADER_WORDS + count), count).set(a.scores);
  return out;
}

/** Throws on bytes that are not a kept set of a `tokens`-row head; an older version's message names it stale. */
export function decodeKept(bytes: Uint8Array, tokens: number): KeptArtifact {
  // Copied once so the typed views are aligned whatever offset LMDB hands the bytes at.
  const buf = new Uint8Array(bytes).buffer;
  if (buf.byteLength < 4 * HEADER_WORDS) throw new Error('infiniretri artifact: truncated header');
  const [magic, version, n, chunk, span, count] = new Uint32Array(buf, 0, HEADER_WORDS);
  if (magic !== MAGIC) throw new Error('infiniretri artifact: bad magic');
  if (version !== INFINIRETRI_VERSION) throw new Error(`infiniretri artifact: version ${version} is stale (this build reads ${INFINIRETRI_VERSION})`);
  if (n !== tokens) throw new Error(`infiniretri artifact: built for ${n} tokens, the head holds ${tokens}`);
  if (buf.byteLength !== 4 * (HEADER_WORDS + 2 * count)) throw new Error('infiniretri artifact: size does not match its count');
  const ids = new Int32Array(buf, 4 * HEADER_WORDS, count);
  if (ids.some((t) => t < 0 || t >= tokens)) throw new Error('infiniretri artifact: id out of range');
  return { tokens, chunk, span, ids, scores: new Float32Array(buf, 4 * (HEADER_WORDS + count), count) };
}
