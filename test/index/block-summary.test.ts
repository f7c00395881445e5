// Block summaries (index/block-summary.ts): per block a few k-means
// sub-centroids of its keys, each row [c, radius, ln count, 0 ...], ranked by
// max over the group and the block's rows of q·c + α·‖q‖·r + √d·ln n, α the
// head's radius share, calibrated at build from the prefill queries
// (issue #16).
//  - a block whose one outlier key holds more attention mass than any other
//    block, among keys whose mean is unremarkable (and whose radius is below
//    the spread blocks'), ranks first in scoreBlocks, the stateless search,
//    and topk-blocks / nosa selections, while the one-mean-per-block score
//    (q·mean + α·‖q‖·radius, computed here in float64) ranks it below the
//    spread blocks at every share;
//  - at share 1 a block's score bounds every one of its keys' q·k;
//  - calibration picks a share above 0 where a needle hides inside a
//    sub-cluster, 0 where the large radii are spread the queries never see,
//    and 0 without prefill queries;
//  - summaries from bare means score by q·mean, bit for bit;
//  - a block scorer is handed the rows (blocks × reps of them) and the
//    augmented query rows (each head's own share), and a candidate
//    scorer's selection is the host's;
//  - the artifact round-trips with its share and reps; versions 1 to 3 are
//    refused as stale.
import { describe, expect, it } from 'vitest';
import { topkHeads, type KvDtype } from '../../addon/kernels.js';
import { blockSummaryBuilder, nosa, topkBlocks } from '../../index/block-select.js';
import { BlockSummary, calibrateShare, RADIUS_SHARES, SUMMARY_BLOCK, SUMMARY_REPS, summaryStride } from '../../index/block-summary.js';
import { isStaleArtifact, type BlockMeans, type BlockScorer, type HeadIndex, type LayerContext, type RetrievalMethod, type SearchParams, type Selection } from '../../index/method.js';
import { DEFAULT_PARAMS } from '../../engine/sessions.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

// A selection's undo is a closure of its own select: equal selections differ in it alone.
const withoutUndo = ({ undo: _undo, ...rest }: Selection) => rest;

const seed = freshSeed();
console.log(`block-summary: seed ${seed}`);
const B = SUMMARY_BLOCK;

/** Keys [tokens, d] of one head as storage words, from a function of (token, channel). */
function keyWords(tokens: number, d: number, dtype: KvDtype, f: (t: number, j: number) => number): Uint16Array {
  const bits = bitsOf(dtype);
  const out = new Uint16Array(tokens * d);
  for (let t = 0; t < tokens; t++) for (let j = 0; j < d; j++) out[t * d + j] = bits(f(t, j));
  return out;
}

async function summaryOf(keys: Uint16Array, tokens: number, d: number, dtype: KvDtype, queries = new Float32Array(0)): Promise<BlockSummary> {
  const bytes = await blockSummaryBuilder.build({ keys, tokens, headDim: d, dtype, queries, queryCount: queries.length / d });
  return blockSummaryBuilder.load(bytes, { keys, tokens, headDim: d, dtype }) as BlockSummary;
}

/** What f throws. */
function captured(f: () => unknown): unknown {
  try {
    f();
  } catch (err) {
    return err;
  }
  return undefined;
}

/** The same summary with radius share `share`. */
const withShare = (s: BlockSummary, share: number) => new BlockSummary(s.blocks, s.blockSize, s.tokens, s.headDim, s.dtype, s.rows, s.importance, share, s.reps);

function layerContext(heads: HeadIndex[], tokens: number, kvHeads: number, qHeads: number, d: number, memo = new Map<string, unknown>(), blockScorer?: BlockScorer): LayerContext {
  const doc = { tokens } as KvSegment, own = { tokens: 0 } as KvSegment;
  return { layer: 0, segments: [doc, own], offsets: [0, tokens], indexes: [heads, undefined], question: () => ({ queries: new Float32Array(0), queryCount: 0 }), memo, tokens, qHeads, kvHeads, headDim: d, ...(blockScorer && { blockScorer }) };
}

