// The RetrievalAttention graph ranked by the group's attention
// (native/indexes/ra_graph_attention.cc) and its key-key edges
// (ra_graph_build.cc, step 3b): an exhaustive search returns the exact top-k
// of the group's mean probability (float64 reference), which the max over
// the group's rows does not when the rows' partitions differ; a bounded
// search's estimated log-probabilities are close to the exact ones; the final
// scores are spent only where the bound allows a key into the result; the
// scan cap stops the walk; the key-key edges raise recall per key scanned when
// the build queries say nothing about the decode queries; keys of equal score
// come in ascending id order; a search reads the keys it is given, the rows
// the graph copies for every search included; bad arguments are refused.
import { describe, expect, it } from 'vitest';
import { RaGraph, type RaGraphSearchArgs } from '../../addon/ra-graph.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`native ra-graph attention tests: seed ${seed}`);

/** Keys as storage words and their exact values: N(0, 1) plus `offset` in the first two channels. */
function keysOf(rng: Rng, dt: Dt, n: number, d: number, offset = 0) {
  const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
  for (let i = 0; i < n * d; i++) {
    bits[i] = bitsOf(dt)(rng.normal() + (i % d < 2 ? offset : 0));
    values[i] = valueOf(dt)(bits[i]);
  }
  return { bits, values };
}

/** Float64 per-row softmax at `scale` and the group's mean probability and max-over-rows score per key. */
function reference(q: Float32Array, G: number, keys: Float64Array, n: number, d: number, scale: number) {
  const logits = Array.from({ length: G }, (_, g) =>
    Float64Array.from({ length: n }, (_, t) => {
      let s = 0;
      for (let j = 0; j < d; j++) s += q[g * d + j] * keys[t * d + j];
      return s * scale;
    }),
  );
  const meanProb = new Float64Array(n), maxLogit = new Float64Array(n).fill(-Infinity);
  for (const x of logits) {
    const m = Math.max(...x);
    let z = 0;
    for (let t = 0; t < n; t++) z += Math.exp(x[t] - m);
    for (let t = 0; t < n; t++) {
      meanProb[t] += Math.exp(x[t] - m) / z / G;
      maxLogit[t] = Math.max(maxLogit[t], x[t]);
    }
  }
  const order = (v: Float64Array) => Array.from({ length: n }, (_, t) => t).sort((a, b) => v[b] - v[a] || a - b);
  return { meanProb, byAttention: order(meanProb), byMax: order(maxLogit) };
}

/** Rows with one peaked head (a large query norm: a few keys take its mass) and broad ones. */
function groupRows(rng: Rng, G: number, d: number): Float32Array {
  const q = new Float32Array(G * d);
  for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) q[g * d + j] = (g === 0 ? 3 : 0.8) * rng.normal();
  return q;
}

function args(keys: Uint16Array, n: number, d: number, dt: Dt, q: Float32Array, G: number, k: number, ef: number): RaGraphSearchArgs {
  const keep = Math.min(k, n);
  return { keys, tokens: n, headDim: d, dtype: dt, q, group: G, k, ef, outIds: new Int32Array(keep), outScores: new Float32Array(keep), aggregate: 'attention' };
}

