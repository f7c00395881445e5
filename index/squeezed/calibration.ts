// Threshold calibration at seal. A threshold table, calibrated on the
// prefill queries (or, when the LLM server sent none, on a sample of the
// keys used as pseudo-queries), maps a target kept fraction to the mass
// threshold at which the kept clusters hold that fraction of the tokens on
// average. Tables exist per GQA group size (TABLE_GROUPS): the prefill rows
// come as [token][group head], and blocks of 16 consecutive rows give groups
// of G consecutive rows; a search uses the table of the largest G ≤ its
// group. Two levels calibrate the coarse thresholds first, then the fine ones
// through the same two-level pipeline a search runs.
import type { BuildInput } from '../method.js';
import { SRC } from './artifact.js';
import type { SqueezedHead } from './head.js';
import { gatherF32 } from './key-rows.js';
import { BINS, solve } from './mass-histogram.js';
import { KEPT_FRACTIONS, type SqueezedOptions, TABLE_GROUPS } from './options.js';
import { Rng, sample } from './sampling.js';
import { tick } from './tick.js';

export const BLOCK_ROWS = 16;
const GROUPS_PER_BLOCK = 4; // calibration groups per block and table

export interface CalibrationRows {
  rows: Float32Array; // [blocks × len, d]
  blocks: number;
  len: number;
  source: number;
}

/** Blocks of 16 consecutive prefill query rows ([token][g] order, so a block holds whole groups when G | 16), evenly spaced; or sampled keys. */
export function calibrationRows(input: BuildInput, maxBlocks: number, seed: number): CalibrationRows {
  const d = input.headDim;
  if (input.queryCount > 0) {
    const len = Math.min(BLOCK_ROWS, input.queryCount), have = Math.floor(input.queryCount / len);
    const blocks = Math.min(have, maxBlocks), rows = new Float32Array(blocks * len * d);
    for (let b = 0; b < blocks; b++) {
      const start = Math.floor(((b + 0.5) * have) / blocks) * len;
      rows.set(input.queries.subarray(start * d, (start + len) * d), b * len * d);
    }
    return { rows, blocks, len, source: SRC.queries };
  }
  if (input.tokens === 0) return { rows: new Float32Array(0), blocks: 0, len: BLOCK_ROWS, source: SRC.none };
  const len = BLOCK_ROWS, count = Math.min(input.tokens, maxBlocks * len);
  const blocks = Math.max(1, Math.floor(count / len));
  const ids = sample(input.tokens, Math.min(input.tokens, blocks * len), new Rng(seed ^ 0x51ed270b));
  // shuffle so that a block's rows are unrelated tokens, like one token's heads
  const rng = new Rng(seed ^ 0x1234567);
  for (let i = ids.length - 1; i > 0; i--) {
    const j = rng.int(i + 1), t = ids[i];
    ids[i] = ids[j];
    ids[j] = t;
  }
  const rows = new Float32Array(blocks * len * d);
  rows.set(gatherF32(input.keys, d, input.dtype, ids));
  return { rows, blocks, len: Math.min(len, ids.length), source: SRC.keys };
}

