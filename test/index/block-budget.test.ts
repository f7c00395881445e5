// How a block method spends its budget (index/static-plus-retrieved.ts
// blockSelection, issue #16): never more rows than the budget beyond the
// sinks and window (the share rounded down to whole blocks: rounding up and
// widening sinks and window to whole blocks had read 3.2-3.3% exact at a
// 2.4% budget), the picked blocks never touching the static ranges, and in
// the document the session's own tokens follow the window extended back by
// the rest of the share. Checked on the selection's rows against a count
// written from the rule, over random shapes.
import { describe, expect, it } from 'vitest';
import type { HeadIndex, LayerContext, SearchParams } from '../../index/method.js';
import { blockSelection, budgetShares, RECENT_SHARE, touchedBlocks, type BlockIndex } from '../../index/static-plus-retrieved.js';
import { rowsOf } from '../../engine/cache/selection-parts.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`block-budget: seed ${seed}`);
const SIZE = 64, KV = 2;

function context(docs: number[], own: number): LayerContext {
  const segments = [...docs, own].map((tokens) => ({ tokens }) as KvSegment);
  const offsets = segments.map((_, i) => segments.slice(0, i).reduce((n, s) => n + s.tokens, 0));
  const index = (tokens: number): BlockIndex => ({ blocks: Math.ceil(tokens / SIZE), blockSize: SIZE, search: () => ({ ids: new Int32Array(0), scanned: 0 }) }) as BlockIndex & HeadIndex;
  return {
    layer: 0, segments, offsets, tokens: offsets[offsets.length - 1] + own, qHeads: 8, kvHeads: KV, headDim: 8, memo: new Map(),
    indexes: [...docs.map((t) => Array.from({ length: KV }, () => index(t))), undefined],
    question: () => ({ queries: new Float32Array(0), queryCount: 0 }),
  };
}

/** Rows of segment s a selection attends for kv head h, ascending, each once (fails on a row attended twice). */
function rowsOfSegment(sel: Awaited<ReturnType<typeof blockSelection>>, ctx: LayerContext, s: number, h: number): number[] {
  const rows = sel.parts.filter((p) => p.segment === ctx.segments[s]).flatMap((p) => [...rowsOf(p, h)]);
  expect(new Set(rows).size).toBe(rows.length);
  return rows.sort((a, b) => a - b);
}

