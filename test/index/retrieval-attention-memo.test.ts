// A session's graph search starts from the ids it found at its last step
// (index/retrieval-attention.ts, SearchMemo): the memo keeps each head's
// ids, and for a next query close to the last one a narrow search seeded by
// them finds more of its exact top-k than the same search from the entry
// points alone; the session's steady zone (memo.steady) starts it for free
// and is left out of its ids. With one q head per kv head the ranking is
// q·k, so the float64 reference is exact.
import { describe, expect, it } from 'vitest';
import type { LayerContext, SearchMemo, SearchParams } from '../../index/method.js';
import { RaGraph } from '../../addon/ra-graph.js';
import { DEFAULT_MARGIN, retrievalAttention, retrievalAttentionBuilder, STEADY_MARGIN } from '../../index/retrieval-attention.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`retrieval-attention-memo: seed ${seed}`);
const toBits = bitsOf('f16'), toValue = valueOf('f16');
const d = 32, N = 6000, heads = 2, k = 60, STEPS = 12;

describe('retrieval-attention search memo', () => {
  it('keeps each head\'s ids, and the next step\'s search started from them finds more of its exact top-k', async () => {
    const rng = new Rng(seed);
    const indexes = [];
    const keysOf: Float64Array[] = [];
    for (let h = 0; h < heads; h++) {
      const bits = Uint16Array.from({ length: N * d }, () => toBits(rng.normal()));
      keysOf.push(Float64Array.from(bits, toValue));
      const queries = Float32Array.from({ length: 512 * d }, () => rng.normal());
      const keys = { keys: bits, values: bits, tokens: N, headDim: d, dtype: 'f16' as const };
      indexes.push(retrievalAttentionBuilder.load(await retrievalAttentionBuilder.build({ ...keys, queries, queryCount: 512 }), keys));
    }
    const recall = (ids: Int32Array, q: Float32Array, h: number) => {
      const score = (t: number) => q.reduce((a, x, j) => a + x * keysOf[h][t * d + j], 0);
      const top = new Set([...Array(N).keys()].sort((a, b) => score(b) - score(a) || a - b).slice(0, k));
      return [...ids].filter((t) => top.has(t)).length / k;
    };
    let before = 0, after = 0;
    for (let step = 0; step < STEPS; step++) {
      const q = Float32Array.from({ length: heads * d }, () => 2 * rng.normal());
      // The next step's query: close to this one.
      const next = q.map((x) => x + 0.5 * rng.normal());
      const memo: SearchMemo = {};
      // A narrow fixed beam (ef = k) misses some of the top-k on Gaussian keys.
      const first = await retrievalAttentionBuilder.searchHeads!(indexes, q, 1, [k, k], k, memo);
      expect(memo.last?.map((ids) => Array.from(ids))).toEqual(first.map((r) => Array.from(r.ids)));
      const cold = await retrievalAttentionBuilder.searchHeads!(indexes, next, 1, [k, k], k);
      const seeded = await retrievalAttentionBuilder.searchHeads!(indexes, next, 1, [k, k], k, memo);
      for (let h = 0; h < heads; h++) {
        const qh = next.subarray(h * d, (h + 1) * d);
        before += recall(cold[h].ids, qh, h);
        after += recall(seeded[h].ids, qh, h);
        // The seeds were scored: counted as scanned.
        expect(seeded[h].scanned).toBeGreaterThan(0);
      }
    }
    console.log(`recall of the next steps: cold ${(before / (STEPS * heads)).toFixed(3)}, seeded ${(after / (STEPS * heads)).toFixed(3)}`);
    expect(after).toBeGreaterThan(before);
  });

  it('starts from the steady zone (memo.steady) for free: k counts it, the ids leave it out, exhaustively the exact top of the rest', async () => {
    const rng = new Rng(seed + 1);
    const n = 2001, W = 100;
    const bits = Uint16Array.from({ length: n * d }, () => toBits(rng.normal()));
    const values = Float64Array.from(bits, toValue);
    const keys = { keys: bits, values: bits, tokens: n, headDim: d, dtype: 'f16' as const };
    const queries = Float32Array.from({ length: 256 * d }, () => rng.normal());
    const index = retrievalAttentionBuilder.load(await retrievalAttentionBuilder.build({ ...keys, queries, queryCount: 256 }), keys);
    const steady = Int32Array.from({ length: 4 + W }, (_, i) => (i < 4 ? i : n - W + (i - 4)));
    const isSteady = (t: number) => t < 4 || t >= n - W;
    // A query leaning towards a window key, so that the plain top-k holds steady ids.
    const q = Float32Array.from({ length: d }, (_, j) => 0.5 * values[(n - 7) * d + j] + 0.5 * rng.normal());
    const memo: SearchMemo = { steady };
    const [withSteady] = await retrievalAttentionBuilder.searchHeads!([index], q, 1, [k + steady.length], n, memo);
    const [plain] = await retrievalAttentionBuilder.searchHeads!([index], q, 1, [k + steady.length], n);
    const score = (t: number) => q.reduce((a, x, j) => a + x * values[t * d + j], 0);
    const order = [...Array(n).keys()].sort((a, b) => score(b) - score(a) || a - b);
    expect(order.slice(0, k + steady.length).some(isSteady)).toBe(true);
    expect(withSteady.ids.length).toBe(k);
    expect([...withSteady.ids].some(isSteady)).toBe(false);
    expect(new Set(withSteady.ids)).toEqual(new Set(order.filter((t) => !isSteady(t)).slice(0, k)));
    // Exhaustive: every key scored, the steady ones free but for those the strided sample (every 31st key here,
    // counted once) holds: 4 of the window's 100.
    expect(plain.scanned).toBe(n);
    expect(withSteady.scanned).toBe(n - steady.length + 4);
    expect([...plain.ids].some(isSteady)).toBe(true);
  });

  it('searches by default (ef 0) with the beam of the k asked and the margin widened by ln(1 + steady/k)', async () => {
    const rng = new Rng(seed + 3);
    const n = 2001, W = 100;
    const bits = Uint16Array.from({ length: n * d }, () => toBits(rng.normal()));
    const keys = { keys: bits, values: bits, tokens: n, headDim: d, dtype: 'f16' as const };
    const queries = Float32Array.from({ length: 256 * d }, () => rng.normal());
    const bytes = await retrievalAttentionBuilder.build({ ...keys, queries, queryCount: 256 });
    const index = retrievalAttentionBuilder.load(bytes, keys), graph = RaGraph.load(bytes);
    const steady = Int32Array.from({ length: 4 + W }, (_, i) => (i < 4 ? i : n - W + (i - 4)));
    const q = Float32Array.from({ length: d }, () => rng.normal());
    const direct = (margin: number, ef: number, free?: Int32Array) => {
      const outIds = new Int32Array(k), outScores = new Float32Array(k);
      const r = graph.searchSync({ ...keys, q, group: 1, k, ef, margin, aggregate: 'attention', outIds, outScores, ...(free && { freeSeeds: free }) });
      return { ids: Array.from(outIds.subarray(0, r.count)), scanned: r.scanned };
    };
    const [session] = await retrievalAttentionBuilder.searchHeads!([index], q, 1, [k + steady.length], 0, { steady });
    const margin = DEFAULT_MARGIN + STEADY_MARGIN * Math.log(1 + steady.length / k);
    expect({ ids: Array.from(session.ids), scanned: session.scanned }).toEqual(direct(margin, 8 * (k + steady.length), steady));
    // Without a steady zone: margin DEFAULT_MARGIN, beam 8k, as before the steady zone was free.
    const [plain] = await retrievalAttentionBuilder.searchHeads!([index], q, 1, [k], 0);
    expect({ ids: Array.from(plain.ids), scanned: plain.scanned }).toEqual(direct(DEFAULT_MARGIN, 8 * k));
    // The widened margin searches further than the bare one from the same start.
    expect(session.scanned).toBeGreaterThan(direct(DEFAULT_MARGIN, 8 * k, steady).scanned);
    graph.dispose();
  });

  it("is handed the session's sinks and window by the selection, which attends them and the budget's top outside them", async () => {
    const rng = new Rng(seed + 2);
    const n = 2001, sinks = 4, window = 100, budget = 30;
    const bits = Uint16Array.from({ length: n * d }, () => toBits(rng.normal()));
    const values = Float64Array.from(bits, toValue);
    const keys = { keys: bits, values: bits, tokens: n, headDim: d, dtype: 'f16' as const };
    const queries = Float32Array.from({ length: 256 * d }, () => rng.normal());
    const index = retrievalAttentionBuilder.load(await retrievalAttentionBuilder.build({ ...keys, queries, queryCount: 256 }), keys);
    // One document of n tokens, no own tokens yet; one kv head of one q head.
    const segments = [{ tokens: n }, { tokens: 0 }] as KvSegment[];
    const ctx = { layer: 0, segments, offsets: [0, n], indexes: [[index], undefined], memo: new Map(), tokens: n, qHeads: 1, kvHeads: 1, headDim: d, question: () => ({ queries: new Float32Array(0), queryCount: 0 }) } as LayerContext;
    const params = { budget, sinks, window, ef: n, chunk: 0, span: 0 } as SearchParams;
    const q = Float32Array.from({ length: d }, (_, j) => 0.5 * values[(n - 7) * d + j] + 0.5 * rng.normal());
    const isSteady = (t: number) => t < sinks || t >= n - window;
    const score = (t: number) => q.reduce((a, x, j) => a + x * values[t * d + j], 0);
    const order = [...Array(n).keys()].filter((t) => !isSteady(t)).sort((a, b) => score(b) - score(a) || a - b);
    for (let step = 0; step < 2; step++) {
      const sel = await retrievalAttention.select(ctx, q, params);
      const [ids] = sel.parts.find((part) => part.ids)!.ids!; // one list per kv head
      expect(new Set(ids)).toEqual(new Set(order.slice(0, budget)));
      // Exhaustive, the steady zone free: every key but its 104 (4 of which the strided sample holds, counted).
      expect(sel.scanned).toBe(n - sinks - window + 4);
      expect(Array.from((ctx.memo.get('retrieved:0') as SearchMemo).steady!)).toEqual([...Array(n).keys()].filter(isSteady));
    }
  });
});
