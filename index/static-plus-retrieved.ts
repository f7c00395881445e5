// The selection every indexed method makes: a static part (attention sinks,
// the recent window, and the session's own tokens) attended in full, plus
// what the method's per-head index retrieves from each document. The two are
// disjoint (retrieved ids inside the static ranges are dropped), so the
// kernel's log-sum-exp merge of the parts is the attention over their union.
import type { HeadIndex, HeadIndexBuilder, LayerContext, RetrievalMethod, SearchMemo, SearchParams, Selection, SelectionPart } from './method.js';

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

/** The first `want` of ids outside every range, in order (one plain loop over a typed array). */
function outsideRanges(ids: Int32Array, ranges: Range[], want: number): Int32Array {
  const flat = Int32Array.from(ranges.flat());
  const kept = new Int32Array(Math.min(want, ids.length));
  let n = 0;
  for (let i = 0; i < ids.length && n < kept.length; i++) {
    const id = ids[i];
    let drop = false;
    for (let r = 0; r < flat.length; r += 2) if (id >= flat[r] && id < flat[r + 1]) drop = true;
    if (!drop) kept[n++] = id;
  }
  return kept.subarray(0, n);
}

/**
 * The budget split over the document segments (all but the last, the
 * session's own tokens, whose share is 0) in proportion to their tokens, by
 * largest remainder (ties to the earlier document), so the shares sum to
 * the budget: a share rounded up per document attended up to one token more
 * per document beyond the first (7 for a budget of 5 over three documents).
 */
export function budgetShares(ctx: LayerContext, budget: number): number[] {
  const docs = ctx.segments.length - 1, total = ctx.offsets[docs];
  const shares = new Array<number>(ctx.segments.length).fill(0);
  if (docs <= 0 || total === 0) return shares;
  const rest: [number, number][] = [];
  let given = 0;
  for (let s = 0; s < docs; s++) {
    const exact = (budget * ctx.segments[s].tokens) / total;
    shares[s] = Math.floor(exact);
    given += shares[s];
    rest.push([exact - shares[s], s]);
  }
  rest.sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  for (let i = 0; i < budget - given && i < docs; i++) shares[rest[i][1]]++;
  return shares;
}

/**
 * The blocks of `size` tokens that the ranges touch, ascending. A block
 * method never picks them: the static part attends the sinks and the window
 * themselves (not widened to whole blocks, which spent a block's worth of
 * exact rows on a 16-token sink range and read 3.2-3.3% exact at a 2.4%
 * budget on kvrecall-code-13M at 16K bytes), the rest of such a block is the
 * estimate's, and no block is split between the two parts.
 */
export function touchedBlocks(ranges: Range[], size: number): Int32Array {
  // Counted by range, then written into one array: a step's exclude list (~130 blocks at 1M: the window extended
  // back) without a growing number[] copied out. Ranges ascending, so a range's first block is the last one's
  // at most: skipped when it is.
  let n = 0, last = -1;
  for (const [a, b] of ranges) {
    const from = Math.max(Math.floor(a / size), last + 1), to = Math.ceil(b / size);
    if (to > from) (n += to - from), (last = to - 1);
  }
  const out = new Int32Array(n);
  n = 0;
  last = -1;
  for (const [a, b] of ranges) for (let k = Math.max(Math.floor(a / size), last + 1), to = Math.ceil(b / size); k < to; k++) out[n++] = last = k;
  return out;
}

/** ids without those in `exclude` (both small; exclude ascending). */
export function without(ids: Int32Array, exclude: Int32Array): Int32Array {
  if (exclude.length === 0) return ids;
  return ids.filter((b) => !binaryHas(exclude, b));
}

function binaryHas(sorted: Int32Array, x: number): boolean {
  let lo = 0, hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo < sorted.length && sorted[lo] === x;
}

