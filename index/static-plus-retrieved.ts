// The selection every indexed method makes: a static part (attention sinks,
// the recent window, and the session's own tokens) attended in full, plus
// what the method's per-head index retrieves from each document. The two are
// disjoint (retrieved ids inside the static ranges are dropped), so the
// kernel's log-sum-exp merge of the parts is the attention over their union.
import type { BlockList, HeadIndex, HeadIndexBuilder, LayerContext, RetrievalMethod, SearchMemo, SearchParams, Selection, SelectionPart } from './method.js';

export type Range = [number, number];

/** Local [begin, end) ranges of segment `s` covered by sinks and the window, merged. */
export function staticRanges(ctx: LayerContext, s: number, p: SearchParams): Range[] {
  const seg = ctx.segments[s], off = ctx.offsets[s];
  if (s === ctx.segments.length - 1) return seg.tokens > 0 ? [[0, seg.tokens]] : []; // own tokens: always
  const global: Range[] = [
    [0, Math.min(p.sinks, ctx.tokens)],
    [Math.max(0, ctx.tokens - p.window), ctx.tokens],
  ];
  const local = global
    .map(([a, b]): Range => [Math.max(a - off, 0), Math.min(b - off, seg.tokens)])
    .filter(([a, b]) => b > a)
    .sort((x, y) => x[0] - y[0]);
  const merged: Range[] = [];
  for (const r of local) {
    const last = merged[merged.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else merged.push([...r]);
  }
  return merged;
}

export const inside = (ranges: Range[], id: number) => ranges.some(([a, b]) => id >= a && id < b);

/**
 * Sinks and window widened to whole blocks: a block method attends blocks,
 * so a block the static part touches is attended whole, and no selected
 * block is split between the two parts.
 */
export function blockAligned(ranges: Range[], size: number, tokens: number): Range[] {
  const out: Range[] = [];
  for (const [a, b] of ranges) {
    const r: Range = [Math.floor(a / size) * size, Math.min(tokens, Math.ceil(b / size) * size)];
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push(r);
  }
  return out;
}

/** A per-kv-head block index of a document (block-select's summaries, quest's bounds). */
export interface BlockIndex extends HeadIndex {
  readonly blocks: number;
  readonly blockSize: number;
}

/**
 * The selection every block method makes: per segment its static ranges
 * (widened to whole blocks where the segment is indexed, so no block is
 * split between the parts), and in each indexed document segment the
 * blocks `pick` chooses within the segment's share of the budget (in
 * blocks), less those the static ranges already cover.
 */
export async function blockSelection<H extends BlockIndex>(
  ctx: LayerContext,
  p: SearchParams,
  pick: (s: number, heads: H[], budget: number) => Promise<{ ids: Int32Array[]; priority?: Uint8Array[]; scanned: number }>,
): Promise<Selection> {
  const docTokens = ctx.offsets[ctx.offsets.length - 1];
  const parts: SelectionPart[] = [];
  let scanned = 0;
  for (let s = 0; s < ctx.segments.length; s++) {
    const segment = ctx.segments[s];
    const heads = ctx.indexes[s] as H[] | undefined;
    if (!heads || segment.tokens === 0) {
      for (const [begin, end] of staticRanges(ctx, s, p)) parts.push({ segment, begin, end });
      continue;
    }
    const size = heads[0].blockSize;
    const ranges = blockAligned(staticRanges(ctx, s, p), size, segment.tokens);
    for (const [begin, end] of ranges) parts.push({ segment, begin, end });
    const share = Math.ceil((p.budget * segment.tokens) / Math.max(1, docTokens));
    const picked = await pick(s, heads, Math.min(heads[0].blocks, Math.ceil(share / size)));
    scanned += picked.scanned;
    // Blocks the static part covers are attended there (with their classes, where given).
    const ids: Int32Array[] = [], priority: Uint8Array[] = [];
    for (const [h, chosen] of picked.ids.entries()) {
      const kept = new Int32Array(chosen.length), cls = new Uint8Array(chosen.length);
      let n = 0;
      for (let i = 0; i < chosen.length; i++)
        if (!inside(ranges, chosen[i] * size)) {
          cls[n] = picked.priority?.[h][i] ?? 0;
          kept[n++] = chosen[i];
        }
      ids.push(kept.subarray(0, n));
      priority.push(cls.subarray(0, n));
    }
    const blocks: BlockList = picked.priority ? { size, ids, priority } : { size, ids };
    parts.push({ segment, blocks });
  }
  return { parts, scanned };
}

/** The search memo of document segment s in this session's layer. */
function memoOf(ctx: LayerContext, s: number): SearchMemo {
  const key = `retrieved:${s}`;
  let memo = ctx.memo.get(key) as SearchMemo | undefined;
  if (!memo) ctx.memo.set(key, (memo = {}));
  return memo;
}

export function staticPlusRetrieved(name: string, builder: HeadIndexBuilder): RetrievalMethod {
  return {
    name,
    builder,
    async select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
      const G = ctx.qHeads / ctx.kvHeads, d = ctx.headDim;
      const docTokens = ctx.offsets[ctx.offsets.length - 1];
      const parts: SelectionPart[] = [];
      let scanned = 0;
      for (let s = 0; s < ctx.segments.length; s++) {
        const segment = ctx.segments[s];
        const ranges = staticRanges(ctx, s, p);
        for (const [begin, end] of ranges) parts.push({ segment, begin, end });
        const heads = ctx.indexes[s];
        if (!heads || segment.tokens === 0) continue;
        const share = Math.ceil((p.budget * segment.tokens) / Math.max(1, docTokens));
        const covered = ranges.reduce((n, [a, b]) => n + b - a, 0);
        const want = Math.min(share, segment.tokens - covered);
        if (want <= 0) continue;
        const k = want + covered;
        const memo = memoOf(ctx, s);
        const results = builder.searchHeads
          ? await builder.searchHeads(heads, q.subarray(0, ctx.kvHeads * G * d), G, heads.map(() => k), p.ef, memo, p.estimate)
          : heads.map((index, h) => index.search(q.subarray(h * G * d, (h + 1) * G * d), G, k, p.ef));
        const ids = results.map((res) => {
          scanned += res.scanned / ctx.kvHeads;
          const kept = new Int32Array(want);
          let n = 0;
          for (const id of res.ids) if (n < want && !inside(ranges, id)) kept[n++] = id;
          return kept.subarray(0, n);
        });
        parts.push({ segment, ids });
      }
      return { parts, scanned };
    },
  };
}
