// The paged wave store (WaveStoreConfig::cacheRows > 0, native/cuda/
// wave_cache.cuh) against the dense one: K and V in pinned host memory and a
// device row cache instead of the layer's K/V on the device (issue #13: "GPU
// memory for the layer ≤ 20% of its K/V; ≤ 2 MiB host→device per step after
// the first 16 steps"). Needs a CUDA device.
//
//   node dist/bench/wave-gpu-paged.js [--check] [--bench] [--kernels [--thp]] [--steps N] [--cluster-size 16] [--probe 4] [--caches 1,2,4] [--stays 0.9,1] [--tag T]
//
// --check: on the small cases of bench/wave-gpu.ts (random keys clustered by
// the real builder), a dense and a paged store of the same heads, the paged
// one's cache exactly the bound of the steps' rows (waveCacheRowsBound), so
// that drifting queries make it evict: over 24 steps the paged answers equal
// the dense ones (ids and counts exactly; out and lse within 1e-6 relative,
// the dense store's own call-to-call spread: its touched clusters are listed
// in atomic order) and the host's (compare(), float64, on the first and last
// step); a step repeated unchanged copies nothing (bytesIn 0); a step whose
// rows exceed the cache rejects and the store answers the next one right.
// Half the steps run graphed, half launched one by one. Every case on the
// plain path (the host's ids bit for bit) and on the default one (every
// tensor-core path on: the host within TOL over the step's own ids).
//
// --bench: one layer at 1M tokens, 8 kv heads x 4 q heads, d=128, f16,
// clusters of 16 (bench/wave-gpu.ts's synthetic layer), budget 2%, sinks 16,
// window 64, the engine's call (attend, ids left on the device, graph) at
// probe 4, with drifting decode queries (the generator's knobs: the target
// row stays with topicStay, the noise is AR(1) with its drift; --stays runs
// each regime apart: the generator's 0.9, and 1, drift alone). Dense and
// paged stores (cache = bound x each --caches factor) alternate step by step
// in one sitting: device ms and host wall p50, answers against the dense
// store's, device bytes (summaries, cache) as a share of the layer's K/V, and
// host-to-device MiB per step over steps 16+ (mean, p99, max).
// Results: bench/results/wave-gpu-paged-<card>.{json,md} (also $OUT when set).
//
// --kernels: the same layer and call; per cache factor one paged store
// (every other pair of steps launched one by one with the cache kernels' CUDA
// events: need, allocate, copy), every answer against the dense store's bit
// for bit; engine call p50 and each kernel's p50 a store:
// bench/results/wave-gpu-paged-kernels-<card>-*. (Until the legacy cache
// kernels were removed this was --ab, which alternated them with these:
// bench/results/wave-gpu-paged-ab-*.)
// --thp: each cache also a store whose pinned host copy asked for huge pages
// (KVRECALL_WAVE_HOST_THP=1: fewer translations for the random row reads).
import { pathToFileURL } from 'node:url';
import { cudaAvailable, deviceName } from '../addon/cuda.js';
import type { KvDtype } from '../addon/kernels.js';
import { WaveGpuStore, waveCacheRowsBound, type WaveGpuStepArgs, type WaveGpuStepResult } from '../addon/wave-gpu.js';
import { PROBE, PROBE_ESTIMATED } from '../index/wave/cluster-index.js';
import { defaultKnobs, Rng } from '../workload/index.js';
import { strFlag } from './args.js';
import { quantile } from './stats.js';
import { caseHeads, words } from './wave-gpu-heads.js';
import { caseName, compare, gpuRanking, keyRows, staticRows, syntheticHead, TOL, waveCases, type KeptFilter, type WaveCase } from './wave-gpu.js';
import { MIN_OVERLAP, type PathName, withPath } from './wave-paths.js';
import { cardName, saveDeviceResult, requireDevice } from './device-results.js';

/**
 * Decode queries that drift as the generator's do (workload/queries.ts): per
 * kv head a target row that stays with probability topicStay, else moves to a
 * random row (every head's at the steps in `jumps`); each q head 1.5 × the
 * target's key plus AR(1) noise (drift ρ, unit variance).
 */
