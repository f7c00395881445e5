// The graph walk's rounds (native/indexes/ra_graph_beam.h, RaSearchOptions::
// expandWidth): several candidates expanded at once, their new neighbours
// scored as one stream. With an unlimited budget every width still expands
// every key reachable from the entry points (scanned = tokens) and returns
// the exact top-k, for both rankings; the scan cap still holds to one
// neighbour list; margin 0 still stops where a beam of width k would at the
// same width; the walk's shape (walkStats) and the pool cap's experiment;
// widths beyond the candidates, and the argument's checks.
import { describe, expect, it } from 'vitest';
import { topk } from '../../addon/kernels.js';
import { RaGraph, type RaGraphSearchArgs } from '../../addon/ra-graph.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`native ra-graph width tests: seed ${seed}`);

function keysOf(rng: Rng, dt: Dt, n: number, d: number) {
  const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
  for (let i = 0; i < n * d; i++) {
    bits[i] = bitsOf(dt)(rng.normal() + (i % d < 2 ? 2 : 0));
    values[i] = valueOf(dt)(bits[i]);
  }
  return { bits, values };
}

function rows(rng: Rng, count: number, d: number, sd = 1): Float32Array {
  return Float32Array.from({ length: count * d }, () => 0.3 + sd * rng.normal());
}

function args(keys: Uint16Array, n: number, d: number, dt: Dt, q: Float32Array, G: number, k: number, ef: number): RaGraphSearchArgs {
  const keep = Math.min(k, n);
  return { keys, tokens: n, headDim: d, dtype: dt, q, group: G, k, ef, outIds: new Int32Array(keep), outScores: new Float32Array(keep) };
}

/** Float64 log of the group's mean probability per key (softmax per row at `scale`). */
function logMeanProb(q: Float32Array, G: number, keys: Float64Array, n: number, d: number, scale: number): Float64Array {
  const mean = new Float64Array(n);
  for (let g = 0; g < G; g++) {
    const x = Float64Array.from({ length: n }, (_, t) => {
      let s = 0;
      for (let j = 0; j < d; j++) s += q[g * d + j] * keys[t * d + j];
      return s * scale;
    });
    let m = -Infinity;
    for (const v of x) m = Math.max(m, v);
    let z = 0;
    for (const v of x) z += Math.exp(v - m);
    for (let t = 0; t < n; t++) mean[t] += Math.exp(x[t] - m) / z / G;
  }
  return mean.map(Math.log);
}

const WIDTHS = [1, 2, 3, 8, 64, 1024];

