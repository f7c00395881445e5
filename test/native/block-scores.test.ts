// Device block scoring (addon/block-scores.ts, native/cuda/block_scores.cu)
// and its use by the block methods. Everywhere: a block method offered a
// scorer that returns only the candidates (the rows of the top `reach` and
// last step's blocks, one or several rows per block) selects what it
// selects from the host's full score array. With a
// GPU (skipped here and in CI): the device top-k is the host topkHeads's,
// ids and scores bit for bit, at odd sizes (blocks not a multiple of 32,
// G = 1, 4, 8, d = 64/128, f16 and bf16, ties, k past the blocks, a sort
// larger than shared memory); and a nosa or topk-blocks session on a GPU
// backend (summaries built as sealed: SUMMARY_REPS rows per block) selects
// the blocks a CPU session selects, step after step.
import { describe, expect, it } from 'vitest';
import { DeviceBlockScores, deviceBlockScoresSupported, type HeadTopBlocks } from '../../addon/block-scores.js';
import { cudaAvailable } from '../../addon/cuda.js';
import { topkHeads, type KvDtype } from '../../addon/kernels.js';
import type { ModelShape } from '../../core/model.js';
import { deviceBlockScorer } from '../../engine/cache/device-block-scores.js';
import { GpuBackend } from '../../engine/cache/gpu-pool.js';
import { decodeStep } from '../../engine/decode-step.js';
import type { LoadedDocument } from '../../engine/documents.js';
import { Session } from '../../engine/session.js';
import { DEFAULT_PARAMS } from '../../engine/sessions.js';
import { blockSummaryBuilder, nosa, topkBlocks } from '../../index/block-select.js';
import { BlockSummary, SUMMARY_REPS } from '../../index/block-summary.js';
import type { BlockMeans, BlockScorer, HeadIndex, LayerContext, RetrievalMethod, SearchParams, Selection } from '../../index/method.js';
import { RECENT_SHARE } from '../../index/static-plus-retrieved.js';
import { UNLIMITED } from '../../storage/host-budget.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { bitsOf } from '../helpers/half.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';

// A selection's undo is a closure of its own select: equal selections differ in it alone.
const withoutUndo = ({ undo: _undo, ...rest }: Selection) => rest;

const seed = freshSeed();
console.log(`block-scores: seed ${seed}`);
const gpu = cudaAvailable();

/** Random means [blocks, d] per head, with ties: some rows copy others, some are zero. */
function randomMeans(rng: Rng, heads: number, blocks: number, d: number, dtype: KvDtype): Uint16Array[] {
  const bits = bitsOf(dtype);
  return Array.from({ length: heads }, () => {
    const m = Uint16Array.from({ length: blocks * d }, () => bits(rng.normal()));
    for (let i = 0; i < Math.floor(blocks / 10); i++) {
      const from = rng.int(blocks), to = rng.int(blocks);
      m.copyWithin(to * d, from * d, (from + 1) * d);
    }
    if (blocks > 3) m.fill(0, 2 * d, 3 * d);
    return m;
  });
}

/** The host answer: topkHeads with every block's score. */
async function hostTopk(means: Uint16Array[], blocks: number, d: number, dtype: KvDtype, q: Float32Array, group: number, k: number) {
  const keep = Math.min(k, blocks);
  const heads = means.map((keys) => ({ keys, tokens: blocks, outIds: new Int32Array(keep), outScores: new Float32Array(keep), allScores: new Float32Array(blocks) }));
  const counts = await topkHeads({ q, group, headDim: d, dtype, k, heads });
  return heads.map((h, i) => ({ ids: h.outIds.subarray(0, counts[i]), scores: h.outScores.subarray(0, counts[i]), all: h.allScores }));
}

/**
 * The device's answer against the host's rows, head by head: the first k
 * distinct groups of `reps` rows in the host's order, each as its first row
 * with its best row's score, and every extra row's own score.
 */