export function driftingQueries(rng: Rng, keyRow: (h: number, t: number) => Float32Array, H: number, N: number, d: number, G: number, steps: number,
                                jumps: number[] = [], topicStay?: number): Float32Array[] {
  const k = defaultKnobs(N, topicStay === undefined ? {} : { topicStay }), rho = k.drift, innov = Math.sqrt(1 - rho * rho);
  const target = Int32Array.from({ length: H }, () => rng.int(N));
  const noise = Array.from({ length: H * G }, () => Float32Array.from({ length: d }, () => rng.normal()));
  const out: Float32Array[] = [];
  for (let s = 0; s < steps; s++) {
    const q = new Float32Array(H * G * d);
    for (let h = 0; h < H; h++) {
      if (s > 0 && (rng.next() >= k.topicStay || jumps.includes(s))) target[h] = rng.int(N);
      const key = keyRow(h, target[h]);
      for (let g = 0; g < G; g++) {
        const x = noise[h * G + g];
        for (let j = 0; j < d; j++) {
          if (s > 0) x[j] = rho * x[j] + innov * rng.normal();
          q[(h * G + g) * d + j] = 1.5 * key[j] + x[j];
        }
      }
    }
    out.push(q);
  }
  return out;
}

const bits = (a: Float32Array, b: Float32Array) => a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
const close = (a: Float32Array, b: Float32Array, tol: number) =>
  a.length === b.length && a.every((x, i) => x === b[i] || Math.abs(x - b[i]) <= tol * Math.max(1, Math.abs(b[i])));

/** The paged step's answer against the dense one's: exactly the same ids and counts, out/lse bit for bit or within `tol`. */
export function sameAnswer(paged: WaveGpuStepResult, dense: WaveGpuStepResult, tol = 1e-6): { same: boolean; bitwise: boolean; why?: string } {
  const eq = (a: number[], b: number[]) => a.length === b.length && a.every((x, i) => x === b[i]);
  if (!eq(paged.kept, dense.kept)) return { same: false, bitwise: false, why: `kept ${paged.kept} vs ${dense.kept}` };
  if (!eq(paged.scanned, dense.scanned)) return { same: false, bitwise: false, why: 'scanned' };
  if (!eq(paged.estimated, dense.estimated)) return { same: false, bitwise: false, why: 'estimated' };
  if ((paged.ids === undefined) !== (dense.ids === undefined)) return { same: false, bitwise: false, why: 'ids asked of one only' };
  if (paged.ids && dense.ids) {
    const di = dense.ids;
    const h = paged.ids.findIndex((x, i) => x.length !== di[i].length || x.some((v, j) => v !== di[i][j]));
    if (h >= 0) return { same: false, bitwise: false, why: `head ${h}'s ids` };
  }
  const bitwise = bits(paged.out, dense.out) && bits(paged.lse, dense.lse);
  const same = bitwise || (close(paged.out, dense.out, tol) && close(paged.lse, dense.lse, tol));
  return { same, bitwise, ...(!same && { why: 'out/lse' }) };
}

export interface PagedCheck {
  steps: number;
  /** Steps whose answer equals the dense store's (sameAnswer), and of them bit for bit. */
  same: number;
  bitwise: number;
  firstDiff?: string;
  /** The paged answers against the host's (float64), first and last step. */
  hostOk: boolean;
  cacheRows: number;
  /** Every kv head's rows: a cache this large never evicts. */
  rows: number;
  /**
   * Whether the steps must have evicted (misses > cacheRows): where the cache holds fewer than every row and the
   * keys are distinct (with a few distinct keys, ties may keep a head's clusters the same whatever its query).
   */
  mustEvict: boolean;
  /** Rows copied in over all steps: more than cacheRows means slots were reused (evictions). */
  misses: number;
  /** bytesIn of the step before and of the same step repeated. */
  repeatBytesIn: [number, number];
  /** The step past the cache rejected with the overflow error, and the next one answered as the dense store. */
  overflowRejected: boolean;
  afterOverflowSame: boolean;
}

