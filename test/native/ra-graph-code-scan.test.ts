// The retrieval-attention graph's code scan (native/indexes/ra_graph_code_scan.h,
// RaSearchOptions::codeScan) against a float64 reference of its rule: every key t gets
// ρ(t) = max_h (x̃_h(t) − c0_h), x̃ the int8 form of the key's 4-bit code (reproduced here from the codes, the
// channels' ranges and q, as ra-graph-code-walk.test.ts states it), c0_h the row's log-partition estimated from
// the strided sample and the free keys; entry points and seeds rank first (+∞), free keys never (−∞); the keys
// scored exactly are the best M = maxScanned − m by ρ (ties towards the lower id), m the sample's size. With k =
// tokens the result is every key scored (the candidates and the sample, free keys left out), so the candidates are
// read off it, the same when the pass is split into pool tasks. Also: maxScanned ≥ tokens is the exhaustive top-k; a fact far along a quiet channel, which its
// clamped code ranks low, is found (an outlier entry point); bad options are refused.
import { describe, expect, it } from 'vitest';
import { RaGraph, type RaGraphSearchArgs } from '../../addon/ra-graph.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { channelKeys } from '../helpers/channel-keys.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { groupMeanProb } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`native ra-graph code scan tests: seed ${seed}`);
const f = Math.fround;

const keysOf = channelKeys;

const queries = (rng: Rng, rows: number, d: number) => Float32Array.from({ length: rows * d }, () => 0.8 * rng.normal());

/** The graph's entry points, read from its blob (ra_graph_codec.cc: ... entry points (int32), then an 8-byte checksum). */
function entriesOf(graph: RaGraph): Int32Array {
  const blob = graph.save(), P = graph.entryPoints;
  return new Int32Array(blob.slice(blob.length - 8 - 4 * P, blob.length - 8).buffer);
}

/** The strided sample as ra_graph_attention.cc takes it: keys off + j·stride, j < m. */
function sampleOf(n: number) {
  const want = Math.min(n, 4096, Math.max(64, Math.floor(n / 512)));
  const stride = Math.max(1, Math.floor(n / want)), off = Math.floor(stride / 2);
  return { stride, off, m: Math.ceil((n - off) / stride) };
}

/** Every key's int8-form logits [n, G] in float64 (ra_key_codes.h, RaCodeQuery), from the codes the graph made. */
function int8Logits(graph: RaGraph, keys: Uint16Array, dt: Dt, n: number, d: number, q: Float32Array, G: number): Float64Array {
  const { codes, low, step } = graph.keyCodes({ keys, tokens: n, headDim: d, dtype: dt });
  const half = Math.ceil(d / 2), scale = f(1 / f(Math.sqrt(d)));
  const level = (t: number, j: number) => (j < half ? codes[t * half + j] & 15 : codes[t * half + j - half] >> 4);
  const roundEven = (v: number) => (Math.abs(v - Math.trunc(v)) === 0.5 ? 2 * Math.round(v / 2) : Math.round(v));
  const x = new Float64Array(n * G);
  for (let g = 0; g < G; g++) {
    const w = Array.from({ length: d }, (_, j) => f(f(scale * q[g * d + j]) * step[j]));
    const s = f(Math.max(...w.map(Math.abs)) / 127);
    const r = w.map((v) => (s > 0 ? Math.max(-127, Math.min(127, roundEven(f(v / s)))) : 0));
    let bias = 0;
    for (let j = 0; j < d; j++) bias += q[g * d + j] * (low[j] + 0.5 * step[j]);
    bias *= scale;
    for (let j = 0; j < d; j++) bias += (w[j] - s * r[j]) * 7.5;
    for (let t = 0; t < n; t++) {
      let dot = 0;
      for (let j = 0; j < d; j++) dot += r[j] * level(t, j);
      x[t * G + g] = bias + s * dot;
    }
  }
  return x;
}

/** c0_h in float64: log(Σ_free e^x + (n − F) / S · Σ_{sample, not free} e^x), x the exact scaled logits. */
function c0Of(values: Float64Array, n: number, d: number, q: Float32Array, G: number, free: Set<number>) {
  const { stride, off, m } = sampleOf(n), scale = 1 / Math.sqrt(d);
  const logit = (t: number, g: number) => {
    let s = 0;
    for (let j = 0; j < d; j++) s += q[g * d + j] * values[t * d + j];
    return scale * s;
  };
  const sample = Array.from({ length: m }, (_, j) => off + j * stride).filter((t) => !free.has(t));
  return Array.from({ length: G }, (_, g) => {
    const terms = [...[...free].map((t) => logit(t, g)), ...sample.map((t) => logit(t, g) + Math.log((n - free.size) / sample.length))];
    const top = Math.max(...terms);
    return top + Math.log(terms.reduce((a, v) => a + Math.exp(v - top), 0));
  });
}

