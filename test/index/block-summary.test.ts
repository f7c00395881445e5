// Block summaries (index/block-summary.ts): each block's mean key and radius
// in one row [mean, radius, 0 ...], ranked by the optimistic score
// max over the group of q·mean + α·‖q‖·radius, α the head's radius share,
// calibrated at build from the prefill queries (issue #16).
//  - a block with one outlier key among ordinary ones ranks above blocks of a
//    higher mean score when the query points at the outlier, in scoreBlocks,
//    the stateless search, and topk-blocks / nosa selections (the plain
//    q·mean ranks it below them);
//  - calibration picks a share above 0 where the prefill queries seek lone
//    keys the block means hide, 0 where the large radii are spread the
//    queries never see, and 0 without prefill queries;
//  - the stored radius bounds every key's distance from the stored mean;
//  - summaries from bare means (no radius) score by q·mean, bit for bit;
//  - a block scorer is handed the rows and the augmented query rows (each
//    head's own share), and a candidate scorer's selection is the host's;
//  - the artifact round-trips with its share; versions 1 and 2 are refused
//    as stale.
import { describe, expect, it } from 'vitest';
import { topkHeads, type KvDtype } from '../../addon/kernels.js';
import { blockSummaryBuilder, nosa, topkBlocks } from '../../index/block-select.js';
import { BlockSummary, calibrateShare, RADIUS_SHARES, SUMMARY_BLOCK, summaryStride } from '../../index/block-summary.js';
import { isStaleArtifact, type BlockMeans, type BlockScorer, type HeadIndex, type LayerContext, type RetrievalMethod, type SearchParams } from '../../index/method.js';
import { DEFAULT_PARAMS } from '../../engine/sessions.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

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
const withShare = (s: BlockSummary, share: number) => new BlockSummary(s.blocks, s.blockSize, s.tokens, s.headDim, s.dtype, s.rows, s.importance, share);

function layerContext(heads: HeadIndex[], tokens: number, kvHeads: number, qHeads: number, d: number, memo = new Map<string, unknown>(), blockScorer?: BlockScorer): LayerContext {
  const doc = { tokens } as KvSegment, own = { tokens: 0 } as KvSegment;
  return { layer: 0, segments: [doc, own], offsets: [0, tokens], indexes: [heads, undefined], question: () => ({ queries: new Float32Array(0), queryCount: 0 }), memo, tokens, qHeads, kvHeads, headDim: d, ...(blockScorer && { blockScorer }) };
}

/** The blocks a selection's block part holds for head h. */
function selectedBlocks(sel: Awaited<ReturnType<RetrievalMethod['select']>>, h: number): number[] {
  const part = sel.parts.find((p) => 'blocks' in p && p.blocks) as { blocks: { ids: Int32Array[] } } | undefined;
  return part ? [...part.blocks.ids[h]] : [];
}