/**
 * One case: dense and paged stores over the same heads, `steps` drifting
 * steps, the repeat, the overflow, on `path` (bench/wave-paths.ts; the two
 * stores run the same kernels on any path). On `plain` the host's ids are
 * checked bit for bit; on a tensor-core path, the host's estimate and
 * float64 attention over the step's own ids within TOL, its ids overlapping
 * the host's by MIN_OVERLAP a head.
 */
export async function checkPagedCase(c: WaveCase, seed: number, steps = 24, path: PathName = 'plain'): Promise<PagedCheck> {
  return withPath(path, () => checkPathPagedCase(c, seed, steps, path));
}
/**
 * A check case's heads and the step's fixed parts, as the paged checks take them: the sinks/window rows (exact),
 * the kept filter that leaves them out of the budget, and the largest cluster (the cache bound's slack).
 */
export async function pagedCaseSetup(c: WaveCase, seed: number) {
  const rng = new Rng(seed);
  const { keysF, heads, gpuHeads } = await caseHeads(c, rng, seed);
  const N = c.tokens, exact = staticRows(N, c.sinks, c.window);
  const skip: [number, number][] = [[0, Math.min(c.sinks, N)], [Math.max(0, N - c.window), N]];
  const filter: KeptFilter = { skip, keep: c.budget.map((k) => Math.max(0, k - exact.length)) };
  const largestCluster = Math.max(...heads.map((h) => Math.max(...h.arrays.counts)));
  return { rng, keysF, heads, gpuHeads, exact, filter, largestCluster };
}

async function checkPathPagedCase(c: WaveCase, seed: number, steps: number, path: PathName): Promise<PagedCheck> {
  const { dt, d, tokens: N, kvHeads: H, G } = c;
  const { rng, keysF, heads, gpuHeads, exact, filter, largestCluster } = await pagedCaseSetup(c, seed);
  // The cache: the rows a step can read at most (engine/cache/device-wave.ts pagedStepFits' count: per head the cut's
  // clusters, under target + the largest cluster, and the exact rows' clusters once each), so that steps evict.
  const maxTarget = Math.max(...c.budget.map((b) => PROBE * b));
  let cacheRows = 0;
  heads.forEach((h, i) => {
    const cl = new Set(Array.from(exact, (t) => h.arrays.tokenCluster[t]));
    cacheRows += Math.min(N, PROBE * c.budget[i] + largestCluster + [...cl].reduce((n, x) => n + h.arrays.counts[x], 0));
  });
  if (cacheRows > waveCacheRowsBound({ kvHeads: H, tokens: N, target: maxTarget, largestCluster, exactRows: exact.length })) throw new Error('the bound is not a bound');
  const dense = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads });
  const paged = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads, cacheRows });
  try {
    // Every head's target moves at the middle step: the cache, about one step's rows, must evict.
    const qs = driftingQueries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G, steps, [steps >> 1]);
    const kv = { keys: gpuHeads.map((g) => g.keys), values: gpuHeads.map((g) => g.values) };
    const argsOf = (q: Float32Array, lean: boolean): WaveGpuStepArgs => ({
      q, qHeads: H * G, scale: c.scale, budget: c.budget, probe: PROBE, ranking: gpuRanking('spread'), exact, attend: true, rest: 'rows', ...filter,
      ...(lean && { stages: false }),
    });
    const r: PagedCheck = { steps, same: 0, bitwise: 0, hostOk: true, cacheRows, rows: H * N, mustEvict: cacheRows < H * N && !c.distinctKeys, misses: 0, repeatBytesIn: [0, 0], overflowRejected: false, afterOverflowSame: false };
    for (let s = 0; s < steps; s++) {
      // Half the steps as the engine calls (graph replayed), half launched one by one with stage times.
      const a = argsOf(qs[s], s % 2 === 1);
      const pr = await paged.step(a), dr = await dense.step(a);
      r.misses += pr.misses;
      const v = sameAnswer(pr, dr);
      if (v.same) r.same++;
      if (v.bitwise) r.bitwise++;
      if (!v.same) r.firstDiff ??= `step ${s}: ${v.why}`;
      if (s === 0 || s === steps - 1) {
        const own = path !== 'plain';
        const host = await compare(heads, pr, qs[s], G, d, dt, c.scale, c.budget, exact, 'spread', 'rows', kv, filter, own);
        r.hostOk &&= own ? host.outRel <= TOL.out && host.lseRel <= TOL.lse && host.estimatedEqual && host.idsOverlap >= MIN_OVERLAP : host.ok;
        if (!host.ok) r.firstDiff ??= `step ${s} against the host: ${host.firstDiff ?? ''} out ${host.outRel} lse ${host.lseRel}`;
      }
    }
    const last = argsOf(qs[steps - 1], true);
    r.repeatBytesIn = [(await paged.step(last)).bytesIn, (await paged.step(last)).bytesIn];
    // A budget past the cache: every row of every head (where the cache holds fewer).
    if (cacheRows < H * N) {
      let rejected = false;
      try {
        await paged.step({ ...last, budget: new Array<number>(H).fill(N), keep: undefined, skip: undefined, target: new Array<number>(H).fill(N) });
      } catch (e) {
        rejected = /exceed the paged store's cache/.test(String(e));
      }
      r.overflowRejected = rejected;
      r.afterOverflowSame = sameAnswer(await paged.step(last), await dense.step(last)).same;
    } else {
      r.overflowRejected = r.afterOverflowSame = true;  // the cache holds every row: nothing can overflow
    }
    return r;
  } finally {
    dense.close();
    paged.close();
  }
}

