// The paged wave store's cap on the rows a step pages (pageCapBytes,
// native/cuda/wave_page_cap.cuh; issue #13: "<= 2 MiB host->device per step
// after the first 16 steps"). Needs a CUDA device.
//
//   node dist/bench/wave-gpu-page-cap.js [--check] [--bench [--graph]] [--steps 48] [--cap-mib 2] [--cap-from 16] [--stays 0.9] [--cache 1] [--tag T]
//
// --check (test/native/wave-gpu-page-cap.test.ts runs it): on bench/wave-gpu.ts's
// small cases, a dense store, a paged store with the cap off (pageCapBytes 0)
// and a capped one (8 rows a kv head a step from step 2), the cache the
// bound of a step's rows, over drifting steps with every head's target moved
// at the middle step: (1) the cap-off store answers as the dense store
// (sameAnswer: ids and counts exactly, out/lse within 1e-6) every step, and
// so does the capped one before the cap applies;
// (2) from step 2 on the capped store never copies more than the cap, and
// the cap binds (some step rescores fewer candidates than the cut took), and
// where it binds it is used up (a head that left candidates unrescored paged
// its whole share: the step copied at least that share for each such head);
// (3) each capped answer equals float64 attention over exactly the rows it
// attended (its kept ids and the sinks/window rows) merged with the host's
// estimate of the rest (index/wave's estimateClusters: a partly attended
// cluster by its rows' own logits, or by its moments where the step says the
// cap left rows of it unread, momentClusters), within TOL; (4) on a capped
// store that has just paged a query's rows (its first, uncapped step), the
// same query again, all its candidates cached, pages nothing and answers as
// the dense store.
//
// --bench: one layer at 1M tokens, 8 kv heads x 4 q heads, d=128, f16,
// clusters of 16 (bench/wave-gpu-paged.ts's layer and the engine's call at
// probe 4), drifting decode queries: the paged store uncapped and capped
// (--cap-mib from step --cap-from), caches of --cache x the bound, alternated
// step by step; per store the host-to-device MiB a step (steps before
// --cap-from, and after: mean / p99 / max), the candidates rescored, and the
// mean output error (relative L2 per q head) against the native kernel's
// attention over every row (f32, on the host) over all steps and steps 16+.
// --graph: the steps replayed from the stores' CUDA graphs, as the engine runs them (the
// device ms then the step's, not the sum of kernels launched one by one).
// Results: bench/results/wave-gpu-page-cap-<card>[-<tag>].{json,md} (also $OUT).
import { pathToFileURL } from 'node:url';
import { cudaAvailable, deviceName } from '../addon/cuda.js';
import { estimateClusters } from '../addon/estimate.js';
import { attend, type KvDtype } from '../addon/kernels.js';
import { WaveGpuStore, waveCacheRowsBound, type WaveGpuStepArgs, type WaveGpuStepResult } from '../addon/wave-gpu.js';
import { centroidStride } from '../index/wave/cluster-codec.js';
import { ClusterIndex, PROBE, PROBE_ESTIMATED } from '../index/wave/cluster-index.js';
import { defaultKnobs } from '../workload/index.js';
import { strFlag } from './args.js';
import { relativeErrors } from './quality.js';
import { quantile } from './stats.js';
import { answerDiff, caseName, gpuRanking, keyRows, mergeAttended, TOL, type WaveCase } from './wave-gpu.js';
import { buildLayer, checkEveryCase, driftingQueries, pagedCaseSetup, sameAnswer, type PagedBenchConfig } from './wave-gpu-paged.js';
import { type PathName, withPath } from './wave-paths.js';
import { cardName, saveDeviceResult, requireDevice } from './device-results.js';

const MiB = 1 << 20;

/**
 * The host's answer to a capped step: float64 attention over the rows it
 * attended (kept ids and `exact`, each once) merged with the estimate of
 * the rest, every partly attended cluster by its rows' own logits except
 * those in `moments` (per head), by their moments. Two host estimates, each
 * over its own clusters (the other clusters' rows given as attended, which
 * leaves them out), merged by log-sum-exp.
 */
