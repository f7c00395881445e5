// The block methods' native choice of a step's blocks (native/kernels/block_choose.cc) against a plain
// reference written from the rule (index/block-select.ts): the query-agnostic blocks first; then the candidates
// in order — `top` as given, then the previous blocks outside it by score (higher first, then lower id) —
// each taken if not yet chosen and either kept from the previous step or within the maxNew quota, until the
// budget; the result ascending, class 1 for blocks whose importance rank is below agnosticClass.
import { describe, expect, it } from 'vitest';
import { chooseBlocks, type BlockChoiceArgs, type BlockChoiceHead } from '../../addon/block-choose.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`block-choose: seed ${seed}`);

function reference(h: BlockChoiceHead, a: BlockChoiceArgs): { ids: number[]; cls: number[] } {
  const chosen: number[] = [...h.agnostic];
  const taken = new Set(chosen), inPrev = new Set(h.prev), inTop = new Set(h.top);
  const below = Array.from(h.prev.keys()).filter((i) => !inTop.has(h.prev[i]))
    .sort((i, j) => h.prevScores[j] - h.prevScores[i] || h.prev[i] - h.prev[j]).map((i) => h.prev[i]);
  const maxNew = h.prev.length === 0 ? Infinity : a.maxNew;
  let brought = 0;
  for (const b of [...h.top, ...below]) {
    if (chosen.length >= a.budget) break;
    if (taken.has(b)) continue;
    if (inPrev.has(b) || brought < maxNew) {
      if (!inPrev.has(b)) brought++;
      taken.add(b);
      chosen.push(b);
    }
  }
  const ids = chosen.sort((x, y) => x - y);
  return { ids, cls: ids.map((b) => (a.protectAgnostic && h.importanceRank[b] < a.agnosticClass ? 1 : 0)) };
}

function randomHead(rng: Rng, blocks: number, budget: number, agnostic: number): BlockChoiceHead {
  const perm = (n: number) => {
    const p = Array.from({ length: n }, (_, i) => i);
    for (let i = n - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [p[i], p[j]] = [p[j], p[i]];
    }
    return p;
  };
  const byImportance = Int32Array.from(perm(blocks));
  const importanceRank = new Int32Array(blocks);
  byImportance.forEach((b, i) => (importanceRank[b] = i));
  const top = Int32Array.from(perm(blocks).slice(0, Math.min(blocks, budget + rng.int(budget + 1))));
  const prev = Int32Array.from(perm(blocks).slice(0, rng.int(Math.min(blocks, budget) + 1)).sort((x, y) => x - y));
  // Scores in few levels, so ties between previous blocks happen and the lower id must win.
  const prevScores = Float32Array.from(prev, () => rng.int(4));
  return { top, prev, prevScores, agnostic: byImportance.subarray(0, agnostic), importanceRank, flags: new Uint8Array(blocks) };
}

describe('chooseBlocks (native)', () => {
  it('chooses as the reference rule does, for every head of a call, and leaves the flags zero', () => {
    const rng = new Rng(seed);
    for (let trial = 0; trial < 200; trial++) {
      const blocks = 1 + rng.int(300), budget = rng.int(blocks + 5), agnostic = Math.min(blocks, Math.floor(budget * 0.25 * rng.int(2)));
      const a: BlockChoiceArgs = {
        blocks, budget, agnosticClass: agnostic, protectAgnostic: rng.int(2) === 1,
        maxNew: rng.int(3) === 0 ? Infinity : Math.max(1, Math.ceil(budget * 0.125)),
      };
      const heads = Array.from({ length: 1 + rng.int(4) }, () => randomHead(rng, blocks, budget, agnostic));
      const got = chooseBlocks(heads, a);
      heads.forEach((h, i) => {
        const want = reference(h, a);
        expect(Array.from(got.ids[i]), `trial ${trial} head ${i}`).toEqual(want.ids);
        expect(Array.from(got.priority[i]), `trial ${trial} head ${i} classes`).toEqual(want.cls);
        expect(h.flags.every((f) => f === 0)).toBe(true);
      });
    }
  });

  it('refuses an id outside the blocks, short scores or scratch, before touching the flags', () => {
    const rng = new Rng(seed + 1);
    const h = randomHead(rng, 50, 10, 2);
    const a: BlockChoiceArgs = { blocks: 50, budget: 10, agnosticClass: 2, protectAgnostic: true, maxNew: 2 };
    expect(() => chooseBlocks([{ ...h, top: Int32Array.of(3, 50) }], a)).toThrow(/top\[1\] = 50 is outside \[0, 50\)/);
    expect(() => chooseBlocks([{ ...h, prev: Int32Array.of(-1) , prevScores: Float32Array.of(0) }], a)).toThrow(/prev\[0\]/);
    expect(() => chooseBlocks([{ ...h, prev: Int32Array.of(1, 2), prevScores: Float32Array.of(0) }], a)).toThrow(/prevScores/);
    expect(() => chooseBlocks([{ ...h, flags: new Uint8Array(49) }], a)).toThrow(/flags/);
    expect(h.flags.every((f) => f === 0)).toBe(true);
  });
});
