// Calibrating a block summary's radius share at seal (index/block-summary.ts):
// where a head's large radii are lone keys its queries seek (a retrieval head
// on real code), a share finds them; where they are only spread (the
// synthetic generator's blocks that straddle two topics, or a broad head),
// any share displaces the right blocks. No one share serves both
// (bench/results/model-block-rank-optimistic-vm.md), so each (document,
// layer, kv head) calibrates its own from its prefill queries and stores it
// in the artifact.
import { topkHeads, widenWords } from '../addon/kernels.js';
import type { BuildInput } from './method.js';

/**
 * The radius shares a head's calibration tries (1 bounds every key's q·k;
 * 0 is the representatives' score alone). On kvrecall-code-13M at 8K bytes
 * with one mean per block, a single share for every head found 10/32 pass
 * keys at 0, 16/32 at 0.5, 20/32 at 1 (dense 32/32), while on the synthetic
 * generator any share above 0.1 raised the error (0.31 → 0.69 at 0.5;
 * bench/results/model-block-rank-optimistic-vm.md).
 */
export const RADIUS_SHARES = [0, 0.25, 0.5, 1] as const;
/** A summary row's extra columns: column headDim holds the radius, headDim + REPS_COUNT_COLUMN the ln count, the rest pad to a multiple of 8 (SIMD rows). */
export const summaryStride = (headDim: number) => headDim + 8;
export const REPS_COUNT_COLUMN = 1;

/** Prefill query rows a head's calibration scores exactly (evenly among the rows that have candidates enough). */
const CALIBRATION_ROWS = 32;
/** Blocks of keys a calibration row scores exactly, at most: a run of its candidates. */
const CALIBRATION_BLOCKS = 128;
/** Candidate blocks a row needs to take part: fewer, and any budget holds most of them. */
const CALIBRATION_MIN_BLOCKS = 8;
/** The budgets calibrated for, as shares of a row's candidate blocks: issue #16's ≤ 3% exact, and twice that. */
const CALIBRATION_BUDGETS = [0.03, 0.06];
/** A row's peak: its keys of the highest scores (a pass key's digits and their neighbours). */
const CALIBRATION_PEAK = 8;
/**
 * The capture a larger share may give up against the best share and still
 * be chosen, relative: optimism is kept wherever it is nearly free.
 */
const CALIBRATION_TOLERANCE = 0.1;

export interface Calibration {
  /** The share chosen, one of RADIUS_SHARES. */
  share: number;
  /** Per share of RADIUS_SHARES: the objective, the mean of mass and peak. */
  capture: number[];
  /** Per share: the rows' attention mass the top blocks hold, mean over rows and budgets. */
  mass: number[];
  /** Per share: the share of the rows' peak (the mass of their CALIBRATION_PEAK best keys) the top blocks hold. */
  peak: number[];
}

/**
 * A head's radius share: the largest of RADIUS_SHARES whose top blocks, at
 * the calibrated budgets, capture within CALIBRATION_TOLERANCE as much of a
 * few of the document's own prefill query rows' exact attention as the
 * best share's (0 without prefill queries, or when no row has candidates
 * enough). The largest within the tolerance, not the best: the lone key a
 * share is for is typically asked for once (a pass key, at the question),
 * so the prefill rows rarely show it; where a share costs the rows nothing
 * it is kept, and where large radii are only spread (the generator's blocks
 * that straddle topics: capture 0.39 at 0, 0.24 at 0.25) it is not.
 * Captured is the mean of two shares: of the row's
 * attention mass, and of its peak, the mass of its CALIBRATION_PEAK best
 * keys. The peak counts on its own because with estimation on (the default
 * wherever documents have clusters) the broad rest of the mass is estimated
 * well, while a lone key that neither a block mean nor a cluster centroid
 * shows is lost unless its block is selected: the pass key on
 * kvrecall-code-13M.
 *
 * A row at position p (inferred from its index: the rows come in token
 * order at an even stride) attends the keys before it; its candidates are
 * blocks 1 .. (p's block − 2), as a decode step's are the blocks outside
 * sinks and window, and it scores exactly a run of at most
 * CALIBRATION_BLOCKS of them (spread over the document from row to row).
 * Cost per head, whatever the document's length: CALIBRATION_ROWS ×
 * CALIBRATION_BLOCKS × blockSize = 262K key scores in one native pass
 * (32 × 8192 × headDim multiply-adds), then per row one pass over those
 * scores and RADIUS_SHARES sorts of ≤ 128 blocks: per head at headDim 128,
 * 35 ms at 8K tokens, 43 ms at 131K, 84 ms at 1M (3% of that head's build)
 * on the 2-core VM under a load of 8 (bench/results/model-block-share-vm.md).
 */