describe('ra-graph ranked by the group attention', () => {
  for (const dt of ['f16', 'bf16'] as const)
    for (const [n, G] of [[3001, 4], [40, 2], [9000, 1]] as const)
      it(`returns the exact top-k of the group's mean probability when ef >= tokens (${dt}, n=${n}, G=${G})`, async () => {
        const rng = new Rng(seed + n + G + (dt === 'f16' ? 0 : 7));
        const d = 24, k = Math.min(60, n), scale = 1 / Math.sqrt(d);
        const keys = keysOf(rng, dt, n, d, 2);
        const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: groupRows(rng, 300, d), degree: 8, kBuild: 16 });
        let differs = 0;
        for (let trial = 0; trial < 3; trial++) {
          const q = groupRows(rng, G, d);
          const ref = reference(q, G, keys.values, n, d, scale);
          const a = args(keys.bits, n, d, dt, q, G, k, n);
          expect(graph.searchSync(a)).toEqual({ count: k, scanned: n });
          // Ranks may swap only where f32 and f64 disagree: keys within 1e-5 relative of each other.
          const want = ref.byAttention.slice(0, k);
          for (let i = 0; i < k; i++) {
            const got = a.outIds[i];
            if (got !== want[i]) expect(Math.abs(ref.meanProb[got] - ref.meanProb[want[i]])).toBeLessThan(1e-5 * ref.meanProb[want[i]]);
            // Scores: log of the mean probability.
            expect(Math.abs(a.outScores[i] - Math.log(ref.meanProb[got]))).toBeLessThan(1e-3);
          }
          // The premise: the max over rows ranks another set (for G > 1).
          const maxTop = new Set(ref.byMax.slice(0, k));
          differs += want.filter((t) => !maxTop.has(t)).length;
          // The same after a round trip.
          const b = args(keys.bits, n, d, dt, q, G, k, n);
          RaGraph.load(graph.save()).searchSync(b);
          expect([...b.outIds]).toEqual([...a.outIds]);
        }
        if (G > 1 && n > 2 * k) expect(differs).toBeGreaterThan(0);
      });

  it("estimates the rows' partitions: a bounded search's log-probabilities are near the exact ones, and it holds more of the group's attention than the max", async () => {
    const rng = new Rng(seed + 101);
    const [n, d, G, k] = [40009, 32, 4, 200];
    const scale = 1 / Math.sqrt(d);
    const keys = keysOf(rng, 'f16', n, d, 3);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: groupRows(rng, 2000, d), degree: 12, kBuild: 32 });
    // 24 trials: one trial's error is mostly its partition miss (below), so the mean over 4 had the
    // sample's tail (0.51 on one CI seed); over 12 its spread is a third of that, and over 24 the
    // held attention's (below) is small enough too.
    const trials = 24;
    const trialMean: number[] = [], trialWorst: number[] = [], trialHeld: number[] = [];
    let sum = 0, scanned = 0, heldAttention = 0, heldMax = 0;
    for (let trial = 0; trial < trials; trial++) {
      const q = groupRows(rng, G, d);
      const ref = reference(q, G, keys.values, n, d, scale);
      const a = { ...args(keys.bits, n, d, 'f16', q, G, k, 8 * k), margin: 1 };
      const r = graph.searchSync(a);
      expect(r.count).toBe(k);
      // The sample (n/512 keys, at least 64) is scored and counted.
      expect(r.scanned).toBeGreaterThanOrEqual(Math.max(64, Math.floor(n / 512)));
      expect(r.scanned).toBeLessThan(n);
      scanned += r.scanned / n / trials;
      let mean = 0, worst = 0;
      for (let i = 0; i < k; i++) {
        const e = Math.abs(a.outScores[i] - Math.log(ref.meanProb[a.outIds[i]]));
        worst = Math.max(worst, e);
        mean += e / k;
      }
      const held = a.outIds.reduce((acc, id) => acc + ref.meanProb[id], 0);
      heldAttention += held;
      trialMean.push(mean);
      trialWorst.push(worst);
      sum += mean / trials;
      // The same walk's budget ranked by the max over rows (margin in q·k units).
      const m = { ...args(keys.bits, n, d, 'f16', q, G, k, 8 * k), margin: 1 / scale, aggregate: 'max' as const };
      graph.searchSync(m);
      const byMax = m.outIds.reduce((acc, id) => acc + ref.meanProb[id], 0);
      heldMax += byMax;
      trialHeld.push(held / byMax);
    }
    const median = (v: number[]) => [...v].sort((x, y) => x - y)[v.length >> 1];
    console.log(
      `attention ranking, bounded (margin 1): log-probability error mean ${sum.toFixed(3)}, per trial ${trialMean.map((e) => e.toFixed(2)).join(' ')}; ` +
        `worst per trial ${trialWorst.map((e) => e.toFixed(2)).join(' ')}; ${(100 * scanned).toFixed(1)}% scanned; ` +
        `group attention held ${(heldAttention / trials).toFixed(3)} (max ranking ${(heldMax / trials).toFixed(3)}; median trial x${median(trialHeld).toFixed(3)})`,
    );
    // The unreached keys' mass comes from the sample's unreached part (n/512
    // keys, 78 here; 2048 at 1M keys). On the peaked row most of the mass
    // sits in a few hundred keys, which a 78-key sample seldom holds, so its
    // partition tends to come out low when the walk missed some of them:
    // measured over 12 seeds, mean 0.10-0.31 and worst 0.26-0.49 (logits);
    // signed, over 8 trials, the mean error was positive every time (the
    // partitions low). The worst is one trial's partition miss shared by its
    // k keys (their 99th percentile is within 0.02 of it), so it has the
    // sample's tail: over 25 more seeds 0.22-0.57, and 0.80 for seed
    // 1184125512 (a CI run failed on the old bound of 0.7). Per trial, over
    // 25 seeds x 12 trials: mean 0.23, range 0.005-0.59; the mean of 12
    // trials 0.17-0.31. Over 28 more seeds x 24 trials: the mean of 24
    // 0.16-0.28 (sd 0.028), the median trial's worst 0.17-0.32. Bounds: the
    // mean below 0.4, and the median trial's worst key below 0.7.
    expect(sum).toBeLessThan(0.4);
    expect(median(trialWorst)).toBeLessThan(0.7);
    // Held attention, over those 28 seeds x 36 trials: the attention ranking
    // holds more than the max ranking in 97% of trials (x0.92-2.57 per
    // trial); in total over 12 trials x1.006-1.067 (sd 0.014: 3.5 sd above
    // the bar of 0.98 it had then), over 24 x1.013-1.061 (sd 0.011). Bars:
    // not below by 2% in total, and more in the median trial (a ranking
    // that picked what the max does holds exactly as much: x1).
    expect(heldAttention).toBeGreaterThan(0.98 * heldMax);
    expect(median(trialHeld)).toBeGreaterThan(1);
  });

  it('refuses a group over 64 rows, a scale that is not positive and an unknown ranking', async () => {
    const rng = new Rng(seed + 102);
    const [n, d] = [500, 8];
    const keys = keysOf(rng, 'f16', n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: groupRows(rng, 50, d) });
    const ok = args(keys.bits, n, d, 'f16', groupRows(rng, 65, d), 65, 5, 20);
    expect(() => graph.searchSync(ok)).toThrow(/group must be <= 64/);
    expect(graph.searchSync({ ...ok, aggregate: 'max' }).count).toBe(5);
    const two = args(keys.bits, n, d, 'f16', groupRows(rng, 2, d), 2, 5, 20);
    for (const scale of [0, -1, Number.NaN, Infinity]) expect(() => graph.searchSync({ ...two, scale })).toThrow(/scale must be/);
    expect(() => graph.searchSync({ ...two, aggregate: 'mean' as unknown as 'max' })).toThrow(/aggregate/);
    // An explicit scale is the softmax's: scores are the log of the mean probability at that scale.
    const s2 = { ...args(keys.bits, n, d, 'f16', two.q, 2, 5, n), scale: 0.7 };
    graph.searchSync(s2);
    const ref = reference(two.q, 2, keys.values, n, d, 0.7);
    expect(s2.outIds[0]).toBe(ref.byAttention[0]);
    expect(Math.abs(s2.outScores[0] - Math.log(ref.meanProb[s2.outIds[0]]))).toBeLessThan(1e-3);
  });
});