function expectGroups(got: HeadTopBlocks[], host: Awaited<ReturnType<typeof hostTopk>>, k: number, reps: number, extra: Int32Array[]): void {
  for (let h = 0; h < host.length; h++) {
    const seen = new Set<number>(), ids: number[] = [], scores: number[] = [];
    for (const r of host[h].ids) {
      const g = Math.floor(r / reps);
      if (seen.has(g) || ids.length >= k) continue;
      seen.add(g);
      ids.push(g * reps);
      scores.push(host[h].all[r]);
    }
    expect(Array.from(got[h].ids), `k=${k} head ${h}`).toEqual(ids);
    expect(Array.from(got[h].scores), `k=${k} head ${h}`).toEqual(scores);
    expect(Array.from(got[h].extraScores)).toEqual(Array.from(extra[h], (r) => host[h].all[r]));
  }
}

/**
 * A BlockScorer on the host that, like the device one, answers only the
 * candidates: the k·reps best rows, or (`grouped`, as the device answers) the
 * first k distinct groups of reps rows among them, each as its first row
 * with the score of its best.
 */
const hostCandidateScorer = (calls: { n: number }, grouped = false): BlockScorer => ({
  async topBlocks(heads: readonly BlockMeans[], q: Float32Array, group: number, k: number, extra: Int32Array[], reps = 1): Promise<HeadTopBlocks[]> {
    calls.n++;
    const { blocks, headDim, dtype } = heads[0];
    const host = await hostTopk(heads.map((s) => s.means), blocks, headDim, dtype, q, group, k * reps);
    return host.map((r, h) => {
      const extraScores = Float32Array.from(extra[h], (b) => r.all[b]);
      if (!grouped) return { ids: r.ids.slice(), scores: r.scores.slice(), extraScores };
      const seen = new Set<number>(), ids: number[] = [], scores: number[] = [];
      r.ids.forEach((row, i) => {
        const g = Math.floor(row / reps);
        if (ids.length < k && !seen.has(g)) seen.add(g), ids.push(g * reps), scores.push(r.scores[i]);
      });
      return { ids: Int32Array.from(ids), scores: Float32Array.from(scores), extraScores };
    });
  },
});

function layerContext(heads: HeadIndex[], tokens: number, kvHeads: number, qHeads: number, d: number, memo: Map<string, unknown>, blockScorer?: BlockScorer): LayerContext {
  const doc = { tokens } as KvSegment, own = { tokens: 0 } as KvSegment;
  return { layer: 0, segments: [doc, own], offsets: [0, tokens], indexes: [heads, undefined], question: () => ({ queries: new Float32Array(0), queryCount: 0 }), memo, tokens, qHeads, kvHeads, headDim: d, ...(blockScorer && { blockScorer }) };
}

/**
 * The selection rule as first written, over every block's score: the
 * agnostic blocks, then the union of the top `reach` and the previous
 * selection sorted by score (then id), previous blocks kept, at most maxNew
 * new ones.
 */
function referenceChoose(byImportance: Int32Array, all: Float32Array, top: Int32Array, budget: number, prev: Set<number>, agnostic: number, maxNewShare: number): number[] {
  const chosen = new Set<number>(byImportance.subarray(0, agnostic));
  const maxNew = prev.size === 0 || maxNewShare === Infinity ? Infinity : Math.max(1, Math.ceil(budget * maxNewShare));
  const byScore = [...new Set([...top, ...prev])].sort((a, b) => all[b] - all[a] || a - b);
  let brought = 0;
  for (const b of byScore) {
    if (chosen.size >= budget) break;
    if (chosen.has(b)) continue;
    if (prev.has(b)) chosen.add(b);
    else if (brought < maxNew) {
      chosen.add(b);
      brought++;
    }
  }
  return [...chosen].sort((a, b) => a - b);
}

