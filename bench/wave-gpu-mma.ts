// The wave step's tensor-core paths (bench/wave-paths.ts; all on by
// default) against the plain path (needs a CUDA device): ScoreClusters on the
// tensor cores (KVRECALL_WAVE_MMA, native/cuda/wave_score_mma.cuh), the
// estimate's and attention's tile numerators on them
// (KVRECALL_WAVE_MMA_TILES, wave_tile_mma.cuh) and the candidates' dots
// (KVRECALL_WAVE_MMA_RESCORE, wave_rescore_mma.cuh). Their sums are not the
// host's bit for bit, so they are checked differently from the plain path
// (bench/wave-gpu-check.ts):
//
//   --check  per case (f16, 4 q heads a kv head, d = 128 and 64, q scaled
//            so that |q|² passes f16's range and so that it is tiny; with
//            the tiles on also bf16 and 8 and 2 q heads a kv head): the
//            plain path first, which must equal the host's search and
//            estimate (ids bit for bit, out and lse within TOL); then the
//            path (--path score | tiles | rescore | both | all, default all), whose answer
//            must equal the host's estimate and float64 attention over the
//            path's own selection within the same TOL, and whose ids must
//            overlap the host's by at least MIN_OVERLAP per head; and its
//            engine's call, replayed from its CUDA graph, the full call's
//            answer.
//   --bench  the engine's call at 1M (bench/wave-gpu.ts's shape: 8 kv heads
//            × 4 q heads, d = 128, f16, budget 2%, window 64; --cluster-size,
//            --head-dim, --budget-share, --window as there), two paths
//            (--base, default plain; --new, default score) alternated step
//            by step (A B B A ...) on one store: p50s, their ratio, their
//            scoring and tiles stages, and how far the new path's answers
//            are from the base path's (ids overlap, out and lse); results in
//            bench/results/wave-gpu-mma-<card>[-d<d>][-<tag>].{md,json}.
//
//   node dist/bench/wave-gpu-mma.js [--check] [--path P] [--bench] [--base P] [--new P] [--steps 50] [--tag T]
import { pathToFileURL } from 'node:url';
import { deviceName } from '../addon/cuda.js';
import { type WaveGpuStepResult, WaveGpuStore } from '../addon/wave-gpu.js';
import { PROBE, PROBE_ESTIMATED } from '../index/wave/cluster-index.js';
import { Rng } from '../workload/index.js';
import { machine } from './host.js';
import { quantile } from './stats.js';
import { benchSetup, compare, type CompareResult, gpuRanking, type KeptFilter, queries, staticRows, TOL, type WaveCase } from './wave-gpu.js';
import { caseHeads } from './wave-gpu-heads.js';
import { isPath, MIN_OVERLAP, PATHS, type PathName, withPath } from './wave-paths.js';
import { cardName, saveDeviceResult, requireDevice } from './device-results.js';

export { MIN_OVERLAP, type PathName } from './wave-paths.js';

const PATH_LABEL: Record<PathName, string> = {
  plain: 'plain (the host\'s sums bit for bit)',
  score: 'ScoreClusters on the tensor cores',
  tiles: 'tile numerators on the tensor cores',
  rescore: 'candidates\' dots on the tensor cores',
  both: 'ScoreClusters and the tiles on the tensor cores',
  all: 'all three on the tensor cores (the default)',
};

export interface MmaCase extends WaveCase {
  /** q is the keys' queries (bench/wave-gpu.ts queries) times this; the softmax scale divided by it. */
  qScale: number;
}

/**
 * Where the mma paths apply (f16, 4 q heads a kv head, d 64 or 128): sizes,
 * groups of budgets, q's range; with the tiles on (they take any dtype and
 * group), also bf16 and groups of 8 (two passes of 4) and 2.
 */