function scanArgs(keys: Uint16Array, n: number, d: number, dt: Dt, q: Float32Array, G: number, maxScanned: number): RaGraphSearchArgs {
  return { keys, tokens: n, headDim: d, dtype: dt, q, group: G, k: n, ef: 0, outIds: new Int32Array(n), outScores: new Float32Array(n), aggregate: 'attention', codeScan: true, maxScanned };
}

describe('ra-graph code scan', () => {
  // The rule in float64. ρ here and the addon's (the same integers, then f32: x̃ within ~1e-6 of its terms' size,
  // the bias and c0 rounded to f32 from sums of size ~10, ~1e-5 at most here) differ by far less than TOL: a key whose ρ is within TOL of the
  // boundary's but not equal to it may fall either side. Equal ρ is an exact tie of the integers (the codes are
  // discrete: at d = 8 many keys share a code row), broken towards the lower id by both.
  const TOL = 1e-4;
  // d = 64 takes the AVX2 path (two keys a step at G <= 4, an odd key last; G = 3 pads a head), the others the scalar
  // one. planted: the strided sample's keys lifted along channel 2 and the queries aimed at it, so that the sample's ρ
  // overstates every other key's: the threshold the scan takes from it collects too few keys, and the pass is redone.
  for (const [dt, n, d, G, planted] of [['f16', 3000, 8, 4, false], ['bf16', 5000, 24, 3, false], ['f16', 4001, 64, 4, false], ['bf16', 3001, 64, 3, false], ['bf16', 2500, 64, 8, false], ['f16', 4000, 16, 2, true]] as const)
    it(`scores exactly the best maxScanned − m keys by the int8 form's ρ, entry points and seeds first, free keys never (${dt}, n=${n}, d=${d}, G=${G}${planted ? ', the sample planted' : ''})`, async () => {
      const rng = new Rng(seed + 13 * d + G);
      const keys = keysOf(rng, dt, n, d);
      const { stride, off, m } = sampleOf(n);
      if (planted)
        for (let j = 0; j < m; j++) {
          const i = (off + j * stride) * d + 2;
          keys.bits[i] = bitsOf(dt)(keys.values[i] + 8);
          keys.values[i] = valueOf(dt)(keys.bits[i]);
        }
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: queries(rng, 200, d), degree: 8, kBuild: 16 });
      const entries = entriesOf(graph);
      expect(entries.length).toBeGreaterThan(n / 256);
      const inSample = (t: number) => t >= off && (t - off) % stride === 0;
      let ambiguous = 0, decided = 0;
      for (let trial = 0; trial < 3; trial++) {
        const q = queries(rng, G, d);
        if (planted) for (let g = 0; g < G; g++) q[g * d + 2] = 3;
        // Free keys: sinks and a window, one entry point and one seed among them (free wins over +∞).
        const seeds = Int32Array.from({ length: 6 }, () => rng.int(n));
        const freeList = [0, 1, 2, 3, ...Array.from({ length: 16 }, (_, i) => n - 16 + i), entries[trial], seeds[0]];
        const free = new Set(freeList), freeSeeds = Int32Array.from(freeList);
        const c0 = c0Of(keys.values, n, d, q, G, free);
        const x = int8Logits(graph, keys.bits, dt, n, d, q, G);
        const rho = Float64Array.from({ length: n }, (_, t) => Math.max(...c0.map((c, g) => x[t * G + g] - c)));
        // The sample's best min(16, m/64) by its walk rank seed the search too (+∞): at these sizes m/64 is 1.
        expect(Math.floor(m / 64)).toBe(1);
        const rank = (t: number) => {
          const sc = 1 / Math.sqrt(d);
          return Math.log(c0.reduce((a, c, g) => {
            let s = 0;
            for (let j = 0; j < d; j++) s += q[g * d + j] * keys.values[t * d + j];
            return a + Math.exp(sc * s - c);
          }, 0));
        };
        const bySample = Array.from({ length: m }, (_, j) => off + j * stride).sort((a, b) => rank(b) - rank(a) || a - b);
        const inf = new Set([...entries, ...seeds, bySample[0]].filter((t) => !free.has(t)));
        for (const share of [0.05, 0.15]) {
          const cap = m + Math.ceil(share * n), M = cap - m;
          const others = [...Array(n).keys()].filter((t) => !free.has(t) && !inf.has(t)).sort((a, b) => rho[b] - rho[a] || a - b);
          const need = M - inf.size;
          expect(need).toBeGreaterThan(0);
          const edge = rho[others[need - 1]];
          if (planted) {
            // The first pass's threshold (the sample's ρ at its expected rank + 4 sd) passes fewer than need keys.
            const specials = free.size + inf.size, p = need / (n - specials), r = Math.ceil(p * m + 4 * Math.sqrt(p * m) + 4);
            const sampleRho = Array.from({ length: m }, (_, j) => rho[off + j * stride]).sort((a, b) => b - a);
            expect(r).toBeLessThan(m);
            expect(others.filter((t) => rho[t] >= sampleRho[r] + TOL).length).toBeLessThan(need);
          }
          const near = others.filter((t) => rho[t] !== edge && Math.abs(rho[t] - edge) <= TOL);
          ambiguous += near.length;
          decided += need;
          // With a near key, the boundary's own tie group may gain or lose a slot: then all of it is uncertain too.
          const top = others.slice(0, need), tied = others.filter((t) => rho[t] === edge);
          const sure = new Set([...inf, ...top.filter((t) => rho[t] > edge + TOL || (near.length === 0 && rho[t] === edge))]);
          const maybe = new Set([...near, ...(near.length > 0 ? tied : [])]);
          const a = { ...scanArgs(keys.bits, n, d, dt, q, G, cap), seeds, freeSeeds };
          const r = graph.searchSync(a);
          const out = Array.from(a.outIds.subarray(0, r.count));
          expect(new Set(out).size).toBe(out.length);
          expect(out.some((t) => free.has(t))).toBe(false);
          // Every sample key not free is in the result, scored (its logits reused) or not.
          const sampleKeys = Array.from({ length: m }, (_, j) => off + j * stride).filter((t) => !free.has(t));
          const outSet = new Set(out);
          expect(sampleKeys.every((t) => outSet.has(t))).toBe(true);
          const scannedOutside = out.filter((t) => !inSample(t));
          for (const t of sure) if (!inSample(t)) expect(outSet.has(t)).toBe(true);
          for (const t of scannedOutside) expect(sure.has(t) || maybe.has(t)).toBe(true);
          // The candidates number M: those outside the sample are read off the result, the rest are sample keys.
          const sampleCands = M - scannedOutside.length;
          expect(sampleCands).toBeGreaterThanOrEqual([...sure].filter(inSample).length);
          expect(sampleCands).toBeLessThanOrEqual([...sure, ...maybe].filter(inSample).length);
          // scanned: the sample and the candidates, a sample key scored once.
          expect(r.scanned).toBe(m + scannedOutside.length);
          expect(r.codesRead).toBe(n);
          // The pass split into pool tasks (scanChunk; 300 keys a task, the last one short): the same search.
          const split = { ...a, outIds: new Int32Array(n), outScores: new Float32Array(n), scanChunk: 300 };
          const rs = graph.searchSync(split);
          expect([rs.count, rs.scanned, rs.codesRead]).toEqual([r.count, r.scanned, r.codesRead]);
          expect(split.outIds).toEqual(a.outIds);
          expect(split.outScores).toEqual(a.outScores);
        }
        // A cap the +∞ keys fill alone: the lowest ids of them, and no code scored.
        const fa = { ...scanArgs(keys.bits, n, d, dt, q, G, m + 3), seeds, freeSeeds };
        const few = graph.searchSync(fa);
        const lowest = [...inf].sort((a, b) => a - b).slice(0, 3).filter((t) => !inSample(t));
        expect(few.codesRead).toBe(0);
        expect(few.scanned).toBe(m + lowest.length);
        expect(Array.from(fa.outIds.subarray(0, few.count)).filter((t) => !inSample(t)).sort((a, b) => a - b)).toEqual(lowest);
      }
      // Near-ties at the boundary are few (0-5 over the 6 searches, of ~1,300-2,900 keys chosen by ρ): the test
      // checks the rule, not the tolerance.
      expect(ambiguous).toBeLessThan(0.005 * decided);
      graph.dispose();
    });

  for (const [dt, n, d, G] of [['f16', 3001, 32, 4], ['bf16', 1500, 16, 2]] as const)
    it(`with maxScanned − m >= tokens returns the exact top-k of the group's mean probability (${dt}, n=${n}, G=${G})`, async () => {
      const rng = new Rng(seed + n);
      const keys = keysOf(rng, dt, n, d);
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: queries(rng, 200, d), degree: 8, kBuild: 16 });
      const k = 40;
      for (let trial = 0; trial < 2; trial++) {
        const q = queries(rng, G, d);
        const { meanProb } = groupMeanProb(q, G, keys.values, n, d, 1 / Math.sqrt(d));
        const order = Array.from({ length: n }, (_, t) => t).sort((a, b) => meanProb[b] - meanProb[a] || a - b);
        // M = maxScanned − m >= tokens: every key a candidate (at maxScanned = tokens, the m keys of lowest ρ would
        // be left out, unless they were the sample's).
        const a = { ...scanArgs(keys.bits, n, d, dt, q, G, n + sampleOf(n).m + trial), k, outIds: new Int32Array(k), outScores: new Float32Array(k) };
        const r = graph.searchSync(a);
        expect(r.count).toBe(k);
        expect(r.scanned).toBe(n);
        for (let i = 0; i < k; i++) {
          const got = a.outIds[i], want = order[i];
          if (got !== want) expect(Math.abs(meanProb[got] - meanProb[want])).toBeLessThan(1e-5 * meanProb[want]);
          expect(Math.abs(a.outScores[i] - Math.log(meanProb[got]))).toBeLessThan(1e-3);
        }
      }
      graph.dispose();
    });

  it('finds facts far along quiet channels, which their clamped codes rank low (outlier entry points)', async () => {
    const rng = new Rng(seed + 90);
    const [n, d, G, facts] = [12007, 32, 2, 8];
    // Keys: N(0, 1) in half the channels, quiet (std 0.05) in the rest; a few fact keys carry content in the quiet ones.
    const dirs = Array.from({ length: facts }, () => {
      const v = Float64Array.from({ length: d }, (_, j) => (j >= d / 2 ? rng.normal() : 0));
      const norm = Math.hypot(...v);
      return v.map((x) => (3 * x) / norm);
    });
    const at = Array.from({ length: facts }, (_, i) => Math.floor(((i + 0.5) * n) / facts) + rng.int(100));
    const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
    for (let t = 0; t < n; t++) {
      const fi = at.indexOf(t);
      for (let j = 0; j < d; j++) bits[t * d + j] = bitsOf('f16')((j < d / 2 ? rng.normal() : 0.05 * rng.normal()) + (fi >= 0 ? dirs[fi][j] : 0));
    }
    bits.forEach((b, i) => (values[i] = valueOf('f16')(b)));
    const buildQ = Float32Array.from({ length: 2000 * d }, (_, i) => (i % d < d / 2 ? rng.normal() : 0));
    const graph = await RaGraph.build({ keys: bits, tokens: n, headDim: d, dtype: 'f16', queries: buildQ, degree: 8, kBuild: 16, positional: 1 });
    const { m } = sampleOf(n);
    const cap = m + Math.ceil(0.02 * n);
    let lowByCode = 0;
    for (let fi = 0; fi < facts; fi++) {
      const q = new Float32Array(G * d);
      // Loud-channel noise as large as the clamped fact's part of its code's score: many keys' codes outrank it.
      for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) q[g * d + j] = (j < d / 2 ? rng.normal() : 0) + 4 * dirs[fi][j];
      const a = { ...scanArgs(bits, n, d, 'f16', q, G, cap), k: 1, outIds: new Int32Array(1), outScores: new Float32Array(1) };
      graph.searchSync(a);
      expect(a.outIds[0]).toBe(at[fi]);
      // How its code ranks it: the fact's channels clamp at the quiet channels' 3σ.
      const x = graph.codeLogits({ keys: bits, tokens: n, headDim: d, dtype: 'f16', q, group: G, ids: Int32Array.from({ length: n }, (_, t) => t), quantized: true });
      const c0 = c0Of(values, n, d, q, G, new Set());
      const rho = Float64Array.from({ length: n }, (_, t) => Math.max(x[t * G] - c0[0], x[t * G + 1] - c0[1]));
      if (rho.filter((v) => v > rho[at[fi]]).length > cap - m) lowByCode++;
    }
    console.log(`code scan: ${facts}/${facts} facts found; ${lowByCode} of them outside the cap by their codes' ρ`);
    // The entry points, not the codes, found those: the rule is exercised.
    expect(lowByCode).toBeGreaterThan(0);
    graph.dispose();
  });

  it('refuses bad options', async () => {
    const rng = new Rng(seed + 29);
    const [n, d] = [300, 16];
    const keys = keysOf(rng, 'f16', n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: queries(rng, 50, d), degree: 8, kBuild: 16 });
    const base = { ...scanArgs(keys.bits, n, d, 'f16', queries(rng, 2, d), 2, 30), k: 10, outIds: new Int32Array(10), outScores: new Float32Array(10) };
    expect(() => graph.searchSync({ ...base, aggregate: 'max' })).toThrow(/codeScan needs aggregate 'attention'/);
    expect(() => graph.searchSync({ ...base, codeWalk: true })).toThrow(/codeScan and codeWalk are two searches/);
    for (const maxScanned of [0, undefined]) expect(() => graph.searchSync({ ...base, maxScanned })).toThrow(/codeScan needs maxScanned > 0/);
    expect(() => graph.searchSync({ ...base, codeDelta: 1 })).toThrow(/codeDelta is an option of the code walk/);
    expect(() => graph.searchSync({ ...base, codeScan: false, scanChunk: 1000 })).toThrow(/scanChunk is an option of the code scan/);
    for (const scanChunk of [-1, 1.5]) expect(() => graph.searchSync({ ...base, scanChunk })).toThrow(/scanChunk/);
    expect(graph.searchSync(base).count).toBe(10);
    expect(graph.searchSync({ ...base, codeScan: false }).codesRead).toBeUndefined();
    graph.dispose();
  });
});