describe('host topkHeads at the candidate counts of several rows per block', () => {
  // k·reps rows of a few thousand: most of a task's rows make its top list
  // (native/kernels/topk.cc then keeps every row and selects once); the
  // answer is the rows sorted by score, then id, whatever the path.
  it('returns the first k of every row sorted by score then id (ties from copied rows)', async () => {
    const rng = new Rng(seed + 20);
    const d = 72, G = 4, rows = 6151;
    const means = randomMeans(rng, 2, rows, d, 'f16');
    const q = Float32Array.from({ length: 2 * G * d }, () => rng.normal());
    for (const k of [300, 1600, 4000, 6151]) {
      const got = await hostTopk(means, rows, d, 'f16', q, G, k);
      for (let h = 0; h < 2; h++) {
        const all = got[h].all;
        const want = [...all.keys()].sort((a, b) => all[b] - all[a] || a - b).slice(0, k);
        expect(Array.from(got[h].ids), `k=${k} head ${h}`).toEqual(want);
        expect(Array.from(got[h].scores)).toEqual(want.map((i) => all[i]));
      }
    }
  });
});

describe('block methods with a candidate scorer', () => {
  // reps 1: one row per block (bare means); reps 3: three rows per block,
  // the block scored as its best row (the candidates are the top reach·3
  // rows, deduplicated to blocks). The reference takes every block's score
  // as the max of its rows' host scores and sorts every block.
  // grouped: the scorer answers the first reach distinct blocks themselves (the device's answer), not reach·reps rows.
  for (const method of [nosa, topkBlocks] as RetrievalMethod[])
    for (const [reps, grouped] of [[1, false], [3, false], [3, true], [4, true]] as [number, boolean][])
      it(`${method.name}, ${reps} row(s) per block${grouped ? ', blocks answered as groups' : ''}: selects what the host's full scores select, step after step`, async () => {
        const rng = new Rng(seed + 1 + reps);
        const kvHeads = 2, qHeads = 8, d = 64, blocks = 777, tokens = blocks * 64 - 5, G = qHeads / kvHeads, stride = d + 8;
        const means = randomMeans(rng, kvHeads, blocks * reps, stride, 'f16');
        const heads = means.map((m) => new BlockSummary(blocks, 64, tokens, d, 'f16', m, Float32Array.from({ length: blocks }, () => rng.next()), 0, reps));
        const params: SearchParams = { ...DEFAULT_PARAMS, budget: 64 * 160, sinks: 16, window: 100 } as SearchParams;
        // 160 blocks of budget, RECENT_SHARE of them (120) spent on the rows before the window: 40 picked; nosa: 10
        // agnostic, at most 5 new a step, reach 55. Never picked: the blocks the sinks and the window extended back
        // by the rest of the budget touch (static-plus-retrieved.ts), so each method asks for that many more.
        expect(RECENT_SHARE).toBe(0.75);
        const budget = 40, isNosa = method.name === 'nosa';
        const from = tokens - params.window - (params.budget - budget * 64);
        const excluded = new Set([0, ...Array.from({ length: blocks - Math.floor(from / 64) }, (_, i) => Math.floor(from / 64) + i)]);
        const agnostic = isNosa ? 10 : 0, maxNewShare = isNosa ? 0.125 : Infinity, reach = (isNosa ? 55 : 40) + excluded.size;
        const calls = { n: 0 };
        const memoHost = new Map<string, unknown>(), memoScored = new Map<string, unknown>();
        const prev = heads.map(() => new Set<number>());
        let q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
        for (let step = 0; step < 12; step++) {
          // Drifting queries: consecutive steps share most of their top blocks.
          q = q.map((x) => 0.8 * x + 0.2 * rng.normal());
          const onHost = await method.select(layerContext(heads, tokens, kvHeads, qHeads, d, memoHost), q, params);
          const scored = await method.select(layerContext(heads, tokens, kvHeads, qHeads, d, memoScored, hostCandidateScorer(calls, grouped)), q, params);
          expect(withoutUndo(scored)).toEqual(withoutUndo(onHost));
          const rows = await hostTopk(means, blocks * reps, stride, 'f16', BlockSummary.augment(heads, q, G), G, 0);
          for (let h = 0; h < kvHeads; h++) {
            const all = Float32Array.from({ length: blocks }, (_, b) => Math.max(...rows[h].all.subarray(b * reps, (b + 1) * reps)));
            const top = Int32Array.from([...all.keys()].sort((a, b) => all[b] - all[a] || a - b).slice(0, reach).filter((b) => !excluded.has(b)));
            const importance = heads[h].byImportance.filter((b) => !excluded.has(b));
            const want = referenceChoose(importance, all, top, budget, prev[h], agnostic, maxNewShare);
            for (const b of want) expect(excluded.has(b)).toBe(false);
            const got = [...scored.parts.find((part) => part.blocks)!.blocks!.ids[h]];
            expect(got, `step ${step} head ${h}`).toEqual(want);
            prev[h] = new Set(want);
          }
        }
        expect(calls.n).toBe(12);
      });
});

