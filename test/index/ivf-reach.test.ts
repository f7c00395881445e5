// ivf at its default effort probes the lists that hold 8x the budget, over
// keys less their mean, and ranks by the group's attention: probing the
// lists that hold only k keys on average (the previous default) missed keys
// of lists whose centroid ranks just below the row's best (kvrecall-code-13M
// at 16K bytes: the pass-key layer's error 0.053 against hnsw's 0.037), and
// uncentred keys with a shared offset split into lists by little but it.
// Checked against the float64 top k of the group's summed softmax
// probabilities, on clustered f16 keys with an offset, at odd sizes, with
// rows of unequal norms (where the max over the rows would rank other keys).
import { describe, expect, it } from 'vitest';
import { ivfBuilder } from '../../index/ivf.js';
import { f16Bits, f16Value } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`ivf-reach: seed ${seed}`);
const rng = new Rng(seed);
const TOKENS = 6001, D = 48, GROUP = 4, K = 121, CENTRES = 97;

function clusteredKeys(): { bits: Uint16Array; values: Float64Array } {
  // Keys around a shared offset (as a model's keys are) and one of CENTRES centres, with per-key noise as
  // large as the centres' spread: lists overlap, so a row's best keys sit in several lists.
  const offset = Array.from({ length: D }, () => 2 * rng.normal());
  const centres = Array.from({ length: CENTRES }, () => Array.from({ length: D }, () => rng.normal()));
  const bits = new Uint16Array(TOKENS * D), values = new Float64Array(TOKENS * D);
  for (let t = 0; t < TOKENS; t++) {
    const c = centres[Math.floor(rng.next() * CENTRES)];
    for (let j = 0; j < D; j++) {
      const b = f16Bits(offset[j] + c[j] + 0.8 * rng.normal());
      bits[t * D + j] = b;
      values[t * D + j] = f16Value(b);
    }
  }
  return { bits, values };
}

/** Float64 top k of the group's attention: each row's softmax (scale 1/√D) over every key, summed over the rows. */
function exactTop(q: Float32Array, values: Float64Array): Set<number> {
  const mass = new Float64Array(TOKENS);
  for (let g = 0; g < GROUP; g++) {
    const logit = new Float64Array(TOKENS);
    for (let t = 0; t < TOKENS; t++) {
      let dot = 0;
      for (let j = 0; j < D; j++) dot += q[g * D + j] * values[t * D + j];
      logit[t] = dot / Math.sqrt(D);
    }
    const m = Math.max(...logit);
    const z = logit.reduce((acc, x) => acc + Math.exp(x - m), 0);
    for (let t = 0; t < TOKENS; t++) mass[t] += Math.exp(logit[t] - m) / z;
  }
  const order = Array.from(mass.keys()).sort((a, b) => mass[b] - mass[a]);
  return new Set(order.slice(0, K));
}

describe('ivf reach', () => {
  it('at the default effort finds most of the exact top k, where the lists holding k keys find fewer', async () => {
    const { bits, values } = clusteredKeys();
    const head = { keys: bits, tokens: TOKENS, headDim: D, dtype: 'f16' as const };
    const index = ivfBuilder.load(await ivfBuilder.build({ ...head, queries: new Float32Array(0), queryCount: 0 }), head);
    const nlist = Math.round(4 * Math.sqrt(TOKENS));
    const holdingK = Math.max(Math.ceil(nlist / 32), Math.ceil(K / (TOKENS / nlist)));
    let found = 0, foundHoldingK = 0, scanned = 0;
    const steps = 24;
    for (let s = 0; s < steps; s++) {
      // A query group near one key's direction, each row perturbed: what a decode step's GQA rows look like.
      const anchor = Math.floor(rng.next() * TOKENS);
      const norm = [0.5, 1, 1.5, 2];
      const q = Float32Array.from({ length: GROUP * D }, (_, i) => norm[Math.floor(i / D)] * (0.3 * values[anchor * D + (i % D)] + 0.4 * rng.normal()));
      const want = exactTop(q, values);
      const got = index.search(q, GROUP, K, 0);
      expect(got.ids.length).toBe(K);
      found += Array.from(got.ids).filter((id) => want.has(id)).length;
      scanned += got.scanned;
      foundHoldingK += Array.from(index.search(q, GROUP, K, holdingK).ids).filter((id) => want.has(id)).length;
    }
    const recall = found / (steps * K), recallHoldingK = foundHoldingK / (steps * K);
    console.log(`ivf-reach: recall ${recall.toFixed(3)} (lists holding k: ${recallHoldingK.toFixed(3)}), scanned ${(scanned / steps / TOKENS).toFixed(3)} per row`);
    // The lists holding k miss several times the keys the default misses.
    // Over 40 seeds x 24 steps: recall 0.886-0.939 (mean 0.913, sd 0.012);
    // the lists holding k miss 2.96-4.48 times as many (mean 3.66, sd 0.39).
    // That spread is the keys' (a seed's clusters), not the steps': at 36
    // steps it is 0.38. The old bar, recall 0.15 above the lists holding k,
    // had 0.136-0.306 over the same seeds at 12 steps (mean 0.227, sd 0.031)
    // and failed on seed 23 (0.952 against 0.815): where both reach far the
    // gain in recall is small, though the misses are still 3.8 times fewer.
    expect(recall).toBeGreaterThan(0.85);
    expect(1 - recallHoldingK).toBeGreaterThan(2 * (1 - recall));
    // 8x the budget per row, lists of uneven size: between 4x and 16x k per row on average.
    expect(scanned / steps).toBeGreaterThan(4 * K);
    expect(scanned / steps).toBeLessThan(16 * K);
  });
});