export function mmaCases(path: PathName = 'score'): MmaCase[] {
  const base = { dt: 'f16' as const, G: 4, sinks: 16, window: 64 };
  const tiles: MmaCase[] = path === 'tiles' || path === 'both' || path === 'all' ? [
    { ...base, dt: 'bf16', kvHeads: 2, d: 128, tokens: 20011, clusterSize: 16, budget: [500, 801], scale: 1 / Math.sqrt(128), qScale: 1 },
    { ...base, kvHeads: 2, G: 8, d: 64, tokens: 12011, clusterSize: 8, budget: [301, 250], scale: 0.125, qScale: 1 },
    { ...base, dt: 'bf16', kvHeads: 3, G: 2, d: 64, tokens: 9011, clusterSize: 16, budget: [200, 97, 403], scale: 0.125, qScale: 1 },
  ] : [];
  return [
    { ...base, kvHeads: 2, d: 128, tokens: 30011, clusterSize: 16, budget: [600, 901], scale: 1 / Math.sqrt(128), qScale: 1 },
    { ...base, kvHeads: 3, d: 64, tokens: 20011, clusterSize: 8, budget: [401, 97, 1203], scale: 0.125, qScale: 1 },
    // |q| past 256: q² overflows f16 unless the kernel scales it down first.
    { ...base, kvHeads: 2, d: 128, tokens: 16411, clusterSize: 16, budget: [500, 500], scale: 1 / Math.sqrt(128), qScale: 300 },
    // tiny q: its low f16 part would be subnormal unless the kernel scales it up first.
    { ...base, kvHeads: 1, d: 64, tokens: 9001, clusterSize: 16, budget: [300], scale: 0.125, qScale: 1e-3 },
    ...tiles,
  ];
}
export const mmaCaseName = (c: MmaCase) => `${c.dt} d=${c.d} kv=${c.kvHeads} G=${c.G} N=${c.tokens} cluster=${c.clusterSize} budget=${c.budget.join('/')} q×${c.qScale}`;

export interface MmaCheck {
  /** The default path against the host's search and estimate (as bench/wave-gpu-check.ts). */
  plain: CompareResult;
  /** The path against the host's estimate and float64 attention over its own ids. */
  mma: CompareResult;
  /** The path's engine's call from its graph (twice: captured, replayed) against its full call: out and lse within 1e-6. */
  leanSame: boolean;
  ok: boolean;
}

/** One case: the layer-step as the engine asks for it (spread ranking, estimate, attend), the default path and `path` on one store. */
export async function checkMmaCase(c: MmaCase, seed: number, path: PathName = 'score'): Promise<MmaCheck> {
  const rng = new Rng(seed);
  const { dt, d, tokens: N, kvHeads: H, G } = c;
  const { keysF, heads, gpuHeads } = await caseHeads(c, rng, seed);
  const store = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads });
  try {
    const q = queries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G).map((x) => x * c.qScale);
    const scale = c.scale / c.qScale, exact = staticRows(N, c.sinks, c.window);
    const kv = { keys: gpuHeads.map((g) => g.keys), values: gpuHeads.map((g) => g.values) };
    const skip: [number, number][] = [[0, Math.min(c.sinks, N)], [Math.max(0, N - c.window), N]];
    const filter: KeptFilter = { skip, keep: c.budget.map((k) => Math.max(0, k - exact.length)) };
    const args = { q, qHeads: H * G, scale, budget: c.budget, probe: PROBE, ranking: gpuRanking('spread'), exact, rest: 'rows' as const, attend: true, ...filter };
    const check = (gpu: WaveGpuStepResult, own: boolean) =>
      compare(heads, gpu, q, G, d, dt, scale, c.budget, exact, 'spread', 'rows', kv, filter, own);
    const plain = await check(await withPath('plain', () => store.step(args)), false);
    const full = await withPath(path, () => store.step(args));
    const mma = await check(full, true);
    const close = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((x, i) => x === b[i] || Math.abs(x - b[i]) <= 1e-6 * Math.max(1, Math.abs(b[i])));
    let leanSame = true;
    for (let i = 0; i < 2; i++) {
      const lean = await withPath(path, () => store.step({ ...args, ids: false, stages: false }));
      leanSame &&= close(lean.out, full.out) && close(lean.lse, full.lse) && lean.kept.every((k, h) => k === full.kept[h]);
    }
    const mmaOk = mma.outRel <= TOL.out && mma.lseRel <= TOL.lse && mma.estimatedEqual && mma.idsOverlap >= MIN_OVERLAP;
    return { plain, mma, leanSame, ok: plain.ok && mmaOk && leanSame };
  } finally {
    store.close();
  }
}