/**
 * The share of a block method's blocks spent on the rows just before the
 * window (in the document the session's own tokens follow) instead of on
 * its best-scored blocks. On kvrecall-code-13M the 128 document tokens
 * before a 64-token window hold as much attention as the three best-scored
 * blocks in layers 1-2 (0.18 / 0.17 of the mass at 8K bytes), and the block
 * score, a block's sub-centroids, misses them: at 16K bytes with the same
 * exact rows, 6 scored blocks cover 0.28 / 0.18 / 0.15 (layers 1 / 2 / 4)
 * of the attention beyond sinks and window, 2 scored blocks and 265 recent
 * rows 0.36 / 0.26 / 0.19 (bench/model/block_recall.py; all recent, layer 4
 * loses what its scored blocks held). End to end at 16K (trials 0-3, 2.9%
 * exact) 0.75 beat 0.5 in every layer but L0 (L1 / L2 / L4 0.048 / 0.039 /
 * 0.040 against 0.049 / 0.042 / 0.046); on the synthetic generator, which
 * has no locality, it costs a little (32K tokens, estimate on: error 0.0073
 * at 0.5, 0.0080 at 0.75, needles 4/4): bench/results/model-block-recent-vm.md.
 */
export const RECENT_SHARE = 0.75;

/**
 * The segment's ranges (merged, ascending) with the one that ends at the
 * segment's end (the window, or none) extended back by `extra` rows, merged
 * with those it reaches; in place.
 */
function extendBack(ranges: Range[], tokens: number, extra: number): void {
  const tail = ranges.length > 0 && ranges[ranges.length - 1][1] === tokens ? ranges.pop() : undefined;
  let from = Math.max(0, (tail ? tail[0] : tokens) - extra);
  for (let r = ranges.pop(); r; r = ranges.pop()) {
    if (r[1] < from) {
      ranges.push(r);
      break;
    }
    from = Math.min(from, r[0]);
  }
  if (from < tokens) ranges.push([from, tokens]);
}

/** A per-kv-head block index of a document (block-select's summaries, quest's bounds). */
export interface BlockIndex extends HeadIndex {
  readonly blocks: number;
  readonly blockSize: number;
}

/**
 * The selection every block method makes: per segment its static ranges (the
 * sinks and window as asked, never widened), and in each indexed document
 * segment the blocks `pick` chooses, none of them one the static ranges
 * touch (`exclude`, ascending: the method skips them and takes the next
 * best). The segment's share of the budget is rounded down to whole blocks,
 * so a block method attends no more than the budget beyond the static part,
 * as the token methods do; in the document the session's own tokens follow,
 * RECENT_SHARE of those blocks and the remainder below a block extend the
 * window back instead. A share covering every row outside the static part
 * attends the whole segment.
 */
export async function blockSelection<H extends BlockIndex>(
  ctx: LayerContext,
  p: SearchParams,
  pick: (s: number, heads: H[], budget: number, exclude: Int32Array) => Promise<{ ids: Int32Array[]; priority?: Uint8Array[]; scanned: number }>,
): Promise<Selection> {
  const shares = budgetShares(ctx, p.budget);
  const parts: SelectionPart[] = [];
  let scanned = 0;
  for (let s = 0; s < ctx.segments.length; s++) {
    const segment = ctx.segments[s];
    const heads = ctx.indexes[s] as H[] | undefined;
    const ranges = staticRanges(ctx, s, p);
    const share = shares[s];
    if (heads && segment.tokens > 0 && share >= segment.tokens - ranges.reduce((n, [a, b]) => n + b - a, 0)) {
      parts.push({ segment, begin: 0, end: segment.tokens }); // the budget covers the segment: all of it, exactly
      continue;
    }
    if (!heads || segment.tokens === 0) {
      for (const [begin, end] of ranges) parts.push({ segment, begin, end });
      continue;
    }
    const size = heads[0].blockSize;
    let count = Math.floor(share / size);
    if (s === ctx.segments.length - 2) {
      // The document the session's own tokens follow: its most recent rows, the window extended back by the
      // share's remainder below a block and RECENT_SHARE of its blocks, attended as a range.
      const recent = Math.floor(count * RECENT_SHARE);
      extendBack(ranges, segment.tokens, share - (count - recent) * size);
      count -= recent;
    }
    for (const [begin, end] of ranges) parts.push({ segment, begin, end });
    const exclude = touchedBlocks(ranges, size);
    const budget = Math.min(heads[0].blocks - exclude.length, count);
    if (budget <= 0) continue;
    const picked = await pick(s, heads, budget, exclude);
    scanned += picked.scanned;
    parts.push({ segment, blocks: picked.priority ? { size, ids: picked.ids, priority: picked.priority } : { size, ids: picked.ids } });
  }
  return { parts, scanned };
}