/** The blocks a selection's block part holds for head h. */
function selectedBlocks(sel: Awaited<ReturnType<RetrievalMethod['select']>>, h: number): number[] {
  const part = sel.parts.find((p) => 'blocks' in p && p.blocks) as { blocks: { ids: Int32Array[] } } | undefined;
  return part ? [...part.blocks.ids[h]] : [];
}

describe('the block score', () => {
  // 12 blocks, d = 32, the query along channel 0 (u, norm 2). Spread blocks
  // 3, 6, 9: every key 1.5·u plus noise 3.5 in channels 1..31 (radius ~25,
  // q·k = 3). The rest: noise 0.1. Block 7 holds one key A·u (q·k = 2A):
  // its mean score is 2A/64, its radius ~A, below the spread blocks'. Dense
  // attention pays block 7 exp(2A/√32) ≈ 285 against a spread block's
  // 64·exp(3/√32) ≈ 109 (checked below): the block to select.
  const d = 32, blocks = 12, tokens = blocks * B, dtype: KvDtype = 'f16';
  const spread = new Set([3, 6, 9]), OUTLIER_BLOCK = 7, outlier = OUTLIER_BLOCK * B + 21, A = 16;
  const makeKeys = (rng: Rng) =>
    keyWords(tokens, d, dtype, (t, j) => {
      if (t === outlier) return j === 0 ? A : 0;
      const b = Math.floor(t / B);
      if (spread.has(b)) return j === 0 ? 1.5 + 0.1 * rng.normal() : 3.5 * rng.normal();
      return 0.1 * rng.normal();
    });
  const qDir = (group: number, norm = 2) => {
    const q = new Float32Array(group * d);
    for (let g = 0; g < group; g++) q[g * d] = norm * (g === 0 ? 1 : 0.5);
    return q;
  };
  /** Float64 from the stored keys: each block's dense attention mass (query row 0) and its one-mean score at share α. */
  const reference = (keys: Uint16Array, q: Float32Array, group: number) => {
    const value = valueOf(dtype), k = Array.from(keys, value);
    const logits = Array.from({ length: tokens }, (_, t) => k.slice(t * d, (t + 1) * d).reduce((s, x, j) => s + x * q[j], 0) / Math.sqrt(d));
    const top = Math.max(...logits), mass = new Array(blocks).fill(0);
    logits.forEach((l, t) => (mass[Math.floor(t / B)] += Math.exp(l - top)));
    const oneMean = (b: number, alpha: number) => {
      const mean = new Array(d).fill(0);
      for (let t = b * B; t < (b + 1) * B; t++) for (let j = 0; j < d; j++) mean[j] += k[t * d + j] / B;
      let radius = 0;
      for (let t = b * B; t < (b + 1) * B; t++) radius = Math.max(radius, Math.hypot(...mean.map((m, j) => k[t * d + j] - m)));
      let best = -Infinity;
      for (let g = 0; g < group; g++) {
        const qg = q.subarray(g * d, (g + 1) * d);
        best = Math.max(best, mean.reduce((s, m, j) => s + m * qg[j], 0) + alpha * Math.hypot(...qg) * radius);
      }
      return best;
    };
    return { mass, oneMean };
  };

  it('ranks first the block whose lone key holds the most mass, which one mean per block ranks below the spread blocks at every share', async () => {
    const rng = new Rng(seed);
    const keys = makeKeys(rng);
    const s = withShare(await summaryOf(keys, tokens, d, dtype), 0);
    expect(s.stride).toBe(summaryStride(d));
    expect(s.reps).toBe(SUMMARY_REPS);
    expect(s.rows.length).toBe(blocks * SUMMARY_REPS * (d + 8));
    for (const group of [1, 4]) {
      const q = qDir(group);
      const { mass, oneMean } = reference(keys, q, group);
      // The premise: block 7 holds the most mass, and one mean per block
      // (any share of the calibration) ranks the spread blocks above it.
      for (let b = 0; b < blocks; b++) if (b !== OUTLIER_BLOCK) expect(mass[OUTLIER_BLOCK]).toBeGreaterThan(2 * mass[b]);
      for (const alpha of RADIUS_SHARES) for (const b of spread) expect(oneMean(b, alpha)).toBeGreaterThan(oneMean(OUTLIER_BLOCK, alpha));
      const { order, scores } = await s.scoreBlocks(q, group, 4);
      expect(order[0]).toBe(OUTLIER_BLOCK);
      // The score is max over the group and the block's rows of q·c + √d·ln n (share 0).
      for (let b = 0; b < blocks; b++) {
        let want = -Infinity;
        for (let r = 0; r < s.reps; r++) {
          const { centroid, logCount } = s.row(b, r);
          for (let g = 0; g < group; g++) want = Math.max(want, centroid.reduce((a, x, j) => a + x * q[g * d + j], 0) + Math.sqrt(d) * logCount);
        }
        expect(scores[b]).toBeCloseTo(want, 3);
      }
      // The stateless view ranks the same way: block 7's tokens come first.
      expect(s.search(q, group, B).ids[0]).toBe(OUTLIER_BLOCK * B);
    }
  });

  it('at share 1 bounds every key of the block', async () => {
    const rng = new Rng(seed + 7);
    const keys = makeKeys(rng), value = valueOf(dtype);
    const s = withShare(await summaryOf(keys, tokens, d, dtype), 1);
    const G = 3, q = Float32Array.from({ length: G * d }, () => rng.normal());
    const { scores } = await s.scoreBlocks(q, G, blocks);
    for (let t = 0; t < tokens; t++)
      for (let g = 0; g < G; g++) {
        let dot = 0;
        for (let j = 0; j < d; j++) dot += q[g * d + j] * value(keys[t * d + j]);
        expect(scores[Math.floor(t / B)]).toBeGreaterThanOrEqual(dot - 1e-3);
      }
  });

  for (const method of [topkBlocks, nosa] as RetrievalMethod[])
    it(`${method.name}: one block of budget selects the outlier's block`, async () => {
      const rng = new Rng(seed + 1);
      const kvHeads = 2, G = 4, qHeads = kvHeads * G;
      const heads = [await summaryOf(makeKeys(rng), tokens, d, dtype), await summaryOf(makeKeys(rng), tokens, d, dtype)];
      const q = new Float32Array(qHeads * d);
      q.set(qDir(G), 0);
      q.set(qDir(G, 3), G * d);
      const params = { ...DEFAULT_PARAMS, budget: B, sinks: 0, window: 0 } as SearchParams;
      const sel = await method.select(layerContext(heads, tokens, kvHeads, qHeads, d), q, params);
      for (let h = 0; h < kvHeads; h++) expect(selectedBlocks(sel, h)).toEqual([OUTLIER_BLOCK]);
    });
});

