// The RetrievalAttention graph's free start keys (RaSearchOptions::freeSeeds,
// addon/ra-graph.ts `freeSeeds`): a session's steady zone (sinks, window),
// attended in full anyway, starts the walk without being counted as scanned
// and is left out of the result. An exhaustive search with them returns the
// exact top-k of the other keys (float64 reference) with scores whose
// partitions still include the free keys; under a scan cap the walk reaches a
// key next to the window through the window, which it misses without them.
import { describe, expect, it } from 'vitest';
import { RaGraph, type RaAggregate, type RaGraphSearchArgs } from '../../addon/ra-graph.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { groupMeanProb } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`native ra-graph free-seeds tests: seed ${seed}`);
const toBits = bitsOf('f16'), toValue = valueOf('f16');

/** N(0, 1) keys; those `lean` picks have 1.5 added in the first two channels. */
function keysOf(rng: Rng, n: number, d: number, lean: (t: number) => boolean = () => false) {
  const bits = Uint16Array.from({ length: n * d }, (_, i) => toBits(rng.normal() + (i % d < 2 && lean(Math.floor(i / d)) ? 1.5 : 0)));
  return { bits, values: Float64Array.from(bits, toValue) };
}

/** Float64 logits per row, the group's mean probability (over all n keys) and the max logit per key. */
const reference = groupMeanProb;

function args(keys: Uint16Array, n: number, d: number, q: Float32Array, G: number, k: number, ef: number, aggregate: RaAggregate): RaGraphSearchArgs {
  return { keys, tokens: n, headDim: d, dtype: 'f16', q, group: G, k, ef, outIds: new Int32Array(k), outScores: new Float32Array(k), aggregate };
}

/** Sinks [0, 16) and a window of the last `w` keys. */
const steadyZone = (n: number, w: number) => Int32Array.from([...Array(16).keys(), ...Array.from({ length: w }, (_, i) => n - w + i)]);

