// Cluster summaries (native/kernels/cluster_summary.h, addon/cluster-summary.ts):
// per cluster of a segment, the mean key and radius, mean value, per-channel
// key variance and the principal axis scaled by the standard deviation along
// it, checked against float64 computed here from the same words (tolerance
// 1e-5 relative for means, variances and radii; 1e-4 for the axis, whose
// four power iterations from the farthest member run in float32):
//  - random clusters of uneven sizes, f16 and bf16, odd head dims;
//  - a cluster of one member: its key, radius 0, variance 0, no axis;
//  - a cluster whose members lie on a line: the axis is that line, its
//    length the members' standard deviation along it;
//  - a row's cluster outside [0, clusters) is refused, nothing run.
import { describe, expect, it } from 'vitest';
import { clusterSummary } from '../../addon/cluster-summary.js';
import type { KvDtype } from '../../addon/kernels.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`cluster-summary: seed ${seed}`);

interface Case {
  keys: number[][];
  values: number[][];
  cluster: number[];
  clusters: number;
}

/** Float64: mean key, radius, mean value, variance per channel, and the scaled axis by the same power iteration. */
function reference(c: Case, k: number, iterations: number) {
  const rows = c.cluster.flatMap((x, i) => (x === k ? [i] : []));
  const d = c.keys[0].length, m = rows.length;
  const mean = (xs: number[][]) => Array.from({ length: d }, (_, j) => rows.reduce((s, i) => s + xs[i][j], 0) / m);
  const mu = mean(c.keys), vmu = mean(c.values);
  const off = rows.map((i) => c.keys[i].map((x, j) => x - mu[j]));
  const sq = off.map((o) => o.reduce((s, x) => s + x * x, 0));
  const variance = Array.from({ length: d }, (_, j) => off.reduce((s, o) => s + o[j] * o[j], 0) / m);
  const axis = new Array<number>(d).fill(0);
  const far = sq.indexOf(Math.max(...sq));
  if (m >= 2 && sq[far] > 0) {
    let u = off[far].slice(), sd = 0;
    for (let it = 0; it <= iterations; it++) {
      const norm = Math.sqrt(u.reduce((s, x) => s + x * x, 0));
      u = u.map((x) => x / norm);
      const next = new Array<number>(d).fill(0);
      let v = 0;
      for (const o of off) {
        const p = o.reduce((s, x, j) => s + x * u[j], 0);
        v += (p * p) / m;
        o.forEach((x, j) => (next[j] += p * x));
      }
      sd = Math.sqrt(v);
      if (it < iterations) u = next;
    }
    u.forEach((x, j) => (axis[j] = sd * x));
  }
  return { mu, radius: Math.sqrt(Math.max(...sq)), vmu, variance, axis };
}

async function run(c: Case, dtype: KvDtype, iterations = 4) {
  const d = c.keys[0].length, n = c.keys.length, C = c.clusters, stride = d + 8;
  const out = { centroids: new Float32Array(C * stride), valueMeans: new Float32Array(C * d), keyVars: new Float32Array(C * d), keyAxes: new Float32Array(C * d) };
  await clusterSummary({
    keys: Uint16Array.from(c.keys.flat(), bitsOf(dtype)), values: Uint16Array.from(c.values.flat(), bitsOf(dtype)), dtype, tokens: n, headDim: d, stride,
    cluster: Int32Array.from(c.cluster), clusters: C, axisIterations: iterations, ...out,
  });
  return { ...out, stride };
}

/** The case's numbers rounded to the dtype, as the native side reads them. */
function rounded(c: Case, dtype: KvDtype): Case {
  const r = (xs: number[][]) => xs.map((row) => row.map((x) => valueOf(dtype)(bitsOf(dtype)(x))));
  return { ...c, keys: r(c.keys), values: r(c.values) };
}