describe('ra-graph final scores', () => {
  it('scores only keys that can enter the result, and still returns the exact top-k; a profile changes nothing', async () => {
    const rng = new Rng(seed + 107);
    const [n, d, G, k] = [20011, 32, 4, 200];
    const scale = 1 / Math.sqrt(d);
    const keys = keysOf(rng, 'f16', n, d, 2);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: groupRows(rng, 1000, d), degree: 8, kBuild: 16 });
    const q = groupRows(rng, G, d);
    const ref = reference(q, G, keys.values, n, d, scale);
    // Every key scored: the final score is spent on a minority (the bound rules out the rest), and
    // the result is still the float64 top-k, as in the exhaustive test above.
    const full = { ...args(keys.bits, n, d, 'f16', q, G, k, n), profile: true };
    const r = graph.searchSync(full);
    expect(r.scanned).toBe(n);
    expect(r.profile).toBeDefined();
    const p = r.profile!;
    expect(p.finalScored).toBeGreaterThanOrEqual(k);
    expect(p.finalScored).toBeLessThan(n / 2);
    for (const ms of [p.sampleMs, p.walkMs, p.scoreMs, p.refineMs, p.finalMs]) expect(ms).toBeGreaterThanOrEqual(0);
    expect(p.scoreMs).toBeLessThanOrEqual(p.walkMs + 1);
    const want = ref.byAttention.slice(0, k);
    for (let i = 0; i < k; i++)
      if (full.outIds[i] !== want[i]) expect(Math.abs(ref.meanProb[full.outIds[i]] - ref.meanProb[want[i]])).toBeLessThan(1e-5 * ref.meanProb[want[i]]);
    // A bounded search, then the exhaustive one again, on the same thread (its scratch is reused):
    // each gives what it gave alone, with or without the profile.
    const bounded = () => ({ ...args(keys.bits, n, d, 'f16', q, G, k, 2 * k), margin: 0.5 });
    const b1 = bounded();
    const rb = graph.searchSync(b1);
    expect(rb.profile).toBeUndefined();
    const again = args(keys.bits, n, d, 'f16', q, G, k, n);
    graph.searchSync(again);
    expect([...again.outIds]).toEqual([...full.outIds]);
    expect([...again.outScores]).toEqual([...full.outScores]);
    const b2 = { ...bounded(), profile: true };
    const rb2 = graph.searchSync(b2);
    expect(rb2.scanned).toBe(rb.scanned);
    expect([...b2.outIds]).toEqual([...b1.outIds]);
    expect(rb2.profile!.finalScored).toBeLessThanOrEqual(rb.scanned);
    // In a batch on the native pool's threads: the same.
    const b3 = bounded(), b4 = { ...args(keys.bits, n, d, 'f16', q, G, k, n) };
    await RaGraph.searchBatch([{ ...b3, graph }, { ...b4, graph }]);
    expect([...b3.outIds]).toEqual([...b1.outIds]);
    expect([...b4.outIds]).toEqual([...full.outIds]);
  });
});