export const pagedCheckOk = (r: PagedCheck) =>
  r.same === r.steps && r.hostOk && r.repeatBytesIn[1] === 0 && r.overflowRejected && r.afterOverflowSame && (!r.mustEvict || r.misses > r.cacheRows);

// ---------------------------------------------------------------- benchmark

export interface PagedBenchConfig {
  tokens: number; kvHeads: number; G: number; d: number; clusterSize: number; budgetShare: number; sinks: number; window: number; steps: number; probe: number;
  caches: number[];
  /** Query regimes, each its own run of `steps` over the same stores: the probability a head's target stays a step (the generator's 0.9; 1: drift only). */
  stays: number[];
}

const p = (xs: number[], q: number) => quantile(xs, q);
const MiB = 1 << 20;

/** bench/wave-gpu.ts's synthetic layer, the engine's call on it and the cache bound. */
export function buildLayer(cfg: PagedBenchConfig) {
  const { tokens: N, kvHeads: H, G, d } = cfg, dt: KvDtype = 'f16';
  const rng = new Rng(20260513);
  const noise = new Float32Array(N * d);
  for (let i = 0; i < noise.length; i++) noise[i] = 0.5 * rng.normal();
  const shared = { noise, values: words(noise, dt), scratch: new Float32Array(N * d) };
  const built = Array.from({ length: H }, () => syntheticHead(rng, N, d, cfg.clusterSize, dt, shared));
  const heads = built.map((b) => b.head);
  const budget = Math.ceil(cfg.budgetShare * N), exact = staticRows(N, cfg.sinks, cfg.window), scale = 1 / Math.sqrt(d);
  const skip: [number, number][] = [[0, Math.min(cfg.sinks, N)], [Math.max(0, N - cfg.window), N]];
  // The engine's call (engine/cache/device-wave.ts stepDocument): the budget searched for past the sinks and window.
  const searchK = budget + exact.length, target = cfg.probe * searchK;
  const args = (q: Float32Array): WaveGpuStepArgs => ({
    q, qHeads: H * G, scale, budget: new Array<number>(H).fill(searchK), probe: cfg.probe, ranking: gpuRanking('spread'), exact, attend: true, rest: 'rows',
    keep: new Array<number>(H).fill(budget), skip, ids: false, stages: false,
  });
  const bound = waveCacheRowsBound({ kvHeads: H, tokens: N, target, largestCluster: cfg.clusterSize, exactRows: exact.length });
  return { rng, heads, dt, budget, searchK, target, args, bound };
}

