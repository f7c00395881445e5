// The generator's hard knobs (workload/index.ts (i), (j)): off, the output is
// pinned byte for byte (sha256 of everything a workload holds, for both
// configurations, taken before the knobs existed); on, prefill queries leave
// the unasked spans' facts alone and decode queries move by the stated shift.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { bytesOf, convert } from '../../addon/kernels.js';
import { broadKnobs, generateWorkload, HARD_KNOBS, type Workload, type WorkloadSpec } from '../../workload/index.js';
import { askedSpans, spanOf } from '../../workload/layout.js';

function digest(w: Workload): string {
  const h = createHash('sha256');
  const add = (a: ArrayBufferView) => h.update(bytesOf(a));
  for (const list of [w.keys, w.values, w.prefillQ, w.prefillPos, w.prefillHead, w.decodeQ, w.decodeSpan]) list.forEach(add);
  [w.spanStart, w.spanTopic, w.salient].forEach(add);
  h.update(JSON.stringify(w.needles));
  return h.digest('hex');
}

const f32 = (w: Workload, h: number) => {
  const out = new Float32Array(w.keys[h].length);
  convert(bytesOf(w.keys[h]), w.dtype, bytesOf(out), 'f32', out.length);
  return out;
};
const dot = (a: Float32Array, ai: number, b: Float32Array, bi: number, d: number) => {
  let s = 0;
  for (let c = 0; c < d; c++) s += a[ai + c] * b[bi + c];
  return s;
};

describe('generator: hard knobs', () => {
  it('off, both configurations are byte for byte what they were before the knobs', () => {
    const base: WorkloadSpec = { seed: 7, tokens: 3000, kvHeads: 2, qHeads: 4, headDim: 64, steps: 5, needles: 2 };
    const broad: WorkloadSpec = { seed: 11, tokens: 5000, kvHeads: 2, qHeads: 8, headDim: 128, steps: 4, needles: 3, knobs: broadKnobs(5000) };
    expect(digest(generateWorkload(base))).toBe('820cc3525bafe580c1c257573cd32d9dff54df533fd9899c99f3d5a569cbcbb8');
    expect(digest(generateWorkload(broad))).toBe('068dcd827023d694068136189a4e7e333638466940d34bad3950f539e55a9cf2');
    // Explicit zeros are the same as absent.
    expect(digest(generateWorkload({ ...base, knobs: { unasked: 0, decodeShift: 0 } }))).toBe('820cc3525bafe580c1c257573cd32d9dff54df533fd9899c99f3d5a569cbcbb8');
  });

  it('unasked: no prefill query singles out the salient tokens of an unasked span', () => {
    const spec: WorkloadSpec = { seed: 5, tokens: 16384, kvHeads: 1, qHeads: 2, headDim: 64, steps: 1, needles: 0, knobs: { unasked: 0.5 } };
    const w = generateWorkload(spec), d = spec.headDim, keys = f32(w, 0), q = w.prefillQ[0], rows = q.length / d;
    const asked = new Set(askedSpans(spec.seed, w.spanStart.length, 0.5));
    expect(asked.size).toBeGreaterThan(0.3 * w.spanStart.length);
    expect(asked.size).toBeLessThan(0.7 * w.spanStart.length);
    // Each salient token's best prefill logit: a targeted one scores hitterBoost (ln n − 2 ≈ 7.7) above the bulk.
    const best = { asked: [] as number[], unasked: [] as number[] };
    for (const t of w.salient) {
      let m = -Infinity;
      for (let r = 0; r < rows; r++) if (w.prefillPos[0][r] >= t) m = Math.max(m, dot(q, r * d, keys, t * d, d) / Math.sqrt(d));
      if (m > -Infinity) (asked.has(spanOf(w.spanStart, t)) ? best.asked : best.unasked).push(m);
    }
    const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    expect(best.unasked.length).toBeGreaterThan(10);
    expect(mean(best.asked) - mean(best.unasked)).toBeGreaterThan(3);
    // Without the knob the same tokens are asked about like any other.
    const w0 = generateWorkload({ ...spec, knobs: {} }), q0 = w0.prefillQ[0];
    const again: number[] = [];
    for (const t of w.salient) {
      if (asked.has(spanOf(w.spanStart, t))) continue;
      let m = -Infinity;
      for (let r = 0; r < rows; r++) if (w0.prefillPos[0][r] >= t) m = Math.max(m, dot(q0, r * d, keys, t * d, d) / Math.sqrt(d));
      if (m > -Infinity) again.push(m);
    }
    expect(mean(again) - mean(best.unasked)).toBeGreaterThan(3);
  });

  it('decodeShift: decode queries move by a shift of the stated logit std; prefill queries and keys do not', () => {
    const spec: WorkloadSpec = { seed: 9, tokens: 8192, kvHeads: 1, qHeads: 2, headDim: 64, steps: 3, needles: 0 };
    const off = generateWorkload(spec), on = generateWorkload({ ...spec, knobs: { decodeShift: HARD_KNOBS.decodeShift } });
    expect(Buffer.compare(bytesOf(on.keys[0]), bytesOf(off.keys[0]))).toBe(0);
    expect(Buffer.compare(bytesOf(on.prefillQ[0]), bytesOf(off.prefillQ[0]))).toBe(0);
    const d = spec.headDim, keys = f32(off, 0);
    for (let g = 0; g < spec.qHeads; g++) {
      const delta = new Float32Array(d);
      for (let c = 0; c < d; c++) delta[c] = on.decodeQ[0][g * d + c] - off.decodeQ[0][g * d + c];
      // The shift's logits over the keys of single spans (one topic each: only the keys' noise varies there).
      const within: number[] = [];
      for (let s = 0; s + 1 < off.spanStart.length; s++) {
        const xs: number[] = [];
        for (let t = off.spanStart[s]; t < off.spanStart[s + 1]; t++) xs.push(dot(delta, 0, keys, t * d, d) / Math.sqrt(d));
        if (xs.length < 64) continue;
        const m = xs.reduce((a, b) => a + b, 0) / xs.length;
        within.push(Math.sqrt(xs.reduce((a, b) => a + (b - m) ** 2, 0) / (xs.length - 1)));
      }
      const std = within.reduce((a, b) => a + b, 0) / within.length;
      expect(std).toBeGreaterThan(0.5 * HARD_KNOBS.decodeShift);
      expect(std).toBeLessThan(1.5 * HARD_KNOBS.decodeShift);
    }
  });

  it('rejects knob values out of range', () => {
    const spec: WorkloadSpec = { seed: 1, tokens: 64, kvHeads: 1, qHeads: 1, headDim: 16, steps: 0, needles: 0 };
    expect(() => generateWorkload({ ...spec, knobs: { unasked: 1.5 } })).toThrow(/unasked/);
    expect(() => generateWorkload({ ...spec, knobs: { decodeShift: -1 } })).toThrow(/decodeShift/);
  });
});
