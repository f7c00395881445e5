// The block methods' native choice of a step's blocks (native/kernels/block_choose.cc) against a plain
// reference written from the rule (index/block-select.ts): the candidates are the first `reach` distinct
// blocks of the top rows (row r is block floor(r / reps)), those excluded dropped, and the previous blocks
// not excluded, each scored as the best of its rows; the query-agnostic blocks (the first `agnostic` of the
// importance order not excluded) first; then the candidates in order — `top`, then the previous blocks
// outside it by score (higher first, then lower id) — each taken if not yet chosen and either kept from the
// previous step or within the maxNew quota, until the budget; the result ascending, class 1 for blocks whose
// importance rank is below agnosticClass, and the chosen blocks' rows. Steps are chained on one chooser (each
// step's choice the next one's previous), and the flags scratch is the thread's, shared by every chooser, so a
// flag left set would show in a later step or trial.
import { describe, expect, it } from 'vitest';
import { augmentRows, BlockChooser, type BlockStepArgs, type BlockStepChoice } from '../../addon/block-choose.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`block-choose: seed ${seed}`);

interface Doc {
  blocks: number;
  reps: number;
  byImportance: Int32Array[];
  importanceRank: Int32Array[];
}

function reference(doc: Doc, a: BlockStepArgs, prev: number[][], h: number): { ids: number[]; cls: number[]; rows: number[] } {
  const R = doc.reps, excluded = new Set(a.exclude);
  const seen: number[] = [];
  for (const row of a.top[h]) {
    if (seen.length >= Math.min(a.reach, doc.blocks)) break;
    const b = Math.floor(row / R);
    if (!seen.includes(b)) seen.push(b);
  }
  const top = seen.filter((b) => !excluded.has(b));
  const scoreOfRow = (i: number, row: number) => (a.extraScores ? a.extraScores[h][i] : a.rowScores![h][row]);
  const kept: { b: number; score: number }[] = [];
  prev[h].forEach((b, i) => {
    let best = -Infinity;
    for (let r = 0; r < R; r++) best = Math.max(best, scoreOfRow(i * R + r, b * R + r));
    if (!excluded.has(b)) kept.push({ b, score: best });
  });
  const chosen = [...doc.byImportance[h]].filter((b) => !excluded.has(b)).slice(0, a.agnostic);
  const taken = new Set(chosen), inPrev = new Set(kept.map((x) => x.b)), inTop = new Set(top);
  const below = kept.filter((x) => !inTop.has(x.b)).sort((x, y) => y.score - x.score || x.b - y.b).map((x) => x.b);
  const maxNew = kept.length === 0 ? Infinity : a.maxNew;
  let brought = 0;
  for (const b of [...top, ...below]) {
    if (chosen.length >= a.budget) break;
    if (taken.has(b)) continue;
    if (inPrev.has(b) || brought < maxNew) {
      if (!inPrev.has(b)) brought++;
      taken.add(b);
      chosen.push(b);
    }
  }
  const ids = chosen.sort((x, y) => x - y);
  return {
    ids,
    cls: ids.map((b) => (a.protectAgnostic && doc.importanceRank[h][b] < a.agnosticClass ? 1 : 0)),
    rows: ids.flatMap((b) => Array.from({ length: R }, (_, r) => b * R + r)),
  };
}

function shuffled(rng: Rng, n: number): number[] {
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
}

function randomDoc(rng: Rng, heads: number): Doc {
  const blocks = 1 + rng.int(300), reps = 1 + rng.int(4);
  const byImportance = Array.from({ length: heads }, () => Int32Array.from(shuffled(rng, blocks)));
  const importanceRank = byImportance.map((order) => {
    const rank = new Int32Array(blocks);
    order.forEach((b, i) => (rank[b] = i));
    return rank;
  });
  return { blocks, reps, byImportance, importanceRank };
}

function randomStep(rng: Rng, doc: Doc, heads: number, prev: BlockStepChoice | undefined): BlockStepArgs {
  const { blocks, reps } = doc, rows = blocks * reps;
  const budget = rng.int(blocks + 5), agnostic = Math.min(blocks, Math.floor(budget * 0.25 * rng.int(2)));
  const exclude = Int32Array.from(shuffled(rng, blocks).slice(0, rng.int(Math.min(8, blocks) + 1)).sort((x, y) => x - y));
  // The top rows as a scorer returns them: distinct rows, up to reach · reps of them.
  const reach = budget + agnostic + exclude.length + rng.int(4);
  const top = Array.from({ length: heads }, () => Int32Array.from(shuffled(rng, rows).slice(0, Math.min(rows, reach * reps - rng.int(reps)))));
  // Scores in few levels, so ties between previous blocks happen and the lower id must win.
  const level = () => rng.int(4) - 1.5;
  const a: BlockStepArgs = {
    // The methods pass agnosticClass = agnostic (classes known from the importance walk); others read the ranks.
    reach, budget, agnostic, agnosticClass: Math.max(0, agnostic + (rng.int(4) === 0 ? rng.int(5) - 2 : 0)), exclude, top, prev,
    protectAgnostic: rng.int(2) === 1,
    maxNew: rng.int(3) === 0 ? Infinity : Math.max(1, Math.ceil(budget * 0.125)),
  };
  if (rng.int(2) === 0) a.rowScores = Array.from({ length: heads }, () => Float32Array.from({ length: rows }, level));
  else a.extraScores = (prev?.rowLists() ?? Array.from({ length: heads }, () => new Int32Array(0))).map((r) => Float32Array.from(r, level));
  return a;
}