async function runBench(cfg: PagedBenchConfig, log: (s: string) => void) {
  const { tokens: N, kvHeads: H, G, d } = cfg;
  const { rng, heads, dt, budget, searchK, target, args, bound } = buildLayer(cfg);
  const t0 = performance.now();
  const dense = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads });
  const stores = [{ name: 'dense', store: dense, cacheRows: 0 }];
  for (const f of cfg.caches) {
    const cacheRows = Math.min(H * N, Math.ceil(f * bound));
    stores.push({ name: `paged x${f}`, store: WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads, cacheRows }), cacheRows });
  }
  log(`stores: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const kvBytes = 2 * H * N * d * 2;
  const regimes = [];
  for (const stay of cfg.stays) {
    const qs = driftingQueries(rng, keyRows(heads, d, dt), H, N, d, G, cfg.steps, [], stay);
    const ms = stores.map(() => [] as number[]), wall = stores.map(() => [] as number[]), bytesIn = stores.map(() => [] as number[]);
    const misses = stores.map(() => [] as number[]);
    const same = stores.map(() => 0), bitwise = stores.map(() => 0);
    for (let s = 0; s < cfg.steps; s++) {
      // Alternated: each step runs every store, in an order that rotates.
      const answers: WaveGpuStepResult[] = new Array(stores.length);
      for (let k = 0; k < stores.length; k++) {
        const i = (k + s) % stores.length;
        const w0 = performance.now();
        const r = await stores[i].store.step(args(qs[s]));
        wall[i].push(performance.now() - w0);
        ms[i].push(r.ms);
        bytesIn[i].push(r.bytesIn);
        misses[i].push(r.misses);
        answers[i] = r;
      }
      for (let i = 1; i < stores.length; i++) {
        const v = sameAnswer(answers[i], answers[0]);
        same[i] += v.same ? 1 : 0;
        bitwise[i] += v.bitwise ? 1 : 0;
      }
    }
    regimes.push({
      topicStay: stay,
      stores: stores.map((x, i) => {
        const b = x.store.bytes(), late = bytesIn[i].slice(16).map((v) => v / MiB);
        return {
          name: x.name, cacheRows: x.cacheRows, cacheShareOfRows: x.cacheRows / (H * N),
          deviceMs: { p50: p(ms[i], 0.5), p90: p(ms[i], 0.9) }, hostWallMs: { p50: p(wall[i], 0.5), p90: p(wall[i], 0.9) },
          bytes: b, summariesShare: b.summaries / kvBytes, cacheShare: b.cache / kvBytes, deviceShare: (b.summaries + b.kv + b.cache) / kvBytes,
          h2dMiBFirst16: bytesIn[i].slice(0, 16).reduce((a, v) => a + v, 0) / MiB,
          h2dMiBPerStepAfter16: late.length ? { mean: late.reduce((a, v) => a + v, 0) / late.length, p50: p(late, 0.5), p99: p(late, 0.99), max: Math.max(...late) } : undefined,
          missesPerStepAfter16: misses[i].length > 16 ? p(misses[i].slice(16), 0.5) : undefined,
          sameAsDense: i === 0 ? undefined : { steps: cfg.steps, same: same[i], bitwise: bitwise[i] },
        };
      }),
    });
  }
  const result = {
    device: deviceName(cudaAvailable()),
    config: { ...cfg, dtype: dt, budget, searchK, target, boundRows: bound, boundShare: bound / (H * N) },
    regimes,
    layerKvBytes: kvBytes,
    targets: { deviceShare: 0.2, h2dMiBPerStepAfter16: 2 },
  };
  for (const x of stores) x.store.close();
  return result;
}

function markdown(r: Awaited<ReturnType<typeof runBench>>): string {
  const f = (x: number | undefined, n = 3) => (x === undefined ? '-' : x.toFixed(n));
  const c = r.config;
  const lines = [
    `# Paged wave store against dense, ${r.device}`,
    '',
    `One layer at ${c.tokens} tokens, ${c.kvHeads} kv x ${c.G} q heads, d=${c.d}, ${c.dtype}, clusters of ${c.clusterSize}, budget ${c.budget} + ${c.searchK - c.budget} sinks/window,`,
    `probe ${c.probe} (target ${c.target} rows a head), the engine's call, ${c.steps} drifting steps, stores alternated step by step.`,
    `Cache bound (waveCacheRowsBound): ${c.boundRows} rows, ${(100 * c.boundShare).toFixed(2)}% of the layer's rows. Shares are of the layer's K/V (${(r.layerKvBytes / MiB).toFixed(0)} MiB).`,
    '',
    '| topicStay | store | device ms p50 | host wall p50 | summaries | cache | device total | H2D MiB, steps 0-15 | H2D MiB/step 16+: mean / p50 / p99 / max | same as dense (bitwise) |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...r.regimes.flatMap((g) => g.stores.map((s) =>
      `| ${g.topicStay} | ${s.name} | ${f(s.deviceMs.p50)} | ${f(s.hostWallMs.p50)} | ${f(100 * s.summariesShare, 1)}% | ${f(100 * s.cacheShare, 1)}% | ${f(100 * s.deviceShare, 1)}% | ` +
      `${f(s.h2dMiBFirst16, 1)} | ${s.h2dMiBPerStepAfter16 ? `${f(s.h2dMiBPerStepAfter16.mean, 2)} / ${f(s.h2dMiBPerStepAfter16.p50, 2)} / ${f(s.h2dMiBPerStepAfter16.p99, 2)} / ${f(s.h2dMiBPerStepAfter16.max, 2)}` : '-'} | ` +
      `${s.sameAsDense ? `${s.sameAsDense.same}/${s.sameAsDense.steps} (${s.sameAsDense.bitwise})` : '-'} |`)),
    '',
    `Targets (issue #13): device total <= ${100 * r.targets.deviceShare}% of the layer's K/V; <= ${r.targets.h2dMiBPerStepAfter16} MiB host to device per step after 16 steps.`,
  ];
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------- the cache kernels' times

