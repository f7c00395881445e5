// The wave decode step on the GPU (addon/wave-gpu.ts): checks against the
// host path and a benchmark at 1M tokens (needs a CUDA device).
//
//   node dist/bench/wave-gpu.js [--check] [--bench] [--steps N] [--cluster-size 8] [--probes 4,2] [--tag T]
//
// --check runs the comparisons test/native/wave-gpu.test.ts makes, without
// vitest: on random keys clustered by the real builder (k-means, odd sizes),
// in both rankings of the step: 'spread' against the host's default path
// (ClusterIndex.searchHeads, ranking 'spread', then estimateClusters with
// estimateArgs(ids): second order, partly attended clusters' remaining rows
// by their own logits), 'spread-moments' (rest 'moments' against
// estimateArgs(ids, 'moments')) and 'radius' against the older one
// (searchHeads(..., 'radius'), estimateArgs(ids, 'first'): first order). The
// selection must equal the host's (the same ids, and scanned: the GPU sums
// every score in the host's order with its roundings, wave_step.cu), the
// estimate must equal estimateClusters over the same exact rows within 1e-4
// relative (out per q head, lse; estimated token counts exactly): the GPU
// sums in f32 tiles merged in float64, the host in float64.
//
// --bench: one layer at 1M tokens per kv head, 8 kv heads x 4 q heads, d=128,
// f16, clusters of exactly 8 tokens (131,072 per head), budget 2%, sinks 16,
// window 64: p50/p90 of the whole call (CUDA events from the inputs' copy to
// the outputs' copy) with ranking 'spread', its stages, the host's wall time
// around the await, the same without the estimate, the same with ranking
// 'radius', and the device memory of the summaries as a share of the layer's
// K/V. One step is also checked against the host's default path.
// Results: bench/results/wave-gpu-h200.{json,md} (also copied to $OUT when set).
import { pathToFileURL } from 'node:url';
import { cudaAvailable, deviceName } from '../addon/cuda.js';
import { estimateClusters } from '../addon/estimate.js';
import { bytesOf, convert, type KvDtype } from '../addon/kernels.js';
import { WaveGpuStore, type WaveGpuHead, type WaveGpuRanking, type WaveGpuStepResult } from '../addon/wave-gpu.js';
import { centroidStride, type ClusterArrays } from '../index/wave/cluster-codec.js';
import { encodeMoments } from '../index/wave/moment-code.js';
import { ClusterIndex, PROBE, PROBE_ESTIMATED, RADIUS_SHARE, SPREAD, type ClusterRanking } from '../index/wave/cluster-index.js';
import { Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { words } from './wave-gpu-heads.js';
import { cardName, saveDeviceResult, requireDevice } from './device-results.js';

export const TOL = { out: 1e-4, lse: 1e-4 };

/** The device's answer against the host's: per q head, out's relative L2 error and lse's relative error (max over heads); Infinity where one lse is -Infinity and the other is not. */
export function answerDiff(gpu: { out: Float32Array; lse: Float32Array }, out: Float32Array, lse: Float32Array, qHeads: number, d: number): { outRel: number; lseRel: number } {
  let outRel = 0, lseRel = 0;
  for (let r = 0; r < qHeads; r++) {
    if (lse[r] === -Infinity || gpu.lse[r] === -Infinity) {
      if (lse[r] !== gpu.lse[r]) lseRel = Infinity;
      continue;
    }
    lseRel = Math.max(lseRel, Math.abs(gpu.lse[r] - lse[r]) / Math.max(1, Math.abs(lse[r])));
    let diff = 0, norm = 0;
    for (let j = 0; j < d; j++) (diff += (gpu.out[r * d + j] - out[r * d + j]) ** 2), (norm += out[r * d + j] ** 2);
    outRel = Math.max(outRel, Math.sqrt(diff) / Math.max(Math.sqrt(norm), 1e-30));
  }
  return { outRel, lseRel };
}

/** The GPU step's ranking for the host's: index/wave's constants. */
export const gpuRanking = (r: ClusterRanking): WaveGpuRanking =>
  r === 'spread' ? { kind: 'spread', spread: SPREAD } : { kind: 'radius', radiusShare: RADIUS_SHARE };

/** Sinks and window rows of a context of n tokens. */
export function staticRows(n: number, sinks: number, window: number): Int32Array {
  const rows = new Set<number>();
  for (let t = 0; t < Math.min(sinks, n); t++) rows.add(t);
  for (let t = Math.max(0, n - window); t < n; t++) rows.add(t);
  return Int32Array.from(rows);
}

/** q rows near a random key of their kv head (spiky attention, as decoding sees). */
export function queries(rng: Rng, keyRow: (h: number, t: number) => Float32Array, H: number, tokens: number, d: number, G: number): Float32Array {
  const q = new Float32Array(H * G * d);
  for (let h = 0; h < H; h++)
    for (let g = 0; g < G; g++) {
      const k = keyRow(h, rng.int(tokens));
      for (let j = 0; j < d; j++) q[(h * G + g) * d + j] = 1.5 * k[j] + rng.normal();
    }
  return q;
}

export interface CompareResult {
  /** Heads whose ids differ from searchHeads' (as sets: the GPU returns them in cluster order). */
  idsDiffer: number;
  firstDiff?: string;
  scannedEqual: boolean;
  /** Max over q heads of ||out_gpu - out_cpu|| / ||out_cpu||. */
  outRel: number;
  /** Max over q heads of |lse_gpu - lse_cpu| / max(1, |lse_cpu|) (0 where both are -Infinity). */
  lseRel: number;
  estimatedEqual: boolean;
  /** Min over heads of |gpu ∩ host| / |gpu ∪ host| of the ids (1 where both are empty). */
  idsOverlap: number;
  ok: boolean;
}

/**
 * The GPU step against searchHeads + estimateClusters on the same heads and
 * query: with 'spread' the host's default path (second-order estimate), with
 * 'radius' the older one (first order). own: the reference is the host's
 * estimate and float64 attention over the GPU's own selection (its ids),
 * not the host's search: for a path whose scores are not the host's bit for
 * bit (native/cuda/wave_score_mma.cuh), where a cluster at the cut may fall
 * the other side of it; its ids against the host's are in idsOverlap.
 */
export async function compare(heads: ClusterIndex[], gpu: WaveGpuStepResult, q: Float32Array, G: number, d: number, dt: KvDtype,
                              scale: number, budget: number[], exact: Int32Array, ranking: ClusterRanking, rest: 'rows' | 'moments' = 'rows',
                              attended?: { keys: Uint16Array[]; values: Uint16Array[] }, filter?: KeptFilter, own = false): Promise<CompareResult> {
  const host = (await ClusterIndex.searchHeads(heads, q, G, budget, ranking)).map((r, h) => (filter ? { ...r, ids: keptIds(r.ids, filter, h) } : r));
  let idsDiffer = 0, firstDiff: string | undefined, idsOverlap = 1;
  const gpuIds = gpu.ids;
  if (!gpuIds) throw new Error('compare needs the step\'s ids (ids: true)');
  const cpu = own ? host.map((r, h) => ({ ...r, ids: Int32Array.from(gpuIds[h]) })) : host;
  heads.forEach((_, h) => {
    const a = Array.from(gpuIds[h]).sort((x, y) => x - y), b = Array.from(host[h].ids).sort((x, y) => x - y);
    const inB = new Set(b), both = a.filter((x) => inB.has(x)).length;
    idsOverlap = Math.min(idsOverlap, a.length + b.length === 0 ? 1 : both / (a.length + b.length - both));
    if (a.length !== b.length || a.some((x, i) => x !== b[i])) {
      idsDiffer++;
      const at = a.findIndex((x, i) => x !== b[i]);
      firstDiff ??= `head ${h}: gpu ${a.length} ids, cpu ${b.length}; first difference at ${at}: ${a[at]} vs ${b[at]}`;
    }
  });
  const scannedEqual = heads.every((_, h) => gpu.scanned[h] === host[h].scanned);
  const qHeads = heads.length * G;
  const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(heads.length);
  const segment = heads.map((h, i) => h.estimateArgs(Int32Array.from([...cpu[i].ids, ...exact]), ranking === 'radius' ? 'first' : rest));
  await estimateClusters({ q, qHeads, kvHeads: heads.length, headDim: d, centroidStride: centroidStride(d), dtype: dt, scale, segments: [segment], out, lse, estimated });
  if (attended) mergeAttended(out, lse, q, G, d, dt, scale, heads.map((_, h) => Int32Array.from(new Set([...cpu[h].ids, ...exact]))), attended);
  const { outRel, lseRel } = answerDiff(gpu, out, lse, qHeads, d);
  const estimatedEqual = heads.every((_, h) => gpu.estimated[h] === estimated[h]);
  const ok = idsDiffer === 0 && scannedEqual && outRel <= TOL.out && lseRel <= TOL.lse && estimatedEqual;
  return { idsDiffer, firstDiff, scannedEqual, outRel, lseRel, estimatedEqual, idsOverlap, ok };
}

/** The GPU step's skip and keep, as staticPlusRetrieved applies them to a search's ids. */
export interface KeptFilter {
  skip: [number, number][];
  keep: number[];
}
function keptIds(ids: Int32Array, f: KeptFilter, h: number): Int32Array {
  const out: number[] = [];
  for (const id of ids) if (out.length < f.keep[h] && !f.skip.some(([lo, hi]) => id >= lo && id < hi)) out.push(id);
  return Int32Array.from(out);
}

/**
 * Float64 attention of each q head over its kv head's rows (each once),
 * merged by log-sum-exp into (out, lse): what the GPU step's `attend` adds
 * to the estimate.
 */
export function mergeAttended(out: Float32Array, lse: Float32Array, q: Float32Array, G: number, d: number, dt: KvDtype, scale: number,
                       rows: Int32Array[], kv: { keys: Uint16Array[]; values: Uint16Array[] }): void {
  const widen = (w: Uint16Array, t: number) => {
    const f = new Float32Array(d);
    convert(bytesOf(w.subarray(t * d, (t + 1) * d)), dt, bytesOf(f), 'f32', d);
    return f;
  };
  rows.forEach((ts, h) => {
    const ks = Array.from(ts, (t) => widen(kv.keys[h], t)), vs = Array.from(ts, (t) => widen(kv.values[h], t));
    for (let g = 0; g < G; g++) {
      const r = h * G + g;
      const logits = ks.map((k) => {
        let dot = 0;
        for (let j = 0; j < d; j++) dot += q[r * d + j] * k[j];
        return scale * dot;
      });
      if (!logits.length) continue;
      const m = Math.max(...logits);
      let den = 0;
      const num = new Float64Array(d);
      logits.forEach((l, i) => {
        const e = Math.exp(l - m);
        den += e;
        for (let j = 0; j < d; j++) num[j] += e * vs[i][j];
      });
      const lseA = m + Math.log(den), lseE = lse[r];
      const all = lseE === -Infinity ? lseA : Math.max(lseA, lseE) + Math.log1p(Math.exp(-Math.abs(lseA - lseE)));
      const wa = Math.exp(lseA - all), we = lseE === -Infinity ? 0 : Math.exp(lseE - all);
      for (let j = 0; j < d; j++) out[r * d + j] = (wa * num[j]) / den + we * out[r * d + j];
      lse[r] = all;
    }
  });
}

export interface WaveCase {
  dt: KvDtype;
  kvHeads: number;
  G: number;
  d: number;
  tokens: number;
  clusterSize: number;
  budget: number[];
  sinks: number;
  window: number;
  scale: number;
  /** Keys drawn from this many distinct rows: scores tie, clusters and candidates alike (the cut's order by index). */
  distinctKeys?: number;
}

/** Odd sizes: d % 16 == 8, groups above the kernels' 4, uneven budgets, budgets past the context, several k-means segments. */
export function waveCases(): WaveCase[] {
  return [
    { dt: 'f16', kvHeads: 3, G: 3, d: 40, tokens: 20011, clusterSize: 8, budget: [97, 13, 401], sinks: 5, window: 17, scale: 0.3 },
    { dt: 'bf16', kvHeads: 2, G: 4, d: 128, tokens: 12345, clusterSize: 5, budget: [250, 251], sinks: 16, window: 64, scale: 1 / Math.sqrt(128) },
    { dt: 'bf16', kvHeads: 2, G: 5, d: 24, tokens: 9001, clusterSize: 16, budget: [123, 77], sinks: 3, window: 0, scale: 0.5 },
    { dt: 'f16', kvHeads: 4, G: 2, d: 128, tokens: 70001, clusterSize: 8, budget: [1401, 1401, 1401, 1401], sinks: 16, window: 64, scale: 1 / Math.sqrt(128) },
    { dt: 'f16', kvHeads: 1, G: 1, d: 64, tokens: 3001, clusterSize: 8, budget: [3001], sinks: 16, window: 64, scale: 0.125 },
    { dt: 'f16', kvHeads: 2, G: 2, d: 32, tokens: 6007, clusterSize: 8, budget: [301, 999], sinks: 4, window: 8, scale: 0.25, distinctKeys: 5 },
  ];
}

export const caseName = (c: WaveCase) => `${c.dt} d=${c.d} kv=${c.kvHeads} G=${c.G} N=${c.tokens} cluster=${c.clusterSize} budget=${c.budget.join('/')}`;

// ---------------------------------------------------------------- benchmark

export interface BenchConfig {
  tokens: number;
  kvHeads: number;
  G: number;
  d: number;
  clusterSize: number;
  budgetShare: number;
  sinks: number;
  window: number;
  steps: number;
  /** The engine's call timed again at each of these probes (candidates = probe × budget; a session's ef). */
  probes: number[];
}

/**
 * One kv head at scale: clusters of exactly `size` tokens inside 8K segments,
 * keys around their centres. The noise and the values are shared by the heads
 * (`shared`, drawn once): only the centres and the membership differ. Each
 * cluster's radius and per-channel variance are its members' around the
 * centre; its axis is the farthest member's offset scaled by the members'
 * standard deviation along it (the builder's power iteration starts there:
 * cheaper at 1M tokens, and the check compares GPU and host on the same
 * arrays either way).
 */
export function syntheticHead(rng: Rng, N: number, d: number, size: number, dt: KvDtype, shared: { noise: Float32Array; values: Uint16Array; scratch: Float32Array }): { head: WaveGpuHead; arrays: ClusterArrays } {
  const C = N / size, stride = centroidStride(d), seg = 8192;
  const tokenCluster = new Int32Array(N);
  const perm = Int32Array.from({ length: seg }, (_, i) => i);
  for (let t0 = 0; t0 < N; t0 += seg) {
    for (let i = seg - 1; i > 0; i--) {
      const j = rng.int(i + 1), x = perm[i];
      (perm[i] = perm[j]), (perm[j] = x);
    }
    for (let i = 0; i < seg && t0 + i < N; i++) tokenCluster[t0 + i] = ((t0 + perm[i]) / size) | 0;
  }
  const centres = new Float32Array(C * stride), means = new Float32Array(C * d);
  for (let c = 0; c < C; c++)
    for (let j = 0; j < d; j++) (centres[c * stride + j] = rng.normal()), (means[c * d + j] = 0.3 * rng.normal());
  const keysF = shared.scratch, noise = shared.noise;
  const vars = new Float32Array(C * d), axes = new Float32Array(C * d), far = new Int32Array(C).fill(-1), farSq = new Float64Array(C);
  for (let t = 0; t < N; t++) {
    const c = tokenCluster[t], r = t * d;
    let sq = 0;
    for (let j = 0; j < d; j++) {
      const x = noise[r + j];
      keysF[r + j] = centres[c * stride + j] + x;
      vars[c * d + j] += (x * x) / size;
      sq += x * x;
    }
    if (sq > farSq[c]) (farSq[c] = sq), (far[c] = t);
  }
  const along = new Float64Array(C);
  for (let t = 0; t < N; t++) {
    const c = tokenCluster[t], f = far[c];
    let dot = 0;
    for (let j = 0; j < d; j++) dot += noise[t * d + j] * noise[f * d + j];
    along[c] += (dot * dot) / farSq[c] / size;
  }
  for (let c = 0; c < C; c++) {
    const norm = Math.sqrt(farSq[c]), sd = Math.sqrt(along[c]);
    centres[c * stride + d] = norm;
    for (let j = 0; j < d; j++) axes[c * d + j] = norm > 0 ? (sd * noise[far[c] * d + j]) / norm : 0;
  }
  // varianceShare 1: the whole second-order term (a built artifact calibrates
  // its own). Asserted rather than annotated: the field is new in the codec.
  const arrays = {
    tokens: N, headDim: d, clusterSize: size, dtype: dt,
    centroids: words(centres, dt), valueMeans: words(means, dt), ...encodeMoments(axes, vars, C, d), varianceShare: 1,
    counts: new Int32Array(C).fill(size), tokenCluster,
  } as ClusterArrays;
  const head = { centroids: arrays.centroids, valueMeans: arrays.valueMeans, keyAxes: arrays.keyAxes, axisScales: arrays.axisScales,
    keyVars: arrays.keyVars, varScales: arrays.varScales, varianceShare: 1,
    counts: arrays.counts, tokenCluster, keys: words(keysF, dt), values: shared.values };
  return { head, arrays };
}

/** Row t of a head's keys, widened. */
export function keyRows(heads: WaveGpuHead[], d: number, dt: KvDtype): (h: number, t: number) => Float32Array {
  return (h, t) => {
    const out = new Float32Array(d);
    convert(bytesOf(heads[h].keys.subarray(t * d, (t + 1) * d)), dt, bytesOf(out), 'f32', d);
    return out;
  };
}

const p = (xs: number[], q: number) => quantile(xs, q);

/** The bench's layer on the device and its steps (shared by the bench and the profile). */
export async function benchSetup(cfg: BenchConfig, log: (s: string) => void) {
  const { tokens: N, kvHeads: H, G, d } = cfg, dt: KvDtype = 'f16';
  const rng = new Rng(20260513);
  const t0 = performance.now();
  const noise = new Float32Array(N * d);
  for (let i = 0; i < noise.length; i++) noise[i] = 0.5 * rng.normal();
  const shared = { noise, values: words(noise, dt), scratch: new Float32Array(N * d) };
  const built = Array.from({ length: H }, () => syntheticHead(rng, N, d, cfg.clusterSize, dt, shared));
  log(`data: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const t1 = performance.now();
  const store = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: built.map((b) => b.head) });
  log(`upload: ${((performance.now() - t1) / 1000).toFixed(1)} s`);
  const budget = Math.ceil(cfg.budgetShare * N), exact = staticRows(N, cfg.sinks, cfg.window), scale = 1 / Math.sqrt(d);
  const budgets = new Array<number>(H).fill(budget);
  const keyRow = keyRows(built.map((b) => b.head), d, dt);
  const qs = Array.from({ length: cfg.steps + 5 }, () => queries(rng, keyRow, H, N, d, G));
  // lean: as the engine calls it (engine/cache/device-wave.ts stepDocument): the budget searched for past the sinks
  // and window, which are dropped from the kept ids (skip) and attended through `exact`; ids left on the device, no
  // stage times.
  const skip: [number, number][] = [[0, Math.min(cfg.sinks, N)], [Math.max(0, N - cfg.window), N]];
  const leanArgs = { budget: budgets.map((k) => k + exact.length), keep: budgets, skip, ids: false, stages: false };
  const step = (q: Float32Array, estimate = true, ranking: ClusterRanking = 'spread', attend = false, lean = false, probe = PROBE, graph = true) =>
    store.step({ q, qHeads: H * G, scale, budget: budgets, probe, ranking: gpuRanking(ranking), exact, estimate, attend,
      ...(lean && leanArgs), graph });
  return { N, H, G, d, dt, built, store, budget, budgets, exact, scale, qs, step };
}

/** The engine's call launched one by one, `cfg.steps` times after 2 warm-ups: for ncu (each kernel its own launch). */
async function profileSteps(cfg: BenchConfig, log: (s: string) => void): Promise<void> {
  const { store, qs, step } = await benchSetup(cfg, log);
  for (let i = 0; i < cfg.steps + 2; i++) await step(qs[i % qs.length], true, 'spread', true, true, PROBE_ESTIMATED, false);
  store.close();
}

async function runBench(cfg: BenchConfig, log: (s: string) => void) {
  const { N, H, G, d, dt, built, store, budget, budgets, exact, scale, qs, step } = await benchSetup(cfg, log);
  for (let i = 0; i < 5; i++) await step(qs[i]);
  const ms: number[] = [], wall: number[] = [], stages: Record<string, number[]> = {}, host: Record<string, number[]> = {};
  for (let i = 0; i < cfg.steps; i++) {
    const w0 = performance.now();
    const r = await step(qs[5 + i]);
    wall.push(performance.now() - w0);
    ms.push(r.ms);
    for (const [k, v] of Object.entries(r.stages)) (stages[k] ??= []).push(v);
    for (const [k, v] of Object.entries(r.host)) (host[k] ??= []).push(v);
  }
  const msSel: number[] = [], msRadius: number[] = [];
  for (let i = 0; i < cfg.steps; i++) msSel.push((await step(qs[5 + i], false)).ms);
  for (let i = 0; i < cfg.steps; i++) msRadius.push((await step(qs[5 + i], true, 'radius')).ms);
  const msAttend: number[] = [], attendStages: Record<string, number[]> = {};
  for (let i = 0; i < cfg.steps; i++) {
    const r = await step(qs[5 + i], true, 'spread', true);
    msAttend.push(r.ms);
    for (const [k, v] of Object.entries(r.stages)) (attendStages[k] ??= []).push(v);
  }
  // The engine's call: with attention, ids and stage times off; its host wall time against the device's.
  // Replayed from its CUDA graph (the default) and launched one by one, alternated step by step.
  const leanWall: number[] = [], leanMs: number[] = [], leanHost: Record<string, number[]> = {};
  const ungraphedWall: number[] = [], ungraphedMs: number[] = [], ungraphedHost: Record<string, number[]> = {};
  for (let i = 0; i < cfg.steps; i++)
    for (const graph of i % 2 ? [false, true] : [true, false]) {
      const w0 = performance.now();
      const r = await step(qs[5 + i], true, 'spread', true, true, PROBE_ESTIMATED, graph);
      (graph ? leanWall : ungraphedWall).push(performance.now() - w0);
      (graph ? leanMs : ungraphedMs).push(r.ms);
      for (const [k, v] of Object.entries(r.host)) ((graph ? leanHost : ungraphedHost)[k] ??= []).push(v);
    }
  // The engine's call at other probes (fewer candidates rescored: bench/results/fidelity-131072-cs16-probes.md).
  const byProbe: { probe: number; deviceMs: { p50: number; p90: number }; hostWallMs: { p50: number } }[] = [];
  for (const probe of cfg.probes) {
    const dev: number[] = [], wallP: number[] = [];
    for (let i = 0; i < cfg.steps; i++) {
      const w0 = performance.now();
      const r = await step(qs[5 + i], true, 'spread', true, true, probe);
      wallP.push(performance.now() - w0);
      dev.push(r.ms);
    }
    byProbe.push({ probe, deviceMs: { p50: p(dev, 0.5), p90: p(dev, 0.9) }, hostWallMs: { p50: p(wallP, 0.5) } });
  }
  // One step against the host's default path, at full size.
  const heads = built.map((b) => new ClusterIndex(b.arrays, b.head.keys, b.head.values));
  const last = await step(qs[5]);
  const check = await compare(heads, last, qs[5], G, d, dt, scale, budgets, exact, 'spread');
  const kv = { keys: built.map((b) => b.head.keys), values: built.map((b) => b.head.values) };
  const checkAttend = await compare(heads, await step(qs[5], true, 'spread', true), qs[5], G, d, dt, scale, budgets, exact, 'spread', 'rows', kv);
  const bytes = store.bytes();
  store.close();
  const kvBytes = 2 * H * N * d * 2;
  const poolBytes = H * (budget + exact.length) * d * 2 * 2;
  const info = cudaAvailable();
  const result = {
    device: deviceName(info),
    config: { ...cfg, dtype: dt, budget, probe: PROBE, spread: SPREAD, clustersPerHead: N / cfg.clusterSize, candidatesPerHead: PROBE * budget },
    stepMs: { p50: p(ms, 0.5), p90: p(ms, 0.9), p99: p(ms, 0.99), min: Math.min(...ms) },
    selectionOnlyMs: { p50: p(msSel, 0.5), p90: p(msSel, 0.9) },
    radiusRankingMs: { p50: p(msRadius, 0.5), p90: p(msRadius, 0.9) },
    withAttentionMs: { p50: p(msAttend, 0.5), p90: p(msAttend, 0.9) },
    withAttentionStagesP50Ms: Object.fromEntries(Object.entries(attendStages).map(([k, v]) => [k, p(v, 0.5)])),
    hostWallMs: { p50: p(wall, 0.5), p90: p(wall, 0.9) },
    hostStagesP50Ms: Object.fromEntries(Object.entries(host).map(([k, v]) => [k, p(v, 0.5)])),
    engineCall: {
      deviceMs: { p50: p(leanMs, 0.5), p90: p(leanMs, 0.9) },
      hostWallMs: { p50: p(leanWall, 0.5), p90: p(leanWall, 0.9) },
      hostStagesP50Ms: Object.fromEntries(Object.entries(leanHost).map(([k, v]) => [k, p(v, 0.5)])),
      ungraphed: {
        deviceMs: { p50: p(ungraphedMs, 0.5), p90: p(ungraphedMs, 0.9) },
        hostWallMs: { p50: p(ungraphedWall, 0.5), p90: p(ungraphedWall, 0.9) },
        hostStagesP50Ms: Object.fromEntries(Object.entries(ungraphedHost).map(([k, v]) => [k, p(v, 0.5)])),
      },
    },
    byProbe,
    stagesP50Ms: Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, p(v, 0.5)])),
    memory: {
      summariesBytes: bytes.summaries, momentsBytes: bytes.moments, layerKvBytes: kvBytes, summariesShare: bytes.summaries / kvBytes,
      poolBytesForBudget: poolBytes, summariesPlusPoolShare: (bytes.summaries + poolBytes) / kvBytes,
      deviceKvHeldBytes: bytes.kv, scratchBytes: bytes.scratch,
    },
    checkAtScale: check,
    checkAtScaleWithAttention: checkAttend,
    targets: { stepMs: 0.5, summariesPlusPoolShare: 0.2 },
  };
  return result;
}

function markdown(r: Awaited<ReturnType<typeof runBench>>): string {
  const c = r.config, m = r.memory, pct = (x: number) => `${(100 * x).toFixed(1)}%`, f = (x: number) => x.toFixed(3);
  const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`, mib = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;
  return [
    `# Wave step on the GPU (${r.device})`,
    '',
    `One layer-step of \`wave\` in one native call (addon/wave-gpu.ts): ${c.tokens} tokens per kv head, ${c.kvHeads} kv heads × ${c.G} q heads, d=${c.d}, ${c.dtype}, ` +
      `clusters of ${c.clusterSize} (${c.clustersPerHead} per head), budget ${c.budget} tokens (${pct(c.budgetShare)}), probe ${c.probe} (${c.candidatesPerHead} candidates per head rescored), ` +
      `sinks ${c.sinks}, window ${c.window}; clusters ranked by ${c.spread} standard deviations of their logits along q, second-order estimate (the host's default path); ` +
      `${c.steps} timed steps, each a fresh query. Generated by \`node dist/bench/wave-gpu.js --bench\`.`,
    '',
    '| measure | p50 ms | p90 ms |',
    '| --- | ---: | ---: |',
    `| **the layer-step: selection, estimate and the exact rows attended from the device's K/V (attend)** | **${f(r.withAttentionMs.p50)}** | ${f(r.withAttentionMs.p90)} |`,
    `| selection and estimate (inputs in → outputs out, CUDA events) | ${f(r.stepMs.p50)} | ${f(r.stepMs.p90)} |`,
    `| the same without the estimate (selection only) | ${f(r.selectionOnlyMs.p50)} | ${f(r.selectionOnlyMs.p90)} |`,
    `| the older step: radius ranking, first-order estimate | ${f(r.radiusRankingMs.p50)} | ${f(r.radiusRankingMs.p90)} |`,
    `| host wall time around the await (N-API, worker thread) | ${f(r.hostWallMs.p50)} | ${f(r.hostWallMs.p90)} |`,
    `| the engine's call (attend, ids left on the device, no stage times, probe ${PROBE_ESTIMATED} as where a layer estimates): on the device | ${f(r.engineCall.deviceMs.p50)} | ${f(r.engineCall.deviceMs.p90)} |`,
    `| the engine's call: host wall time around the await | ${f(r.engineCall.hostWallMs.p50)} | ${f(r.engineCall.hostWallMs.p90)} |`,
    `| the engine's call launched one by one (graph: false, alternated with the above): on the device | ${f(r.engineCall.ungraphed.deviceMs.p50)} | ${f(r.engineCall.ungraphed.deviceMs.p90)} |`,
    `| the same: host wall time around the await | ${f(r.engineCall.ungraphed.hostWallMs.p50)} | ${f(r.engineCall.ungraphed.hostWallMs.p90)} |`,
    '',
    'Host stages (p50 ms) of the selection-and-estimate step: ' + Object.entries(r.hostStagesP50Ms).map(([k, v]) => `${k} ${f(v)}`).join(', ') +
      ' (parse: the arguments read, before the hop; queue: the call to the work\'s start on a worker thread; prep: the inputs laid out; launch: every launch issued; wait: the stream; ' +
      'copy: the outputs read back; back: the work\'s end to the answer\'s writing on the event loop; convert: the answer written). The engine\'s call: ' +
      Object.entries(r.engineCall.hostStagesP50Ms).map(([k, v]) => `${k} ${f(v)}`).join(', ') + '; launched one by one: ' +
      Object.entries(r.engineCall.ungraphed.hostStagesP50Ms).map(([k, v]) => `${k} ${f(v)}`).join(', ') + '.',
    '',
    ...(r.byProbe.length ? [
      `The engine's call by probe (candidates rescored = probe × budget; ${c.probe} without the estimate, ${PROBE_ESTIMATED} with it, by default; a session sets it through ef): ` +
        r.byProbe.map((b) => `probe ${b.probe}: ${f(b.deviceMs.p50)} ms on the device (p90 ${f(b.deviceMs.p90)}), ${f(b.hostWallMs.p50)} host wall`).join('; ') + '.',
      '',
    ] : []),
    'Stages (p50 ms) of the layer-step: ' + Object.entries(r.withAttentionStagesP50Ms).map(([k, v]) => `${k} ${f(v)}`).join(', ') +
      ' (tiles: the estimate\'s cluster tiles and the attended rows\' tiles).',
    '',
    '| memory | bytes | share of the layer\'s K/V |',
    '| --- | ---: | ---: |',
    `| layer K/V (f16) | ${gib(m.layerKvBytes)} | 100% |`,
    `| summaries on the device (centroids+radius, value means, key axes and variances, counts, members, token→cluster) | ${mib(m.summariesBytes)} | ${pct(m.summariesShare)} |`,
    `| of which key axes and variances (the spread ranking, the second-order estimate) | ${mib(m.momentsBytes)} | ${pct(m.momentsBytes / m.layerKvBytes)} |`,
    `| summaries + a pool holding the budget, sinks and window | ${mib(m.summariesBytes + m.poolBytesForBudget)} | ${pct(m.summariesPlusPoolShare)} |`,
    `| K and V held for this measurement (rescoring, exact rows) | ${gib(m.deviceKvHeldBytes)} | 100% |`,
    `| per-step scratch | ${mib(m.scratchBytes)} | ${pct(m.scratchBytes / m.layerKvBytes)} |`,
    '',
    `Check at full size against the host's default path (ClusterIndex.searchHeads, ranking 'spread', + estimateClusters, second order): heads with different ids ${r.checkAtScale.idsDiffer}, ` +
      `out max rel ${r.checkAtScale.outRel.toExponential(1)}, lse max rel ${r.checkAtScale.lseRel.toExponential(1)}, estimated equal ${r.checkAtScale.estimatedEqual}; ` +
      `the layer-step (attend) against the same estimate merged with float64 attention over the same rows: out max rel ${r.checkAtScaleWithAttention.outRel.toExponential(1)}, ` +
      `lse max rel ${r.checkAtScaleWithAttention.lseRel.toExponential(1)}.`,
    '',
    `Targets (issue #13): a wave step ≤ ${r.targets.stepMs} ms; summaries + pool ≤ ${pct(r.targets.summariesPlusPoolShare)} of K/V.`,
    '',
  ].join('\n');
}

async function main() {
  const args = process.argv.slice(2);
  const all = !args.includes('--check') && !args.includes('--bench') && !args.includes('--profile');
  const steps = args.includes('--steps') ? Number(args[args.indexOf('--steps') + 1]) : 50;
  const info = requireDevice();
  let failed = 0;
  if (all || args.includes('--check')) {
    let seed = Date.now() % 1_000_000;
    // Loaded here, not at the top: the check imports this module's helpers.
    const { checkWaveCase } = await import('./wave-gpu-check.js');
    for (const c of waveCases()) {
      const both = await checkWaveCase(c, seed++);
      for (const [ranking, r] of Object.entries(both)) {
        if (!r.ok) failed++;
        console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${ranking} ${caseName(c)}: idsDiffer ${r.idsDiffer} scanned ${r.scannedEqual} out ${r.outRel.toExponential(2)} lse ${r.lseRel.toExponential(2)} estimated ${r.estimatedEqual} ${r.ms.toFixed(3)} ms${r.firstDiff ? ` (${r.firstDiff})` : ''}${r.leanFailed ? `; lean: ${r.leanFailed}` : ''}${r.pathsSame === false ? '; graph, replay and one by one answer otherwise' : ''}`);
      }
    }
  }
  const opt = (name: string) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
  // The layer's shape: the issue's (d=128, 2% budget, window 64) unless --head-dim, --budget-share or
  // --window say otherwise (llama3.2-1b's decode: --head-dim 64 --budget-share 0.01 --window 256).
  const shape = { d: Number(opt('--head-dim') ?? 128), budgetShare: Number(opt('--budget-share') ?? 0.02), window: Number(opt('--window') ?? 64) };
  if (args.includes('--profile'))
    await profileSteps({ tokens: 1 << 20, kvHeads: 8, G: 4, clusterSize: Number(opt('--cluster-size') ?? 16), sinks: 16, steps, probes: [], ...shape }, console.log);
  if (all || args.includes('--bench')) {
    const clusterSize = Number(opt('--cluster-size') ?? 8);
    const probes = (opt('--probes') ?? '').split(',').filter(Boolean).map(Number);
    const r = await runBench({ tokens: 1 << 20, kvHeads: 8, G: 4, clusterSize, sinks: 16, steps, probes, ...shape }, console.log);
    const md = markdown(r);
    console.log(JSON.stringify(r, null, 2));
    console.log(md);
    const tag = opt('--tag');
    saveDeviceResult(`wave-gpu-${cardName(info.device)}${clusterSize === 8 ? '' : `-cs${clusterSize}`}${tag ? `-${tag}` : ''}`, r, md);
  }
  process.exit(failed ? 1 : 0);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) main().catch((e) => {
  console.error(e);
  process.exit(1);
});