/** Two paths' engine's calls alternated on one store at 1M; their p50s, stages and how far apart their answers are. */
async function runBench(o: { steps: number; clusterSize: number; d: number; budgetShare: number; window: number; base: PathName; next: PathName }, log: (s: string) => void) {
  const cfg = { tokens: 1 << 20, kvHeads: 8, G: 4, sinks: 16, steps: o.steps, probes: [], clusterSize: o.clusterSize, d: o.d, budgetShare: o.budgetShare, window: o.window };
  const { store, qs, step, d } = await benchSetup(cfg, log);
  const engine = (q: Float32Array) => step(q, true, 'spread', true, true, PROBE_ESTIMATED, true);
  const full = (q: Float32Array) => step(q, true, 'spread', true, false, PROBE_ESTIMATED, true);
  const sides = [o.base, o.next] as const, key = (i: number) => (i === 0 ? 'base' : 'next');
  const ms = { base: [] as number[], next: [] as number[] }, score = { base: [] as number[], next: [] as number[] }, tiles = { base: [] as number[], next: [] as number[] };
  let overlap = 1, outRel = 0, lseAbs = 0;
  try {
    for (const path of sides) for (let i = 0; i < 3; i++) await withPath(path, () => engine(qs[i]));  // both graphs captured
    for (let i = 0; i < o.steps; i++) {
      const q = qs[5 + (i % (qs.length - 5))];
      const order = i % 2 ? [1, 0] : [0, 1];
      for (const k of order) ms[key(k)].push((await withPath(sides[k], () => engine(q))).ms);
      const r: Partial<Record<'base' | 'next', WaveGpuStepResult>> = {};
      for (const k of order) {
        const x = await withPath(sides[k], () => full(q));
        r[key(k)] = x;
        if (x.stages.score !== undefined) score[key(k)].push(x.stages.score);
        if (x.stages.tiles !== undefined) tiles[key(k)].push(x.stages.tiles);
      }
      const a = r.base as WaveGpuStepResult, b = r.next as WaveGpuStepResult;
      (a.ids ?? []).forEach((ids, h) => {
        const inA = new Set(ids), other = (b.ids ?? [])[h] ?? new Int32Array(0);
        const both = other.filter((x) => inA.has(x)).length;
        overlap = Math.min(overlap, ids.length + other.length === 0 ? 1 : both / (ids.length + other.length - both));
      });
      for (let r0 = 0; r0 < a.lse.length; r0++) {
        lseAbs = Math.max(lseAbs, Math.abs(a.lse[r0] - b.lse[r0]));
        let diff = 0, norm = 0;
        for (let j = 0; j < d; j++) (diff += (a.out[r0 * d + j] - b.out[r0 * d + j]) ** 2), (norm += a.out[r0 * d + j] ** 2);
        outRel = Math.max(outRel, Math.sqrt(diff) / Math.max(Math.sqrt(norm), 1e-30));
      }
    }
  } finally {
    store.close();
  }
  const p = (x: number[], f: number) => (x.length ? quantile(x, f) : NaN);
  const side = (k: 'base' | 'next') => ({ path: o[k === 'base' ? 'base' : 'next'], p50: p(ms[k], 0.5), p90: p(ms[k], 0.9), scoreStageP50: p(score[k], 0.5), tilesStageP50: p(tiles[k], 0.5) });
  return {
    machine: machine(), date: new Date().toISOString(), rev: process.env.KVRECALL_BENCH_REV ?? '', config: cfg,
    engineCallMs: { base: side('base'), next: side('next') },
    ratio: p(ms.next, 0.5) / p(ms.base, 0.5),
    nextVsBase: { idsOverlapMin: overlap, outRelMax: outRel, lseAbsMax: lseAbs },
  };
}

