// The wave build made faster (selection instead of sorts, the float64 sums
// and the moments' codes in the addon, only the calibrated segments'
// variances decoded) builds the same bytes as the build before it
// (bench/wave-build-before.ts, commit 077953a): whole artifacts on generator
// heads; the calibration's per-share errors bit for bit, with ties at the
// top-token cut and rows without a finite maximum; the outlier flags with
// ties and NaN scores; and the k-th largest against a sort.
import { describe, expect, it } from 'vitest';
import { bitsOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { buildClustersBefore, calibrationErrorsBefore, decodeMomentsBefore, outlierKeysBefore } from '../../bench/wave-build-before.js';
import type { BuildInput } from '../../index/method.js';
import { buildClusters, outlierKeys } from '../../index/wave/cluster-build.js';
import { centroidStride } from '../../index/wave/cluster-codec.js';
import { encodeMoments } from '../../index/wave/moment-code.js';
import { kthLargest } from '../../index/wave/select-kth.js';
import { calibrationErrors, type BuiltClusters } from '../../index/wave/variance-share.js';
import { defaultKnobs, broadKnobs, generateWorkload } from '../../workload/index.js';

const seed = freshSeed();
console.log(`wave-build-same: seed ${seed}`);

const sameBytes = (a: Uint8Array, b: Uint8Array) => {
  expect(a.byteLength).toBe(b.byteLength);
  let first = -1;
  for (let i = 0; i < a.byteLength && first < 0; i++) if (a[i] !== b[i]) first = i;
  expect(first).toBe(-1);
};

/** A head of keys drawn from a few topics, some rows repeated exactly (ties in every score), with `rows` queries. */
function tiedHead(rng: Rng, N: number, d: number, rows: number, dtype: 'f16' | 'bf16'): BuildInput {
  const toBits = bitsOf(dtype), topics = Array.from({ length: 16 }, () => Float32Array.from({ length: d }, () => 2 * rng.normal()));
  const keys = new Uint16Array(N * d), values = new Uint16Array(N * d);
  for (let t = 0; t < N; t++) {
    const src = t > 0 && rng.next() < 0.2 ? t - 1 - rng.int(Math.min(t, 50)) : -1;
    const topic = topics[rng.int(topics.length)];
    for (let j = 0; j < d; j++) {
      keys[t * d + j] = src >= 0 ? keys[src * d + j] : toBits(topic[j] + 0.5 * rng.normal());
      values[t * d + j] = toBits(rng.normal());
    }
  }
  const queries = Float32Array.from({ length: rows * d }, () => rng.normal());
  return { keys, values, tokens: N, headDim: d, dtype, queries, queryCount: rows };
}

/** Clusters of consecutive tokens (sizes 1-24) in segments of `seg` tokens, random summaries and moments: what the calibration reads. */
function someClusters(rng: Rng, input: BuildInput, seg: number): { after: BuiltClusters; before: Parameters<typeof calibrationErrorsBefore>[1] } {
  const N = input.tokens, d = input.headDim, stride = centroidStride(d);
  const tokenCluster = new Int32Array(N), segments: [number, number, number, number][] = [], counts: number[] = [];
  for (let t0 = 0; t0 < N; t0 += seg) {
    const t1 = Math.min(N, t0 + seg), c0 = counts.length;
    for (let t = t0; t < t1; ) {
      const size = Math.min(t1 - t, 1 + rng.int(24));
      for (let i = 0; i < size; i++) tokenCluster[t + i] = counts.length;
      counts.push(size);
      t += size;
    }
    segments.push([t0, t1, c0, counts.length]);
  }
  const C = counts.length;
  const centroids = Float32Array.from({ length: C * stride }, () => rng.normal());
  const valueMeans = Float32Array.from({ length: C * d }, () => rng.normal());
  const axes = Float32Array.from({ length: C * d }, () => rng.normal());
  const vars = Float32Array.from({ length: C * d }, () => (rng.next() < 0.05 ? 0 : rng.next() ** 3));
  const moments = encodeMoments(axes, vars, C, d);
  const common = { headDim: d, stride, centroids, valueMeans, counts: Int32Array.from(counts), tokenCluster, segments };
  return { after: { ...common, moments }, before: { ...common, keyVars: decodeMomentsBefore(moments, d).vars } };
}

describe('wave build made faster: the same bytes as before', () => {
  it('builds byte-identical artifacts on generator heads (f16 and bf16, both configurations, with and without prefill queries)', async () => {
    for (const [N, knobs, dtype, H] of [[40000, defaultKnobs, 'f16', 2], [20000, broadKnobs, 'bf16', 1]] as const) {
      const w = generateWorkload({ seed, tokens: N, kvHeads: H, qHeads: 4 * H, headDim: 64, steps: 1, needles: 2, dtype, knobs: knobs(N) });
      for (let h = 0; h < H; h++) {
        for (const queryCount of [w.prefillQ[h].length / 64, 3, 0]) {
          const input: BuildInput = { keys: w.keys[h], values: w.values[h], tokens: N, headDim: 64, dtype: w.dtype, queries: w.prefillQ[h], queryCount };
          const o = { clusterSize: 16, segmentTokens: 8192, iterations: 4, seed: 1 + h };
          sameBytes(await buildClusters(input, o), await buildClustersBefore(input, o));
        }
      }
    }
  }, 120_000);

  it('builds byte-identical artifacts on heads with repeated keys (ties), odd shapes, a short tail segment', async () => {
    const rng = new Rng(seed + 1);
    for (const [N, d, rows, dtype] of [[9000, 32, 40, 'f16'], [5000, 12, 2, 'bf16'], [300, 64, 16, 'f16']] as const) {
      const input = tiedHead(rng, N, d, rows, dtype);
      const o = { clusterSize: 8, segmentTokens: 2048, iterations: 3, seed: 5 };
      sameBytes(await buildClusters(input, o), await buildClustersBefore(input, o));
    }
  }, 60_000);

  it("calibrates with the same per-share errors, bit for bit (ties at the top-token cut; 1, 3, 16 rows)", () => {
    const rng = new Rng(seed + 2);
    for (const [N, d, rows, seg] of [[6000, 32, 40, 1000], [3000, 64, 3, 512], [700, 16, 1, 700], [5000, 8, 16, 777]] as const) {
      const input = tiedHead(rng, N, d, rows, 'f16');
      const c = someClusters(rng, input, seg);
      const a = calibrationErrors(input, c.after), b = calibrationErrorsBefore(input, c.before);
      expect(Array.from(a, (x) => Number.isFinite(x))).toEqual(Array(a.length).fill(true));
      expect(Array.from(a)).toEqual(Array.from(b));
    }
  });

  it('a query row with no finite maximum (NaN, or an infinite logit) spoils every share in both', () => {
    const rng = new Rng(seed + 3);
    for (const bad of [NaN, Infinity]) {
      const input = tiedHead(rng, 2000, 16, 16, 'f16');
      input.queries[5 * 16 + 3] = bad;
      const c = someClusters(rng, input, 500);
      const a = calibrationErrors(input, c.after), b = calibrationErrorsBefore(input, c.before);
      expect(Array.from(a, Number.isNaN)).toEqual(Array(a.length).fill(true));
      expect(Array.from(b, Number.isNaN)).toEqual(Array(b.length).fill(true));
    }
  });

  it('flags the same outlier keys: ties at the cut, and keys whose scores are NaN or infinite', async () => {
    const rng = new Rng(seed + 4);
    for (const [poison, copies] of [[0, 0], [0, 100], [5, 100], [40, 0], [300, 0]]) {
      const input = tiedHead(rng, 12000, 16, 0, 'f16');
      // One loud key copied more times than the cut keeps (12000/256 = 46): the cut falls among equal scores.
      const loud = Uint16Array.from({ length: 16 }, () => bitsOf('f16')(12 * rng.normal()));
      for (let i = 0; i < copies; i++) input.keys.set(loud, rng.int(12000) * 16);
      // f16 infinities and NaNs in a few keys: their scores are not finite.
      for (let i = 0; i < poison; i++) input.keys[rng.int(12000) * 16 + rng.int(16)] = rng.next() < 0.5 ? 0x7c00 : 0x7e00;
      const a = await outlierKeys(input), b = await outlierKeysBefore(input);
      expect(a.reduce((s, f) => s + f, 0)).toBe(b.reduce((s, f) => s + f, 0));
      expect(Array.from(a)).toEqual(Array.from(b));
    }
  });

  it('finds the k-th largest as a sort does, with duplicates, signed zeros and infinities', () => {
    const rng = new Rng(seed + 5);
    for (let trial = 0; trial < 300; trial++) {
      const n = 1 + rng.int(trial < 250 ? 60 : 5000), pool = [-0, 0, 1, -1, Infinity, -Infinity, 2.5];
      const a = Float64Array.from({ length: n }, () => (rng.next() < 0.5 ? pool[rng.int(pool.length)] : rng.int(8) + rng.next()));
      const k = 1 + rng.int(n), sorted = a.slice().sort();
      const got = kthLargest(a.slice(), n, k), want = sorted[n - k];
      expect(got === want).toBe(true);
      const f = Float32Array.from(a);
      expect(kthLargest(f.slice(), n, k) === f.slice().sort()[n - k]).toBe(true);
    }
    expect(() => kthLargest(new Float64Array(3), 3, 0)).toThrow(RangeError);
    expect(() => kthLargest(new Float64Array(3), 3, 4)).toThrow(RangeError);
  });
});