const listsOf = (c: BlockStepChoice) => ({ ids: c.ids().map((x) => Array.from(x)), cls: c.classes().map((x) => Array.from(x)), rows: c.rowLists().map((x) => Array.from(x)) });

describe('BlockChooser.step (native)', () => {
  it('chooses as the reference rule does, for every head of a call, step after step', () => {
    const rng = new Rng(seed);
    for (let trial = 0; trial < 150; trial++) {
      const heads = 1 + rng.int(4), doc = randomDoc(rng, heads);
      const chooser = new BlockChooser(doc.blocks, doc.reps, heads, doc.byImportance.map((byImportance, h) => ({ byImportance, importanceRank: doc.importanceRank[h] })));
      let prev: BlockStepChoice | undefined;
      for (let step = 0; step < 4; step++) {
        const a = randomStep(rng, doc, heads, prev);
        const prevIds = prev ? prev.ids().map((x) => Array.from(x)) : Array.from({ length: heads }, () => []);
        const got = chooser.step(a), lists = listsOf(got);
        for (let h = 0; h < heads; h++) {
          const want = reference(doc, a, prevIds, h);
          expect(lists.ids[h], `trial ${trial} step ${step} head ${h}`).toEqual(want.ids);
          expect(lists.cls[h], `trial ${trial} step ${step} head ${h} classes`).toEqual(want.cls);
          expect(lists.rows[h], `trial ${trial} step ${step} head ${h} rows`).toEqual(want.rows);
        }
        prev = got;
      }
    }
  });

  it('refuses an id outside the blocks or rows, or short scores, and chooses as before afterwards', () => {
    const rng = new Rng(seed + 1);
    const doc = randomDoc(rng, 2);
    const make = () => new BlockChooser(doc.blocks, doc.reps, 2, doc.byImportance.map((byImportance, h) => ({ byImportance, importanceRank: doc.importanceRank[h] })));
    const chooser = make(), twin = make();
    const first = randomStep(rng, doc, 2, undefined);
    const prev = chooser.step(first);
    twin.step(first);
    const a = randomStep(rng, doc, 2, prev);
    const rows = doc.blocks * doc.reps;
    expect(() => chooser.step({ ...a, top: [a.top[0], Int32Array.of(0, rows)] })).toThrow(new RegExp(`top\\[head 1\\]\\[1\\] = ${rows} is outside \\[0, ${rows}\\)`));
    expect(() => chooser.step({ ...a, exclude: Int32Array.of(doc.blocks) })).toThrow(/exclude\[0\]/);
    expect(() => chooser.step({ ...a, extraScores: undefined, rowScores: [new Float32Array(rows), new Float32Array(rows - 1)] })).toThrow(/rowScores entry/);
    if (prev.counts[0] > 0) expect(() => chooser.step({ ...a, rowScores: undefined, extraScores: [new Float32Array(0), new Float32Array(0)] })).toThrow(/extraScores entry/);
    const bad = new Int32Array(doc.blocks).fill(doc.blocks);
    expect(() => new BlockChooser(doc.blocks, doc.reps, 1, [{ byImportance: bad, importanceRank: doc.importanceRank[0] }])).toThrow(/byImportance/);
    // The refused calls touched nothing: the chooser answers as its twin.
    expect(listsOf(chooser.step(a))).toEqual(listsOf(twin.step(a)));
  });
});

describe('augmentRows (native)', () => {
  // The loop index/block-summary.ts ran in JS before: the norm summed in double in order, each product rounded
  // to float32 once. The native rows must be its bits, or a GPU and a CPU session (or two builds) could rank
  // blocks apart at a tie.
  function reference(q: Float32Array, group: number, d: number, shares: Float64Array): Float32Array {
    const rows = q.length / d, stride = d + 8, out = new Float32Array(rows * stride);
    for (let r = 0; r < rows; r++) {
      let ss = 0;
      for (let j = 0; j < d; j++) {
        const x = q[r * d + j];
        out[r * stride + j] = x;
        ss += x * x;
      }
      out[r * stride + d] = shares[Math.floor(r / group)] * Math.sqrt(ss);
      out[r * stride + d + 1] = Math.sqrt(d);
    }
    return out;
  }

  it('gives the JS loop\'s bits, for norms near float32\'s ends and shares that are not float32', () => {
    const rng = new Rng(seed + 2);
    for (let trial = 0; trial < 300; trial++) {
      const d = [8, 32, 64, 72, 128][rng.int(5)], group = [1, 2, 4, 8][rng.int(4)], heads = 1 + rng.int(8);
      const scale = [1, 1e-20, 1e19, 3e38, 1e-42][rng.int(5)];
      const q = Float32Array.from({ length: heads * group * d }, () => (rng.int(9) === 0 ? 0 : rng.normal() * scale));
      const shares = Float64Array.from({ length: heads }, () => [0, 0.25, 0.3, 1 / 3, Math.fround(0.7), 1][rng.int(6)]);
      const got = augmentRows(q, group, d, shares), want = reference(q, group, d, shares);
      expect(new Uint32Array(got.buffer)).toEqual(new Uint32Array(want.buffer));
    }
  });
});
