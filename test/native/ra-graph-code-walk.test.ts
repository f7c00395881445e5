// The retrieval-attention graph's code-gated walk (native/indexes/ra_graph_code_walk.h,
// RaSearchOptions::codeWalk) and the 4-bit key codes it reads (ra_key_codes.h):
// the codes dequantize within half a level of each key value inside the
// channel's mean ± 3σ (float64 reference), the approximate logits are those of
// the dequantized key (float64), an uncapped walk that scores every key met
// returns the exact top-k of the group's mean probability, its lists read
// from their 64-byte slots (ra_walk_lists.h) as from the CSR, the two caps
// stop it, the moving cutoff (codeAdapt) brings both caps' shares together, and bad options are refused.
import { describe, expect, it } from 'vitest';
import { RaGraph, type RaGraphSearchArgs } from '../../addon/ra-graph.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { channelKeys } from '../helpers/channel-keys.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { groupMeanProb } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`native ra-graph code walk tests: seed ${seed}`);

const keysOf = channelKeys;

/** Float64 mean and population σ of each channel. */
function channelStats(values: Float64Array, n: number, d: number) {
  const mu = new Float64Array(d), sd = new Float64Array(d);
  for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) mu[j] += values[t * d + j] / n;
  for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) sd[j] += (values[t * d + j] - mu[j]) ** 2 / n;
  for (let j = 0; j < d; j++) sd[j] = Math.sqrt(sd[j]);
  return { mu, sd };
}

/** Channel j's level in a row of codes (byte i: channel i low, channel i + ceil(d/2) high). */
function level(codes: Uint8Array, t: number, j: number, d: number): number {
  const half = Math.ceil(d / 2), b = codes[t * half + (j < half ? j : j - half)];
  return j < half ? b & 15 : b >> 4;
}

/** The group's mean probability of every key (float64) and the keys by it, best first (ties by id). */
function meanProbOrder(q: Float32Array, G: number, keys: Float64Array, n: number, d: number) {
  const { meanProb } = groupMeanProb(q, G, keys, n, d, 1 / Math.sqrt(d));
  return { meanProb, order: Array.from({ length: n }, (_, t) => t).sort((a, b) => meanProb[b] - meanProb[a] || a - b) };
}

function queries(rng: Rng, rows: number, d: number): Float32Array {
  return Float32Array.from({ length: rows * d }, () => 0.8 * rng.normal());
}

async function graphOf(rng: Rng, dt: Dt, n: number, d: number) {
  const keys = keysOf(rng, dt, n, d);
  const graph = await RaGraph.build({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, queries: queries(rng, 200, d), degree: 8, kBuild: 16 });
  return { keys, graph };
}

function walkArgs(keys: Uint16Array, n: number, d: number, dt: Dt, q: Float32Array, G: number, k: number): RaGraphSearchArgs {
  const keep = Math.min(k, n);
  return { keys, tokens: n, headDim: d, dtype: dt, q, group: G, k, ef: k, outIds: new Int32Array(keep), outScores: new Float32Array(keep), aggregate: 'attention', codeWalk: true };
}