describe('calibrating the radius share', () => {
  // 160 blocks, d = 32, one prefill query row per 4 tokens (the rows
  // calibration infers positions from). Each query row seeks one of four
  // directions e_0..e_3 (norm 4, a little noise in channels 0..15; none in
  // 16..31).
  const d = 32, blocks = 160, tokens = blocks * B, dtype: KvDtype = 'f16', rowsCount = tokens / 4;
  const queriesOf = (rng: Rng, dirs: number) => {
    const q = new Float32Array(rowsCount * d);
    for (let r = 0; r < rowsCount; r++) {
      const dir = rng.int(dirs);
      for (let j = 0; j < d / 2; j++) q[r * d + j] = (j === dir ? 4 : 0) + 0.1 * rng.normal();
    }
    return q;
  };

  it('picks a share above 0 where a needle hides inside a sub-cluster', async () => {
    // Ordinary keys: noise 0.3 per channel; 40 blocks lean towards one of
    // the directions (every key +1 along it: score 4 for a query along it,
    // its keys' logits 4/√32). Every block holds three decoys, 30·e_(16+i)
    // in channels no query reads: the farthest keys from the block mean, so
    // they take the three sub-clusters of their own. A needle A·e_i in every
    // 8th block (direction by block, A = 20) is nearer the bulk than any
    // decoy, so it stays in the bulk's sub-cluster: its logit 4·20/√32 = 14
    // outweighs a leaning block's 64 keys ~10^4 times over, but it moves the
    // bulk's centroid score by only 4·20/61, so at share 0 its blocks rank
    // below the leaning ones, while the bulk's radius (~20, against ~2.5)
    // carries them first at a share. Among the needle blocks, at share 1,
    // the one along q leads by only 4·A/61 less the other centroids' noise
    // (the centroid's shift toward the needle comes off the radius): with
    // A = 12 another direction's came first in 3 of 3000 seeds (the lead
    // 0.43 on average, sd 0.11, over 400), with A = 20 in none (lead
    // 0.57-1.24, mean 0.96).
    const rng = new Rng(seed + 10);
    const needleAt = (b: number) => (b % 8 === 3 ? b * B + ((b * 7) % B) : -1);
    const keys = keyWords(tokens, d, dtype, (t, j) => {
      const b = Math.floor(t / B), i = t % B;
      if (i >= 40 && i < 43) return j === 16 + i - 40 ? 30 : 0;
      if (t === needleAt(b)) return j === (b >> 3) % 4 ? 20 : 0;
      return (b % 4 === 1 && j === (b >> 2) % 4 ? 1 : 0) + 0.3 * rng.normal();
    });
    const queries = queriesOf(rng, 4);
    const { share, capture } = await calibrateShare({ keys, tokens, headDim: d, dtype, queries, queryCount: rowsCount }, (await summaryOf(keys, tokens, d, dtype)).rows, blocks, SUMMARY_REPS, B);
    expect(share).toBeGreaterThan(0);
    // Share 0 captures far less of the mass than the share chosen.
    expect(capture[RADIUS_SHARES.indexOf(share as never)]).toBeGreaterThan(capture[0] + 0.2);
    // The built summary carries the share, and with it one block finds the needle.
    const s = await summaryOf(keys, tokens, d, dtype, queries);
    expect(s.radiusShare).toBe(share);
    const q = new Float32Array(d);
    q[2] = 4;
    const { order } = await s.scoreBlocks(q, 1, 1);
    expect(needleAt(order[0])).toBeGreaterThanOrEqual(0);
    expect((order[0] >> 3) % 4).toBe(2);
  });

  it('keeps 0 (or the smallest share) where the large radii are spread in channels the queries never see', async () => {
    // Topics: spans of 20 blocks, span s's keys +2 along e_(s mod 4)
    // (channels 0..15 carry topics; noise 0.3). Every 5th block also spreads
    // its keys by 8 per channel in channels 16..31: radius ~32 against ~2,
    // but no query reads those channels, so a query's logits there are its
    // topic's like any other block's. Any share lifts those blocks over the
    // topic's own.
    // One document's calibration reads a few of its prefill rows
    // (CALIBRATION_ROWS), so its captures are noisy: over 4000 seeds a
    // document kept 0.5 in 3.9% (0.25 in 3.2%, 1 twice), and a share of 0.5
    // or 1 captured as much as 0 in 1.5% (CI would have failed 1 run in 25).
    // Hence 9 documents: the median share, and the mean capture per share
    // (its margin, capture at 0 less the best at 0.5 or 1, 0.042-0.12 over
    // 444 groups of 9, mean 0.074, sd 0.011).
    const rng = new Rng(seed + 11);
    const documents = 9, shares: number[] = [], capture: number[] = RADIUS_SHARES.map(() => 0);
    for (let i = 0; i < documents; i++) {
      const keys = keyWords(tokens, d, dtype, (t, j) => {
        const b = Math.floor(t / B), topic = Math.floor(b / 20) % 4;
        if (j >= 16) return (b % 5 === 2 ? 8 : 0.3) * rng.normal();
        return (j === topic ? 2 : 0) + 0.3 * rng.normal();
      });
      const s = await summaryOf(keys, tokens, d, dtype);
      const got = await calibrateShare({ keys, tokens, headDim: d, dtype, queries: queriesOf(rng, 4), queryCount: rowsCount }, s.rows, blocks, SUMMARY_REPS, B);
      shares.push(got.share);
      got.capture.forEach((c, a) => (capture[a] += c / documents));
      // The radius is large where the spread is: the test's premise.
      const radius = (b: number) => Math.max(...Array.from({ length: s.reps }, (_, r) => s.row(b, r).radius));
      expect(radius(2)).toBeGreaterThan(4 * radius(3));
    }
    console.log(`spread radii: shares ${shares.join(' ')}; mean capture ${capture.map((c) => c.toFixed(3)).join(' ')}`);
    // The mean alone captures the most; the rule keeps the largest share
    // within 10% of the best, which here is 0 or, in some documents, the
    // smallest share above it; a share that lifts the spread blocks far
    // only in a few.
    for (let a = 2; a < RADIUS_SHARES.length; a++) expect(capture[a]).toBeLessThan(capture[0]);
    expect([...shares].sort((x, y) => x - y)[documents >> 1]).toBeLessThanOrEqual(RADIUS_SHARES[1]);
  });

  it('is 0 without prefill queries, and on a document too short to have candidates', async () => {
    const rng = new Rng(seed + 12);
    const keys = keyWords(tokens, d, dtype, () => rng.normal());
    expect((await summaryOf(keys, tokens, d, dtype)).radiusShare).toBe(0);
    const short = 9 * B;
    const q = queriesOf(rng, 4).subarray(0, (short / 4) * d);
    const zeros = RADIUS_SHARES.map(() => 0);
    expect(await calibrateShare({ keys: keys.subarray(0, short * d), tokens: short, headDim: d, dtype, queries: q, queryCount: short / 4 }, new Uint16Array(9 * SUMMARY_REPS * summaryStride(d)), 9, SUMMARY_REPS, B)).toEqual({ share: 0, capture: zeros, mass: zeros, peak: zeros });
  });
});

