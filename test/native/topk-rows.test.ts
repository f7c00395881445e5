// topkHeads over a candidate row list (the wave index's second stage): the
// best rows among the candidates by max over the group of q·k, against a
// float64 scan of the same rows; rows outside the keys are refused.
import { describe, expect, it } from 'vitest';
import { topkHeads } from '../../addon/kernels.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`topk-rows: seed ${seed}`);

describe('topkHeads with rows', () => {
  it('ranks only the candidate rows, as a float64 scan of them does', async () => {
    const rng = new Rng(seed);
    const d = 40, tokens = 997, G = 3, k = 17;
    const keys = Uint16Array.from({ length: tokens * d }, () => bitsOf('f16')(rng.normal()));
    const q = Float32Array.from({ length: G * d }, () => rng.normal());
    const rows = Int32Array.from(new Set(Array.from({ length: 300 }, () => rng.int(tokens))));
    const outIds = new Int32Array(k), outScores = new Float32Array(k);
    const [n] = await topkHeads({ q, group: G, headDim: d, dtype: 'f16', k, heads: [{ keys, tokens, rows, outIds, outScores }] });
    const score = (t: number) => Math.max(...Array.from({ length: G }, (_, g) => {
      let s = 0;
      for (let j = 0; j < d; j++) s += q[g * d + j] * valueOf('f16')(keys[t * d + j]);
      return s;
    }));
    const want = [...rows].sort((a, b) => score(b) - score(a) || a - b).slice(0, k);
    expect(n).toBe(k);
    expect([...outIds]).toEqual(want);
    outIds.forEach((t, i) => expect(outScores[i]).toBeCloseTo(score(t), 3));
  });

  it('scans nothing for an empty row list (one head may have no budget)', async () => {
    const keys = new Uint16Array(8 * 4).fill(0x3c00);
    const counts = await topkHeads({ q: new Float32Array(16).fill(1), group: 1, headDim: 8, dtype: 'f16', k: 2, heads: [{ keys, tokens: 4, rows: new Int32Array(0), outIds: new Int32Array(0), outScores: new Float32Array(0) }, { keys, tokens: 4, rows: Int32Array.of(2), outIds: new Int32Array(1), outScores: new Float32Array(1) }] });
    expect(counts).toEqual([0, 1]);
  });

  it('refuses a row outside the keys', async () => {
    const keys = new Uint16Array(8 * 4);
    await expect(async () =>
      topkHeads({ q: new Float32Array(8), group: 1, headDim: 8, dtype: 'f16', k: 2, heads: [{ keys, tokens: 4, rows: Int32Array.of(1, 4), outIds: new Int32Array(2), outScores: new Float32Array(2) }] }),
    ).rejects.toThrow(/rows/);
  });
});