describe('ra-graph free start keys', () => {
  for (const [n, G] of [[3001, 4], [777, 2]] as const)
    for (const aggregate of ['max', 'attention'] as const)
      it(`exhaustively returns the exact top-k of the keys outside them, not counting them as scanned (${aggregate}, n=${n}, G=${G})`, async () => {
        const rng = new Rng(seed + n + (aggregate === 'max' ? 0 : 3));
        const d = 24, k = 40, scale = 1 / Math.sqrt(d);
        const free = steadyZone(n, 101);
        const keys = keysOf(rng, n, d, (t) => t < 16 || t >= n - 101);
        const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: Float32Array.from({ length: 300 * d }, () => rng.normal()), degree: 8, kBuild: 16 });
        const isFree = new Uint8Array(n);
        for (const t of free) isFree[t] = 1;
        for (let trial = 0; trial < 3; trial++) {
          // Rows that favour the steady zone's direction, so that it holds much of the group's top keys. The
          // premise: the plain top-k holds free keys, so leaving them out changes the answer. A draw misses it now
          // and then (seed 230028506's first 'max' draw at n=3001: no free key in the top 40), so the rows are
          // drawn again until it holds (at most 20 draws; each holds with probability well over 1/2).
          let q = new Float32Array(0), by: Float64Array = new Float64Array(0), order: number[] = [];
          let ref!: ReturnType<typeof reference>;
          for (let draw = 0; draw < 20; draw++) {
            q = Float32Array.from({ length: G * d }, (_, i) => (i % d < 2 ? 1.2 : 0) + rng.normal());
            ref = reference(q, G, keys.values, n, d, scale);
            by = aggregate === 'max' ? ref.maxLogit : ref.meanProb;
            order = [...Array(n).keys()].sort((a, b) => by[b] - by[a] || a - b);
            if (order.slice(0, k).some((t) => isFree[t])) break;
          }
          expect(order.slice(0, k).some((t) => isFree[t])).toBe(true);
          const want = order.filter((t) => !isFree[t]).slice(0, k);
          const a = { ...args(keys.bits, n, d, q, G, k, n, aggregate), freeSeeds: free };
          const r = graph.searchSync(a);
          expect(r.count).toBe(k);
          // 'attention' counts its strided sample (here 64 keys) once, free keys among it included.
          if (aggregate === 'max') expect(r.scanned).toBe(n - free.length);
          else expect(r.scanned).toBeGreaterThanOrEqual(n - free.length), expect(r.scanned).toBeLessThanOrEqual(n - free.length + 64);
          for (let i = 0; i < k; i++) {
            const got = a.outIds[i];
            expect(isFree[got]).toBe(0);
            // Ranks may swap only where f32 and f64 disagree.
            if (got !== want[i]) expect(Math.abs(by[got] - by[want[i]])).toBeLessThan(1e-5 * Math.abs(by[want[i]]));
            // 'attention' scores: log of the mean probability over ALL keys: the free keys' mass stays in the partitions.
            if (aggregate === 'attention') expect(Math.abs(a.outScores[i] - Math.log(ref.meanProb[got]))).toBeLessThan(1e-3);
          }
          // The same after a round trip.
          const b = { ...args(keys.bits, n, d, q, G, k, n, aggregate), freeSeeds: free };
          RaGraph.load(graph.save()).searchSync(b);
          expect([...b.outIds]).toEqual([...a.outIds]);
        }
      });

  // A cold walk's first list holds p when its best start key happens to link to it: measured outside the suite
  // (this setup, 500 seeds x both rankings, 2-core VM), in 22 of 1000 graphs (2.2%; with key-key edges, d = 32,
  // ~1 in 6), so the premise is counted over 6 graphs: at most 3 (4 or more: ~4e-6 of runs). The walk with the
  // steady zone found p in all 1000.
  for (const aggregate of ['max', 'attention'] as const)
    it(`reach a key beside the window under a scan cap that the walk misses without them (${aggregate})`, async () => {
      const [n, d, G, k, W, TRIALS] = [5003, 64, 4, 10, 64, 6];
      const p = n - W - 1;
      const free = steadyZone(n, W);
      let coldHits = 0;
      for (let trial = 0; trial < TRIALS; trial++) {
        const rng = new Rng(seed + 40 + 2 * trial + (aggregate === 'max' ? 0 : 1));
        const raw = Float64Array.from({ length: n * d }, () => rng.normal());
        // The target p sits just before the window, its norm √d (q·p is then 8 sd of the other keys' scores, whose
        // best is ~4 sd; a larger norm would make p a hub that many build queries retrieve); the window's first key
        // is nearly p (a positional edge joins them).
        let norm = 0;
        for (let j = 0; j < d; j++) norm += raw[p * d + j] ** 2;
        for (let j = 0; j < d; j++) raw[p * d + j] *= Math.sqrt(d / norm);
        for (let j = 0; j < d; j++) raw[(p + 1) * d + j] = raw[p * d + j] + 0.2 * rng.normal();
        const bits = Uint16Array.from(raw, toBits);
        const queries = Float32Array.from({ length: 500 * d }, () => rng.normal());
        const graph = await RaGraph.build({ keys: bits, tokens: n, headDim: d, dtype: 'f16', queries, degree: 8, kBuild: 16, keyNeighbors: 0 });
        const q = new Float32Array(G * d);
        for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) q[g * d + j] = raw[p * d + j] + 0.2 * rng.normal();
        const search = (cap: number, withFree: boolean, ef = 8 * k) => {
          const a = { ...args(bits, n, d, q, G, k, ef, aggregate), margin: 1e6, maxScanned: cap, ...(withFree ? { freeSeeds: free } : {}) };
          const r = graph.searchSync(a);
          return { ...r, ids: [...a.outIds.subarray(0, r.count)] };
        };
        // A cap of 1 stops before any expansion: what the start costs (entries, sample). The smallest cap above
        // it that scores more lets the walk expand exactly one neighbour list: the best start key's.
        const oneList = (withFree: boolean) => {
          const base = search(1, withFree).scanned;
          for (let cap = base + 1; ; cap++) {
            const r = search(cap, withFree);
            if (r.scanned > base) return { ...r, base };
          }
        };
        const seeded = oneList(true), cold = oneList(false);
        expect(seeded.ids).toContain(p);
        expect(seeded.ids.some((t) => free.includes(t))).toBe(false);
        // The window's 64 keys were scored but not counted: the start costs no more than without them.
        expect(seeded.base).toBeLessThanOrEqual(cold.base);
        expect(seeded.scanned - seeded.base).toBeLessThanOrEqual(graph.maxDegree);
        coldHits += cold.ids.includes(p) ? 1 : 0;
        // p is the best key outside the steady zone: an exhaustive search finds it with or without them.
        expect(search(0, false, n).ids.slice(0, 2)).toContain(p);
        expect(search(0, true, n).ids[0]).toBe(p);
        graph.dispose();
      }
      expect(coldHits).toBeLessThanOrEqual(3);
    });

  it('refuses free start keys outside the keys', async () => {
    const rng = new Rng(seed + 90);
    const [n, d] = [301, 12];
    const keys = keysOf(rng, n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: Float32Array.from({ length: 50 * d }, () => rng.normal()) });
    const ok = args(keys.bits, n, d, Float32Array.from({ length: 2 * d }, () => rng.normal()), 2, 10, 20, 'attention');
    expect(() => graph.searchSync({ ...ok, freeSeeds: Int32Array.of(0, n) })).toThrow(/freeSeeds\[1\] = 301 is outside/);
    expect(() => graph.searchSync({ ...ok, freeSeeds: Float32Array.of(1) as unknown as Int32Array })).toThrow(TypeError);
  });
});