export async function cappedReference(heads: ClusterIndex[], ids: Int32Array[], moments: Int32Array[], q: Float32Array, G: number, d: number, dt: KvDtype,
                                      scale: number, exact: Int32Array, kv: { keys: Uint16Array[]; values: Uint16Array[] }) {
  const H = heads.length, qHeads = H * G;
  const attended = heads.map((_, h) => new Set([...ids[h], ...exact]));
  const parts = [];
  for (const byMoments of [false, true]) {
    const segment = heads.map((index, h) => {
      const chosen = new Set(moments[h]);
      const given = new Set(attended[h]);
      // Rows of the other part's clusters count as attended: no estimate of them here.
      for (let c = 0; c < index.clusters; c++)
        if (chosen.has(c) !== byMoments)
          for (let j = index.offsets[c]; j < index.offsets[c + 1]; j++) given.add(index.members[j]);
      return index.estimateArgs(Int32Array.from(given), byMoments ? 'moments' : 'rows');
    });
    const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(H);
    await estimateClusters({ q, qHeads, kvHeads: H, headDim: d, centroidStride: centroidStride(d), dtype: dt, scale, segments: [segment], out, lse, estimated });
    parts.push({ out, lse, estimated });
  }
  const [a, b] = parts, out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
  for (let r = 0; r < qHeads; r++) {
    const la = a.lse[r], lb = b.lse[r];
    if (la === -Infinity && lb === -Infinity) {
      lse[r] = -Infinity;
      continue;
    }
    const m = Math.max(la, lb), wa = la === -Infinity ? 0 : Math.exp(la - m), wb = lb === -Infinity ? 0 : Math.exp(lb - m);
    lse[r] = m + Math.log(wa + wb);
    for (let j = 0; j < d; j++) out[r * d + j] = (wa * a.out[r * d + j] + wb * b.out[r * d + j]) / (wa + wb);
  }
  mergeAttended(out, lse, q, G, d, dt, scale, attended.map((s) => Int32Array.from(s)), kv);
  return { out, lse, estimated: heads.map((_, h) => a.estimated[h] + b.estimated[h]) };
}

export interface CapCheck {
  steps: number;
  capBytes: number;
  capFrom: number;
  /** (1) Steps the cap-off paged store answered as the dense store; steps before capFrom the capped one did (it pages every row until then). */
  offSame: number;
  earlySame: number;
  /**
   * (2) Steps from capFrom on whose bytes copied exceeded the cap, the most copied there, the steps where the cap
   * left candidates unrescored, and those from capFrom on where the cap-off store copied more than the cap (where
   * the cap must bind; none where the cache holds every row the steps read after the first).
   */
  overCap: number;
  offOverCap: number;
  /**
   * Steps from capFrom on that copied less than a kv head's share of the cap (capBytes / kvHeads) for each head
   * that left candidates unrescored: such a head's miss cut reached its target, so it paged its whole share.
   */
  underUsed: number;
  /** Steps whose answer took some cluster's rest from its moments for want of rows (reported: the check exercises that branch where > 0). */
  momentSteps: number;
  maxBytesCapped: number;
  capBound: number;
  /** (3) Capped steps within TOL of the host's answer over the rows they attended (and the estimate's token counts equal). */
  refOk: number;
  worstOut: number;
  worstLse: number;
  /** (4) The same query again on a capped store that paged it: bytes copied, candidates rescored = taken, and its answer against the dense store's. */
  cached: { bytesIn: number; allRescored: boolean; same: boolean; why?: string };
  firstDiff?: string;
}