describe('ra-graph walk rounds (expandWidth)', () => {
  for (const dt of ['f16', 'bf16'] as const)
    it(`expands every reachable key and returns the exact top-k at every width when ef >= tokens (${dt})`, async () => {
      const rng = new Rng(seed + (dt === 'f16' ? 1 : 2));
      const [n, d, G, k] = [4001, 24, 4, 50];
      const keys = keysOf(rng, dt, n, d);
      // Build queries aimed at three directions: most keys are in no build query's top list.
      const aims = Array.from({ length: 3 }, () => Float64Array.from({ length: d }, () => 2 * rng.normal()));
      const queries = new Float32Array(600 * d);
      for (let r = 0; r < 600; r++) for (let j = 0; j < d; j++) queries[r * d + j] = aims[r % 3][j] + 0.2 * rng.normal();
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries, degree: 8, kBuild: 16 });
      expect(graph.buildStats!.unretrieved).toBeGreaterThan(n / 2);
      for (let trial = 0; trial < 2; trial++) {
        const q = rows(rng, G, d, 1.3);
        const kOut = new Int32Array(k), kScores = new Float32Array(k);
        await topk({ q, group: G, headDim: d, keys: keys.bits, tokens: n, dtype: dt, k, outIds: kOut, outScores: kScores });
        const ref = logMeanProb(q, G, keys.values, n, d, 1 / Math.sqrt(d));
        const byProb = Array.from({ length: n }, (_, t) => t).sort((a, b) => ref[b] - ref[a] || a - b);
        for (const expandWidth of WIDTHS) {
          // The max over the rows: the topk kernel's ids and scores, bit for bit.
          const a = { ...args(keys.bits, n, d, dt, q, G, k, n), expandWidth };
          expect(graph.searchSync(a)).toEqual({ count: k, scanned: n });
          expect([...a.outIds]).toEqual([...kOut]);
          expect([...a.outScores]).toEqual([...kScores]);
          // The group's attention: its partitions are summed in the walk's order, so the last float bits may move
          // with the width; ranks may swap only where keys are within 1e-5 of each other in probability.
          const b = { ...args(keys.bits, n, d, dt, q, G, k, n), expandWidth, aggregate: 'attention' as const };
          expect(graph.searchSync(b)).toEqual({ count: k, scanned: n });
          for (let i = 0; i < k; i++) {
            const got = b.outIds[i], want = byProb[i];
            if (got !== want) expect(Math.abs(ref[got] - ref[want])).toBeLessThan(1e-5);
            expect(Math.abs(b.outScores[i] - ref[got])).toBeLessThan(1e-3);
          }
        }
      }
    });

  it('holds the scan cap to one neighbour list and stops on margin 0 where a beam of width k would, at every width', async () => {
    const rng = new Rng(seed + 3);
    const [n, d, G, k] = [12007, 16, 4, 60];
    const keys = keysOf(rng, 'f16', n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: rows(rng, 1200, d), degree: 8, kBuild: 16 });
    for (let trial = 0; trial < 3; trial++) {
      const q = rows(rng, G, d, 1.2);
      for (const expandWidth of WIDTHS)
        for (const aggregate of ['max', 'attention'] as const) {
          for (const cap of [200, 1500]) {
            const a = { ...args(keys.bits, n, d, 'f16', q, G, k, n), aggregate, margin: 1e6, maxScanned: cap, expandWidth };
            const r = graph.searchSync(a);
            expect(r.count).toBe(k);
            // 'attention' counts its sample (n/512, at least 64 keys) once though the walk may reach it again.
            expect(r.scanned).toBeGreaterThanOrEqual(cap - (aggregate === 'attention' ? 64 : 0));
            expect(r.scanned).toBeLessThanOrEqual(cap + graph.maxDegree);
          }
          if (aggregate === 'max') {
            const fixed = { ...args(keys.bits, n, d, 'f16', q, G, k, k), expandWidth };
            const m0 = { ...args(keys.bits, n, d, 'f16', q, G, k, n), margin: 0, expandWidth };
            expect(graph.searchSync(m0)).toEqual(graph.searchSync(fixed));
            expect([...m0.outIds]).toEqual([...fixed.outIds]);
          }
        }
    }
  });

  it('reports the walk\'s shape: with ef >= tokens every key expanded once, in rounds of at most the width; a pool cap cuts the candidates', async () => {
    const rng = new Rng(seed + 5);
    const [n, d, G, k] = [3001, 16, 4, 40];
    const keys = keysOf(rng, 'f16', n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: rows(rng, 400, d), degree: 8, kBuild: 16 });
    const q = rows(rng, G, d, 1.2);
    const search = (expandWidth: number, extra: Partial<RaGraphSearchArgs> = {}) => {
      const a = { ...args(keys.bits, n, d, 'f16', q, G, k, n), aggregate: 'attention' as const, expandWidth, walkStats: true, ...extra };
      return { res: graph.searchSync(a), ids: [...a.outIds] };
    };
    for (const expandWidth of WIDTHS) {
      const { res } = search(expandWidth);
      const w = res.walk!;
      // Nothing bounds the walk: every key is scored, pushed and expanded once.
      expect(w.expanded).toBe(n);
      if (expandWidth === 1) expect(w.rounds).toBe(n);
      expect(w.rounds).toBeGreaterThanOrEqual(Math.ceil(n / expandWidth));
      expect(w.rounds).toBeLessThanOrEqual(n);
      // The entry points, plus at most the sample's 16 best as seeds.
      expect(w.startKeys).toBeGreaterThanOrEqual(graph.entryPoints);
      expect(w.startKeys).toBeLessThanOrEqual(graph.entryPoints + 16);
      expect(w.peakCandidates).toBeGreaterThanOrEqual(w.startKeys);
      expect(w.peakCandidates).toBeLessThanOrEqual(n);
    }
    // Absent unless asked, and never for the max ranking.
    expect(search(8, { walkStats: false }).res.walk).toBeUndefined();
    expect(search(8, { aggregate: 'max' }).res.walk).toBeUndefined();
    const free = search(8);
    // A pool that never binds changes nothing; a small one holds the candidates to it plus a round's new keys.
    const wide = search(8, { poolCap: n });
    expect(wide.ids).toEqual(free.ids);
    expect(wide.res.walk).toEqual(free.res.walk);
    const cut = search(8, { poolCap: 16 }).res.walk!;
    expect(cut.peakCandidates).toBeLessThanOrEqual(Math.max(cut.startKeys, 16 + 8 * graph.maxDegree));
    expect(cut.expanded).toBeLessThan(n);
    // The cut applies whether the stats are asked or not.
    expect(search(8, { poolCap: 16, walkStats: false }).ids).toEqual(search(8, { poolCap: 16 }).ids);
  });

  it('takes widths beyond the candidates on tiny graphs, defaults when absent and refuses a width outside 1..1024', async () => {
    const rng = new Rng(seed + 4);
    for (const n of [1, 2, 37]) {
      const d = 8;
      const keys = keysOf(rng, 'f16', n, d);
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: rows(rng, 5, d), degree: 4, kBuild: 8 });
      const q = rows(rng, 2, d);
      const want = args(keys.bits, n, d, 'f16', q, 2, 10, n);
      expect(graph.searchSync({ ...want, expandWidth: 1 })).toEqual({ count: Math.min(10, n), scanned: n });
      const wide = { ...args(keys.bits, n, d, 'f16', q, 2, 10, n), expandWidth: 1024 };
      expect(graph.searchSync(wide)).toEqual({ count: Math.min(10, n), scanned: n });
      expect([...wide.outIds]).toEqual([...want.outIds]);
    }
    const n = 500, d = 8;
    const keys = keysOf(rng, 'f16', n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: rows(rng, 50, d), degree: 4, kBuild: 8 });
    const q = rows(rng, 2, d);
    // Absent: the native default (1, the walk one candidate at a time).
    const dflt = args(keys.bits, n, d, 'f16', q, 2, 5, 5), one = { ...args(keys.bits, n, d, 'f16', q, 2, 5, 5), expandWidth: 1 };
    expect(graph.searchSync(dflt)).toEqual(graph.searchSync(one));
    expect([...dflt.outIds]).toEqual([...one.outIds]);
    for (const expandWidth of [0, -1, 1.5, 1025, Number.NaN]) {
      const a = { ...args(keys.bits, n, d, 'f16', q, 2, 5, 5), expandWidth };
      expect(() => graph.searchSync(a)).toThrow(RangeError);
      expect([...a.outIds]).toEqual([0, 0, 0, 0, 0]);
    }
  });
});