export async function calibrate(head: SqueezedHead, input: BuildInput, o: Required<SqueezedOptions>, cal: CalibrationRows): Promise<void> {
  const n = head.tokens, C = head.clusters, P = head.coarse, F = KEPT_FRACTIONS.length, T = TABLE_GROUPS.length;
  const fine = new Float32Array(T * F).fill(-Infinity), coarse = new Float32Array(head.levels === 2 ? T * F : 0).fill(-Infinity);
  head.fineThr = fine;
  head.coarseThr = coarse;
  if (n === 0 || cal.blocks === 0) return;
  const { len } = cal, two = head.levels === 2;
  // Per-row dots of one block against the fine and coarse centroids: [len][C], [len][P].
  const rowFine = new Float32Array(len * C), rowCoarse = new Float32Array(len * P);
  const rawFine = new Float32Array(C), rawCoarse = new Float32Array(P);
  const computed = TABLE_GROUPS.map((G) => G <= len);
  const hist1 = TABLE_GROUPS.map(() => new Float64Array(BINS));
  const histC = two ? TABLE_GROUPS.map(() => new Float64Array(BINS)) : [];
  const hist2 = two ? TABLE_GROUPS.map(() => KEPT_FRACTIONS.map(() => new Float64Array(BINS))) : [];
  const groupsSeen = new Float64Array(T);

  // Visits up to GROUPS_PER_BLOCK groups of G consecutive rows per block and table (rotating
  // through the block's groups from block to block), with their fine and coarse scores.
  const forEachGroup = async (fineToo: boolean, visit: (t: number, raw: Float32Array, rawC: Float32Array) => void) => {
    for (let b = 0; b < cal.blocks; b++) {
      if (fineToo) head.rowDots(cal.rows, b * len, len, 'fine', rowFine);
      if (P) head.rowDots(cal.rows, b * len, len, 'coarse', rowCoarse);
      for (let t = 0; t < T; t++) {
        const G = TABLE_GROUPS[t], count = Math.floor(len / G);
        if (!computed[t]) continue;
        const visits = Math.min(count, GROUPS_PER_BLOCK), step = Math.ceil(count / visits);
        for (let i = 0; i < visits; i++) {
          const g0 = ((b + i * step) % count) * G;
          if (fineToo) maxRows(rowFine, C, g0, G, rawFine);
          if (P) maxRows(rowCoarse, P, g0, G, rawCoarse);
          visit(t, rawFine, rawCoarse);
        }
      }
      await tick();
    }
  };

  // Pass 1: one-level fine masses, or (two levels) coarse masses only.
  await forEachGroup(!two, (t, raw, rawC) => {
    groupsSeen[t]++;
    if (!two) head.histogram(hist1[t], head.massesOne(raw, 0), 0);
    else head.coarseHistogram(histC[t], head.massesCoarse(rawC, 0));
  });
  for (let t = 0; t < T; t++) {
    if (!computed[t]) continue;
    for (let i = 0; i < F - 1; i++) {
      if (!two) fine[t * F + i] = solve(hist1[t], groupsSeen[t] * n, KEPT_FRACTIONS[i]);
      else coarse[t * F + i] = solve(histC[t], groupsSeen[t] * n, Math.min(1, o.expand * KEPT_FRACTIONS[i]));
    }
  }
  if (two) {
    // Pass 2: fine masses through the two-level pipeline, per target fraction.
    await forEachGroup(true, (t, raw, rawC) => {
      const lzc = head.massesCoarse(rawC, 0);
      for (let i = 0; i < F - 1; i++) {
        const ne = head.expand(lzc, coarse[t * F + i], Math.min(n, KEPT_FRACTIONS[i] * n));
        head.histogram(hist2[t][i], head.massesTwo(raw, 0, ne), ne);
      }
    });
    for (let t = 0; t < T; t++)
      if (computed[t]) for (let i = 0; i < F - 1; i++) fine[t * F + i] = solve(hist2[t][i], groupsSeen[t] * n, KEPT_FRACTIONS[i]);
  }
  // Tables not computable (fewer rows than the group): copy the largest smaller one.
  for (let t = 1; t < T; t++)
    if (!computed[t])
      for (let i = 0; i < F; i++) {
        fine[t * F + i] = fine[(t - 1) * F + i];
        if (coarse.length) coarse[t * F + i] = coarse[(t - 1) * F + i];
      }
}

/** raw[c] = max over rows [g0, g0 + G) of rowDots[r][c]. */
function maxRows(rowDots: Float32Array, count: number, g0: number, G: number, raw: Float32Array): void {
  raw.set(rowDots.subarray(g0 * count, (g0 + 1) * count));
  for (let r = g0 + 1; r < g0 + G; r++) {
    const o = r * count;
    for (let c = 0; c < count; c++) if (rowDots[o + c] > raw[c]) raw[c] = rowDots[o + c];
  }
}