function markdown(r: Awaited<ReturnType<typeof runBench>>, device: string): string {
  const f = (x: number) => x.toFixed(3), c = r.config, { base, next } = r.engineCallMs;
  const row = (x: typeof base) => `| ${PATH_LABEL[x.path]} (\`${x.path}\`) | ${f(x.p50)} | ${f(x.p90)} | ${f(x.scoreStageP50)} | ${f(x.tilesStageP50)} |`;
  return [
    `### The wave step's tensor-core paths: \`${next.path}\` against \`${base.path}\`, ${device}`,
    '',
    `${r.machine}, ${r.date}${r.rev ? `, ${r.rev}` : ''}; \`node dist/bench/wave-gpu-mma.js --bench --base ${base.path} --new ${next.path}\`: ${c.tokens} tokens a kv head, ${c.kvHeads} kv heads × ${c.G} q heads, d=${c.d}, f16, clusters of ${c.clusterSize}, budget ${c.budgetShare * 100}%, sinks ${c.sinks}, window ${c.window}, probe ${PROBE_ESTIMATED}; the engine's call (attend, ids left on the device, no stage times, its CUDA graph), the two paths alternated step by step on one store, ${c.steps} steps each; the stages from full calls with stage times (score: ScoreClusters; tiles: AttendAndClusters).`,
    '',
    '| path | engine call p50 ms | p90 ms | score stage p50 ms | tiles stage p50 ms |',
    '| --- | ---: | ---: | ---: | ---: |',
    row(base),
    row(next),
    '',
    `\`${next.path}\` ÷ \`${base.path}\`, engine call p50: **${f(r.ratio)}**. Its answers against the base path's over the same steps (full calls): ids overlap (Jaccard, least head) ${r.nextVsBase.idsOverlapMin.toFixed(4)}, out ${r.nextVsBase.outRelMax.toExponential(2)} relative (largest q head), lse ${r.nextVsBase.lseAbsMax.toExponential(2)} absolute.`,
    '',
  ].join('\n');
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
  const pathOpt = (name: string, fallback: PathName): PathName => {
    const v = opt(name) ?? fallback;
    if (!isPath(v)) throw new Error(`${name} ${v}: one of ${Object.keys(PATHS).join(', ')}`);
    return v;
  };
  const info = requireDevice();
  let failed = 0;
  if (args.includes('--check') || !args.includes('--bench')) {
    const path = pathOpt('--path', 'all');
    let seed = Date.now() % 1_000_000;
    for (const c of mmaCases(path)) {
      const r = await checkMmaCase(c, seed++, path);
      if (!r.ok) failed++;
      const line = (x: CompareResult) => `idsDiffer ${x.idsDiffer} overlap ${x.idsOverlap.toFixed(4)} out ${x.outRel.toExponential(2)} lse ${x.lseRel.toExponential(2)} estimated ${x.estimatedEqual}`;
      console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${mmaCaseName(c)}: default ${line(r.plain)}; ${path} ${line(r.mma)}; lean ${r.leanSame}`);
    }
  }
  if (args.includes('--bench')) {
    const r = await runBench({
      steps: Number(opt('--steps') ?? 50), clusterSize: Number(opt('--cluster-size') ?? 16), d: Number(opt('--head-dim') ?? 128),
      budgetShare: Number(opt('--budget-share') ?? 0.02), window: Number(opt('--window') ?? 64),
      base: pathOpt('--base', 'plain'), next: pathOpt('--new', 'score'),
    }, console.log);
    const md = markdown(r, deviceName(info));
    console.log(md);
    const tag = opt('--tag');
    saveDeviceResult(`wave-gpu-mma-${cardName(info.device)}${r.config.d === 128 ? '' : `-d${r.config.d}`}${tag ? `-${tag}` : ''}`, r, md);
  }
  process.exit(failed ? 1 : 0);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) main().catch((e) => {
  console.error(e);
  process.exit(1);
});