/** The ids of merged ascending ranges covering `count` rows; `last` when it holds exactly them (no allocation per step). */
function idsOf(ranges: Range[], count: number, last?: Int32Array): Int32Array {
  if (last && last.length === count) {
    let at = 0, same = true;
    for (const [a, b] of ranges) {
      // Ascending distinct ids: equal at every range's ends and in total means equal throughout.
      if (last[at] !== a || last[at + b - a - 1] !== b - 1) same = false;
      at += b - a;
    }
    if (same) return last;
  }
  const ids = new Int32Array(count);
  let n = 0;
  for (const [a, b] of ranges) for (let t = a; t < b; t++) ids[n++] = t;
  return ids;
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
      // Each searched memo's last results as they were, put back if the step fails (Selection.undo): a graph
      // search starts from them, so a failed step's, kept, would start the retry elsewhere and find other keys.
      const searched: [SearchMemo, SearchMemo['last']][] = [];
      const undo = () => {
        for (const [memo, last] of searched) memo.last = last;
        searched.length = 0;
      };
      try {
        return { ...(await choose(ctx, q, p, searched)), undo };
      } catch (e) {
        undo();
        throw e;
      }
    },
  };

  async function choose(ctx: LayerContext, q: Float32Array, p: SearchParams, searched: [SearchMemo, SearchMemo['last']][]): Promise<Selection> {
    const G = ctx.qHeads / ctx.kvHeads, d = ctx.headDim;
    const shares = budgetShares(ctx, p.budget);
    const parts: SelectionPart[] = [];
    let scanned = 0, codes: number | undefined;
    for (let s = 0; s < ctx.segments.length; s++) {
      const segment = ctx.segments[s];
      const ranges = staticRanges(ctx, s, p);
      for (const [begin, end] of ranges) parts.push({ segment, begin, end });
      const heads = ctx.indexes[s];
      if (!heads || segment.tokens === 0) continue;
      const covered = ranges.reduce((n, [a, b]) => n + b - a, 0);
      const want = Math.min(shares[s], segment.tokens - covered);
      if (want <= 0) continue;
      const k = want + covered;
      const memo = memoOf(ctx, s);
      memo.steady = idsOf(ranges, covered, memo.steady);
      searched.push([memo, memo.last]);
      const results = builder.searchHeads
        ? await builder.searchHeads(heads, q.subarray(0, ctx.kvHeads * G * d), G, heads.map(() => k), p.ef, memo, p.estimate, p, ctx.keyScanner)
        : heads.map((index, h) => index.search(q.subarray(h * G * d, (h + 1) * G * d), G, k, p.ef));
      const ids = results.map((res) => {
        scanned += res.scanned / ctx.kvHeads;
        if (res.codes !== undefined) codes = (codes ?? 0) + res.codes / ctx.kvHeads;
        // A search that kept the steady zone out (retrieval-attention's) needs no pass: at 1M, ~10K ids a head
        // checked against the ranges took ~1 ms a layer-step of JS (the 2-core VM).
        if (res.outsideSteady) return res.ids.length <= want ? res.ids : res.ids.subarray(0, want);
        return outsideRanges(res.ids, ranges, want);
      });
      // Rows a device store holds (a key scanner's): the cache attends them there.
      const device = results[0]?.rows;
      parts.push(device ? { segment, ids, device } : { segment, ids });
    }
    return codes === undefined ? { parts, scanned } : { parts, scanned, codes };
  }
}