describe('ra-graph keys given', () => {
  it("reads the keys each search is given, the sample's and the entry points' rows too (copied once per keys array)", async () => {
    // Two key arrays of the graph's shape, searched exhaustively in turn: each search returns its own
    // array's exact top-k and log-probabilities, so the copies of the rows every search reads (the
    // strided sample's, the entry points') follow the array. Stale copies would put the other
    // array's logits on ~200 keys and into every partition.
    const rng = new Rng(seed + 401);
    const [n, d, G, k] = [20011, 24, 4, 200];
    const scale = 1 / Math.sqrt(d);
    const a = keysOf(rng, 'f16', n, d, 2), b = keysOf(rng, 'f16', n, d, 2);
    const graph = await RaGraph.build({ keys: a.bits, tokens: n, headDim: d, dtype: 'f16', queries: groupRows(rng, 500, d), degree: 8, kBuild: 16 });
    const q = groupRows(rng, G, d);
    for (const keys of [a, b, a, b]) {
      const ref = reference(q, G, keys.values, n, d, scale);
      const s = args(keys.bits, n, d, 'f16', q, G, k, n);
      expect(graph.searchSync(s)).toEqual({ count: k, scanned: n });
      const want = ref.byAttention.slice(0, k);
      for (let i = 0; i < k; i++) {
        const got = s.outIds[i];
        if (got !== want[i]) expect(Math.abs(ref.meanProb[got] - ref.meanProb[want[i]])).toBeLessThan(1e-5 * ref.meanProb[want[i]]);
        expect(Math.abs(s.outScores[i] - Math.log(ref.meanProb[got]))).toBeLessThan(1e-3);
      }
    }
  });
});