describe('the optimistic block score', () => {
  // 12 blocks, d = 32, the query along channel 0 (u). Ordinary keys: small
  // noise plus a per-block offset along u; blocks 3, 6, 9 lean towards u
  // (mean score 1.5), the rest sit at 0. Block 7's keys have no lean, but
  // one of them is the outlier A·u: its mean score is A/64, far below 1.5,
  // while its best key, A, beats every other key by far.
  const d = 32, blocks = 12, tokens = blocks * B, dtype: KvDtype = 'f16';
  const lean = new Set([3, 6, 9]), OUTLIER_BLOCK = 7, outlier = OUTLIER_BLOCK * B + 21;
  // Large enough that the radius term carries block 7 past the leaning blocks at share ALPHA.
  const ALPHA = 0.5, A = 3 / ALPHA;
  const makeKeys = (rng: Rng) =>
    keyWords(tokens, d, dtype, (t, j) => {
      if (t === outlier) return j === 0 ? A : 0;
      const base = j === 0 && lean.has(Math.floor(t / B)) ? 1.5 : 0;
      return base + 0.1 * rng.normal();
    });
  const qDir = (group: number, norm = 2) => {
    const q = new Float32Array(group * d);
    for (let g = 0; g < group; g++) q[g * d] = norm * (g === 0 ? 1 : 0.5);
    return q;
  };

  it('ranks a block with one outlier key above blocks of a higher mean score', async () => {
    const rng = new Rng(seed);
    const keys = makeKeys(rng);
    const s = withShare(await summaryOf(keys, tokens, d, dtype), ALPHA);
    expect(s.stride).toBe(summaryStride(d));
    expect(s.rows.length).toBe(blocks * (d + 8));
    // The plain mean score puts the leaning blocks first: the problem.
    const meanScore = (b: number) => 2 * s.mean(b)[0];
    for (const b of lean) expect(meanScore(b)).toBeGreaterThan(meanScore(OUTLIER_BLOCK) + 1);
    // The radius sees the outlier.
    expect(s.radius(OUTLIER_BLOCK)).toBeGreaterThan(A * 0.9);
    for (const b of lean) expect(s.radius(b)).toBeLessThan(1.5);
    for (const group of [1, 4]) {
      const q = qDir(group);
      const { order, scores } = await s.scoreBlocks(q, group, 4);
      expect(order[0]).toBe(OUTLIER_BLOCK);
      expect([...order.subarray(1)].sort()).toEqual([...lean].sort());
      // The score is max over the group of q·mean + share·‖q‖·radius.
      for (let b = 0; b < blocks; b++) {
        let want = -Infinity;
        const m = s.mean(b), r = s.radius(b);
        for (let g = 0; g < group; g++) {
          let dot = 0, nn = 0;
          for (let j = 0; j < d; j++) {
            dot += q[g * d + j] * m[j];
            nn += q[g * d + j] ** 2;
          }
          want = Math.max(want, dot + ALPHA * Math.sqrt(nn) * r);
        }
        expect(scores[b]).toBeCloseTo(want, 3);
      }
      // The stateless view ranks the same way: block 7's tokens come first.
      const hit = s.search(q, group, B);
      expect(hit.ids[0]).toBe(OUTLIER_BLOCK * B);
      // At share 0 (the plain mean) the leaning blocks come first.
      const plain = await withShare(s, 0).scoreBlocks(q, group, 3);
      expect([...plain.order].sort()).toEqual([...lean].sort());
    }
  });

  for (const method of [topkBlocks, nosa] as RetrievalMethod[])
    it(`${method.name}: one block of budget selects the outlier's block`, async () => {
      const rng = new Rng(seed + 1);
      const kvHeads = 2, G = 4, qHeads = kvHeads * G;
      const heads = [withShare(await summaryOf(makeKeys(rng), tokens, d, dtype), ALPHA), withShare(await summaryOf(makeKeys(rng), tokens, d, dtype), ALPHA)];
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

  it('picks a share above 0 where a lone key per block holds the mass its block mean hides', async () => {
    // Ordinary keys: noise 0.3 per channel; 40 blocks lean towards one of
    // the directions (every key +1 along it: mean score 4 for a query
    // along it, its keys' logits 4/√32). A needle A·e_i in every 8th block
    // (direction by block): its logit 4·12/√32 = 8.5 outweighs a leaning
    // block's 64 keys ~30 times over, but it moves its block's mean score
    // by only 4·12/64 = 0.75, so by q·mean its blocks rank below the
    // leaning ones, while its radius (~12, against ~2.5) carries them first.
    const rng = new Rng(seed + 10);
    const needleAt = (b: number) => (b % 8 === 3 ? b * B + ((b * 7) % B) : -1);
    const keys = keyWords(tokens, d, dtype, (t, j) => {
      const b = Math.floor(t / B);
      if (t === needleAt(b)) return j === (b >> 3) % 4 ? 12 : 0;
      return (b % 4 === 1 && j === (b >> 2) % 4 ? 1 : 0) + 0.3 * rng.normal();
    });
    const queries = queriesOf(rng, 4);
    const { share, capture } = await calibrateShare({ keys, tokens, headDim: d, dtype, queries, queryCount: rowsCount }, (await summaryOf(keys, tokens, d, dtype)).rows, blocks);
    expect(share).toBeGreaterThan(0);
    // The plain mean captures far less of the mass than the share chosen.
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
    const rng = new Rng(seed + 11);
    const keys = keyWords(tokens, d, dtype, (t, j) => {
      const b = Math.floor(t / B), topic = Math.floor(b / 20) % 4;
      if (j >= 16) return (b % 5 === 2 ? 8 : 0.3) * rng.normal();
      return (j === topic ? 2 : 0) + 0.3 * rng.normal();
    });
    const rows = (await summaryOf(keys, tokens, d, dtype)).rows;
    const { share, capture } = await calibrateShare({ keys, tokens, headDim: d, dtype, queries: queriesOf(rng, 4), queryCount: rowsCount }, rows, blocks);
    // The mean alone captures the most; the rule keeps the largest share
    // within 10% of the best, which here is 0 or, on some seeds, the
    // smallest share above it — never a share that lifts the spread blocks
    // far (1 in 14 seeds picked 0.25 when this asked for 0 exactly).
    for (let a = 2; a < RADIUS_SHARES.length; a++) expect(capture[a]).toBeLessThan(capture[0]);
    expect(share).toBeLessThanOrEqual(RADIUS_SHARES[1]);
    // The radius is large where the spread is: the test's premise.
    const s = await summaryOf(keys, tokens, d, dtype);
    expect(s.radius(2)).toBeGreaterThan(4 * s.radius(3));
  });

  it('is 0 without prefill queries, and on a document too short to have candidates', async () => {
    const rng = new Rng(seed + 12);
    const keys = keyWords(tokens, d, dtype, () => rng.normal());
    expect((await summaryOf(keys, tokens, d, dtype)).radiusShare).toBe(0);
    const short = 9 * B;
    const q = queriesOf(rng, 4).subarray(0, (short / 4) * d);
    const zeros = RADIUS_SHARES.map(() => 0);
    expect(await calibrateShare({ keys: keys.subarray(0, short * d), tokens: short, headDim: d, dtype, queries: q, queryCount: short / 4 }, new Uint16Array(9 * summaryStride(d)), 9)).toEqual({ share: 0, capture: zeros, mass: zeros, peak: zeros });
  });
});

describe('block radii', () => {
  for (const dtype of ['f16', 'bf16'] as KvDtype[])
    it(`${dtype}: the stored radius bounds every key's distance from the stored mean (a partial last block too)`, async () => {
      const rng = new Rng(seed + 2);
      const d = 64, tokens = 5 * B + 23;
      const keys = keyWords(tokens, d, dtype, () => rng.normal() * 3 + (rng.next() < 0.01 ? 40 : 0));
      const s = await summaryOf(keys, tokens, d, dtype);
      expect(s.blocks).toBe(6);
      const value = valueOf(dtype);
      for (let b = 0; b < s.blocks; b++) {
        const m = s.mean(b);
        const [from, to] = s.tokenRange(b);
        let worst = 0;
        for (let t = from; t < to; t++) {
          let ss = 0;
          for (let j = 0; j < d; j++) ss += (value(keys[t * d + j]) - m[j]) ** 2;
          worst = Math.max(worst, Math.sqrt(ss));
        }
        expect(s.radius(b)).toBeGreaterThanOrEqual(worst * (1 - 1e-6));
        expect(s.radius(b)).toBeLessThan(worst * 1.01);
        // The padding after the radius is zero.
        for (let j = d + 1; j < s.stride; j++) expect(s.rows[b * s.stride + j]).toBe(0);
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
    const seen: { headDim: number; qLength: number; rows: boolean }[] = [];
    let radiusColumnChecked = 0;
    const scorer: BlockScorer = {
      async topBlocks(views: readonly BlockMeans[], q: Float32Array, group: number, k: number, extra: Int32Array[]) {
        const { blocks, headDim, dtype } = views[0];
        seen.push({ headDim, qLength: q.length, rows: views.every((v, h) => v.means === heads[h].rows && v === heads[h].scored) });
        for (let r = 0; r < views.length * group; r++) {
          const row = q.subarray(r * headDim, (r + 1) * headDim);
          const norm = Math.hypot(...row.subarray(0, d));
          expect(row[d]).toBeCloseTo(shares[Math.floor(r / group)] * norm, 4);
          expect([...row.subarray(d + 1)]).toEqual(new Array(headDim - d - 1).fill(0));
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
        expect(scored).toEqual(onHost);
      }
    }
    expect(seen.length).toBe(16);
    expect(radiusColumnChecked).toBe(16 * qHeads);
    for (const s of seen) expect(s).toEqual({ headDim: summaryStride(d), qLength: qHeads * summaryStride(d), rows: true });
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
    expect(bytes.byteLength).toBe(28 + 4 * summaryStride(d) * 2 + 4 * 4);
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
    new DataView(future.buffer).setInt32(4, 4, true);
    expect(() => blockSummaryBuilder.load(future, hk)).toThrow(/corrupt/);
  });

  it('refuses version-1 (means without radii) and version-2 (no share) artifacts as stale', () => {
    // As the previous builds wrote them: a six-int32 header, means [blocks, d]
    // (v1) or rows [blocks, d + 8] (v2), importance.
    const blocks = 4;
    const hk = { keys: new Uint16Array(tokens * d), tokens, headDim: d, dtype: 'f16' as const };
    for (const [version, width] of [[1, d], [2, summaryStride(d)]]) {
      const header = new Int32Array([0x4b56424c, version, blocks, B, tokens, d]);
      const old = new Uint8Array(24 + blocks * width * 2 + blocks * 4);
      old.set(new Uint8Array(header.buffer), 0);
      expect(() => blockSummaryBuilder.load(old, hk)).toThrow(new RegExp(`block summary artifact version ${version} is stale`));
      expect(isStaleArtifact(captured(() => blockSummaryBuilder.load(old, hk)))).toBe(true);
    }
  });
});