describe('a block method spends its budget', () => {
  it('within the budget beyond sinks and window, blocks clear of them, the rest of the share on the recent rows', async () => {
    const rng = new Rng(seed);
    for (let trial = 0; trial < 200; trial++) {
      const docs = Array.from({ length: 1 + rng.int(2) }, () => 200 + rng.int(20000));
      const own = rng.int(100), docTokens = docs.reduce((a, b) => a + b, 0);
      const ctx = context(docs, own);
      const p = { budget: 1 + rng.int(Math.floor(docTokens * 0.05)), sinks: rng.int(40), window: rng.int(200), ef: 0, chunk: 0, span: 0 } as SearchParams;
      const asked: { s: number; budget: number; exclude: Int32Array }[] = [];
      // The picker takes the lowest blocks not excluded (any order of preference would do).
      const sel = await blockSelection(ctx, p, async (s, heads, budget, exclude) => {
        asked.push({ s, budget, exclude });
        const free = Array.from({ length: heads[0].blocks }, (_, b) => b).filter((b) => !exclude.includes(b)).slice(0, budget);
        return { ids: heads.map(() => Int32Array.from(free)), scanned: 0 };
      });
      for (let s = 0; s < docs.length; s++) {
        const tokens = docs[s], off = ctx.offsets[s];
        // The document's share of the budget (in proportion to its tokens, summing to the budget: budget-shares.test.ts).
        const share = budgetShares(ctx, p.budget)[s];
        // Sinks and window as the context asks, local to this document.
        const stat = new Set<number>();
        for (let t = 0; t < tokens; t++) if (off + t < p.sinks || off + t >= ctx.tokens - p.window) stat.add(t);
        for (let h = 0; h < KV; h++) {
          const rows = rowsOfSegment(sel, ctx, s, h);
          if (share >= tokens - stat.size) {
            expect(rows.length).toBe(tokens); // the budget covers the document
            continue;
          }
          for (const t of stat) expect(rows).toContain(t);
          const blocks = Math.floor(share / SIZE), last = s === docs.length - 1;
          const recent = last ? Math.floor(blocks * RECENT_SHARE) : 0;
          const extra = last ? share - (blocks - recent) * SIZE : 0;
          // The recent rows: the window (or the document's end) extended back by `extra`.
          const windowFrom = Math.min(tokens, Math.max(0, ctx.tokens - p.window - off));
          const recentRows = new Set<number>();
          for (let t = Math.max(0, windowFrom - extra); t < tokens; t++) recentRows.add(t);
          const want = new Set([...stat, ...recentRows]);
          const call = asked.find((a) => a.s === s);
          const picked = rows.filter((t) => !want.has(t));
          // Only whole blocks beyond the static and recent rows, none of them touching those rows.
          const pickedBlocks = new Set(picked.map((t) => Math.floor(t / SIZE)));
          for (const b of pickedBlocks) {
            expect(call!.exclude).not.toContain(b);
            for (let t = b * SIZE; t < Math.min(tokens, (b + 1) * SIZE); t++) {
              expect(want.has(t)).toBe(false);
              expect(rows).toContain(t);
            }
          }
          // As many blocks as the share leaves, where that many lie clear of the static and recent rows.
          const clear = Math.ceil(tokens / SIZE) - touchedBlocks(mergedRanges(want), SIZE).length;
          expect(pickedBlocks.size).toBe(Math.min(blocks - recent, clear));
          // The recent rows attended, and never more than the share beyond sinks and window.
          expect([...recentRows].every((t) => rows.includes(t))).toBe(true);
          expect([...recentRows].filter((t) => !stat.has(t)).length).toBeLessThanOrEqual(extra);
          expect(rows.length - stat.size).toBeLessThanOrEqual(share);
        }
      }
    }
  });

  it('an earlier document gets its share in blocks, no recent rows', async () => {
    const ctx = context([64 * 100, 64 * 100], 10);
    const p = { budget: 64 * 10 + 30, sinks: 0, window: 0, ef: 0, chunk: 0, span: 0 } as SearchParams;
    const sel = await blockSelection(ctx, p, async (_s, heads, budget, exclude) => ({
      ids: heads.map(() => Int32Array.from({ length: budget }, (_, i) => i).filter((b) => !exclude.includes(b))),
      scanned: 0,
    }));
    // Each document's share: ceil(670 / 2) = 335 rows, 5 whole blocks: in the first 5 blocks; in the second
    // 5 - floor(5 * RECENT_SHARE) = 2 blocks picked and 335 - 2 * 64 = 207 recent rows.
    expect(RECENT_SHARE).toBe(0.75);
    expect(rowsOfSegment(sel, ctx, 0, 0)).toEqual(Array.from({ length: 5 * 64 }, (_, i) => i));
    const second = rowsOfSegment(sel, ctx, 1, 1);
    expect(second.length).toBe(335);
    expect(second.slice(0, 128)).toEqual(Array.from({ length: 128 }, (_, i) => i));
    expect(second.slice(128)).toEqual(Array.from({ length: 207 }, (_, i) => 6400 - 207 + i));
  });
});

function mergedRanges(rows: Set<number>): [number, number][] {
  const sorted = [...rows].sort((a, b) => a - b), out: [number, number][] = [];
  for (const t of sorted) {
    const last = out[out.length - 1];
    if (last && last[1] === t) last[1] = t + 1;
    else out.push([t, t + 1]);
  }
  return out;
}
