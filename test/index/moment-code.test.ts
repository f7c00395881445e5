// The wave index's 8-bit key moments (index/wave/moment-code.ts; decoded by
// native/common/moment_code.h the same way): on random clusters whose
// channel variances span six orders of magnitude, every decoded value is
// within the code's stated bound of the float64 input, the decode is one f32
// product, and the artifact holds the codes (version 5) or, for a version 4
// artifact (f16 moments), codes them at load as a build codes them.
import { describe, expect, it } from 'vitest';
import { widenWords } from '../../addon/kernels.js';
import { decodeClusters, encodeClusters, encodeWordMoments, upgradeClusters, type ClusterArrays } from '../../index/wave/cluster-codec.js';
import { decodeAxis, decodeMoments, decodeVar, encodeMoments } from '../../index/wave/moment-code.js';
import { bitsOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`moment-code: seed ${seed}`);
const toBits = bitsOf('f16');
const ulp = (x: number) => Math.abs(x) * 2 ** -23;

function randomMoments(rng: Rng, C: number, d: number) {
  const axes = new Float32Array(C * d), vars = new Float32Array(C * d);
  for (let c = 0; c < C; c++) {
    const size = 10 ** (4 * rng.next() - 2);
    for (let j = 0; j < d; j++) {
      axes[c * d + j] = size * rng.normal();
      // Log-uniform over 1e-6 .. 1 of the cluster's size; some exact zeros (a channel that never varies).
      vars[c * d + j] = rng.next() < 0.03 ? 0 : size * 10 ** (-6 * rng.next());
    }
  }
  return { axes, vars };
}