describe.skipIf(!gpu.ok)('device block top-k (GPU)', () => {
  const cases: { dtype: KvDtype; d: number; G: number; blocks: number }[] = [];
  const sizes = [1, 31, 1000, 4099, 16387];
  let i = 0;
  // d = 136 (a summary row: d 128 + 8) sums a tail of 8 words after the 16-word strides; at G=4 d <= 144 runs the
  // score kernel that stages a warp's rows in shared memory (ScoreBlocksStaged), 264 and the other groups the
  // one that reads them from memory row by row (ScoreBlocks).
  for (const dtype of ['f16', 'bf16'] as KvDtype[])
    for (const d of [64, 128, 136, 264])
      for (const G of [1, 4, 8]) cases.push({ dtype, d, G, blocks: sizes[i++ % sizes.length] });

  for (const c of cases)
    it(`${c.dtype} d=${c.d} G=${c.G} blocks=${c.blocks}: the host's ids and scores, bit for bit`, async () => {
      const rng = new Rng(seed + c.blocks + c.d + c.G);
      const heads = 3;
      const means = randomMeans(rng, heads, c.blocks, c.d, c.dtype);
      const dev = DeviceBlockScores.create({ means, blocks: c.blocks, headDim: c.d, dtype: c.dtype });
      try {
        expect(dev.pipedScores).toBe(process.env.KVRECALL_BLOCK_SCORES_PIPED !== '0' && c.d <= 144);
        expect(dev.slicedSelect).toBe(process.env.KVRECALL_BLOCK_SELECT_SLICED !== '0');
        for (const k of [0, 1, 7, Math.max(1, c.blocks - 1), c.blocks, c.blocks + 5, 300]) {
          const q = Float32Array.from({ length: heads * c.G * c.d }, () => rng.normal() * 2);
          const extra = Array.from({ length: heads }, (_, h) => Int32Array.from({ length: h * 5 }, () => rng.int(c.blocks)));
          const want = await hostTopk(means, c.blocks, c.d, c.dtype, q, c.G, k);
          // The engine's call (a CUDA graph), on a worker thread, and launched one by one with events.
          for (const got of [dev.topk({ q, group: c.G, k, extra }), await dev.topkAsync({ q, group: c.G, k, extra }), dev.topk({ q, group: c.G, k, extra, times: true })])
            for (let h = 0; h < heads; h++) {
              expect(Array.from(got[h].ids), `k=${k} head ${h}`).toEqual(Array.from(want[h].ids));
              expect(Array.from(got[h].scores)).toEqual(Array.from(want[h].scores));
              expect(Array.from(got[h].extraScores)).toEqual(Array.from(extra[h], (b) => want[h].all[b]));
            }
        }
      } finally {
        dev.close();
      }
    });

  // reps > 1 (a summary's rows of one block ranked as one group): the first k distinct groups of the host's row
  // ranking, each as its first row with its best row's score; extra ids stay rows. Copied rows tie across groups
  // (the lower row, so the lower group, first) and within one (its lower row's score). 65,536 rows: a 1M-token
  // head's 16,384 blocks of 4 rows, the groups held in registers where the rows are not.
  for (const [reps, groups, dtype] of [[4, 16384, 'f16'], [2, 1001, 'bf16'], [8, 517, 'f16'], [16, 64, 'f16']] as [number, number, KvDtype][])
    it(`${dtype} reps=${reps} groups=${groups}: the first k distinct groups of the host's rows, in their order`, async () => {
      const rng = new Rng(seed + 30 + reps);
      const heads = 3, d = 136, G = 4, rows = groups * reps;
      const means = randomMeans(rng, heads, rows, d, dtype);
      for (const m of means)
        for (let t = 0; t < 40; t++) {
          const from = rng.int(rows), to = rng.int(rows);
          m.copyWithin(to * d, from * d, from * d + d);
        }
      const dev = DeviceBlockScores.create({ means, blocks: rows, headDim: d, dtype });
      try {
        for (const k of [0, 1, 7, 185, groups - 1, groups, groups + 3]) {
          const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
          const extra = Array.from({ length: heads }, (_, h) => Int32Array.from({ length: 3 + h * 40 }, () => rng.int(rows)));
          const host = await hostTopk(means, rows, d, dtype, q, G, rows);
          for (const got of [dev.topk({ q, group: G, k, extra, reps }), dev.topk({ q, group: G, k, extra, reps, times: true })])
            expectGroups(got, host, k, reps, extra);
        }
        expect(() => dev.topk({ q: new Float32Array(heads * G * d), group: G, k: 4, reps: 3 })).toThrow(/reps/);
      } finally {
        dev.close();
      }
    });

  it('a layer\'s steps replay one CUDA graph while their extra ids change, and answer as the host every step', async () => {
    const rng = new Rng(seed + 11);
    const heads = 4, blocks = 5003, d = 128, G = 4, k = 40;
    const means = randomMeans(rng, heads, blocks, d, 'f16');
    const dev = DeviceBlockScores.create({ means, blocks, headDim: d, dtype: 'f16' });
    try {
      // Extra counts that change every step within one bucket of the copies (2048 ids), then past it, then back.
      const totals = [300, 40, 1200, 7, 2047, 5000, 90, 0];
      const captures: number[] = [];
      for (const total of totals) {
        const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
        const split = [0, 0, 0, 0].map(() => rng.next());
        const sum = split.reduce((a, b) => a + b, 0);
        const counts = split.map((x) => Math.floor((x / sum) * total));
        const extra = counts.map((n) => Int32Array.from({ length: n }, () => rng.int(blocks)));
        const want = await hostTopk(means, blocks, d, 'f16', q, G, k);
        const got = dev.topk({ q, group: G, k, extra });
        for (let h = 0; h < heads; h++) {
          expect(Array.from(got[h].ids), `total ${total} head ${h}`).toEqual(Array.from(want[h].ids));
          expect(Array.from(got[h].scores)).toEqual(Array.from(want[h].scores));
          expect(Array.from(got[h].extraScores), `total ${total} head ${h} extra`).toEqual(Array.from(extra[h], (b) => want[h].all[b]));
        }
        captures.push(dev.graphCaptures);
      }
      // One graph while the ids fit the first bucket; 5000 ids grow the staging buffers (a new graph), after which
      // 90 ids are a shape of the new buffers (another), and no extra ids one more.
      expect(captures).toEqual([1, 1, 1, 1, 1, 2, 3, 4]);
    } finally {
      dev.close();
    }
  });

  it('deviceTime: the call\'s time on the device from events in its own graph, or around the kernels launched one by one; the same answers', async () => {
    const rng = new Rng(seed + 13);
    const heads = 2, rows = 4096, d = 136, G = 4, reps = 4, k = 50;
    const means = randomMeans(rng, heads, rows, d, 'f16');
    const dev = DeviceBlockScores.create({ means, blocks: rows, headDim: d, dtype: 'f16' });
    try {
      for (let step = 0; step < 3; step++) {
        const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
        const extra = Array.from({ length: heads }, () => Int32Array.from({ length: 30 }, () => rng.int(rows)));
        const plain = dev.topk({ q, group: G, k, extra, reps });
        expect(dev.lastTimes.deviceMs).toBe(0);
        const timed = dev.topk({ q, group: G, k, extra, reps, deviceTime: true });
        expect(dev.lastTimes.deviceMs).toBeGreaterThan(0);
        const oneByOne = dev.topk({ q, group: G, k, extra, reps, times: true, deviceTime: true });
        const t = dev.lastTimes;
        // The call's events bracket its kernels' on one stream (event resolution ~0.5 us).
        expect(t.deviceMs).toBeGreaterThanOrEqual(t.scoreMs + t.selectMs - 0.005);
        for (const got of [timed, oneByOne])
          for (let h = 0; h < heads; h++) {
            expect(Array.from(got[h].ids)).toEqual(Array.from(plain[h].ids));
            expect(Array.from(got[h].scores)).toEqual(Array.from(plain[h].scores));
            expect(Array.from(got[h].extraScores)).toEqual(Array.from(plain[h].extraScores));
          }
      }
      // The engine's graph and the timed one (its event nodes), each captured once.
      expect(dev.graphCaptures).toBe(2);
    } finally {
      dev.close();
    }
  });

  // The switches (read when a copy is made; both on by default, =0 turns each off): KVRECALL_BLOCK_SCORES_PIPED, the staged shapes' score kernel
  // walking tiles with its copies overlapping its sums (block_score_kernels.cuh ScoreBlocksPiped);
  // KVRECALL_BLOCK_SELECT_SLICED, the select in two launches (block_scores.cu SelectMode) where a head's slices'
  // candidates fit. The host's ids and scores bit for bit, at a 1M-token head's rows, odd sizes (a part tile,
  // fewer tiles than CTAs, a last slice of one key), reps 1 and 4, f16 and bf16, d 64-144, k past the candidates'
  // room (the one-launch select), each switch alone and both.
  const SWITCHES = ['KVRECALL_BLOCK_SCORES_PIPED', 'KVRECALL_BLOCK_SELECT_SLICED'] as const;
  for (const on of [[], [SWITCHES[0]], [SWITCHES[1]], [...SWITCHES]] as (typeof SWITCHES[number])[][])
    for (const [dtype, d, rows, reps] of [['f16', 136, 65536, 4], ['bf16', 136, 4099 * 4, 4], ['f16', 128, 2049, 1], ['bf16', 64, 1000, 1], ['f16', 144, 130, 1]] as [KvDtype, number, number, number][])
      it(`${SWITCHES.map((v) => `${v}=${on.includes(v) ? 1 : 0}`).join(' ')}, ${dtype} d=${d} rows=${rows} reps=${reps}: the host's ids and scores`, async () => {
        const rng = new Rng(seed + 17 + rows + d + on.length);
        const heads = 3, G = 4, groups = rows / reps;
        const means = randomMeans(rng, heads, rows, d, dtype);
        const before = SWITCHES.map((v) => process.env[v]);
        for (const v of SWITCHES) process.env[v] = on.includes(v) ? '1' : '0';
        let dev: DeviceBlockScores;
        try {
          dev = DeviceBlockScores.create({ means, blocks: rows, headDim: d, dtype });
        } finally {
          SWITCHES.forEach((v, i) => (before[i] === undefined ? delete process.env[v] : (process.env[v] = before[i])));
        }
        try {
          expect([dev.pipedScores, dev.slicedSelect]).toEqual([on.includes(SWITCHES[0]), on.includes(SWITCHES[1])]);
          for (const k of [1, 40, 185, 512, 513, groups]) {
            const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
            const extra = Array.from({ length: heads }, (_, h) => Int32Array.from({ length: 5 + h * 20 }, () => rng.int(rows)));
            const host = await hostTopk(means, rows, d, dtype, q, G, rows);
            for (const got of [dev.topk({ q, group: G, k, extra, reps }), dev.topk({ q, group: G, k, extra, reps, times: true })])
              expectGroups(got, host, k, reps, extra);
          }
        } finally {
          dev.close();
        }
      });

  it('a top-k larger than shared memory sorts in global memory, the same', async () => {
    const rng = new Rng(seed + 5);
    const blocks = 20011, d = 64, G = 2, k = 12000;
    const means = randomMeans(rng, 2, blocks, d, 'bf16');
    const dev = DeviceBlockScores.create({ means, blocks, headDim: d, dtype: 'bf16' });
    try {
      const q = Float32Array.from({ length: 2 * G * d }, () => rng.normal());
      const want = await hostTopk(means, blocks, d, 'bf16', q, G, k);
      const got = dev.topk({ q, group: G, k });
      for (let h = 0; h < 2; h++) expect(Array.from(got[h].ids)).toEqual(Array.from(want[h].ids));
    } finally {
      dev.close();
    }
  });

  it('refuses extra ids outside the blocks and steps after close', () => {
    const dev = DeviceBlockScores.create({ means: [new Uint16Array(10 * 64)], blocks: 10, headDim: 64, dtype: 'f16' });
    expect(() => dev.topk({ q: new Float32Array(64), group: 1, k: 3, extra: [Int32Array.of(10)] })).toThrow(/extraIds/);
    expect(deviceBlockScoresSupported(64, 1)).toBe(true);
    expect(deviceBlockScoresSupported(60, 1)).toBe(false);
    dev.close();
    expect(() => dev.topk({ q: new Float32Array(64), group: 1, k: 3 })).toThrow(/closed/);
  });
});

