// A document's block summaries (block-select's, quest's) are shared by every
// session over it, and two sessions' steps score them at once: each step's
// top blocks (and the scores of its previous blocks) are its own query's,
// the same as when it scores alone. The host scoring is one native call off
// the event loop, so the steps' calls are in flight together.
import { describe, expect, it } from 'vitest';
import type { KvDtype } from '../../addon/kernels.js';
import { BlockSummary, SUMMARY_BLOCK } from '../../index/block-summary.js';
import { QUEST_BLOCK, QuestSummary } from '../../index/quest.js';
import { bitsOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
const dtype: KvDtype = 'f16';
const d = 64, kvHeads = 2, G = 4, STEPS = 8;

const words = (rng: Rng, n: number) => {
  const bits = bitsOf(dtype);
  return Uint16Array.from({ length: n }, () => bits(rng.normal()));
};
const queries = (rng: Rng) => Array.from({ length: STEPS }, () => Float32Array.from({ length: kvHeads * G * d }, () => rng.normal()));

describe(`block scoring by concurrent steps (seed ${seed})`, () => {
  it('block summaries: each step gets its own top blocks and previous blocks\' scores', async () => {
    const rng = new Rng(seed);
    const blocks = 6000;
    const heads = Array.from({ length: kvHeads }, () => new BlockSummary(blocks, SUMMARY_BLOCK, blocks * SUMMARY_BLOCK, d, dtype, words(rng, blocks * d), new Float32Array(blocks).fill(1 / blocks)));
    const qs = queries(rng);
    // A step's previous blocks, as the rows whose scores it asks for (one row per block here).
    const prev = qs.map(() => heads.map(() => Int32Array.from({ length: 16 }, () => Math.floor(rng.next() * blocks)).sort()));
    // The decode step's call: its top rows and its previous rows' scores, copied before the host pass's arrays go back.
    const step = (i: number) =>
      BlockSummary.candidateRows(heads, qs[i], G, 40, prev[i], undefined, (c) =>
        c.top.map((ids, h) => ({ top: [...ids], extraScores: Array.from(prev[i][h], (r) => c.rowScores![h][r]) })));
    const alone = [];
    for (let i = 0; i < STEPS; i++) alone.push(await step(i));
    const together = await Promise.all(qs.map((_, i) => step(i)));
    for (let i = 0; i < STEPS; i++)
      for (let h = 0; h < kvHeads; h++) {
        expect(together[i][h].top).toEqual(alone[i][h].top);
        expect(together[i][h].extraScores).toEqual(alone[i][h].extraScores);
      }
    // And scoreHeads (every block's score) alike.
    const scoresAlone = [];
    for (let i = 0; i < STEPS; i++) scoresAlone.push(await BlockSummary.scoreHeads(heads, qs[i], G, 40));
    const scoresTogether = await Promise.all(qs.map((q) => BlockSummary.scoreHeads(heads, q, G, 40)));
    for (let i = 0; i < STEPS; i++)
      for (let h = 0; h < kvHeads; h++) {
        expect([...scoresTogether[i][h].order]).toEqual([...scoresAlone[i][h].order]);
        expect([...scoresTogether[i][h].scores]).toEqual([...scoresAlone[i][h].scores]);
      }
  });

  it('quest: each step gets its own top blocks', async () => {
    const rng = new Rng(seed + 1);
    // Rows as the artifact holds them ([max, min] per block); their values do not matter here.
    const blocks = 6000;
    const heads = Array.from({ length: kvHeads }, () => new QuestSummary(blocks, QUEST_BLOCK, blocks * QUEST_BLOCK, d, dtype, words(rng, blocks * 2 * d)));
    const qs = queries(rng);
    const alone = [];
    for (const q of qs) alone.push(await QuestSummary.topHeads(heads, q, G, 40));
    const together = await Promise.all(qs.map((q) => QuestSummary.topHeads(heads, q, G, 40)));
    for (let i = 0; i < STEPS; i++) for (let h = 0; h < kvHeads; h++) expect([...together[i][h]]).toEqual([...alone[i][h]]);
  });
});