// scanKeep (native/indexes/ra_pq_codes.h): the PQ codes against float64 (each key's nearest centroid a subspace,
// the outliers those with a channel past 5σ, the integer form within M·Δ/2 of the tables' logits), and the two-pass
// rule: the best max(need, keep) keys by the PQ form's ρ plus the outliers, then the best need of those by the int8
// form's ρ. At G = 1, ρ is the logit less one constant, so each pass's order is the order of the forms' own floats
// (codeLogits: pq, quantized), which the tests above and below hold to float64; near-ties (floats that differ by
// less than the subtraction's rounding) are counted, not judged.
describe('ra-graph code scan, PQ first pass (scanKeep)', () => {
  const pqArgs = (bits: Uint16Array, n: number, d: number, dt: Dt) => ({ keys: bits, tokens: n, headDim: d, dtype: dt });
  /** Channels' mean and σ over the keys, in float64. */
  const moments = (values: Float64Array, n: number, d: number) => {
    const mu = new Float64Array(d), sd = new Float64Array(d);
    for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) mu[j] += values[t * d + j] / n;
    for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) sd[j] += (values[t * d + j] - mu[j]) ** 2 / n;
    return { mu, sd: sd.map(Math.sqrt) };
  };
  /** Keys with a few planted far along one channel (12σ), as storage words and exact values. */
  function plantedKeys(rng: Rng, dt: Dt, n: number, d: number, planted: number[]) {
    const keys = keysOf(rng, dt, n, d);
    const { mu, sd } = moments(keys.values, n, d);
    for (const t of planted) {
      const j = 2 + (t % (d - 2));
      keys.bits[t * d + j] = bitsOf(dt)(mu[j] + 12 * Math.max(sd[j], 0.1));
      keys.values[t * d + j] = valueOf(dt)(keys.bits[t * d + j]);
    }
    return keys;
  }

  for (const [dt, n, d] of [['f16', 3000, 64], ['bf16', 2001, 10]] as const)
    it(`PQ codes: each key's nearest centroid a subspace, the outliers those with a channel past 5σ (${dt}, n=${n}, d=${d})`, async () => {
      const rng = new Rng(seed + 7 * d);
      const keys = plantedKeys(rng, dt, n, d, [5, 77, 1000, n - 3]);
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: queries(rng, 100, d), degree: 8, kBuild: 16 });
      const { codes, centroids, outliers } = graph.pqCodes(pqArgs(keys.bits, n, d, dt));
      const M = Math.ceil(d / 4), rb = Math.ceil(M / 2);
      expect(codes.length).toBe(n * rb);
      expect(centroids.length).toBe(M * 16 * 4);
      for (let s = 0; s < M; s++) for (let c = 0; c < 16; c++) for (let j = 0; j < 4; j++) if (4 * s + j >= d) expect(centroids[(s * 16 + c) * 4 + j]).toBe(0);
      const code = (t: number, s: number) => (s & 1 ? codes[t * rb + (s >> 1)] >> 4 : codes[t * rb + (s >> 1)] & 15);
      const dist = (t: number, s: number, c: number) => {
        let e = 0;
        for (let j = 0; j < 4 && 4 * s + j < d; j++) e += (keys.values[t * d + 4 * s + j] - centroids[(s * 16 + c) * 4 + j]) ** 2;
        return e;
      };
      let err = 0, spread = 0;
      const { mu, sd } = moments(keys.values, n, d);
      for (let t = 0; t < n; t++) {
        if (M % 2 === 1) expect(codes[t * rb + rb - 1] >> 4).toBe(0);
        for (let s = 0; s < M; s++) {
          const best = Math.min(...Array.from({ length: 16 }, (_, c) => dist(t, s, c)));
          expect(dist(t, s, code(t, s))).toBeLessThanOrEqual(best + 1e-5 * (1 + best));
          err += dist(t, s, code(t, s));
        }
        for (let j = 0; j < d; j++) spread += (keys.values[t * d + j] - mu[j]) ** 2;
      }
      // Trained: 16 centroids in 4 channels leave ~0.3 of the keys' spread (k-means; random keys as centroids ~2x that).
      expect(err / spread).toBeLessThan(0.45);
      // The outliers, away from the 5σ boundary (|z − 5| > 1e-6: float32 sums there).
      const z = (t: number) => Math.max(...Array.from({ length: d }, (_, j) => (sd[j] > 0 ? Math.abs(keys.values[t * d + j] - mu[j]) / sd[j] : 0)));
      const got = new Set(outliers);
      expect(Array.from(outliers)).toEqual([...outliers].sort((a, b) => a - b));
      for (const t of [5, 77, 1000, n - 3]) expect(got.has(t)).toBe(true);
      for (let t = 0; t < n; t++) if (Math.abs(z(t) - 5) > 1e-6) expect(got.has(t)).toBe(z(t) > 5);
      graph.dispose();
    });

  for (const [dt, n, d, G] of [['f16', 2000, 64, 3], ['bf16', 1500, 10, 6]] as const)
    it(`PQ integer form: within M·Δ/2 of the tables' logits in float64 (${dt}, d=${d}, G=${G})`, async () => {
      const rng = new Rng(seed + 11 * d + G);
      const keys = keysOf(rng, dt, n, d);
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: queries(rng, 100, d), degree: 8, kBuild: 16 });
      const { codes, centroids } = graph.pqCodes(pqArgs(keys.bits, n, d, dt));
      const M = Math.ceil(d / 4), rb = Math.ceil(M / 2), L = Math.min(255, Math.floor(65535 / M)), scale = 1 / Math.sqrt(d);
      const ids = Int32Array.from({ length: n }, (_, t) => t);
      let worst = 0, rms = 0;
      for (let trial = 0; trial < 2; trial++) {
        const q = queries(rng, G, d);
        const x = graph.codeLogits({ ...pqArgs(keys.bits, n, d, dt), q, group: G, ids, pq: true });
        for (let h = 0; h < G; h++) {
          const T = Array.from({ length: M }, (_, s) => Array.from({ length: 16 }, (_, c) => {
            let v = 0;
            for (let j = 0; j < 4 && 4 * s + j < d; j++) v += q[h * d + 4 * s + j] * centroids[(s * 16 + c) * 4 + j];
            return scale * v;
          }));
          const delta = Math.max(...T.map((row) => Math.max(...row) - Math.min(...row))) / L;
          for (let t = 0; t < n; t++) {
            let ref = 0;
            for (let s = 0; s < M; s++) ref += T[s][s & 1 ? codes[t * rb + (s >> 1)] >> 4 : codes[t * rb + (s >> 1)] & 15];
            const e = Math.abs(x[t * G + h] - ref);
            expect(e).toBeLessThanOrEqual((M * delta) / 2 + 1e-5 * (1 + Math.abs(ref)));
            worst = Math.max(worst, e / ((M * delta) / 2));
            rms += e * e;
          }
        }
      }
      console.log(`PQ integer form (d=${d}, G=${G}): worst error ${worst.toFixed(3)} of the bound, rms ${Math.sqrt(rms / (2 * G * n)).toExponential(2)}`);
      graph.dispose();
    });

  for (const [dt, n, d] of [['f16', 4001, 64], ['bf16', 3000, 24]] as const)
    it(`two passes: the best need by the int8 form among the best max(need, keep) by the PQ form and the outliers (${dt}, n=${n}, d=${d}, G=1)`, async () => {
      const rng = new Rng(seed + 5 * d);
      // More outliers than the graph's outlier entry points (n / 256): some are kept by the outlier rule alone.
      const keys = plantedKeys(rng, dt, n, d, Array.from({ length: 40 }, (_, i) => 50 + Math.floor((i * (n - 100)) / 40)));
      const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: queries(rng, 200, d), degree: 8, kBuild: 16 });
      const entries = entriesOf(graph);
      const { outliers } = graph.pqCodes(pqArgs(keys.bits, n, d, dt));
      expect(outliers.length).toBeGreaterThanOrEqual(40);
      let byOutliers = 0;
      const { stride, off, m } = sampleOf(n);
      expect(Math.floor(m / 64)).toBe(1);
      const inSample = (t: number) => t >= off && (t - off) % stride === 0;
      const ids = Int32Array.from({ length: n }, (_, t) => t);
      const TOL = 1e-5;
      let judged = 0, skipped = 0;
      for (let trial = 0; trial < 3; trial++) {
        const q = queries(rng, 1, d);
        const seeds = Int32Array.from({ length: 6 }, () => rng.int(n));
        const freeList = [0, 1, 2, 3, ...Array.from({ length: 16 }, (_, i) => n - 16 + i), entries[trial], seeds[0]];
        const free = new Set(freeList), freeSeeds = Int32Array.from(freeList);
        const x1 = graph.codeLogits({ ...pqArgs(keys.bits, n, d, dt), q, group: 1, ids, pq: true });
        const x2 = graph.codeLogits({ ...pqArgs(keys.bits, n, d, dt), q, group: 1, ids, quantized: true });
        // The sample's best by its exact logit seeds the search (+∞), as the one-pass test's rank does at G = 1.
        const exact = (t: number) => q.reduce((a, v, j) => a + v * keys.values[t * d + j], 0);
        const bySample = Array.from({ length: m }, (_, j) => off + j * stride).sort((a, b) => exact(b) - exact(a) || a - b);
        const inf = new Set([...entries, ...seeds, bySample[0]].filter((t) => !free.has(t)));
        const others = [...Array(n).keys()].filter((t) => !free.has(t) && !inf.has(t));
        // The best `count` by x (ties towards the lower id), and whether a near-tie makes the boundary uncertain.
        const best = (list: number[], x: Float32Array, count: number) => {
          const sorted = [...list].sort((a, b) => x[b] - x[a] || a - b), edge = x[sorted[count - 1]];
          return { top: sorted.slice(0, count), unsure: list.some((t) => x[t] !== edge && Math.abs(x[t] - edge) <= TOL * (1 + Math.abs(edge))) };
        };
        for (const [share, keep] of [[0.03, 0.1], [0.05, 0.02], [0.03, 1]] as const) {
          const cap = m + Math.ceil(share * n), need = cap - m - inf.size;
          const first = best(others, x1, Math.min(others.length, Math.max(need, Math.ceil(keep * n))));
          const kept = [...new Set([...first.top, ...Array.from(outliers).filter((t) => !free.has(t) && !inf.has(t))])];
          byOutliers += kept.length - first.top.length;
          const second = best(kept, x2, need);
          const a = { ...scanArgs(keys.bits, n, d, dt, q, 1, cap), seeds, freeSeeds, scanKeep: keep };
          const r = graph.searchSync(a);
          expect(r.codesRead).toBe(n);
          const outside = Array.from(a.outIds.subarray(0, r.count)).filter((t) => !inSample(t)).sort((u, v) => u - v);
          expect(r.scanned).toBe(m + outside.length);
          if (first.unsure || second.unsure) {
            skipped++;
            continue;
          }
          judged++;
          expect(r.codesKept).toBe(kept.length);
          expect(outside).toEqual([...new Set([...inf, ...second.top])].filter((t) => !inSample(t)).sort((u, v) => u - v));
          // Split into pool tasks: the same search.
          const split = { ...a, outIds: new Int32Array(n), outScores: new Float32Array(n), scanChunk: 500 };
          const rs = graph.searchSync(split);
          expect([rs.scanned, rs.codesKept]).toEqual([r.scanned, r.codesKept]);
          expect(split.outIds).toEqual(a.outIds);
          if (keep === 1) {
            // Every key kept: the one-pass scan's search.
            const one = { ...scanArgs(keys.bits, n, d, dt, q, 1, cap), seeds, freeSeeds };
            const r1 = graph.searchSync(one);
            expect(r1.scanned).toBe(r.scanned);
            expect(one.outIds).toEqual(a.outIds);
            expect(one.outScores).toEqual(a.outScores);
          }
        }
      }
      expect(skipped).toBeLessThanOrEqual(1);
      expect(judged).toBeGreaterThan(0);
      expect(byOutliers).toBeGreaterThan(0);
      graph.dispose();
    });

  it('keeps a fact its PQ code loses: far along a few channels, an outlier', async () => {
    const rng = new Rng(seed + 91);
    const [n, d, G, facts] = [12007, 32, 2, 6];
    const at = Array.from({ length: facts }, (_, i) => Math.floor(((i + 0.5) * n) / facts) + rng.int(100));
    // N(0, 1) keys; fact fi adds ±9 (9σ) to the 4 channels of subspace 1 + fi / 2. Its PQ code is the centroid of
    // ordinary keys that stands out most along that direction (~1σ a channel), which ~1/16 of the keys share: the first
    // pass, keeping the best ~60 by PQ, ranks it among them by chance and loses most facts. Its 4-bit code clamps at
    // 3σ, still far above every ordinary key's (the queries' other channels are weak), so once kept it is found. No
    // outlier entry point finds a fact: the build queries look at channels 16..31 only, and keys that stand out more
    // (20 in the 4 channels of subspace 0, which no query looks at) take the graph's outlier entry points (n / 256 by
    // Σ z²). A fact that is one of the other entry points (the keys most often a build query's nearest, by chance
    // here) is found whatever the scan does, so it is not judged.
    const sub = (fi: number) => 1 + (fi >> 1), sign = (fi: number) => (fi & 1 ? -1 : 1);
    const loud = new Set(Array.from({ length: Math.ceil(n / 256) + 12 }, () => rng.int(n)).filter((t) => !at.includes(t)));
    const bits = new Uint16Array(n * d);
    for (let t = 0; t < n; t++) {
      const fi = at.indexOf(t);
      for (let j = 0; j < d; j++)
        bits[t * d + j] = bitsOf('f16')(rng.normal() + (fi >= 0 && j >> 2 === sub(fi) ? 9 * sign(fi) : 0) + (loud.has(t) && j < 4 ? 20 : 0));
    }
    const buildQ = Float32Array.from({ length: 2000 * d }, (_, i) => (i % d >= 16 ? rng.normal() : 0));
    const graph = await RaGraph.build({ keys: bits, tokens: n, headDim: d, dtype: 'f16', queries: buildQ, degree: 8, kBuild: 16, positional: 1 });
    const entries = new Set(entriesOf(graph));
    const { outliers } = graph.pqCodes(pqArgs(bits, n, d, 'f16'));
    const { m } = sampleOf(n);
    // The entry points score +∞ and take the first of the cap's places; `rest` are left to the scan.
    const keep = 0.005, rest = Math.ceil(0.005 * n), cap = m + entries.size + rest;
    const firstPass = Math.max(rest, Math.ceil(keep * n));
    let judged = 0, lostByPq = 0;
    for (let fi = 0; fi < facts; fi++) {
      expect(Array.from(outliers)).toContain(at[fi]);
      if (entries.has(at[fi])) continue;
      judged++;
      const q = new Float32Array(G * d);
      for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) q[g * d + j] = j >= 16 ? 0.5 * rng.normal() : j >> 2 === sub(fi) ? 1.5 * sign(fi) : 0;
      const a = { ...scanArgs(bits, n, d, 'f16', q, G, cap), k: 1, outIds: new Int32Array(1), outScores: new Float32Array(1), scanKeep: keep };
      const r = graph.searchSync(a);
      expect(a.outIds[0]).toBe(at[fi]);
      expect(r.codesKept).toBeLessThanOrEqual(firstPass + outliers.length);
      // Its PQ form's rank (max over the rows of x̃: the rows' c0 differ little here) well beyond what the first pass keeps.
      const x = graph.codeLogits({ ...pqArgs(bits, n, d, 'f16'), q, group: G, ids: Int32Array.from({ length: n }, (_, t) => t), pq: true });
      const rho = Float64Array.from({ length: n }, (_, t) => Math.max(x[t * G], x[t * G + 1]));
      if (rho.filter((v) => v > rho[at[fi]]).length > 1.5 * firstPass) lostByPq++;
    }
    console.log(`scanKeep: ${judged}/${facts} facts judged (the rest entry points), all found; by their PQ codes alone ${lostByPq} ranked beyond 1.5x what the first pass keeps`);
    expect(judged).toBeGreaterThanOrEqual(facts - 2);
    expect(lostByPq).toBeGreaterThan(0);
    graph.dispose();
  });

  it('refuses bad options', async () => {
    const rng = new Rng(seed + 31);
    const [n, d] = [300, 16];
    const keys = keysOf(rng, 'f16', n, d);
    const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', queries: queries(rng, 50, d), degree: 8, kBuild: 16 });
    const base = { ...scanArgs(keys.bits, n, d, 'f16', queries(rng, 2, d), 2, 200), k: 10, outIds: new Int32Array(10), outScores: new Float32Array(10) };
    expect(() => graph.searchSync({ ...base, codeScan: false, scanKeep: 0.1 })).toThrow(/scanKeep is an option of the code scan/);
    for (const scanKeep of [0, -0.1, 1.5, NaN]) expect(() => graph.searchSync({ ...base, scanKeep })).toThrow(/scanKeep must be a number in \(0, 1\]/);
    expect(() => graph.codeLogits({ ...pqArgs(keys.bits, n, d, 'f16'), q: queries(rng, 1, d), group: 1, ids: Int32Array.from([0]), pq: true, quantized: true })).toThrow(/pq and quantized/);
    const r = graph.searchSync({ ...base, scanKeep: 0.5 });
    expect(r.count).toBe(10);
    expect(r.codesKept).toBeGreaterThan(0);
    expect(graph.searchSync(base).codesKept).toBeUndefined();
    graph.dispose();
  });
});