describe.skipIf(!gpu.ok)('block methods on a GPU session (GPU)', () => {
  for (const name of ['nosa', 'topk-blocks'])
    it(`${name}: the GPU session selects the CPU session's blocks, step after step`, async () => {
      const rng = new Rng(seed + 9);
      const model: ModelShape = { layers: 1, qHeads: 16, kvHeads: 4, headDim: 128, dtype: 'f16', blockSize: 64 };
      const tokens = 64 * 260 + 13;
      const chunk = randomKv(rng, 'f16', model.kvHeads, tokens, model.headDim);
      const seg = new KvSegment(model.kvHeads, model.headDim, 'f16');
      seg.append(chunk.k.data, chunk.v.data, 'f16', tokens);
      const summaries: HeadIndex[] = [];
      for (let h = 0; h < model.kvHeads; h++) {
        const keys = seg.k[h].subarray(0, tokens * model.headDim);
        const bytes = await blockSummaryBuilder.build({ keys, tokens, headDim: model.headDim, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 });
        summaries.push(blockSummaryBuilder.load(bytes, { keys, tokens, headDim: model.headDim, dtype: 'f16' }));
      }
      // Several rows per block: the device ranks rows, the step deduplicates them to blocks.
      expect((summaries[0] as BlockSummary).reps).toBe(SUMMARY_REPS);
      const doc: LoadedDocument = {
        meta: { id: 'doc', model, status: 'ready', tokens, methods: ['nosa', 'topk-blocks'], createdAt: new Date().toISOString() },
        layers: [seg],
        indexes: new Map(),
      };
      const method = name === 'nosa' ? nosa : topkBlocks;
      const params = { ...DEFAULT_PARAMS, budget: 64 * 30, sinks: 16, window: 100 } as SearchParams;
      const backend = GpuBackend.open({ budgetBytes: 256 << 20 })!;
      const reserved = backend.admit(model, name, params, tokens);
      expect(reserved).toBeGreaterThan(0);
      const open = (onGpu: boolean) =>
        new Session({ id: `${name}-${onGpu}`, model, documents: [doc], method, params, documentIndexes: [[summaries]], budget: UNLIMITED, ...(onGpu && { gpu: backend, gpuReserved: reserved }) });
      const [g, c] = [open(true), open(false)];
      const before = deviceBlockScorer().stats.steps;
      try {
        let q = Float32Array.from({ length: model.qHeads * model.headDim }, () => rng.normal());
        for (let step = 0; step < 10; step++) {
          q = q.map((x) => 0.85 * x + 0.15 * rng.normal());
          const req = { layer: 0, q, scale: 1 / Math.sqrt(model.headDim), want: new Set(['selection']) } as Parameters<typeof decodeStep>[1];
          const [rg, rc] = [await decodeStep(g, req), await decodeStep(c, req)];
          expect(rg.stats.backend).toBe('cuda');
          expect(rc.stats.backend).toBe('cpu');
          expect(rg.selection!.map((s) => Array.from(s))).toEqual(rc.selection!.map((s) => Array.from(s)));
        }
        expect(deviceBlockScorer().stats.steps - before).toBe(10);
      } finally {
        g.release();
        c.release();
        backend.close();
      }
    });
});