describe('row radii', () => {
  for (const dtype of ['f16', 'bf16'] as KvDtype[])
    it(`${dtype}: every key lies within the stored radius of one of its block's rows (a partial last block too)`, async () => {
      const rng = new Rng(seed + 2);
      const d = 64, tokens = 5 * B + 23;
      const keys = keyWords(tokens, d, dtype, () => rng.normal() * 3 + (rng.next() < 0.01 ? 40 : 0));
      const s = await summaryOf(keys, tokens, d, dtype);
      expect(s.blocks).toBe(6);
      const value = valueOf(dtype);
      for (let b = 0; b < s.blocks; b++) {
        const rows = Array.from({ length: s.reps }, (_, r) => s.row(b, r));
        const [from, to] = s.tokenRange(b);
        let worst = -Infinity;
        for (let t = from; t < to; t++) {
          // Its gap to the nearest row's ball (≤ 0: inside), float64.
          const gap = Math.min(...rows.map(({ centroid, radius }) => Math.sqrt(centroid.reduce((a, c, j) => a + (value(keys[t * d + j]) - c) ** 2, 0)) - radius));
          worst = Math.max(worst, gap);
        }
        expect(worst).toBeLessThanOrEqual(1e-9);
        for (const { logCount } of rows) expect(logCount >= 0 && logCount <= Math.log(B) + 0.01).toBe(true);
        // The padding after the ln count is zero.
        for (let i = b * s.reps; i < (b + 1) * s.reps; i++) for (let j = d + 2; j < s.stride; j++) expect(s.rows[i * s.stride + j]).toBe(0);
      }
    });
});

