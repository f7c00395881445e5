// The engine's device block scorer (engine/cache/device-block-scores.ts) and
// the addon wrapper's JS (addon/block-scores.ts: the call's arguments in one
// buffer, the answer's views) on any host: the native call is a stand-in
// that answers what the device answers (the host pass's rows, the first k
// distinct blocks of them as their first rows, the extra rows' scores), so
// nosa and topk-blocks through the scorer must select what the host path
// selects, step after step; the device copy is made once; timeSteps records
// each call's split.
import { describe, expect, it } from 'vitest';
import { DeviceBlockScores, type BlockTopKTimes, type NativeBlockScores } from '../../addon/block-scores.js';
import { topkHeads } from '../../addon/kernels.js';
import { DeviceBlockScorer } from '../../engine/cache/device-block-scores.js';
import { DEFAULT_PARAMS } from '../../engine/sessions.js';
import { nosa, topkBlocks } from '../../index/block-select.js';
import { BlockSummary, SUMMARY_REPS, summaryStride } from '../../index/block-summary.js';
import type { RetrievalMethod, SearchParams, Selection } from '../../index/method.js';
import { blockLayerContext, randomSummaryRows } from '../../bench/block-layer-context.js';
import { freshSeed } from '../helpers/random.js';
import { Rng } from '../../workload/index.js';

const seed = freshSeed();
console.log(`device-block-scorer: seed ${seed}`);

const TIMES: BlockTopKTimes = { scoreMs: 0, selectMs: 0, deviceMs: 0.25, prepMs: 0.5, issueMs: 0.125, waitMs: 2, copyOutMs: 0.0625 };

/** Answers a call from the host pass over every row of the step (`rows`: each head's row ids best first and every row's score). */
class StandIn implements NativeBlockScores {
  rows?: { ids: Int32Array; all: Float32Array }[];
  calls = 0;
  topk(a: Parameters<NativeBlockScores['topk']>[0]): number {
    this.calls++;
    const R = a.reps ?? 1, heads = this.rows!, kk = Math.min(a.k, Math.floor(heads[0].all.length / R));
    heads.forEach(({ ids, all }, h) => {
      const seen = new Set<number>();
      let n = 0;
      for (let i = 0; i < ids.length && n < kk; i++) {
        const g = Math.floor(ids[i] / R);
        if (seen.has(g)) continue;
        seen.add(g);
        a.outIds[h * kk + n] = g * R;
        a.outScores[h * kk + n++] = all[ids[i]];
      }
    });
    let at = 0;
    if (a.extraIds) heads.forEach(({ all }, h) => {
      for (let i = 0; i < a.extraCounts![h]; i++, at++) a.extraScores![at] = all[a.extraIds![at]];
    });
    expect(at).toBe(a.extraIds?.length ?? 0);
    return kk;
  }
  bytes = () => 0;
  lastTimes = () => ({ ...TIMES });
  graphCaptures = () => 0;
  pipedScores = () => false;
  slicedSelect = () => false;
  close(): void {}
}

const withoutUndo = ({ undo: _undo, ...rest }: Selection) => rest;

describe('the device block scorer over a stand-in native call', () => {
  for (const method of [nosa, topkBlocks] as RetrievalMethod[])
    it(`${method.name}: selects what the host path selects, step after step; one copy; each call's split with timeSteps`, async () => {
      const rng = new Rng(seed);
      const kvHeads = 3, qHeads = 12, d = 64, G = qHeads / kvHeads, blocks = 1000, tokens = blocks * 64 - 7, reps = SUMMARY_REPS, stride = summaryStride(d);
      const heads = Array.from({ length: kvHeads }, () =>
        new BlockSummary(blocks, 64, tokens, d, 'f16', randomSummaryRows(rng, blocks, reps, d, 64), Float32Array.from({ length: blocks }, () => rng.next()), 0.3, reps));
      const native = new StandIn();
      let made = 0;
      const scorer = new DeviceBlockScorer({
        create: (o) => {
          made++;
          expect(o.means.map((m) => m.length)).toEqual(heads.map(() => blocks * reps * stride));
          return DeviceBlockScores.over(native, { heads: o.means.length, blocks: o.blocks, headDim: o.headDim });
        },
        supported: (headDim, group) => headDim === stride && group === G,
      });
      const params = { ...DEFAULT_PARAMS, budget: 64 * 120, sinks: 16, window: 100 } as SearchParams;
      const shape = { tokens, qHeads, kvHeads, headDim: d };
      const onHost = blockLayerContext(heads, shape, new Map()), scored = blockLayerContext(heads, shape, new Map(), scorer);
      let q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      for (let step = 0; step < 10; step++) {
        q = q.map((x) => 0.8 * x + 0.2 * rng.normal());
        const all = heads.map(() => ({ ids: new Int32Array(blocks * reps), all: new Float32Array(blocks * reps) }));
        await topkHeads({ q: BlockSummary.augment(heads, q, G), group: G, headDim: stride, dtype: 'f16', k: blocks * reps, heads: heads.map((s, h) => ({ keys: s.rows, tokens: blocks * reps, outIds: all[h].ids, outScores: new Float32Array(blocks * reps), allScores: all[h].all })) });
        native.rows = all;
        scorer.timeSteps = step % 2 === 1;
        const before = scorer.lastStep;
        const got = await method.select(scored, q, params);
        expect(withoutUndo(got)).toEqual(withoutUndo(await method.select(onHost, q, params)));
        if (scorer.timeSteps) {
          expect(scorer.lastStep).not.toBe(before);
          expect(scorer.lastStep!.native).toEqual(TIMES);
          expect(scorer.lastStep!.callMs).toBeGreaterThanOrEqual(0);
        } else expect(scorer.lastStep).toBe(before);
      }
      expect([made, native.calls, scorer.stats.steps, scorer.stats.failures]).toEqual([1, 10, 10, 0]);
      // A shape the build cannot score: the host path, no call.
      const other = blockLayerContext(heads, { ...shape, qHeads: kvHeads }, new Map(), scorer);
      const q1 = q.subarray(0, kvHeads * d);
      expect(withoutUndo(await method.select(other, q1, params))).toEqual(withoutUndo(await method.select(blockLayerContext(heads, { ...shape, qHeads: kvHeads }, new Map()), q1, params)));
      expect(native.calls).toBe(10);
    });
});
