// The wave step's kernels against their previous path in one sitting (needs
// a CUDA device). KVRECALL_WAVE_LEGACY=1 makes native/cuda/wave_step.cu run
// the step as before issue #13's kernel work: every dot summed again from
// the keys, the cuts' streaming kernels on few-CTA grids, ResolveCut's digit
// passes from global memory, ScoreClusters in CTAs of 128 clusters, the
// exact rows' estimate tiles in their own launch, no L2 prefetch. Without
// it: the rescored candidates' dots (and the sinks/window rows', ExactDots)
// serve the partly attended clusters' logits (PartialLogitsFromDots) and the
// attention tiles, the cuts' grids are wide, ResolveCut holds its bin in
// shared memory, ScoreClusters runs four CTAs of 64 an SM on a swizzled
// tile (its centroid and axis passes sharing their q loads), the exact
// rows' estimate tiles run in the attention's kernel (AttendAndRows), and
// the tiles prefetch their value rows. (GatherCandidates' batched copy is
// in both.) The variable is read at each step, so this alternates the two step
// by step (A B B A ...) on one store at bench/wave-gpu.ts's shape.
// --old NAME=VALUE (repeatable) names another switch for the old path, to
// time one change against the rest of the new path; --each compares the
// legacy path and then each of these in turn on the same store:
// KVRECALL_WAVE_SWIZZLE=0 (ScoreClusters' tile unswizzled, its passes
// unfused), KVRECALL_WAVE_SCORE_FUSE=0 (its centroid and axis passes apart),
// KVRECALL_WAVE_SCORE_SPLIT=0 (the fused kernel's tile awaited whole),
// KVRECALL_WAVE_CLEAR=0 (the step's six memsets instead of StepClear),
// KVRECALL_WAVE_FIND=1 (HistogramFind instead of Histogram and FindBin),
// KVRECALL_WAVE_RESCORE_HELD=0 (RescoreCandidates instead of RescoreHeld),
// KVRECALL_WAVE_PACK=0 (ScatterKept and PackIds instead of ScatterPack),
// KVRECALL_WAVE_ROUND2=0 (none of the round-2 changes, nor round 4's order
// ranges and owners, which follow CLEAR and PACK), KVRECALL_WAVE_PDL=1 (a
// kernel launched while the one before it ends; off by default); all in
// native/cuda/wave_paths.cuh. Round 4's own switches (ROUND4, RANGE, HALF,
// PACK_OWNERS, TILES) were removed after their A/B on an H100
// (bench/results/wave-round4-*.md), and a switch not listed here is refused.
//
//   node dist/bench/wave-gpu-ab.js [--steps 50] [--cluster-size 16] [--probe 4] [--old KVRECALL_WAVE_LEGACY=1 ...] [--each]
//
// Reports p50/p90 of the engine's call (attend, ids left on the device, no
// stage times, graphs) for each path, per-stage p50s of the full call (ids,
// stage times) for each, and whether every answer is the same bit for bit:
// ids and counts, out, lse, estimated. Exits 1 when any differs.
import { requireDevice } from './device-results.js';
import type { WaveGpuStepResult } from '../addon/wave-gpu.js';
import { PROBE_ESTIMATED } from '../index/wave/cluster-index.js';
import { quantile } from './stats.js';
import { benchSetup } from './wave-gpu.js';
import { setPath } from './wave-paths.js';

/** The switches of single changes (native/cuda/wave_paths.cuh), each against the rest of the new path. */
// FIND=1 and PDL=1 time HistogramFind and early launches (off by default) against the default; ROUND2=0 the paths before round 2.
const SINGLE = [...['SWIZZLE', 'SCORE_FUSE', 'SCORE_SPLIT', 'CLEAR', 'RESCORE_HELD', 'PACK'].map((n) => `KVRECALL_WAVE_${n}=0`), 'KVRECALL_WAVE_FIND=1',
  'KVRECALL_WAVE_PDL=1', 'KVRECALL_WAVE_ROUND2=0'];
/** Every switch wave_paths.cuh reads: a name not here would change nothing, and the two paths would be the same by default. */
const KNOWN = new Set(['KVRECALL_WAVE_LEGACY', ...SINGLE.map((s) => s.split('=')[0])]);

/** Sets the old path's switch (name=value) or removes it (the new path). */
function setOld(sw: { name: string; value: string }, on: boolean): void {
  if (on) process.env[sw.name] = sw.value;
  else delete process.env[sw.name];
}

const sameBits = (a: Float32Array, b: Float32Array) =>
  a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