describe('summaries from bare means', () => {
  it('score by q·mean alone, bit for bit', async () => {
    const rng = new Rng(seed + 3);
    const d = 64, blocks = 301, G = 4, heads = 2, dtype: KvDtype = 'bf16';
    const bits = bitsOf(dtype);
    const means = Array.from({ length: heads }, () => Uint16Array.from({ length: blocks * d }, () => bits(rng.normal())));
    const summaries = means.map((m) => new BlockSummary(blocks, B, blocks * B, d, dtype, m, new Float32Array(blocks).fill(1 / blocks)));
    const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
    const got = await BlockSummary.scoreHeads(summaries, q, G, 20);
    const want = means.map((keys) => ({ keys, tokens: blocks, outIds: new Int32Array(20), outScores: new Float32Array(20), allScores: new Float32Array(blocks) }));
    await topkHeads({ q, group: G, headDim: d, dtype, k: 20, heads: want });
    for (let h = 0; h < heads; h++) {
      expect([...got[h].order]).toEqual([...want[h].outIds]);
      expect([...got[h].scores]).toEqual([...want[h].allScores]);
    }
    expect(() => new BlockSummary(blocks, B, blocks * B, d, dtype, new Uint16Array(blocks * d + 1), new Float32Array(blocks))).toThrow(RangeError);
  });
});