describe('ra-graph result order', () => {
  it('puts keys of equal score in ascending id order, for G = 4 and G = 3', async () => {
    // Each key is stored four times (ids t, t + m, t + 2m, t + 3m): equal rows, equal scores, so the
    // order among them is the ids' alone (the float64 test above allows any order within 1e-5).
    const rng = new Rng(seed + 211);
    const [m, d] = [1500, 16];
    const n = 4 * m;
    const base = keysOf(rng, 'f16', m, d, 1);
    const bits = new Uint16Array(n * d);
    for (let c = 0; c < 4; c++) bits.set(base.bits, c * m * d);
    const graph = await RaGraph.build({ keys: bits, tokens: n, headDim: d, dtype: 'f16', queries: groupRows(rng, 200, d), degree: 8, kBuild: 16 });
    for (const G of [4, 3]) {
      const q = groupRows(rng, G, d);
      const a = args(bits, n, d, 'f16', q, G, 400, n);
      expect(graph.searchSync(a).count).toBe(400);
      for (let i = 1; i < 400; i++) expect(a.outScores[i]).toBeLessThanOrEqual(a.outScores[i - 1]);
      // A base key's float64 log mean probability (each copy holds a quarter of it: the same order).
      const ref = reference(q, G, base.values, m, d, 1 / Math.sqrt(d));
      const logP = (t: number) => Math.log(ref.meanProb[t % m]);
      // Runs of equal score: ascending ids, and a run is its keys' four copies (t, t + m, t + 2m, t + 3m), the
      // last run perhaps cut at k. Two distinct keys may share a run: the top 100's log-probabilities lie ~0.04
      // apart on average and float32 resolves ~1e-6 at their ~-8, so two of them tie in about 1 run of 40
      // (seed 16: 2.3e-7 apart in float64). Those must be within f32's reach of each other (1e-5, as above).
      let shared = 0;
      for (let i = 0; i < 400; ) {
        let j = i + 1;
        while (j < 400 && a.outScores[j] === a.outScores[i]) j++;
        const run = [...a.outIds.subarray(i, j)];
        for (let r = 1; r < run.length; r++) expect(run[r]).toBeGreaterThan(run[r - 1]);
        const keysIn = [...new Set(run.map((t) => t % m))].sort((x, y) => x - y);
        const copies = [0, 1, 2, 3].flatMap((c) => keysIn.map((t) => t + c * m));
        expect(run).toEqual(j < 400 ? copies : copies.slice(0, run.length));
        for (const t of keysIn) expect(Math.abs(logP(t) - logP(keysIn[0]))).toBeLessThan(1e-5);
        if (keysIn.length > 1) shared++;
        i = j;
      }
      if (shared) console.log(`result order (G=${G}): ${shared} run(s) of distinct keys tied in float32`);
    }
  });
});

describe('ra-graph scan cap', () => {
  it('stops once maxScanned keys are scored (by at most one neighbour list over), for both rankings', async () => {
    const rng = new Rng(seed + 105);
    const [n, d, G, k] = [20011, 16, 4, 100];
    const keys = keysOf(rng, 'f16', n, d, 2);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: groupRows(rng, 1000, d), degree: 8, kBuild: 16 });
    const q = groupRows(rng, G, d);
    for (const aggregate of ['max', 'attention'] as const) {
      const free = { ...args(keys.bits, n, d, 'f16', q, G, k, n), aggregate, margin: 1e6 };
      expect(graph.searchSync(free).scanned).toBe(n);
      for (const cap of [300, 1000, 4000]) {
        const a = { ...args(keys.bits, n, d, 'f16', q, G, k, n), aggregate, margin: 1e6, maxScanned: cap };
        const r = graph.searchSync(a);
        expect(r.count).toBe(k);
        // 'attention' counts its 64-key sample once though its walk may reach sample keys again: up to 64 under.
        expect(r.scanned).toBeGreaterThanOrEqual(cap - (aggregate === 'attention' ? 64 : 0));
        expect(r.scanned).toBeLessThanOrEqual(cap + graph.maxDegree);
        const truth = new Set(free.outIds);
        const hits = [...a.outIds].filter((id) => truth.has(id)).length;
        expect(hits).toBeGreaterThan(0);
      }
      // 0 means no cap.
      expect(graph.searchSync({ ...args(keys.bits, n, d, 'f16', q, G, k, n), aggregate, margin: 1e6, maxScanned: 0 }).scanned).toBe(n);
    }
    expect(() => graph.searchSync({ ...args(keys.bits, n, d, 'f16', q, G, k, k), maxScanned: -1 })).toThrow(RangeError);
  });
});