/** The first difference between two answers of the same step, or '' when they are the same bit for bit. */
function differs(a: WaveGpuStepResult, b: WaveGpuStepResult): string {
  if (a.kept.join() !== b.kept.join()) return `kept ${a.kept.join('/')} vs ${b.kept.join('/')}`;
  if (a.scanned.join() !== b.scanned.join()) return `scanned ${a.scanned.join('/')} vs ${b.scanned.join('/')}`;
  if (a.estimated.join() !== b.estimated.join()) return `estimated ${a.estimated.join('/')} vs ${b.estimated.join('/')}`;
  if ((a.ids === undefined) !== (b.ids === undefined)) return 'ids on one side only';
  for (let h = 0; a.ids && b.ids && h < a.ids.length; h++)
    if (a.ids[h].length !== b.ids[h].length || a.ids[h].some((x, i) => x !== b.ids?.[h][i])) return `ids of kv head ${h}`;
  if (!sameBits(a.lse, b.lse)) return 'lse';
  if (!sameBits(a.out, b.out)) {
    let worst = 0;
    a.out.forEach((x, i) => (worst = Math.max(worst, Math.abs(x - b.out[i]) / Math.max(1e-30, Math.abs(b.out[i])))));
    return `out (max rel ${worst.toExponential(2)})`;
  }
  return '';
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
  const steps = Number(opt('--steps') ?? 50), clusterSize = Number(opt('--cluster-size') ?? 16), probe = Number(opt('--probe') ?? PROBE_ESTIMATED);
  // --old NAME=VALUE (repeatable), --each: the legacy path and every single switch, one after another on one store
  const olds = args.flatMap((a, i) => (a === '--old' ? [args[i + 1]] : []));
  if (args.includes('--each')) olds.push('KVRECALL_WAVE_LEGACY=1', ...SINGLE);
  if (!olds.length) olds.push('KVRECALL_WAVE_LEGACY=1');
  const switches = olds.map((o) => {
    const m = /^(KVRECALL_WAVE_[A-Z0-9_]+)=(\w+)$/.exec(o ?? '');
    if (!m) throw new Error(`--old wants NAME=VALUE with a KVRECALL_WAVE_ switch, got ${o}`);
    if (!KNOWN.has(m[1])) throw new Error(`--old: native/cuda/wave_paths.cuh reads no ${m[1]} (it reads ${[...KNOWN].join(', ')})`);
    return { name: m[1], value: m[2] };
  });
  requireDevice();
  // The paths compared bit for bit sum in the host's order: the tensor-core
  // paths (on by default; bench/wave-gpu-mma.ts compares them) off in both.
  setPath('plain');
  const { store, qs, step } = await benchSetup(
    { tokens: 1 << 20, kvHeads: 8, G: 4, d: 128, clusterSize, budgetShare: 0.02, sinks: 16, window: 64, steps, probes: [] }, console.log);
  const engine = (q: Float32Array) => step(q, true, 'spread', true, true, probe, true);
  const full = (q: Float32Array) => step(q, true, 'spread', true, false, probe, true);
  let differing = 0;
  try {
    for (const sw of switches) {
      const ms: Record<'old' | 'new', number[]> = { old: [], new: [] };
      const stages: Record<'old' | 'new', Record<string, number[]>> = { old: {}, new: {} };
      const diffs: string[] = [];
      for (const old of [true, false]) {  // warm both paths (their graphs captured)
        setOld(sw, old);
        for (let i = 0; i < 3; i++) await engine(qs[i]);
      }
      for (let i = 0; i < steps; i++) {
        const q = qs[5 + (i % (qs.length - 5))];
        const order = i % 2 ? [false, true] : [true, false];
        const lean: Partial<Record<'old' | 'new', WaveGpuStepResult>> = {}, whole: Partial<Record<'old' | 'new', WaveGpuStepResult>> = {};
        for (const old of order) {
          setOld(sw, old);
          const r = await engine(q);
          ms[old ? 'old' : 'new'].push(r.ms);
          lean[old ? 'old' : 'new'] = r;
        }
        for (const old of order) {
          setOld(sw, old);
          const r = await full(q);
          for (const [k, v] of Object.entries(r.stages)) (stages[old ? 'old' : 'new'][k] ??= []).push(v);
          whole[old ? 'old' : 'new'] = r;
        }
        setOld(sw, false);
        const d1 = differs(lean.old as WaveGpuStepResult, lean.new as WaveGpuStepResult);
        const d2 = differs(whole.old as WaveGpuStepResult, whole.new as WaveGpuStepResult);
        if (d1 || d2) diffs.push(`step ${i}: ${d1 ? `engine call: ${d1}` : ''}${d1 && d2 ? '; ' : ''}${d2 ? `full call: ${d2}` : ''}`);
      }
      const f = (x: number) => x.toFixed(3);
      const row = (key: 'old' | 'new') => `p50 ${f(quantile(ms[key], 0.5))} ms, p90 ${f(quantile(ms[key], 0.9))} ms`;
      console.log(`== old path ${sw.name}=${sw.value}: clusters of ${clusterSize}, probe ${probe}, ${steps} steps alternated`);
      console.log(`engine call, old path: ${row('old')}`);
      console.log(`engine call, new path: ${row('new')}`);
      console.log(`new / old p50: ${(quantile(ms.new, 0.5) / quantile(ms.old, 0.5)).toFixed(3)}`);
      for (const key of ['old', 'new'] as const)
        console.log(`stages p50 (${key}, full call): ` + Object.entries(stages[key]).map(([k, v]) => `${k} ${f(quantile(v, 0.5))}`).join(', '));
      console.log(diffs.length ? `DIFFER in ${diffs.length} of ${steps} steps:\n${diffs.slice(0, 10).join('\n')}` : `answers bit-identical in all ${steps} steps (engine call and full call)`);
      if (diffs.length) differing++;
    }
  } finally {
    for (const sw of switches) setOld(sw, false);
    store.close();
  }
  process.exit(differing ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