describe('a block scorer', () => {
  it('is handed the rows and the augmented query rows; its candidates select what the host selects', async () => {
    const rng = new Rng(seed + 4);
    const d = 64, kvHeads = 2, G = 4, qHeads = kvHeads * G, tokens = 90 * B + 7;
    const heads: BlockSummary[] = [];
    // Each head its own share: the query rows carry α_h·‖q‖ per head.
    const shares = [0.5, 0.25];
    for (let h = 0; h < kvHeads; h++) heads.push(withShare(await summaryOf(keyWords(tokens, d, 'f16', () => rng.normal() + (rng.next() < 0.002 ? 8 : 0)), tokens, d, 'f16'), shares[h]));
    const seen: { headDim: number; qLength: number; rows: boolean; blocks: number }[] = [];
    let radiusColumnChecked = 0;
    const scorer: BlockScorer = {
      async topBlocks(views: readonly BlockMeans[], q: Float32Array, group: number, rowGroups: number, extra: Int32Array[], reps = 1) {
        const k = rowGroups * reps; // rows: this scorer does not group them
        const { blocks, headDim, dtype } = views[0];
        seen.push({ headDim, qLength: q.length, rows: views.every((v, h) => v.means === heads[h].rows && v === heads[h].scored), blocks });
        for (let r = 0; r < views.length * group; r++) {
          const row = q.subarray(r * headDim, (r + 1) * headDim);
          const norm = Math.hypot(...row.subarray(0, d));
          expect(row[d]).toBeCloseTo(shares[Math.floor(r / group)] * norm, 4);
          expect(row[d + 1]).toBe(Math.sqrt(d));
          expect([...row.subarray(d + 2)]).toEqual(new Array(headDim - d - 2).fill(0));
          radiusColumnChecked++;
        }
        const keep = Math.min(k, blocks);
        const out = views.map((v) => ({ keys: v.means, tokens: blocks, outIds: new Int32Array(keep), outScores: new Float32Array(keep), allScores: new Float32Array(blocks) }));
        const counts = await topkHeads({ q, group, headDim, dtype, k, heads: out });
        return out.map((o, h) => ({ ids: o.outIds.subarray(0, counts[h]), scores: o.outScores.subarray(0, counts[h]), extraScores: Float32Array.from(extra[h], (b) => o.allScores[b]) }));
      },
    };
    for (const method of [nosa, topkBlocks] as RetrievalMethod[]) {
      const params = { ...DEFAULT_PARAMS, budget: 12 * B, sinks: 16, window: 100 } as SearchParams;
      const memoHost = new Map<string, unknown>(), memoScored = new Map<string, unknown>();
      let q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      for (let step = 0; step < 8; step++) {
        q = q.map((x) => 0.8 * x + 0.2 * rng.normal());
        const onHost = await method.select(layerContext(heads, tokens, kvHeads, qHeads, d, memoHost), q, params);
        const scored = await method.select(layerContext(heads, tokens, kvHeads, qHeads, d, memoScored, scorer), q, params);
        expect(withoutUndo(scored)).toEqual(withoutUndo(onHost));
      }
    }
    expect(seen.length).toBe(16);
    expect(radiusColumnChecked).toBe(16 * qHeads);
    for (const s of seen) expect(s).toEqual({ headDim: summaryStride(d), qLength: qHeads * summaryStride(d), rows: true, blocks: heads[0].blocks * SUMMARY_REPS });
  });
});