/** One case (see the top): dense, cap-off and capped stores over the same heads, `steps` drifting steps, on `path`. */
export async function checkCapCase(c: WaveCase, seed: number, steps = 16, path: PathName = 'all'): Promise<CapCheck> {
  return withPath(path, () => checkPathCapCase(c, seed, steps));
}
async function checkPathCapCase(c: WaveCase, seed: number, steps: number): Promise<CapCheck> {
  const { dt, d, tokens: N, kvHeads: H, G } = c;
  const { rng, keysF, heads, gpuHeads, exact, filter, largestCluster } = await pagedCaseSetup(c, seed);
  const cacheRows = waveCacheRowsBound({ kvHeads: H, tokens: N, target: Math.max(...c.budget.map((b) => PROBE * b)), largestCluster, exactRows: exact.length });
  const capFrom = 2, capBytes = H * 4 * d * 8;  // 8 rows of K and V a kv head a step
  const base = { kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads, cacheRows };
  const dense = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads });
  const off = WaveGpuStore.create({ ...base, pageCapBytes: 0 });
  const capped = WaveGpuStore.create({ ...base, pageCapBytes: capBytes, pageCapFrom: capFrom });
  const again = WaveGpuStore.create({ ...base, pageCapBytes: capBytes, pageCapFrom: 1 });
  const kv = { keys: gpuHeads.map((g) => g.keys), values: gpuHeads.map((g) => g.values) };
  const r: CapCheck = { steps, capBytes, capFrom, offSame: 0, earlySame: 0, overCap: 0, offOverCap: 0, underUsed: 0, momentSteps: 0, maxBytesCapped: 0, capBound: 0, refOk: 0, worstOut: 0, worstLse: 0,
    cached: { bytesIn: -1, allRescored: false, same: false } };
  try {
    const qs = driftingQueries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G, steps, [steps >> 1]);
    const argsOf = (q: Float32Array, lean: boolean): WaveGpuStepArgs => ({
      q, qHeads: H * G, scale: c.scale, budget: c.budget, probe: PROBE, ranking: gpuRanking('spread'), exact, attend: true, rest: 'rows', ...filter,
      detail: true, ...(lean && { stages: false }),
    });
    for (let s = 0; s < steps; s++) {
      const a = argsOf(qs[s], s % 2 === 1);  // half graphed, half launched one by one
      const dr = await dense.step(a), or = await off.step(a), cr = await capped.step(a);
      const v = sameAnswer(or, dr);
      if (v.same) r.offSame++;
      else r.firstDiff ??= `step ${s}, cap off against dense: ${v.why}`;
      if (s < capFrom) {
        const e = sameAnswer(cr, dr);
        if (e.same) r.earlySame++;
        else r.firstDiff ??= `step ${s}, capped before the cap against dense: ${e.why}`;
      } else {
        r.maxBytesCapped = Math.max(r.maxBytesCapped, cr.bytesIn);
        if (cr.bytesIn > capBytes) r.overCap++;
        if (or.bytesIn > capBytes) r.offOverCap++;
      }
      const taken = cr.scanned.map((n, h) => n - heads[h].clusters);
      if (!cr.rescored || !cr.momentClusters || !cr.ids) throw new Error('a capped step with detail reports rescored, momentClusters and ids');
      const binding = cr.rescored.filter((n, h) => n < taken[h]).length;
      if (binding > 0) r.capBound++;
      if (s >= capFrom && cr.bytesIn < binding * (capBytes / H)) {
        r.underUsed++;
        r.firstDiff ??= `step ${s}, capped: ${binding} heads left candidates unrescored but the step copied ${cr.bytesIn} bytes (each head's share: ${capBytes / H})`;
      }
      if (cr.momentClusters.some((m) => m.length > 0)) r.momentSteps++;
      const ref = await cappedReference(heads, cr.ids, cr.momentClusters, qs[s], G, d, dt, c.scale, exact, kv);
      const diff = answerDiff(cr, ref.out, ref.lse, H * G, d);
      r.worstOut = Math.max(r.worstOut, diff.outRel);
      r.worstLse = Math.max(r.worstLse, diff.lseRel);
      const estimatedEqual = cr.estimated.every((e, h) => e === ref.estimated[h]);
      if (diff.outRel <= TOL.out && diff.lseRel <= TOL.lse && estimatedEqual) r.refOk++;
      else r.firstDiff ??= `step ${s}, capped against the host: out ${diff.outRel} lse ${diff.lseRel} estimated ${cr.estimated} vs ${ref.estimated}`;
    }
    // (4): the last query on a store whose first step (uncapped) paged its rows, then again, capped.
    const last = argsOf(qs[steps - 1], true);
    await again.step(last);
    const ar = await again.step(last), dr = await dense.step(last);
    const taken = ar.scanned.map((n, h) => n - heads[h].clusters);
    const v = sameAnswer(ar, dr);
    r.cached = { bytesIn: ar.bytesIn, allRescored: !!ar.rescored && ar.rescored.every((n, h) => n === taken[h]), same: v.same, ...(v.why && { why: v.why }) };
    return r;
  } finally {
    for (const s of [dense, off, capped, again]) s.close();
  }
}

export const capCheckOk = (r: CapCheck) =>
  r.offSame === r.steps && r.earlySame === r.capFrom && r.overCap === 0 && r.underUsed === 0 && (r.offOverCap === 0 || r.capBound > 0) && r.refOk === r.steps && r.cached.bytesIn === 0 && r.cached.allRescored && r.cached.same;