describe('ra-graph key codes', () => {
  for (const [dt, n, d] of [['f16', 3000, 128], ['bf16', 2000, 24], ['f16', 500, 7]] as const)
    it(`dequantize within half a level inside mean ± 3σ, and the approximate logits are the dequantized key's (${dt}, d=${d})`, async () => {
      const rng = new Rng(seed + d);
      const { keys, graph } = await graphOf(rng, dt, n, d);
      const { codes, low, step } = graph.keyCodes({ keys: keys.bits, tokens: n, headDim: d, dtype: dt });
      expect(codes.length).toBe(n * Math.ceil(d / 2));
      const { mu, sd } = channelStats(keys.values, n, d);
      let inside = 0, clamped = 0;
      for (let j = 0; j < d; j++) {
        // The range is the channel's float64 mean − 3σ, 16 levels over 6σ (stored as f32).
        expect(Math.abs(low[j] - (mu[j] - 3 * sd[j]))).toBeLessThanOrEqual(1e-6 * (Math.abs(mu[j]) + 3 * sd[j]) + 1e-6);
        expect(Math.abs(step[j] - (6 * sd[j]) / 16)).toBeLessThanOrEqual(1e-6 * sd[j] + 1e-9);
        for (let t = 0; t < n; t++) {
          const v = keys.values[t * d + j], c = level(codes, t, j, d);
          const deq = low[j] + (c + 0.5) * step[j];
          if (v >= low[j] && v <= low[j] + 16 * step[j]) {
            inside++;
            expect(Math.abs(v - deq)).toBeLessThanOrEqual(0.5 * step[j] * (1 + 1e-5) + 1e-6 * Math.abs(v));
          } else {
            clamped++;
            expect(c).toBe(v < low[j] ? 0 : 15);
          }
        }
      }
      expect(clamped).toBeGreaterThan(0); // normal tails pass 3σ: the clamp is exercised
      expect(clamped).toBeLessThan(0.01 * inside);

      const G = 3, q = queries(rng, G, d), scale = 1 / Math.sqrt(d);
      const ids = Int32Array.from({ length: 200 }, () => rng.int(n));
      const x = graph.codeLogits({ keys: keys.bits, tokens: n, headDim: d, dtype: dt, q, group: G, ids });
      expect(x.length).toBe(ids.length * G);
      ids.forEach((t, i) => {
        for (let g = 0; g < G; g++) {
          let want = 0, size = 0;
          for (let j = 0; j < d; j++) {
            const term = q[g * d + j] * (low[j] + (level(codes, t, j, d) + 0.5) * step[j]);
            want += term;
            size += Math.abs(term);
          }
          // f32 sums of d terms (the bias in double): a few ulps of the terms' magnitude.
          expect(Math.abs(x[i * G + g] - scale * want)).toBeLessThanOrEqual(1e-5 * scale * size + 1e-6);
        }
      });
      graph.dispose();
    });

  // The walk ranks codes by an int8 form of the weights (ra_key_codes.h, RaCodeQuery): w_hj = scale·q_hj·step_j
  // (f32), s_h = max_j |w_hj| / 127, r_hj = w_hj / s_h rounded (half to even), x̃_h = b̃_h + s_h·Σ_j r_hj·c_j with
  // b̃_h = the dequantized key's bias + Σ_j (w_hj − s_h·r_hj)·7.5. Its distance from the dequantized key's logit
  // (float64) is at most s_h/2 · Σ_j |c_j − 7.5|. d = 128 and 64 take the AVX2 path, 24 and 7 the scalar one: both
  // must give these numbers; G = 3 and 5 leave a partial group of four heads.
  for (const [dt, n, d, G] of [['f16', 3000, 128, 5], ['f16', 1000, 64, 3], ['bf16', 2000, 24, 4], ['f16', 500, 7, 3]] as const)
    it(`int8 form: the stated integers, within its bound of the dequantized key's logits (${dt}, d=${d}, G=${G})`, async () => {
      const rng = new Rng(seed + 3 * d + G);
      const { keys, graph } = await graphOf(rng, dt, n, d);
      const args = { keys: keys.bits, tokens: n, headDim: d, dtype: dt };
      const { codes, low, step } = graph.keyCodes(args);
      // The scale as the addon takes it by default, 1.f / sqrt(float(d)): at d = 7 or 24 the double 1/√d rounded once is
      // another float, and a weight near a rounding tie would take another int8 value.
      const f = Math.fround, q = queries(rng, G, d), scale = f(1 / f(Math.sqrt(d)));
      const ids = Int32Array.from({ length: 300 }, () => rng.int(n));
      const got = graph.codeLogits({ ...args, q, group: G, ids, quantized: true });
      const deq = graph.codeLogits({ ...args, q, group: G, ids });
      expect(got.length).toBe(ids.length * G);
      const roundEven = (v: number) => (Math.abs(v - Math.trunc(v)) === 0.5 ? 2 * Math.round(v / 2) : Math.round(v));
      let quantErr = 0, codeErr = 0;
      for (let g = 0; g < G; g++) {
        const w = Array.from({ length: d }, (_, j) => f(f(f(scale) * q[g * d + j]) * step[j]));
        const s = f(Math.max(...w.map(Math.abs)) / 127);
        const r = w.map((v) => Math.max(-127, Math.min(127, roundEven(f(v / s)))));
        let bias = 0, biasSize = 0;
        for (let j = 0; j < d; j++) {
          const term = q[g * d + j] * (low[j] + 0.5 * step[j]);
          bias += term;
          biasSize += Math.abs(term);
        }
        bias *= scale;
        for (let j = 0; j < d; j++) bias += (w[j] - s * r[j]) * 7.5;
        ids.forEach((t, i) => {
          let dot = 0, spread = 0, want = 0, exact = 0;
          for (let j = 0; j < d; j++) {
            const c = level(codes, t, j, d);
            dot += r[j] * c;
            spread += Math.abs(c - 7.5);
            want += q[g * d + j] * (low[j] + (c + 0.5) * step[j]);
            exact += q[g * d + j] * keys.values[t * d + j];
          }
          want *= scale;
          exact *= scale;
          const x = got[i * G + g];
          // The integers exactly, the bias and the fused step within f32 rounding of their sizes.
          expect(Math.abs(x - (bias + s * dot))).toBeLessThanOrEqual(1e-6 * (scale * biasSize + Math.abs(s * dot)) + 1e-6);
          // Within the bound (real arithmetic) of the dequantized key's logit, plus the f32 rounding of both.
          expect(Math.abs(x - want)).toBeLessThanOrEqual(0.5 * s * spread + 1e-5 * (scale * biasSize + Math.abs(s * dot)) + 1e-5);
          expect(Math.abs(deq[i * G + g] - want)).toBeLessThanOrEqual(1e-5 * (scale * biasSize + Math.abs(s * dot)) + 1e-5);
          quantErr += (x - want) ** 2;
          codeErr += (want - exact) ** 2;
        });
      }
      // And in practice a small part of the codes' own error
      // (0.04-0.07 here; the keys have outlier channels, which widen s.)
      expect(Math.sqrt(quantErr / codeErr)).toBeLessThan(0.15);
      graph.dispose();
    });

  it('follow the keys a call brings: another keys array gets its own codes', async () => {
    const rng = new Rng(seed + 5);
    const [n, d] = [700, 16];
    const { keys, graph } = await graphOf(rng, 'f16', n, d);
    const args = { tokens: n, headDim: d, dtype: 'f16' as const };
    const first = graph.keyCodes({ ...args, keys: keys.bits });
    // The same values shifted by 4 in every channel: the same spread, every level's range moved.
    const shifted = Uint16Array.from({ length: n * d }, (_, i) => bitsOf('f16')(keys.values[i] + 4));
    const second = graph.keyCodes({ ...args, keys: shifted });
    // f16 rounds each shifted value by up to half a unit in its last place (1/128 near 16).
    for (let j = 0; j < d; j++) expect(Math.abs(second.low[j] - first.low[j] - 4)).toBeLessThan(0.05);
    expect(graph.keyCodes({ ...args, keys: keys.bits }).low).toEqual(first.low);
    graph.dispose();
  });
});