describe('the artifact', () => {
  const d = 32, tokens = 3 * B + 5;

  it('round-trips and refuses foreign, truncated and stale bytes', async () => {
    const rng = new Rng(seed + 5);
    const keys = keyWords(tokens, d, 'f16', () => rng.normal());
    const hk = { keys, tokens, headDim: d, dtype: 'f16' as const };
    const bytes = await blockSummaryBuilder.build({ ...hk, queries: new Float32Array(0), queryCount: 0 });
    const s = blockSummaryBuilder.load(bytes, hk) as BlockSummary;
    expect(s.blocks).toBe(4);
    expect(s.reps).toBe(SUMMARY_REPS);
    expect(bytes.byteLength).toBe(32 + 4 * SUMMARY_REPS * summaryStride(d) * 2 + 4 * 4);
    // Loaded from an unaligned copy: the same rows and importance.
    const shifted = new Uint8Array(bytes.byteLength + 1);
    shifted.set(bytes, 1);
    const again = blockSummaryBuilder.load(shifted.subarray(1), hk) as BlockSummary;
    expect([...again.rows]).toEqual([...s.rows]);
    expect([...again.importance]).toEqual([...s.importance]);
    expect(s.importance.reduce((a, x) => a + x, 0)).toBeCloseTo(1, 5);
    // The share round-trips (written into the header as a calibration would).
    expect(s.radiusShare).toBe(0);
    const shared = bytes.slice();
    new DataView(shared.buffer).setFloat32(24, 0.25, true);
    expect((blockSummaryBuilder.load(shared, hk) as BlockSummary).radiusShare).toBe(0.25);
    for (const bad of [-1, NaN, 1e9]) {
      new DataView(shared.buffer).setFloat32(24, bad, true);
      expect(() => blockSummaryBuilder.load(shared, hk)).toThrow(/corrupt/);
    }

    expect(() => blockSummaryBuilder.load(bytes.subarray(0, 10), hk)).toThrow(/truncated/);
    expect(() => blockSummaryBuilder.load(bytes.subarray(0, bytes.byteLength - 4), hk)).toThrow(/corrupt/);
    expect(() => blockSummaryBuilder.load(bytes, { ...hk, tokens: tokens - 1, keys: keys.subarray(0, (tokens - 1) * d) })).toThrow(/corrupt|other keys/);
    const foreign = bytes.slice();
    foreign[0] ^= 0xff;
    expect(() => blockSummaryBuilder.load(foreign, hk)).toThrow(/corrupt/);
    const future = bytes.slice();
    new DataView(future.buffer).setInt32(4, 5, true);
    expect(() => blockSummaryBuilder.load(future, hk)).toThrow(/corrupt/);
    // reps out of range, or not the rows' count.
    for (const reps of [0, 65, SUMMARY_REPS + 1]) {
      const bad = bytes.slice();
      new DataView(bad.buffer).setInt32(28, reps, true);
      expect(() => blockSummaryBuilder.load(bad, hk)).toThrow(/corrupt/);
    }
  });

  it('refuses version-1 (means without radii), version-2 (no share) and version-3 (one mean per block) artifacts as stale', () => {
    // As the previous builds wrote them: a six-int32 header (v3: and the
    // share), means [blocks, d] (v1) or rows [blocks, d + 8] (v2, v3),
    // importance.
    const blocks = 4;
    const hk = { keys: new Uint16Array(tokens * d), tokens, headDim: d, dtype: 'f16' as const };
    for (const [version, width, headerBytes] of [[1, d, 24], [2, summaryStride(d), 24], [3, summaryStride(d), 28]]) {
      const header = new Int32Array([0x4b56424c, version, blocks, B, tokens, d, 0]);
      const old = new Uint8Array(headerBytes + blocks * width * 2 + blocks * 4);
      old.set(new Uint8Array(header.buffer, 0, headerBytes), 0);
      expect(() => blockSummaryBuilder.load(old, hk)).toThrow(new RegExp(`block summary artifact version ${version} is stale`));
      expect(isStaleArtifact(captured(() => blockSummaryBuilder.load(old, hk)))).toBe(true);
    }
  });
});
