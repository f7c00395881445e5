// The synthetic workload generator (workload/): deterministic for a
// seed, the right shapes, each property measurable on a small instance; and
// the quality metrics (bench/quality.ts) against float64 brute force.
import { describe, expect, it } from 'vitest';
import {
  attentionRecall,
  compareWithOracle,
  distinctIds,
  exactAttention,
  meanProbs,
  nativeSelectedOutput,
  oracleSelection,
  outputError,
  rankOf,
  selectedOutput,
  topKIndices,
  topKRecall,
  widen,
  type ExactAttention,
} from '../../bench/quality.js';
import { generateWorkload, type Workload, type WorkloadSpec } from '../../workload/index.js';
import { bytesOf, convert } from '../../addon/kernels.js';
import { f16Bits, f16Value } from '../helpers/half.js';

const tiny: WorkloadSpec = { seed: 7, tokens: 3000, kvHeads: 2, qHeads: 4, headDim: 64, steps: 5, needles: 2 };

const sameBytes = (a: ArrayBufferView, b: ArrayBufferView) => Buffer.compare(Buffer.from(bytesOf(a)), Buffer.from(bytesOf(b))) === 0;

describe('generateWorkload: determinism and shapes', () => {
  it('gives identical bytes for a seed and different bytes for another', () => {
    const a = generateWorkload(tiny), b = generateWorkload(tiny), c = generateWorkload({ ...tiny, seed: 8 });
    for (let h = 0; h < tiny.kvHeads; h++) {
      expect(sameBytes(a.keys[h], b.keys[h])).toBe(true);
      expect(sameBytes(a.values[h], b.values[h])).toBe(true);
      expect(sameBytes(a.prefillQ[h], b.prefillQ[h])).toBe(true);
      expect(sameBytes(a.keys[h], c.keys[h])).toBe(false);
      expect(sameBytes(a.values[h], c.values[h])).toBe(false);
    }
    for (let s = 0; s < tiny.steps; s++) expect(sameBytes(a.decodeQ[s], b.decodeQ[s])).toBe(true);
    expect(sameBytes(a.decodeQ[0], c.decodeQ[0])).toBe(false);
    expect(b.needles).toEqual(a.needles);
    expect(sameBytes(a.spanStart, b.spanStart)).toBe(true);
  });

  it('has the documented shapes', () => {
    const w = generateWorkload({ ...tiny, dtype: 'bf16' });
    const { tokens, kvHeads, qHeads, headDim: d, steps } = tiny;
    const G = qHeads / kvHeads, rows = Math.floor(tokens / 16);
    expect(w.dtype).toBe('bf16');
    expect(w.scale).toBeCloseTo(1 / Math.sqrt(d), 12);
    expect(w.keys).toHaveLength(kvHeads);
    expect(w.values).toHaveLength(kvHeads);
    for (let h = 0; h < kvHeads; h++) {
      expect(w.keys[h]).toBeInstanceOf(Uint16Array);
      expect(w.keys[h].length).toBe(tokens * d);
      expect(w.values[h].length).toBe(tokens * d);
      expect(w.prefillQ[h]).toBeInstanceOf(Float32Array);
      expect(w.prefillQ[h].length).toBe(rows * d);
      expect(w.prefillPos[h].length).toBe(rows);
      for (let r = 0; r < rows; r++) {
        expect(w.prefillPos[h][r]).toBeGreaterThanOrEqual(r > 0 ? w.prefillPos[h][r - 1] : 0);
        expect(w.prefillPos[h][r]).toBeLessThan(tokens);
        expect(Math.floor(w.prefillHead[h][r] / G)).toBe(h);
      }
      expect(w.decodeSpan[h].length).toBe(steps);
      for (const s of w.decodeSpan[h]) expect(s).toBeLessThan(w.spanStart.length);
      // Every value finite in storage.
      const f = widen(w.keys[h], 'bf16');
      expect(f.every(Number.isFinite)).toBe(true);
    }
    expect(w.decodeQ).toHaveLength(steps);
    for (const q of w.decodeQ) expect(q.length).toBe(qHeads * d);
    expect(w.needles).toHaveLength(tiny.needles);
    for (const n of w.needles) {
      expect(n.position).toBeGreaterThanOrEqual(w.knobs.sinks);
      expect(n.position).toBeLessThan(tokens);
      expect(n.step).toBeLessThan(steps);
      expect(Math.floor(n.qHead / G)).toBe(n.head);
    }
    expect(w.spanStart[0]).toBe(w.knobs.sinks);
    for (let i = 1; i < w.spanStart.length; i++) expect(w.spanStart[i]).toBeGreaterThan(w.spanStart[i - 1]);
    expect(generateWorkload({ ...tiny, prefillQueries: 10 }).prefillQ[0].length).toBe(10 * d);
  });

  it('rejects malformed specs', () => {
    expect(() => generateWorkload({ ...tiny, qHeads: 3 })).toThrow(RangeError);
    expect(() => generateWorkload({ ...tiny, headDim: 63 })).toThrow(RangeError);
    expect(() => generateWorkload({ ...tiny, steps: 0 })).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------- properties

describe('generateWorkload: properties on 8K tokens', () => {
  const spec: WorkloadSpec = { seed: 11, tokens: 8192, kvHeads: 2, qHeads: 8, headDim: 128, steps: 24, needles: 4 };
  const w: Workload = generateWorkload(spec);
  const { tokens, headDim: d, qHeads, kvHeads, steps } = spec;
  const G = qHeads / kvHeads;
  // Exact attention for every (kv head, step), all its group's heads.
  const exact: ExactAttention[][] = Array.from({ length: kvHeads }, (_, h) =>
    Array.from({ length: steps }, (_, s) =>
      exactAttention(w.decodeQ[s].subarray(h * G * d, (h + 1) * G * d), G, w.keys[h], w.values[h], { headDim: d, outputs: false }),
    ),
  );
  const each = (f: (p: Float64Array, h: number, s: number, g: number) => number) => {
    let sum = 0, n = 0;
    for (let h = 0; h < kvHeads; h++)
      for (let s = 0; s < steps; s++)
        for (let g = 0; g < G; g++) {
          sum += f(exact[h][s].probs[g], h, s, g);
          n++;
        }
    return sum / n;
  };
  const massIn = (p: Float64Array, a: number, b: number) => {
    let m = 0;
    for (let t = a; t < b; t++) m += p[t];
    return m;
  };
  const K0 = widen(w.keys[0], w.dtype);
  const colStats = () => {
    const mu = new Float64Array(d), m2 = new Float64Array(d), abs = new Float64Array(d), pos = new Float64Array(d);
    for (let t = 0; t < tokens; t++)
      for (let j = 0; j < d; j++) {
        const x = K0[t * d + j];
        mu[j] += x;
        m2[j] += x * x;
        abs[j] += Math.abs(x);
        if (x > 0) pos[j]++;
      }
    const sd = new Float64Array(d);
    for (let j = 0; j < d; j++) {
      mu[j] /= tokens;
      abs[j] /= tokens;
      sd[j] = Math.sqrt(m2[j] / tokens - mu[j] * mu[j]);
    }
    return { mu, sd, abs, pos };
  };
  const cols = colStats();

  it('(a) sinks take a large share of the mass', () => {
    const sink = each((p) => massIn(p, 0, w.knobs.sinks));
    expect(sink).toBeGreaterThan(0.2);
    expect(sink).toBeLessThan(0.95);
  });

  it('(b) a few slow-frequency key channels are large and of fixed sign', () => {
    const half = d / 2, out = [half - 2, half - 1, d - 2, d - 1];
    const med = [...cols.abs].sort((a, b) => a - b)[d / 2];
    for (const j of out) {
      expect(cols.abs[j] / med).toBeGreaterThan(4);
      expect(Math.max(cols.pos[j], tokens - cols.pos[j]) / tokens).toBeGreaterThan(0.99);
    }
  });

  it('(c) RoPE: centred keys of neighbouring positions are more alike than distant ones', () => {
    const ccos = (a: number, b: number) => {
      let ab = 0, aa = 0, bb = 0;
      for (let j = 0; j < d; j++) {
        const x = K0[a * d + j] - cols.mu[j], y = K0[b * d + j] - cols.mu[j];
        ab += x * y;
        aa += x * x;
        bb += y * y;
      }
      return ab / Math.sqrt(aa * bb);
    };
    let near = 0, far = 0, n = 0;
    for (let t = 100; t + 4000 < tokens; t += 37, n++) {
      near += ccos(t, t + 1);
      far += ccos(t, t + 4000);
    }
    expect(near / n - far / n).toBeGreaterThan(0.1);
  });

  it('(d) decode queries lie far outside the key distribution', () => {
    let zq = 0, zk = 0, n = 0;
    for (let s = 0; s < steps; s++)
      for (let g = 0; g < G; g++, n++) {
        const q = w.decodeQ[s].subarray(g * d, (g + 1) * d), t = (s * 997 + g * 131) % tokens;
        for (let j = 0; j < d; j++) {
          zq += ((q[j] - cols.mu[j]) / cols.sd[j]) ** 2 / d;
          zk += ((K0[t * d + j] - cols.mu[j]) / cols.sd[j]) ** 2 / d;
        }
      }
    expect(zk / n).toBeLessThan(2);
    expect(zq / n).toBeGreaterThan(4);
  });

  it('(e) keys cluster by span, and queries favour their target span', () => {
    // Share of the centred key variance explained by span membership, vs shuffled spans.
    const spanOfT = new Int32Array(tokens).fill(-1);
    for (let i = 0; i < w.spanStart.length; i++) spanOfT.fill(i, w.spanStart[i], i + 1 < w.spanStart.length ? w.spanStart[i + 1] : tokens);
    const r2 = (label: Int32Array) => {
      const n = w.spanStart.length, sum = new Float64Array(n * d), cnt = new Float64Array(n);
      let total = 0;
      for (let t = w.knobs.sinks; t < tokens; t++) {
        cnt[label[t]]++;
        for (let j = 0; j < d; j++) {
          const x = K0[t * d + j] - cols.mu[j];
          sum[label[t] * d + j] += x;
          total += x * x;
        }
      }
      let between = 0;
      for (let i = 0; i < n; i++) if (cnt[i] > 0) for (let j = 0; j < d; j++) between += sum[i * d + j] ** 2 / cnt[i];
      return between / total;
    };
    const shuffled = spanOfT.slice();
    for (let i = tokens - 1; i > w.knobs.sinks; i--) {
      const j = w.knobs.sinks + ((i * 7919) % (i - w.knobs.sinks + 1));
      [shuffled[i], shuffled[j]] = [shuffled[j], shuffled[i]];
    }
    expect(r2(spanOfT)).toBeGreaterThan(0.15);
    expect(r2(shuffled)).toBeLessThan(0.05);
    // The target span's share of the non-sink mass over its share of the non-sink tokens.
    const ratio = each((p, h, s) => {
      const sp = w.decodeSpan[h][s], a = w.spanStart[sp], b = sp + 1 < w.spanStart.length ? w.spanStart[sp + 1] : tokens;
      return massIn(p, a, b) / (1 - massIn(p, 0, w.knobs.sinks)) / ((b - a) / (tokens - w.knobs.sinks));
    });
    expect(ratio).toBeGreaterThan(3);
  });

  it('(f) recent tokens draw more than distant ones', () => {
    // Mean probability per token of the last 128 tokens over that of the
    // older ones, both outside the sinks and the step's target span (which
    // recency of content would otherwise confound).
    const ratios: number[] = [];
    each((p, h, s) => {
      const sp = w.decodeSpan[h][s], a = w.spanStart[sp], b = sp + 1 < w.spanStart.length ? w.spanStart[sp + 1] : tokens;
      let near = 0, nn = 0, far = 0, nf = 0;
      for (let t = w.knobs.sinks; t < tokens; t++) {
        if (t >= a && t < b) continue;
        if (t >= tokens - 128) {
          near += p[t];
          nn++;
        } else {
          far += p[t];
          nf++;
        }
      }
      if (nn > 0) ratios.push(near / nn / (far / nf));
      return 0;
    });
    expect(ratios.length).toBeGreaterThan(10);
    expect(ratios.reduce((x, y) => x + y) / ratios.length).toBeGreaterThan(2.5);
  });

  it('(g) consecutive decode steps attend overlapping top-k sets', () => {
    const k = 32;
    let next = 0, far = 0, n1 = 0, n2 = 0;
    for (let h = 0; h < kvHeads; h++)
      for (let g = 0; g < G; g++) {
        const tops = exact[h].map((ex) => new Set(topKIndices(ex.probs[g], k)));
        const overlap = (a: Set<number>, b: Set<number>) => [...a].filter((x) => b.has(x)).length / k;
        for (let s = 0; s + 1 < steps; s++, n1++) next += overlap(tops[s], tops[s + 1]);
        for (let s = 0; s + 16 < steps; s++, n2++) far += overlap(tops[s], tops[s + 16]);
      }
    expect(next / n1).toBeGreaterThan(far / n2 + 0.15);
  });

  it('(h) each needle is the top key for exactly its step and q head', () => {
    for (const nd of w.needles) {
      const ex = exact[nd.head][nd.step], g = nd.qHead - nd.head * G;
      expect(rankOf(ex.probs[g], nd.position)).toBe(1);
      // needleBoost logits above the runner-up.
      const s = ex.scores[g], top2 = topKIndices(s, 2);
      expect((s[top2[0]] - s[top2[1]]) * ex.scale).toBeGreaterThan(w.knobs.needleBoost - 0.1);
      // No other step of the same q head singles it out.
      const own = ex.probs[g][nd.position];
      const others = exact[nd.head].filter((_, st) => st !== nd.step);
      expect(Math.min(...others.map((e) => rankOf(e.probs[g], nd.position)))).toBeGreaterThan(3);
      expect(Math.max(...others.map((e) => e.probs[g][nd.position]))).toBeLessThan(own / 10);
    }
  });
});

// ---------------------------------------------------------------- metrics

/** Brute force in float64 from f16 words decoded independently (test/helpers/half.ts). */
function bruteForce(q: number[][], kBits: Uint16Array, vBits: Uint16Array, n: number, d: number, scale: number) {
  return q.map((qr) => {
    const s = Array.from({ length: n }, (_, t) => {
      let x = 0;
      for (let j = 0; j < d; j++) x += qr[j] * f16Value(kBits[t * d + j]);
      return x * scale;
    });
    const m = Math.max(...s), e = s.map((x) => Math.exp(x - m)), z = e.reduce((a, b) => a + b);
    const p = e.map((x) => x / z);
    const o = Array.from({ length: d }, (_, j) => p.reduce((acc, pt, t) => acc + pt * f16Value(vBits[t * d + j]), 0));
    return { p, o, lse: m + Math.log(z) };
  });
}

function f16Of(values: number[]): Uint16Array {
  return Uint16Array.from(values, f16Bits);
}

describe('quality metrics', () => {
  it('match a float64 brute force on random data', () => {
    const n = 57, d = 12, G = 3;
    let seed = 5;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;
    const kBits = f16Of(Array.from({ length: n * d }, () => 2 * rnd()));
    const vBits = f16Of(Array.from({ length: n * d }, rnd));
    const q = Float32Array.from({ length: G * d }, () => 3 * rnd());
    const qRows = Array.from({ length: G }, (_, g) => Array.from(q.subarray(g * d, (g + 1) * d)));
    const ref = bruteForce(qRows, kBits, vBits, n, d, 1 / Math.sqrt(d));
    const ex = exactAttention(q, G, kBits, vBits, { headDim: d });
    for (let g = 0; g < G; g++) {
      for (let t = 0; t < n; t++) expect(ex.probs[g][t]).toBeCloseTo(ref[g].p[t], 12);
      expect(ex.lse[g]).toBeCloseTo(ref[g].lse, 10);
      for (let j = 0; j < d; j++) expect(ex.out[g * d + j]).toBeCloseTo(ref[g].o[j], 12);
    }
    const all = Int32Array.from({ length: n }, (_, i) => i);
    expect(attentionRecall(ex, all)).toBeCloseTo(1, 12);
    expect(topKRecall(ex, all, 10)).toBe(1);
    expect(outputError(ex, all).max).toBeLessThan(1e-12);
    // A subset: recall is the mean over heads of the kept mass; o_S renormalised over S.
    const S = Int32Array.from([3, 9, 9, 20, 41, 3]);
    const ids = [3, 9, 20, 41];
    const kept = ref.map((r) => ids.reduce((a, t) => a + r.p[t], 0));
    expect(attentionRecall(ex, S)).toBeCloseTo(kept.reduce((a, b) => a + b) / G, 12);
    const oS = selectedOutput(ex, S);
    for (let g = 0; g < G; g++)
      for (let j = 0; j < d; j++) {
        const want = ids.reduce((a, t) => a + ref[g].p[t] * f16Value(vBits[t * d + j]), 0) / kept[g];
        expect(oS[g * d + j]).toBeCloseTo(want, 12);
      }
    const errs = ref.map((r, g) => {
      let num = 0, den = 0;
      for (let j = 0; j < d; j++) {
        num += (oS[g * d + j] - r.o[j]) ** 2;
        den += r.o[j] ** 2;
      }
      return Math.sqrt(num / den);
    });
    expect(outputError(ex, S).mean).toBeCloseTo(errs.reduce((a, b) => a + b) / G, 12);
    expect(outputError(ex, S).max).toBeCloseTo(Math.max(...errs), 12);
    // Top-k recall against each head's own exact top-k.
    const k = 5;
    const want = ref.map((r) => {
      const top = r.p.map((p, t) => [p, t]).sort((a, b) => b[0] - a[0]).slice(0, k).map((x) => x[1]);
      return top.filter((t) => ids.includes(t)).length / k;
    });
    expect(topKRecall(ex, S, k)).toBeCloseTo(want.reduce((a, b) => a + b) / G, 12);
    expect(attentionRecall(ex, new Int32Array(0))).toBe(0);
    expect(() => attentionRecall(ex, Int32Array.from([n]))).toThrow(RangeError);
    expect(distinctIds(S, n)).toEqual(Int32Array.from(ids));
  });

  it('give the known values on a hand-made case', () => {
    // Scores 0, ln2, 2·ln2 → probabilities 1/7, 2/7, 4/7.
    const d = 2, kBits = f16Of([0, 0, 1, 0, 2, 0]), vBits = f16Of([1, 0, 0, 1, 1, 1]);
    const ex = exactAttention(Float32Array.from([Math.LN2, 0]), 1, kBits, vBits, { headDim: d, scale: 1 });
    expect(Array.from(ex.probs[0])).toEqual([1 / 7, 2 / 7, 4 / 7].map((x) => expect.closeTo(x, 6)));
    expect(ex.out[0]).toBeCloseTo(5 / 7, 6);
    expect(ex.out[1]).toBeCloseTo(6 / 7, 6);
    expect(attentionRecall(ex, Int32Array.from([2]))).toBeCloseTo(4 / 7, 6);
    expect(topKRecall(ex, Int32Array.from([2]), 1)).toBe(1);
    expect(topKRecall(ex, Int32Array.from([0, 1]), 1)).toBe(0);
    expect(topKRecall(ex, Int32Array.from([0, 2]), 2)).toBe(0.5);
    // S = {1, 2}: o_S = (2·[0,1] + 4·[1,1]) / 6 = [2/3, 1]; o = [5/7, 6/7].
    const e = Math.hypot(2 / 3 - 5 / 7, 1 - 6 / 7) / Math.hypot(5 / 7, 6 / 7);
    expect(outputError(ex, Int32Array.from([1, 2])).mean).toBeCloseTo(e, 6);
    expect(Array.from(oracleSelection(ex, 2))).toEqual([2, 1]);
    const cmp = compareWithOracle(ex, Int32Array.from([0, 1]), 1);
    expect(cmp.method.attentionRecall).toBeCloseTo(3 / 7, 6);
    expect(cmp.oracle.attentionRecall).toBeCloseTo(6 / 7, 6);
    expect(cmp.oracle.count).toBe(2);
  });

  it('the oracle maximises the group-averaged attention recall at its count', () => {
    const n = 9, d = 4, G = 2;
    let seed = 99;
    const rnd = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32) * 2 - 1;
    const kBits = f16Of(Array.from({ length: n * d }, () => 3 * rnd()));
    const vBits = f16Of(Array.from({ length: n * d }, rnd));
    const ex = exactAttention(Float32Array.from({ length: G * d }, rnd), G, kBits, vBits, { headDim: d });
    const m = 3;
    let best = 0;
    for (let a = 0; a < n; a++)
      for (let b = a + 1; b < n; b++)
        for (let c = b + 1; c < n; c++) best = Math.max(best, attentionRecall(ex, Int32Array.from([a, b, c])));
    expect(attentionRecall(ex, oracleSelection(ex, m))).toBeCloseTo(best, 14);
    const mp = meanProbs(ex);
    expect(mp.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 12);
  });

  it('agree with the native kernel for o_S, and widen once per array', async () => {
    const w = generateWorkload(tiny);
    const d = tiny.headDim, G = tiny.qHeads / tiny.kvHeads;
    const q = w.decodeQ[0].subarray(0, G * d);
    const ex = exactAttention(q, G, w.keys[0], w.values[0], { headDim: d, dtype: w.dtype });
    const S = Int32Array.from({ length: 300 }, (_, i) => (i * 37) % tiny.tokens);
    const ours = selectedOutput(ex, S);
    const native = await nativeSelectedOutput(q, G, w.keys[0], w.values[0], S, { headDim: d, dtype: w.dtype });
    for (let g = 0; g < G; g++) {
      let num = 0, den = 0;
      for (let j = 0; j < d; j++) {
        num += (native.out[g * d + j] - ours[g * d + j]) ** 2;
        den += ours[g * d + j] ** 2;
      }
      expect(Math.sqrt(num / den)).toBeLessThan(1e-5);
    }
    expect(widen(w.keys[0], w.dtype)).toBe(widen(w.keys[0], w.dtype));
    const f = new Float32Array(4);
    convert(bytesOf(w.keys[0].subarray(0, 4)), w.dtype, bytesOf(f), 'f32', 4);
    expect(Array.from(widen(w.keys[0], w.dtype).subarray(0, 4))).toEqual(Array.from(f));
  });
});