const CACHE_STAGES = ['cache.need', 'cache.allocate', 'cache.copy'] as const;

interface KernelsRow {
  topicStay: number; store: string; cacheRows: number;
  engineMs: { p50: number; n: number }; hostWallMs: number; stageMs: Record<string, number>; timedSteps: number;
  copyGBps: number; h2dMiBPerStep: number;
  sameAsDense: { steps: number; same: number; bitwise: number; firstDiff?: string };
}

/**
 * One paged store a cache factor, the dense one beside it: each step's query runs on the dense store (the reference)
 * and once on each paged store, every other pair of steps launched one by one with stage times (the cache kernels'
 * CUDA events) instead of the engine's call (graph, no stages). Steps before `warm` (the cache's first fill, the
 * graphs' captures) are left out of the times. Every paged answer against the dense one's, bit for bit.
 */
async function runKernels(cfg: PagedBenchConfig, log: (s: string) => void, thp = false, warm = 8) {
  const { tokens: N, kvHeads: H, G, d } = cfg;
  const { rng, heads, dt, args, bound } = buildLayer(cfg);
  const t0 = performance.now();
  const dense = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads });
  // With thp, each cache a second store whose host copy asked for huge pages (KVRECALL_WAVE_HOST_THP=1 when made).
  // (One that fails to be made is left out, with a line: the experiment must not cost the run.)
  const stores = cfg.caches.flatMap((f) => {
    const cacheRows = Math.min(H * N, Math.ceil(f * bound));
    return (thp ? [false, true] : [false]).flatMap((huge) => {
      if (huge) process.env.KVRECALL_WAVE_HOST_THP = '1';
      try {
        return [{ name: `paged x${f}${huge ? ' thp' : ''}`, cacheRows, store: WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads, cacheRows }) }];
      } catch (e) {
        if (!huge) throw e;
        log(`paged x${f} thp: not made (${String(e)})`);
        return [];
      } finally {
        delete process.env.KVRECALL_WAVE_HOST_THP;
      }
    });
  });
  log(`stores: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const rows: KernelsRow[] = [];
  try {
    for (const stay of cfg.stays) {
      const qs = driftingQueries(rng, keyRows(heads, d, dt), H, N, d, G, cfg.steps, [], stay);
      type Acc = { ms: number[]; wall: number[]; mib: number[]; stages: Record<string, number[]>; gbps: number[]; steps: number; bitwise: number; same: number; firstDiff?: string };
      const acc = stores.map((): Acc => ({ ms: [], wall: [], mib: [], stages: {}, gbps: [], steps: 0, bitwise: 0, same: 0 }));
      for (let s = 0; s < cfg.steps; s++) {
        const dr = await dense.step(args(qs[s]));
        const timed = (s >> 1) % 2 === 1;
        for (let k = 0; k < stores.length; k++) {
          const a = acc[k];
          const w0 = performance.now();
          const r = await stores[k].store.step(timed ? { ...args(qs[s]), stages: true } : args(qs[s]));
          const wall = performance.now() - w0;
          const v = sameAnswer(r, dr);
          a.steps++;
          a.same += v.same ? 1 : 0;
          a.bitwise += v.bitwise ? 1 : 0;
          if (!v.bitwise) a.firstDiff ??= `step ${s}: ${v.why ?? 'out/lse within 1e-6, not bitwise'}`;
          if (s < warm) continue;
          a.mib.push(r.bytesIn / MiB);
          if (!timed) {
            a.ms.push(r.ms);
            a.wall.push(wall);
          } else {
            for (const n of CACHE_STAGES) (a.stages[n] ??= []).push(r.stages[n] ?? NaN);
            const copy = r.stages['cache.copy'];
            if (copy > 0 && r.bytesIn > 0) a.gbps.push(r.bytesIn / 1e6 / copy);
          }
        }
      }
      for (let k = 0; k < stores.length; k++) {
        const a = acc[k];
        rows.push({
          topicStay: stay, store: stores[k].name, cacheRows: stores[k].cacheRows,
          engineMs: { p50: p(a.ms, 0.5), n: a.ms.length }, hostWallMs: p(a.wall, 0.5),
          stageMs: Object.fromEntries(CACHE_STAGES.map((n) => [n, p(a.stages[n] ?? [], 0.5)])), timedSteps: (a.stages['cache.copy'] ?? []).length,
          copyGBps: p(a.gbps, 0.5), h2dMiBPerStep: p(a.mib, 0.5),
          sameAsDense: { steps: a.steps, same: a.same, bitwise: a.bitwise, firstDiff: a.firstDiff },
        });
      }
    }
  } finally {
    dense.close();
    for (const x of stores) x.store.close();
  }
  return { device: deviceName(cudaAvailable()), config: { ...cfg, dtype: dt, warm, boundRows: bound }, rows };
}

function kernelsMarkdown(r: Awaited<ReturnType<typeof runKernels>>): string {
  const f = (x: number | undefined, n = 3) => (x === undefined || Number.isNaN(x) ? '-' : x.toFixed(n));
  const c = r.config;
  return [
    `# Paged wave store's cache kernels, ${r.device}`,
    '',
    `One layer at ${c.tokens} tokens, ${c.kvHeads} kv x ${c.G} q heads, d=${c.d}, ${c.dtype}, clusters of ${c.clusterSize}, probe ${c.probe}, ${c.steps} drifting steps;`,
    `one paged store a cache (bound ${c.boundRows} rows); every other pair of steps launched one by one with the cache kernels' events.`,
    `Times from step ${c.warm} on; answers of every step against the dense store's, bit for bit.`,
    '',
    '| topicStay | store | engine ms p50 (n) | host wall p50 | need ms | allocate ms | copy ms | copy GB/s | H2D MiB/step p50 | bitwise as dense |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...r.rows.map((x) =>
      `| ${x.topicStay} | ${x.store} | ${f(x.engineMs.p50)} (${x.engineMs.n}) | ${f(x.hostWallMs)} | ${f(x.stageMs['cache.need'])} | ${f(x.stageMs['cache.allocate'])} | ` +
      `${f(x.stageMs['cache.copy'])} | ${f(x.copyGBps, 1)} | ${f(x.h2dMiBPerStep, 2)} | ${x.sameAsDense.bitwise}/${x.sameAsDense.steps}${x.sameAsDense.firstDiff ? ` (${x.sameAsDense.firstDiff})` : ''} |`),
    '',
  ].join('\n');
}