describe('ra-graph code-gated walk', () => {
  for (const [dt, n, d, G] of [['f16', 3001, 32, 4], ['bf16', 1500, 24, 2], ['f16', 900, 64, 1]] as const)
    it(`uncapped and scoring every key met, returns the exact top-k of the group's mean probability (${dt}, n=${n}, G=${G})`, async () => {
      const rng = new Rng(seed + n);
      const { keys, graph } = await graphOf(rng, dt, n, d);
      const k = 40;
      for (let trial = 0; trial < 2; trial++) {
        const q = queries(rng, G, d);
        const ref = meanProbOrder(q, G, keys.values, n, d);
        const a = { ...walkArgs(keys.bits, n, d, dt, q, G, k), codeDelta: Infinity };
        const r = graph.searchSync(a);
        expect(r.count).toBe(k);
        expect(r.scanned).toBe(n); // every key reached and scored exactly
        expect(r.codesRead).toBeGreaterThan(0);
        for (let i = 0; i < k; i++) {
          const got = a.outIds[i], want = ref.order[i];
          // Ranks may swap only where f32 and f64 disagree.
          if (got !== want) expect(Math.abs(ref.meanProb[got] - ref.meanProb[want])).toBeLessThan(1e-5 * ref.meanProb[want]);
          expect(Math.abs(a.outScores[i] - Math.log(ref.meanProb[got]))).toBeLessThan(1e-3);
        }
        // A gate at δ = 0 scores fewer keys exactly and reads the rest as codes: every key is still met.
        const gated = graph.searchSync({ ...walkArgs(keys.bits, n, d, dt, q, G, k), codeDelta: 0 });
        expect(gated.scanned).toBeLessThan(n);
        expect(gated.scanned + gated.codesRead!).toBeGreaterThanOrEqual(n);
      }
      graph.dispose();
    });

  // With no caps the walk meets every key; one read as a code is scored exactly iff its walk score from the int8 form,
  // log Σ_g exp(x̃_g − c0_g) (c0_g: the strided sample's exact log-partition), is >= τ − δ, τ the sample keys' such
  // score at quantile q. So the keys scored exactly are the sample, the entry points (P of them) and those at or
  // above the cut: the ranks and the gate checked against float64 (keys within 1e-3 of the cut either way).
  for (const [n, d, G, q, delta] of [[20000, 64, 4, 5, 0.5], [12000, 32, 3, 5, 1]] as const)
    it(`uncapped, scores exactly the keys whose code's walk score passes the cut, as float64 has it (n=${n}, d=${d}, G=${G})`, async () => {
      const rng = new Rng(seed + 7 * d + G);
      const { keys, graph } = await graphOf(rng, 'f16', n, d);
      const stride = Math.floor(n / Math.min(n, 4096, Math.max(64, Math.floor(n / 512)))), off = Math.floor(stride / 2);
      const m = Math.ceil((n - off) / stride), P = graph.entryPoints, scale = 1 / Math.sqrt(d);
      const ids = Int32Array.from({ length: n }, (_, i) => i);
      for (let trial = 0; trial < 2; trial++) {
        const qs = queries(rng, G, d);
        const x = graph.codeLogits({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', q: qs, group: G, ids, quantized: true });
        const c0 = Array.from({ length: G }, (_, g) => {
          const logits = Array.from({ length: m }, (_, j) => {
            let s = 0;
            for (let c = 0; c < d; c++) s += qs[g * d + c] * keys.values[(off + j * stride) * d + c];
            return scale * s;
          });
          const top = Math.max(...logits);
          return top + Math.log(logits.reduce((a, v) => a + Math.exp(v - top), 0)) + Math.log(n / m);
        });
        const rank = (t: number) => Math.log(c0.reduce((a, c, g) => a + Math.exp(x[t * G + g] - c), 0));
        const sample = Array.from({ length: m }, (_, j) => rank(off + j * stride)).sort((a, b) => b - a);
        const cut = sample[Math.min(m - 1, Math.floor((m * q) / 100))] - delta;
        let above = 0, near = 0;
        for (let t = 0; t < n; t++) {
          if (t >= off && (t - off) % stride === 0) continue;
          const r = rank(t);
          if (Math.abs(r - cut) < 1e-3) near++;
          else if (r > cut) above++;
        }
        const r = graph.searchSync({ ...walkArgs(keys.bits, n, d, 'f16', qs, G, 40), codeQuantile: q, codeDelta: delta, codeAdapt: 0 });
        expect(above).toBeGreaterThan(10 * P); // the gate, not the entry points, decides the count
        expect(r.scanned - m).toBeGreaterThanOrEqual(above);
        expect(r.scanned - m).toBeLessThanOrEqual(above + near + P);
        expect(r.scanned + r.codesRead!).toBeGreaterThanOrEqual(n); // every key met
      }
      graph.dispose();
    });

  it("stops at the caps on keys scored exactly and on codes read, passing each by at most one round's lists", async () => {
    const rng = new Rng(seed + 17);
    const [n, d, G] = [20000, 32, 4];
    const { keys, graph } = await graphOf(rng, 'f16', n, d);
    for (const codeWidth of [1, 8]) {
      for (let trial = 0; trial < 3; trial++) {
        const list = codeWidth * graph.maxDegree;
        const q = queries(rng, G, d);
        const maxCodes = 1000 + 500 * trial;
        const byCodes = graph.searchSync({ ...walkArgs(keys.bits, n, d, 'f16', q, G, 100), maxCodes, codeWidth });
        expect(byCodes.codesRead).toBeGreaterThanOrEqual(maxCodes);
        expect(byCodes.codesRead).toBeLessThanOrEqual(maxCodes + list);
        expect(byCodes.scanned).toBeLessThan(n);
        const maxScanned = 300 + 100 * trial;
        const byExact = graph.searchSync({ ...walkArgs(keys.bits, n, d, 'f16', q, G, 100), maxScanned, codeDelta: Infinity, codeWidth });
        // The sample keys the walk meets again are scored once: the count may stop a few short of the cap.
        expect(byExact.scanned).toBeGreaterThanOrEqual(0.8 * maxScanned);
        expect(byExact.scanned).toBeLessThanOrEqual(maxScanned + list);
      }
    }
    // The codes are held with the graph (64 bytes a key at d = 128; here 16).
    expect(graph.memoryBytes).toBeGreaterThanOrEqual(n * (d / 2));
    graph.dispose();
  });

  // The walk reads each list from a 64-byte slot (ra_walk_lists.h: 15 ids inline, the rest of a longer list
  // elsewhere); KVR_RA_WALK_LISTS=csr, read when a graph makes its slots, keeps it on the CSR. The walk's
  // every step follows its lists in order, so a slot that lost, added or reordered a neighbour moves the ids,
  // the keys scored or the codes read of some capped walk: the two graphs (one blob) must agree on all of them.
  it('reads the lists from their slots as from the CSR: the same ids, scanned and codes read; the slots counted in memoryBytes', async () => {
    const rng = new Rng(seed + 29);
    const [n, d, G] = [20000, 32, 4];
    const { keys, graph } = await graphOf(rng, 'f16', n, d);
    expect(graph.maxDegree).toBeGreaterThan(15); // some lists spill past a slot
    const blob = graph.save();
    graph.dispose();
    const before = process.env.KVR_RA_WALK_LISTS;
    const withLists = (mode: string) => {
      process.env.KVR_RA_WALK_LISTS = mode;
      try {
        const g = RaGraph.load(blob);
        g.searchSync(walkArgs(keys.bits, n, d, 'f16', queries(rng, G, d), G, 10)); // its first code walk chooses
        return g;
      } finally {
        if (before === undefined) delete process.env.KVR_RA_WALK_LISTS;
        else process.env.KVR_RA_WALK_LISTS = before;
      }
    };
    const csr = withLists('csr'), slots = withLists('slots');
    expect(slots.memoryBytes - csr.memoryBytes).toBeGreaterThanOrEqual(n * 64);
    for (const codeWidth of [1, 16])
      for (let trial = 0; trial < 3; trial++) {
        const q = queries(rng, G, d);
        const caps = [{ maxCodes: 800 + 900 * trial }, { maxScanned: 300 + 200 * trial, codeDelta: Infinity }, { maxCodes: 2000, maxScanned: 400 + 100 * trial }];
        for (const cap of caps) {
          const a = { ...walkArgs(keys.bits, n, d, 'f16', q, G, 100), codeWidth, ...cap };
          const b = { ...a, outIds: new Int32Array(100), outScores: new Float32Array(100) };
          const ra = csr.searchSync(a), rb = slots.searchSync(b);
          expect([rb.scanned, rb.codesRead]).toEqual([ra.scanned, ra.codesRead]);
          expect([...b.outIds]).toEqual([...a.outIds]);
        }
        // Uncapped and scoring every key met: the slots reach every key.
        expect(slots.searchSync({ ...walkArgs(keys.bits, n, d, 'f16', q, G, 10), codeDelta: Infinity, codeWidth }).scanned).toBe(n);
      }
    csr.dispose();
    slots.dispose();
  });

  // The moving cutoff (codeAdapt = κ): each round's gate is cut + κ·D, D = X − C, X the share of the walk's exact cap
  // Mx used since its E0 start keys ((E − E0) / (Mx − E0)), C the share of maxCodes Mc read. Every walk score s
  // lies within h·κ of cut, h = (span + ln G + δ) / κ (span: a row's approximate-logit range; s = log Σ_g exp(x_g − c0_g)).
  // A round reads c ≤ L new codes and scores g ≤ c of them plus any sample keys met (always exact), so, from D = 0:
  // while D ≥ h no code passes the gate and D rises only by sample keys: D ≤ h + (L + m) / (Mx − E0); while D < −h
  // every code passes, and with Mx − E0 ≤ Mc D does not fall: D ≥ −h − L / Mc. The walk ends at a cap (X ≥ 1 or
  // C ≥ 1), so both shares end near 1. κ = 0 with a loose δ scores nearly every key met instead: about one code is
  // read per key scored exactly, and the exact cap stops the walk with half the codes' cap unread.
  it('with codeAdapt, meets both caps near together, where a fixed loose cutoff spends the exact cap first; no cap passed by more than a round', async () => {
    const rng = new Rng(seed + 41);
    const [n, d, G] = [20000, 32, 4];
    const { keys, graph } = await graphOf(rng, 'f16', n, d);
    // The strided sample as ra_graph_attention.cc takes it: m keys scored first, counted in `scanned`
    // (S = m + E − R, R ≤ m the sample keys the walk scores again); the walk's exact cap is maxScanned − m.
    const stride = Math.floor(n / Math.min(n, 4096, Math.max(64, Math.floor(n / 512)))), m = Math.ceil((n - Math.floor(stride / 2)) / stride);
    const Mx = 2500, Mc = 5000, codeWidth = 1, L = codeWidth * graph.maxDegree, delta = 4, kappa = 1e4;
    // E0: the entry points (distinct) and at most 16 best sample keys, scored before the first round.
    const P = graph.entryPoints;
    expect(Mx - P).toBeLessThanOrEqual(Mc);
    const ids = Int32Array.from({ length: n }, (_, i) => i);
    for (let trial = 0; trial < 4; trial++) {
      const q = queries(rng, G, d);
      const run = (codeAdapt: number) =>
        graph.searchSync({ ...walkArgs(keys.bits, n, d, 'f16', q, G, 100), maxScanned: m + Mx, maxCodes: Mc, codeWidth, codeDelta: delta, codeAdapt });
      const x = graph.codeLogits({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', q, group: G, ids, quantized: true });
      let span = 0;
      for (let g = 0; g < G; g++) {
        let lo = Infinity, hi = -Infinity;
        for (let t = 0; t < n; t++) (lo = Math.min(lo, x[t * G + g])), (hi = Math.max(hi, x[t * G + g]));
        span = Math.max(span, hi - lo);
      }
      const h = (span + Math.log(G) + delta + 1e-3) / kappa;
      // X's bounds from S: E − E0 in [S − m − P − 16, S − P], Mx − E0 in [Mx − P − 16, Mx − P].
      const shares = (r: { scanned: number; codesRead?: number }) =>
        ({ xLo: (r.scanned - m - P - 16) / (Mx - P), xHi: (r.scanned - P) / (Mx - P - 16), c: r.codesRead! / Mc });
      const up = (L + m) / (Mx - P - 16) + h, down = L / Mc + h;

      const moving = shares(run(kappa));
      expect(moving.xLo - moving.c).toBeLessThanOrEqual(up);
      expect(moving.xHi - moving.c).toBeGreaterThanOrEqual(-down);
      expect(moving.c).toBeGreaterThanOrEqual(1 - up);
      expect(moving.xHi).toBeGreaterThanOrEqual(1 - down);

      const fixed = shares(run(0));
      expect(fixed.c).toBeLessThan(1); // the exact cap stopped it
      expect(fixed.xLo).toBeGreaterThanOrEqual(1 - (m + 16) / (Mx - P)); // S >= Mx: not every key met
      expect(fixed.c).toBeLessThanOrEqual(fixed.xLo - 0.3);

      // Whatever κ, each cap is passed by at most one round's lists.
      for (const codeAdapt of [0, 0.5, 2, kappa]) {
        const r = run(codeAdapt);
        expect(r.scanned).toBeLessThan(m + Mx + L);
        expect(r.codesRead).toBeLessThan(Mc + L);
      }
    }
    graph.dispose();
  });

  it('refuses bad options', async () => {
    const rng = new Rng(seed + 29);
    const [n, d] = [300, 16];
    const { keys, graph } = await graphOf(rng, 'f16', n, d);
    const base = walkArgs(keys.bits, n, d, 'f16', queries(rng, 2, d), 2, 10);
    expect(() => graph.searchSync({ ...base, aggregate: 'max' })).toThrow(/codeWalk needs aggregate 'attention'/);
    for (const codeQuantile of [0, -1, 100.5, NaN]) expect(() => graph.searchSync({ ...base, codeQuantile })).toThrow(/codeQuantile must be a number in \(0, 100\]/);
    for (const codeDelta of [-0.1, NaN]) expect(() => graph.searchSync({ ...base, codeDelta })).toThrow(/codeDelta must be a number >= 0/);
    for (const codeAdapt of [-0.1, NaN, Infinity]) expect(() => graph.searchSync({ ...base, codeAdapt })).toThrow(/codeAdapt must be a finite number >= 0/);
    expect(() => graph.searchSync({ ...base, maxCodes: -1 })).toThrow(/maxCodes/);
    expect(() => graph.searchSync({ ...base, maxCodes: 1.5 })).toThrow(/maxCodes/);
    for (const codeWidth of [0, 1025, 2.5]) expect(() => graph.searchSync({ ...base, codeWidth })).toThrow(/codeWidth must be an integer in \[1, 1024\]/);
    for (const knob of ['codeQuantile', 'codeDelta', 'codeAdapt', 'maxCodes', 'codeWidth'] as const)
      expect(() => graph.searchSync({ ...base, codeWalk: false, [knob]: 1 })).toThrow(new RegExp(`${knob} is an option of the code walk`));
    expect(() => graph.codeLogits({ keys: keys.bits, tokens: n, headDim: d, dtype: 'f16', q: base.q, group: 2, ids: Int32Array.of(n) })).toThrow(/ids\[0\] = 300 is outside/);
    // A valid search still runs after the refusals, and the plain search reports no codes.
    expect(graph.searchSync({ ...base, codeQuantile: 100, codeDelta: 0, maxCodes: 0 }).count).toBe(10);
    expect(graph.searchSync({ ...base, codeWalk: undefined }).codesRead).toBeUndefined();
    graph.dispose();
  });
});