export async function calibrateShare(input: BuildInput, rows: Uint16Array, blocks: number, reps: number, blockSize: number): Promise<Calibration> {
  const { queryCount: count, tokens, headDim: d, dtype } = input;
  const B = blockSize, stride = summaryStride(d), R = reps;
  const zeros = () => RADIUS_SHARES.map(() => 0);
  const none = { share: 0, capture: zeros(), mass: zeros(), peak: zeros() };
  if (count === 0 || blocks < CALIBRATION_MIN_BLOCKS + 2) return none;
  const candidates = (r: number) => Math.min(blocks, Math.floor(((r + 0.5) * tokens) / count / B)) - 2;
  let first = 0;
  while (first < count && candidates(first) < CALIBRATION_MIN_BLOCKS) first++;
  if (first === count) return none;
  const n = Math.min(CALIBRATION_ROWS, count - first);
  const picked = Array.from({ length: n }, (_, i) => first + Math.floor(((i + 0.5) * (count - first)) / n));
  // Each row's run of candidate blocks [from, from + width): where its candidates exceed
  // the cap, placed along them by the golden-ratio sequence, so the rows cover the document.
  const runs = picked.map((r, i) => {
    const avail = candidates(r), width = Math.min(avail, CALIBRATION_BLOCKS);
    return { from: 1 + Math.floor(((i * 0.6180339887) % 1) * (avail - width + 1)), width };
  });
  const q = new Float32Array(n * d);
  picked.forEach((r, i) => q.set(input.queries.subarray(r * d, (r + 1) * d), i * d));
  const exact = runs.map(({ width }) => new Float32Array(width * B));
  const none0 = new Int32Array(0), noScores = new Float32Array(0);
  await topkHeads({
    q,
    group: 1,
    headDim: d,
    dtype,
    k: 0,
    heads: runs.map(({ from, width }, i) => ({ keys: input.keys.subarray(from * B * d, (from + width) * B * d), tokens: width * B, outIds: none0, outScores: noScores, allScores: exact[i] })),
  });
  const m = widenWords(rows, dtype), scale = 1 / Math.sqrt(d);
  const mass = new Float64Array(RADIUS_SHARES.length), peak = new Float64Array(RADIUS_SHARES.length);
  const per = 1 / (n * CALIBRATION_BUDGETS.length);
  for (let i = 0; i < n; i++) {
    const { from, width } = runs[i], s = exact[i], qi = q.subarray(i * d, (i + 1) * d);
    const peakKeys = topKeys(s, CALIBRATION_PEAK);
    const top = s[peakKeys[0]];
    const blockMass = new Float64Array(width), blockPeak = new Float64Array(width);
    let z = 0, zPeak = 0;
    for (let t = 0; t < s.length; t++) {
      const e = Math.exp((s[t] - top) * scale);
      blockMass[Math.floor(t / B)] += e;
      z += e;
    }
    for (const t of peakKeys) {
      const e = Math.exp((s[t] - top) * scale);
      blockPeak[Math.floor(t / B)] += e;
      zPeak += e;
    }
    // Per row of the run's blocks: q·c + √d·ln n, and its radius.
    const dot = new Float64Array(width * R), rad = new Float64Array(width * R);
    let qq = 0;
    for (let j = 0; j < d; j++) qq += qi[j] * qi[j];
    for (let i = 0; i < width * R; i++) {
      const at = ((from * R) + i) * stride;
      for (let j = 0; j < d; j++) dot[i] += qi[j] * m[at + j];
      dot[i] += Math.sqrt(d) * m[at + d + REPS_COUNT_COLUMN];
      rad[i] = m[at + d];
    }
    RADIUS_SHARES.forEach((alpha, a) => {
      const blockScore = new Float64Array(width).fill(-Infinity);
      for (let i = 0; i < width * R; i++) blockScore[Math.floor(i / R)] = Math.max(blockScore[Math.floor(i / R)], dot[i] + alpha * Math.sqrt(qq) * rad[i]);
      const score = (b: number) => blockScore[b];
      const order = Array.from({ length: width }, (_, b) => b).sort((x, y) => score(y) - score(x) || x - y);
      for (const budget of CALIBRATION_BUDGETS) {
        const k = Math.max(1, Math.ceil(budget * width));
        for (let c = 0; c < k; c++) {
          mass[a] += (blockMass[order[c]] / z) * per;
          peak[a] += (blockPeak[order[c]] / zPeak) * per;
        }
      }
    });
  }
  const capture = RADIUS_SHARES.map((_, a) => (mass[a] + peak[a]) / 2);
  const floor = (1 - CALIBRATION_TOLERANCE) * Math.max(...capture);
  let chosen = 0;
  for (let a = 0; a < RADIUS_SHARES.length; a++) if (capture[a] >= floor) chosen = a;
  return { share: RADIUS_SHARES[chosen], capture, mass: [...mass], peak: [...peak] };
}

/** The indices of the `n` largest of `s`, largest first (ties to the lower index). */
function topKeys(s: Float32Array, n: number): number[] {
  const out: number[] = [];
  for (let t = 0; t < s.length; t++) {
    if (out.length === n && !(s[t] > s[out[n - 1]])) continue;
    if (out.length === n) out.pop();
    let at = out.length;
    while (at > 0 && s[out[at - 1]] < s[t]) at--;
    out.splice(at, 0, t);
  }
  return out;
}