// ---------------------------------------------------------------- benchmark

interface CapBenchConfig extends PagedBenchConfig {
  capBytes: number;
  capFrom: number;
  /** Steps replayed from the store's CUDA graph (the engine's way; the ids asked, so rescored comes back) rather than launched one by one with stage events. */
  graph: boolean;
}

async function runBench(cfg: CapBenchConfig, log: (s: string) => void) {
  const { tokens: N, kvHeads: H, G, d } = cfg;
  const { rng, heads, dt, budget, searchK, target, args, bound } = buildLayer(cfg);
  const cacheRows = Math.min(H * N, Math.ceil(cfg.caches[0] * bound));
  const t0 = performance.now();
  const base = { kvHeads: H, headDim: d, dtype: dt, tokens: N, heads, cacheRows };
  const stores = [
    { name: 'paged, no cap', store: WaveGpuStore.create({ ...base, pageCapBytes: 0 }) },
    { name: `paged, cap ${(cfg.capBytes / MiB).toFixed(2)} MiB from step ${cfg.capFrom}`, store: WaveGpuStore.create({ ...base, pageCapBytes: cfg.capBytes, pageCapFrom: cfg.capFrom }) },
  ];
  log(`stores: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const kvBytes = 2 * H * N * d * 2;
  const regimes = [];
  for (const stay of cfg.stays) {
    const qs = driftingQueries(rng, keyRows(heads, d, dt), H, N, d, G, cfg.steps, [], stay);
    const acc = stores.map(() => ({ mib: [] as number[], err: [] as number[], late: [] as number[], rescored: [] as number[], taken: [] as number[], ms: [] as number[] }));
    for (let s = 0; s < cfg.steps; s++) {
      // The reference: the native kernel's attention over every row (f32, the host's threads).
      const ref = new Float32Array(H * G * d), refLse = new Float32Array(H * G);
      await attend({ q: qs[s], qHeads: H * G, kvHeads: H, headDim: d, dtype: dt, scale: 1 / Math.sqrt(d),
        segments: [{ k: heads.map((h) => h.keys), v: heads.map((h) => h.values), tokens: N, begin: 0, end: N }], out: ref, lse: refLse });
      for (let k = 0; k < stores.length; k++) {
        const i = (k + s) % stores.length, a = acc[i];
        // stages or ids: the extra answer (rescored) comes back; with ids the step is still the graph's.
        const r: WaveGpuStepResult = await stores[i].store.step({ ...args(qs[s]), ...(cfg.graph ? { ids: true } : { stages: true }) });
        const e = relativeErrors(r.out, ref, H * G);
        a.mib.push(r.bytesIn / MiB);
        a.ms.push(r.ms);
        a.err.push(...e);
        if (s >= 16) a.late.push(...e);
        const taken = r.scanned.reduce((x, n, h) => x + n - stores[i].store.clusters[h], 0);
        a.taken.push(taken);
        a.rescored.push(r.rescored ? r.rescored.reduce((x, n) => x + n, 0) : taken);
      }
      if (s % 8 === 7) log(`topicStay ${stay}: step ${s + 1}/${cfg.steps}`);
    }
    regimes.push({
      topicStay: stay,
      stores: stores.map((x, i) => {
        const a = acc[i], b = x.store.bytes(), before = a.mib.slice(0, cfg.capFrom), after = a.mib.slice(cfg.capFrom);
        const mean = (v: number[]) => (v.length ? v.reduce((p, y) => p + y, 0) / v.length : NaN);
        return {
          name: x.name, cacheRows, deviceShare: (b.summaries + b.cache) / kvBytes,
          h2dMiBBeforeCap: { mean: mean(before), max: Math.max(...before) },
          h2dMiBPerStepAfter: { mean: mean(after), p50: quantile(after, 0.5), p99: quantile(after, 0.99), max: Math.max(...after) },
          rescoredShare: mean(a.rescored.map((n, j) => n / Math.max(1, a.taken[j]))),
          error: { mean: mean(a.err), steps16: mean(a.late), p90: quantile(a.err, 0.9) },
          deviceMsP50: quantile(a.ms, 0.5),
        };
      }),
    });
  }
  for (const x of stores) x.store.close();
  return { device: deviceName(cudaAvailable()), config: { ...cfg, dtype: dt, budget, searchK, target, boundRows: bound, cacheRows }, layerKvBytes: kvBytes, regimes };
}

function markdown(r: Awaited<ReturnType<typeof runBench>>): string {
  const f = (x: number | undefined, n = 3) => (x === undefined || Number.isNaN(x) ? '-' : x.toFixed(n));
  const c = r.config;
  return [
    `# Paged wave store: a cap on the rows a step pages, ${r.device}`,
    '',
    `One layer at ${c.tokens} tokens, ${c.kvHeads} kv x ${c.G} q heads, d=${c.d}, ${c.dtype}, clusters of ${c.clusterSize}, budget ${c.budget} + ${c.searchK - c.budget} sinks/window,`,
    `probe ${c.probe} (target ${c.target} rows a head), the engine's call (attend, estimate, rest 'rows'), ${c.steps} drifting steps, the stores alternated step by step;`,
    `cache ${c.cacheRows} rows (${c.caches[0]} x the bound). Error: relative L2 per q head against the native kernel's attention over every row (f32).`,
    '',
    `| topicStay | store | device (summaries + cache) | H2D MiB/step before the cap: mean / max | after: mean / p50 / p99 / max | candidates rescored | error mean | steps 16+ | p90 | device ms p50 (${r.config.graph ? 'the graph replayed' : 'stage times on'}) |`,
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...r.regimes.flatMap((g) => g.stores.map((s) =>
      `| ${g.topicStay} | ${s.name} | ${f(100 * s.deviceShare, 1)}% | ${f(s.h2dMiBBeforeCap.mean, 2)} / ${f(s.h2dMiBBeforeCap.max, 2)} | ` +
      `${f(s.h2dMiBPerStepAfter.mean, 2)} / ${f(s.h2dMiBPerStepAfter.p50, 2)} / ${f(s.h2dMiBPerStepAfter.p99, 2)} / ${f(s.h2dMiBPerStepAfter.max, 2)} | ` +
      `${f(100 * s.rescoredShare, 1)}% | ${f(s.error.mean, 4)} | ${f(s.error.steps16, 4)} | ${f(s.error.p90, 4)} | ${f(s.deviceMsP50)} |`)),
    '',
    'Targets (issue #13): <= 2 MiB host to device a step after 16 steps; device <= 20% of the layer\'s K/V; mean output error <= 0.05.',
    '',
  ].join('\n');
}