describe('ra-graph key-key edges', () => {
  it('adds keyNeighbors edges per key, round-trips them, and keeps every key reachable', async () => {
    const rng = new Rng(seed + 103);
    const [n, d] = [2003, 16];
    const keys = keysOf(rng, 'f16', n, d, 4);
    const queries = groupRows(rng, 200, d);
    const none = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries, degree: 8, kBuild: 16, keyNeighbors: 0 });
    const some = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries, degree: 8, kBuild: 16, keyNeighbors: 6 });
    expect(none.keyNeighbors).toBe(0);
    expect(some.keyNeighbors).toBe(6);
    // Up to 6 more per key (none duplicates a projected or positional edge).
    expect(some.edges - none.edges).toBeGreaterThan(5 * n);
    expect(some.edges - none.edges).toBeLessThanOrEqual(6 * n);
    const loaded = RaGraph.load(some.save());
    expect(loaded.keyNeighbors).toBe(6);
    expect(loaded.edges).toBe(some.edges);
    const q = groupRows(rng, 3, d);
    const a = args(keys.bits, n, d, 'f16', q, 3, 7, n);
    expect(loaded.searchSync({ ...a, aggregate: 'max' }).scanned).toBe(n);
    await expect(RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', keyNeighbors: 1025 })).rejects.toThrow(/keyNeighbors/);
  });

  it('raise recall per key scanned when the build queries say nothing about the decode queries', async () => {
    const rng = new Rng(seed + 104);
    const [n, d, G, k] = [20011, 32, 2, 100];
    // Keys share a large offset in two channels (centring removes it); build
    // queries look at other channels than the decode queries do.
    const keys = keysOf(rng, 'f16', n, d, 6);
    const queries = Float32Array.from({ length: 3000 * d }, (_, i) => (i % d < d / 2 ? 2 * rng.normal() : 0));
    // 48 decode queries: over 30 seeds the smallest gain below (bar 0.03) was 0.037-0.058 with 24
    // (sd 0.0054: 3.6 sd above the bar), 0.044-0.062 with 48 (sd 0.0038). The two builds take most
    // of the test's time; the searches cost little.
    const decode = Array.from({ length: 48 }, () => Float32Array.from({ length: G * d }, (_, i) => (i % d >= d / 2 ? 1.5 * rng.normal() : 0.2 * rng.normal())));
    const build = (keyNeighbors: number) => RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries, degree: 12, kBuild: 32, keyNeighbors });
    const [plain, linked] = [await build(0), await build(8)];
    const truth = decode.map((q) => {
      const a = args(keys.bits, n, d, 'f16', q, G, k, n);
      plain.searchSync(a);
      return new Set(a.outIds);
    });
    const curve = (graph: RaGraph) =>
      [1, 2, 4, 8].map((m) => {
        let hit = 0, scanned = 0;
        decode.forEach((q, i) => {
          const a = args(keys.bits, n, d, 'f16', q, G, k, m * k);
          scanned += graph.searchSync(a).scanned;
          for (const id of a.outIds) hit += truth[i].has(id) ? 1 : 0;
        });
        return { recall: hit / (decode.length * k), scanned: scanned / decode.length / n };
      });
    const [p, l] = [curve(plain), curve(linked)];
    const fmt = (c: { recall: number; scanned: number }[]) => c.map((x) => `${x.recall.toFixed(3)}@${(100 * x.scanned).toFixed(1)}%`).join(' ');
    console.log(`key-key edges: without ${fmt(p)}; with 8 ${fmt(l)}`);
    // The plain graph's recall at the scan each linked point used, interpolated on its curve (clamped at the ends).
    const plainAt = (s: number) => {
      if (s <= p[0].scanned) return p[0].recall;
      for (let i = 1; i < p.length; i++)
        if (s <= p[i].scanned) return p[i - 1].recall + ((p[i].recall - p[i - 1].recall) * (s - p[i - 1].scanned)) / (p[i].scanned - p[i - 1].scanned);
      return p[p.length - 1].recall;
    };
    for (const x of l.slice(0, 3)) expect(x.recall).toBeGreaterThan(plainAt(x.scanned) + 0.03);
  });
});