const rel = (a: ArrayLike<number>, b: number[]) => {
  const diff = Math.sqrt(b.reduce((s, x, j) => s + (a[j] - x) ** 2, 0)), norm = Math.sqrt(b.reduce((s, x) => s + x * x, 0));
  return diff / Math.max(norm, 1e-30);
};

describe('cluster summaries', () => {
  for (const [dtype, d] of [['f16', 24], ['bf16', 40]] as [KvDtype, number][])
    it(`${dtype} d=${d}: random clusters of uneven sizes match float64`, async () => {
      const rng = new Rng(seed + d);
      const n = 700, C = 37;
      // Uneven: cluster 0 takes a fifth of the rows, 36 gets exactly one.
      const cluster = Array.from({ length: n }, () => (rng.next() < 0.2 ? 0 : 1 + rng.int(C - 2)));
      cluster[rng.int(n)] = C - 1;
      const c = rounded({ keys: Array.from({ length: n }, () => Array.from({ length: d }, () => rng.normal() * 2)), values: Array.from({ length: n }, () => Array.from({ length: d }, () => rng.normal())), cluster, clusters: C }, dtype);
      const got = await run(c, dtype);
      for (let k = 0; k < C; k++) {
        if (!cluster.includes(k)) continue;
        const ref = reference(c, k, 4);
        const at = `cluster ${k}: `;
        expect(rel(got.centroids.subarray(k * got.stride, k * got.stride + d), ref.mu), at + 'mean key').toBeLessThan(1e-5);
        expect(Math.abs(got.centroids[k * got.stride + d] - ref.radius), at + 'radius').toBeLessThanOrEqual(1e-5 * Math.max(1, ref.radius));
        expect(rel(got.valueMeans.subarray(k * d, (k + 1) * d), ref.vmu), at + 'mean value').toBeLessThan(1e-5);
        expect(rel(got.keyVars.subarray(k * d, (k + 1) * d), ref.variance), at + 'variance').toBeLessThan(1e-5);
        if (ref.axis.some((x) => x !== 0)) expect(rel(got.keyAxes.subarray(k * d, (k + 1) * d), ref.axis), at + 'axis').toBeLessThan(1e-4);
      }
      // The lone member: its own key, no spread.
      const lone = cluster.indexOf(C - 1);
      expect(Array.from(got.centroids.subarray((C - 1) * got.stride, (C - 1) * got.stride + d + 1))).toEqual([...c.keys[lone].map((x) => Math.fround(x)), 0]);
      expect(Array.from(got.keyVars.subarray((C - 1) * d, C * d)).every((x) => x === 0)).toBe(true);
      expect(Array.from(got.keyAxes.subarray((C - 1) * d, C * d)).every((x) => x === 0)).toBe(true);
    });

  it('members on a line: the axis is the line, as long as their standard deviation along it', async () => {
    const d = 16, dir = Array.from({ length: d }, (_, j) => (j % 3) - 1), norm = Math.sqrt(dir.reduce((s, x) => s + x * x, 0));
    const ts = [-3, -1, 0, 1, 3];  // mean 0, variance 4: sd 2
    const keys = ts.map((t) => dir.map((x) => 5 + (t * x) / norm));
    const got = await run({ keys, values: keys, cluster: ts.map(() => 0), clusters: 1 }, 'f16');
    const sd = 2, axis = Array.from(got.keyAxes);
    const sign = Math.sign(axis.reduce((s, x, j) => s + x * dir[j], 0));
    expect(rel(axis.map((x) => x * sign), dir.map((x) => (sd * x) / norm))).toBeLessThan(2e-3);  // f16 keys
  });

  it('refuses a row whose cluster is outside [0, clusters)', async () => {
    const c: Case = { keys: [[1, 2], [3, 4]], values: [[0, 0], [0, 0]], cluster: [0, 2], clusters: 2 };
    await expect(run(c, 'f16')).rejects.toThrow(/outside/);
  });
});