describe('8-bit key moments', () => {
  it('decode within half a step of the float64 input: axes |x - x̂| <= scale/2, variances |v - v̂| <= (code + 1/2)·scale', () => {
    const rng = new Rng(seed);
    const C = 500, d = 64;
    const { axes, vars } = randomMoments(rng, C, d);
    const m = encodeMoments(axes, vars, C, d);
    const dec = decodeMoments(m, d);
    let worstSmall = 0;
    for (let c = 0; c < C; c++) {
      let maxA = 0, maxV = 0;
      for (let j = 0; j < d; j++) (maxA = Math.max(maxA, Math.abs(axes[c * d + j]))), (maxV = Math.max(maxV, vars[c * d + j]));
      const sa = m.axisScales[c], sv = m.varScales[c];
      // The scales: the row's largest value at the code's largest step, in f32.
      expect(sa).toBe(Math.fround(maxA / 127));
      expect(sv).toBe(Math.fround(maxV / 255 ** 2));
      for (let j = 0; j < d; j++) {
        const i = c * d + j, a = axes[i], v = vars[i], code = m.keyVars[i];
        expect(Math.abs(m.keyAxes[i])).toBeLessThanOrEqual(127);
        // The decode is f32(code · scale): one rounding of an exact product.
        expect(dec.axes[i]).toBe(Math.fround(m.keyAxes[i] * sa));
        expect(dec.vars[i]).toBe(Math.fround(code * code * sv));
        expect(Math.abs(a - dec.axes[i]), `axis ${c},${j}`).toBeLessThanOrEqual(sa / 2 + ulp(a) + ulp(dec.axes[i]));
        expect(Math.abs(v - dec.vars[i]), `var ${c},${j}`).toBeLessThanOrEqual((code + 0.5) * sv + ulp(v) + ulp(dec.vars[i]));
        // The square-root code keeps small variances: one at 1-2% of the row's largest within 4% (a linear code: up to 20%).
        if (v >= 0.01 * maxV && v < 0.02 * maxV) worstSmall = Math.max(worstSmall, Math.abs(v - dec.vars[i]) / v);
        if (v === 0) expect(code).toBe(0);
      }
    }
    console.log(`variances at 1-2% of the row's largest: worst relative error ${worstSmall.toFixed(4)}`);
    expect(worstSmall).toBeLessThan(0.0401);
  });

  it('codes an all-zero row as zeros with scale 0, and refuses non-finite moments', () => {
    const d = 8;
    const m = encodeMoments(new Float32Array(d), new Float32Array(d), 1, d);
    expect([...m.keyAxes, ...m.keyVars, m.axisScales[0], m.varScales[0]].every((x) => x === 0)).toBe(true);
    expect(decodeAxis(0, 0)).toBe(0);
    expect(decodeVar(0, 0)).toBe(0);
    // A typed refusal (422 at the seal), not an internal error.
    for (const [axis, v] of [[NaN, 0], [0, Infinity]])
      expect(() => encodeMoments(Float32Array.of(axis, 0, 0, 0, 0, 0, 0, 0), Float32Array.of(v, 0, 0, 0, 0, 0, 0, 0), 1, d)).toThrow(
        expect.objectContaining({ kind: 'invalid', message: expect.stringMatching(/not finite in float32/) }),
      );
  });

  it('travel in the artifact (version 5); a version 4 artifact (f16 moments) is read with its moments coded at load', () => {
    const rng = new Rng(seed + 1);
    const C = 40, d = 16, N = 300, stride = d + 8;
    const { axes, vars } = randomMoments(rng, C, d);
    const a: ClusterArrays = {
      tokens: N, headDim: d, clusterSize: 8, dtype: 'f16',
      centroids: Uint16Array.from({ length: C * stride }, () => toBits(rng.normal())),
      valueMeans: Uint16Array.from({ length: C * d }, () => toBits(rng.normal())),
      ...encodeMoments(axes, vars, C, d),
      counts: Int32Array.from({ length: C }, (_, c) => (c < N % C ? 1 : 0) + Math.floor(N / C)),
      varianceShare: 0.25,
      tokenCluster: Int32Array.from({ length: N }, (_, t) => t % C),
    };
    const back = decodeClusters(encodeClusters(a));
    for (const k of ['centroids', 'valueMeans', 'keyAxes', 'axisScales', 'keyVars', 'varScales', 'counts', 'tokenCluster'] as const)
      expect(Array.from(back[k]), k).toEqual(Array.from(a[k]));
    expect(back.varianceShare).toBe(0.25);
    // The same clusters as an older build stored them: axes and variances as f16 words.
    const axisWords = Uint16Array.from(axes, toBits), varWords = Uint16Array.from(vars, toBits);
    const old = decodeClusters(encodeWordMoments(a, varWords, axisWords));
    const want = encodeMoments(widenWords(axisWords, 'f16'), widenWords(varWords, 'f16'), C, d);
    for (const k of ['keyAxes', 'axisScales', 'keyVars', 'varScales'] as const) expect(Array.from(old[k]), k).toEqual(Array.from(want[k]));
    for (const k of ['centroids', 'valueMeans', 'counts', 'tokenCluster'] as const) expect(Array.from(old[k]), k).toEqual(Array.from(a[k]));
    expect(old.varianceShare).toBe(0.25);
    // Its upgrade (what the store keeps in its place) is version 5 of those arrays; a version 5 artifact needs none.
    const up = upgradeClusters(encodeWordMoments(a, varWords, axisWords))!;
    expect(new DataView(up.buffer).getUint32(4, true)).toBe(5);
    const upArrays = decodeClusters(up);
    for (const k of ['centroids', 'valueMeans', 'keyAxes', 'axisScales', 'keyVars', 'varScales', 'counts', 'tokenCluster'] as const) expect(Array.from(upArrays[k]), k).toEqual(Array.from(old[k]));
    expect(upgradeClusters(encodeClusters(a))).toBeUndefined();
    // A version 4 f16 variance past 65504 was stored as infinity: that artifact is stale (rebuilt from the keys), not a failed attach.
    const inf = Uint16Array.from(varWords);
    inf[3] = 0x7c00;
    expect(() => decodeClusters(encodeWordMoments(a, inf, axisWords))).toThrow(/version 4 is stale/);
    // Another version is still refused.
    const stale = encodeClusters(a);
    new DataView(stale.buffer).setUint32(4, 3, true);
    expect(() => decodeClusters(stale)).toThrow(/version 3/);
  });
});
