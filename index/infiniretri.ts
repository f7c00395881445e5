// `infiniretri` (InfiniRetri): the question's own queries read each attached
// document chunk by chunk. In every chunk the candidates are the tokens
// retained so far plus the chunk's tokens; each is scored by the attention
// mass the question's query rows pay it (softmax over the candidates, summed
// over rows); the top tokens are kept with their neighbouring span (phrase
// granularity) and carried into the next chunk. What remains after the last
// chunk is the retained set (ids, not copies) that decode attends, with
// sinks, window and the session's own tokens.
//
// The question's query rows come from the session's kv route (`q`). When the
// session sent none, the first decode step's query rows stand in for them.
// Retention is computed once per layer and recomputed only when more
// question rows arrive. Each document is read as its own stream: a softmax
// never spans two documents, and each gets a share of the budget by size.
import { attentionMass } from '../addon/kernels.js';
import type { HeadKeys, LayerContext, RetrievalMethod, SearchParams, Selection, SelectionPart } from './method.js';
import { inside, staticRanges } from './static-plus-retrieved.js';

interface Retained {
  questionRows: number;
  /** [segment][kv head]: retained rows, ascending. */
  ids: Int32Array[][];
  scanned: number;
}

/** Retains up to `budget` rows of one kv head's keys, read in chunks by the question's query rows. */
export async function retainHead(
  keys: HeadKeys,
  rows: Float32Array,
  rowCount: number,
  p: Pick<SearchParams, 'chunk' | 'span'>,
  budget: number,
  scale: number,
): Promise<Int32Array> {
  const seg = keys;
  if (budget >= seg.tokens) return Int32Array.from({ length: seg.tokens }, (_, i) => i);
  const span = Math.max(0, p.span), chunk = Math.max(1, p.chunk);
  const top = Math.max(1, Math.ceil(budget / (2 * span + 1)));
  let kept = new Int32Array(0);
  for (let c0 = 0; c0 < seg.tokens; c0 += chunk) {
    const c1 = Math.min(seg.tokens, c0 + chunk);
    const ids = new Int32Array(kept.length + c1 - c0);
    ids.set(kept);
    for (let i = c0; i < c1; i++) ids[kept.length + i - c0] = i;
    const mass = new Float32Array(ids.length);
    await attentionMass({ q: rows, rows: rowCount, headDim: seg.headDim, keys: seg.keys, tokens: seg.tokens, dtype: seg.dtype, scale, ids, out: mass });
    const order = Array.from(ids.keys()).sort((a, b) => mass[b] - mass[a] || ids[a] - ids[b]);
    const next = new Set<number>();
    for (const i of order.slice(0, top)) {
      if (next.size >= budget) break;
      for (let t = Math.max(0, ids[i] - span); t <= Math.min(seg.tokens - 1, ids[i] + span) && next.size < budget; t++) next.add(t);
    }
    kept = Int32Array.from(next).sort();
  }
  return kept;
}

async function retain(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Retained> {
  const G = ctx.qHeads / ctx.kvHeads, d = ctx.headDim, scale = 1 / Math.sqrt(d);
  const docs = ctx.segments.length - 1;
  const docTokens = ctx.offsets[docs];
  const ids: Int32Array[][] = [];
  for (let s = 0; s < docs; s++) {
    const seg = ctx.segments[s];
    const budget = Math.min(seg.tokens, Math.ceil((p.budget * seg.tokens) / Math.max(1, docTokens)));
    const perHead: Int32Array[] = [];
    for (let h = 0; h < ctx.kvHeads; h++) {
      const question = ctx.question(h);
      const rows = question.queryCount > 0 ? question.queries : q.subarray(h * G * d, (h + 1) * G * d);
      const rowCount = question.queryCount > 0 ? question.queryCount : G;
      const keys = { keys: seg.k[h], tokens: seg.tokens, headDim: seg.headDim, dtype: seg.dtype };
      perHead.push(seg.tokens === 0 || budget === 0 ? new Int32Array(0) : await retainHead(keys, rows, rowCount, p, budget, scale));
    }
    ids.push(perHead);
  }
  return { questionRows: ctx.question(0).queryCount, ids, scanned: docTokens };
}

export const infiniretri: RetrievalMethod = {
  name: 'infiniretri',
  async select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
    let r = ctx.memo.get('infiniretri') as Retained | undefined;
    let scanned = 0;
    if (!r || r.questionRows !== ctx.question(0).queryCount) {
      r = await retain(ctx, q, p);
      ctx.memo.set('infiniretri', r);
      scanned = r.scanned;
    }
    const parts: SelectionPart[] = [];
    ctx.segments.forEach((segment, s) => {
      const ranges = staticRanges(ctx, s, p);
      for (const [begin, end] of ranges) parts.push({ segment, begin, end });
      if (s < r.ids.length) parts.push({ segment, ids: r.ids[s].map((ids) => ids.filter((id) => !inside(ranges, id))) });
    });
    return { parts, scanned };
  },
};