async function main() {
  const args = process.argv.slice(2);
  const opt = (name: string) => strFlag(name, args);
  const all = !args.includes('--check') && !args.includes('--bench');
  const info = requireDevice();
  let failed = 0;
  if (all || args.includes('--check')) {
    failed += await checkEveryCase((c, seed, path) => checkCapCase(c, seed, 16, path), capCheckOk, (c, path, r) =>
      `cap ${caseName(c)} (${path}): off=dense ${r.offSame}/${r.steps}, over cap ${r.overCap} (max ${r.maxBytesCapped} of ${r.capBytes}), ` +
      `bound ${r.capBound} (uncapped over it ${r.offOverCap}, share unused ${r.underUsed}), moments ${r.momentSteps}, host ${r.refOk}/${r.steps} (out ${r.worstOut.toExponential(2)} lse ${r.worstLse.toExponential(2)}), cached ${JSON.stringify(r.cached)}${r.firstDiff ? ` (${r.firstDiff})` : ''}`);
  }
  if (all || args.includes('--bench')) {
    const cfg: CapBenchConfig = {
      tokens: 1 << 20, kvHeads: 8, G: 4, d: 128, clusterSize: 16, budgetShare: 0.02, sinks: 16, window: 64,
      steps: Number(opt('--steps') ?? 48), probe: PROBE_ESTIMATED, caches: [Number(opt('--cache') ?? 1)],
      stays: (opt('--stays') ?? `${defaultKnobs(1).topicStay}`).split(',').map(Number),
      capBytes: Math.round(Number(opt('--cap-mib') ?? 2) * MiB), capFrom: Number(opt('--cap-from') ?? 16), graph: args.includes('--graph'),
    };
    const r = await runBench(cfg, console.log);
    const md = markdown(r);
    console.log(md);
    const tag = opt('--tag');
    saveDeviceResult(`wave-gpu-page-cap-${cardName(info.device)}${tag ? `-${tag}` : ''}`, r, md);
  }
  process.exit(failed ? 1 : 0);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) main().catch((e) => {
  console.error(e);
  process.exit(1);
});
