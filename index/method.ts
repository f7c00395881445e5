// The interface every retrieval method implements. A method sees one layer's
// context (documents, then the session's own tokens) and the step's query
// heads, and answers which tokens attention should read. It never computes
// the attention itself: src/decode-step.ts does, the same way for every method.
import type { AttendSegment } from '../native/index.js';
import type { KvSegment } from '../storage/kv-segment.js';

export interface LayerContext {
  layer: number;
  /** Documents in order, then the session's own tokens. */
  segments: KvSegment[];
  /** Position of each segment's first token in the context. */
  offsets: number[];
  /** Tokens in the whole context. */
  tokens: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

export interface SearchParams {
  /** Tokens the method may select per kv head, beyond sinks and window. */
  budget: number;
  /** First tokens of the context always attended. */
  sinks: number;
  /** Last tokens of the context always attended. */
  window: number;
}

/** Part of a selection: a token range of one segment, or per-kv-head row ids. */
export type SelectionPart = { segment: KvSegment } & Pick<AttendSegment, 'begin' | 'end' | 'ids'>;

export interface Selection {
  parts: SelectionPart[];
  /** Keys whose score the method computed (for the scanned fraction). */
  scanned: number;
}

export interface RetrievalMethod {
  readonly name: string;
  select(ctx: LayerContext, q: Float32Array, params: SearchParams): Promise<Selection>;
}