/**
 * A paged check over every wave case on both kernel paths (plain, all), each
 * case its own seed from the clock: prints a line a case, returns the failures.
 */
export async function checkEveryCase<R>(check: (c: WaveCase, seed: number, path: PathName) => Promise<R>, ok: (r: R) => boolean, line: (c: WaveCase, path: PathName, r: R) => string): Promise<number> {
  let seed = Date.now() % 1_000_000, failed = 0;
  for (const path of ['plain', 'all'] as const) for (const c of waveCases()) {
    const r = await check(c, seed++, path);
    const good = ok(r);
    if (!good) failed++;
    console.log(`${good ? 'ok  ' : 'FAIL'} ${line(c, path, r)}`);
  }
  return failed;
}

async function main() {
  const args = process.argv.slice(2);
  const opt = (name: string) => strFlag(name, args);
  const all = !args.includes('--check') && !args.includes('--bench') && !args.includes('--kernels');
  const info = requireDevice();
  let failed = 0;
  if (all || args.includes('--check')) {
    failed += await checkEveryCase((c, seed, path) => checkPagedCase(c, seed, 24, path), pagedCheckOk, (c, path, r) =>
      `paged ${caseName(c)} (${path} path): same ${r.same}/${r.steps} (bitwise ${r.bitwise}) host ${r.hostOk} cache ${r.cacheRows} misses ${r.misses} ` +
      `repeat bytesIn ${r.repeatBytesIn.join(' -> ')} overflow ${r.overflowRejected} after ${r.afterOverflowSame}${r.firstDiff ? ` (${r.firstDiff})` : ''}`);
  }
  const benchCfg = (): PagedBenchConfig => ({
    tokens: 1 << 20, kvHeads: 8, G: 4, d: 128, clusterSize: Number(opt('--cluster-size') ?? 16), budgetShare: 0.02, sinks: 16, window: 64,
    steps: Number(opt('--steps') ?? 64), probe: Number(opt('--probe') ?? PROBE_ESTIMATED), caches: (opt('--caches') ?? '1,2,4').split(',').map(Number),
    stays: (opt('--stays') ?? `${defaultKnobs(1).topicStay},1`).split(',').map(Number),
  });
  const card = cardName(info.device), tag = opt('--tag');
  const save = (name: string, json: unknown, md: string) => saveDeviceResult(`${name}${tag ? `-${tag}` : ''}`, json, md);
  if (args.includes('--kernels')) {
    const cfg = benchCfg();
    const r = await runKernels(cfg, console.log, args.includes('--thp'));
    const md = kernelsMarkdown(r);
    console.log(md);
    save(`wave-gpu-paged-kernels-${card}-cs${cfg.clusterSize}-p${cfg.probe}`, r, md);
    if (r.rows.some((x) => x.sameAsDense.same !== x.sameAsDense.steps)) failed++;
  }
  if (all || args.includes('--bench')) {
    const cfg = benchCfg();
    const r = await runBench(cfg, console.log);
    const md = markdown(r);
    console.log(JSON.stringify(r, null, 2));
    console.log(md);
    save(`wave-gpu-paged-${card}-cs${cfg.clusterSize}-p${cfg.probe}`, r, md);
  }
  process.exit(failed ? 1 : 0);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) main().catch((e) => {
  console.error(e);
  process.exit(1);
});
