// The wave step's GPU check (`node dist/bench/wave-gpu.js --check`,
// test/native/wave-gpu.test.ts): per case, one GPU step per ranking against
// the host's, then the engine's call (graph on, ids left on the device)
// against the full one, for fresh queries and for shapes of other budgets
// taking turns on the store.
import { type WaveGpuStepResult, WaveGpuStore, waveStepBucket } from '../addon/wave-gpu.js';
import { PROBE, type ClusterRanking } from '../index/wave/cluster-index.js';
import { Rng } from '../workload/index.js';
import { compare, type CompareResult, gpuRanking, type KeptFilter, queries, staticRows, type WaveCase } from './wave-gpu.js';
import { caseHeads } from './wave-gpu-heads.js';
import { withPath } from './wave-paths.js';

/**
 * The engine's call (ids left on the device, no stage times) against the full one: `kept` the ids' lengths, no ids,
 * no stages, the same out and lse within 1e-6 relative (the touched clusters are listed in atomic order, so sums may
 * round differently from one call to the next).
 */
function leanSame(full: WaveGpuStepResult, lean: WaveGpuStepResult): boolean {
  const close = (x: number, y: number) => x === y || Math.abs(x - y) <= 1e-6 * Math.max(1, Math.abs(y));
  const same = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((x, i) => close(x, b[i]));
  return lean.ids === undefined && Object.keys(lean.stages).length === 0 && Object.keys(full.stages).length > 0 &&
    full.ids !== undefined && full.ids.every((ids, h) => ids.length === lean.kept[h]) && same(full.out, lean.out) && same(full.lse, lean.lse);
}

/**
 * The step with stage times off from a graph (kernels launched early where wave_paths.cuh's pdl is on; twice, the
 * second replaying the graph: a key's first step runs one by one, native/cuda/step_graph.cuh) and launched one by
 * one: the same ids, out and lse as leanSame has them. (Until the round-4 switches were removed it also ran each
 * under KVRECALL_WAVE_ROUND4=0.)
 */
async function launchesSame(store: WaveGpuStore, args: Parameters<WaveGpuStore['step']>[0]): Promise<boolean> {
  const runs: WaveGpuStepResult[] = [];
  const close = (x: number, y: number) => x === y || Math.abs(x - y) <= 1e-6 * Math.max(1, Math.abs(y));
  const key = (r: WaveGpuStepResult) => (r.ids ?? []).map((a) => a.join()).join('|') + `|${r.kept.join()}`;
  for (const graph of [true, true, false]) runs.push(await store.step({ ...args, stages: false, graph }));
  const [a] = runs;
  return runs.every((r) => key(r) === key(a) && r.out.every((x, i) => close(x, a.out[i])) && r.lse.every((x, i) => close(x, a.lse[i])));
}

type WaveCaseCheck = Record<string, CompareResult & { ms: number; leanSame?: boolean; leanFailed?: string; pathsSame?: boolean }>;

/**
 * Builds the case's clusters on the host (k-means), runs one GPU step per
 * ranking and compares each with the host's: on the `plain` path
 * (bench/wave-paths.ts), whose ids are the host's bit for bit.
 */
export async function checkWaveCase(c: WaveCase, seed: number): Promise<WaveCaseCheck> {
  return withPath('plain', () => checkPlainCase(c, seed));
}
async function checkPlainCase(c: WaveCase, seed: number): Promise<WaveCaseCheck> {
  const rng = new Rng(seed);
  const { dt, d, tokens: N, kvHeads: H, G } = c;
  const { keysF, heads, gpuHeads } = await caseHeads(c, rng, seed);
  const store = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads });
  try {
    const q = queries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G), exact = staticRows(N, c.sinks, c.window);
    const kv = { keys: gpuHeads.map((g) => g.keys), values: gpuHeads.map((g) => g.values) };
    // The layer-step as the engine asks for it: sinks and window attended
    // through `exact`, so dropped from the kept ids, and the budget less them.
    const skip: [number, number][] = [[0, Math.min(c.sinks, N)], [Math.max(0, N - c.window), N]];
    const filter: KeptFilter = { skip, keep: c.budget.map((k) => Math.max(0, k - exact.length)) };
    const run = async (ranking: ClusterRanking, rest: 'rows' | 'moments' = 'rows', attend = false) => {
      const args = { q, qHeads: H * G, scale: c.scale, budget: c.budget, probe: PROBE, ranking: gpuRanking(ranking), exact, rest, attend, ...(attend && filter) };
      const shape = (budget: number[], keep: number[] | undefined) => ({ ...args, budget, ...(keep && { keep }) });
      // The widest budget moved past its bucket's edge (up where the tokens allow, else down).
      const farShape = () => {
        const widest = Math.min(N, Math.max(...c.budget));
        let to = waveStepBucket(widest) + 1;
        if (to > N) for (to = widest - 1; to > 0 && waveStepBucket(to) === waveStepBucket(widest); to--);
        const farBudget = c.budget.map((b) => Math.min(N, Math.max(0, Math.min(N, b) + to - widest)));
        return shape(farBudget, args.keep && farBudget.map((b) => Math.max(0, b - exact.length)));
      };
      const gpu = await store.step(args);
      const r = await compare(heads, gpu, q, G, d, dt, c.scale, c.budget, exact, ranking, rest, attend ? kv : undefined, attend ? filter : undefined);
      if (!attend) return { ...r, ms: gpu.ms };
      // The engine's call, replayed from a CUDA graph: the same answer for
      // this query and for fresh ones (the graph must take each step's
      // inputs, not the captured step's), one capture while the shape holds.
      // failed: the checks that did not hold (each runs whatever failed before), for the test's message.
      const failed: string[] = [];
      const check = (ok: boolean, what: string) => (ok || failed.push(what), ok);
      const leanStep = (a: typeof args) => store.step({ ...a, ids: false, stages: false });
      // The far shape (below) once first, launched one by one: the step's
      // buffers grow to its sizes now, so none is reallocated while graphs
      // are counted (a graph's key holds the buffers' pointers: a buffer that
      // moved would make the first shape a new key).
      await store.step({ ...farShape(), graph: false });
      check(leanSame(gpu, await leanStep(args)), 'lean after full');
      const captures = (await leanStep(args)).graphCaptures;
      for (let i = 0; i < 3; i++) {
        const a2 = { ...args, q: queries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G) };
        const full = await store.step(a2), replayed = await leanStep(a2);
        check(leanSame(full, replayed), `fresh query ${i}: replayed vs full`);
        check(replayed.graphCaptures === captures, `fresh query ${i}: captured again`);
      }
      // Other shapes taking turns with the first, as sessions with other
      // budgets do on a shared layer. near: the budget one more a head (one
      // less where one more would pass the tokens: the step clamps the budget
      // to them); its sizes' buckets are the first shape's (native/cuda/
      // wave_sizes.cuh), so it replays the first shape's graph with its own
      // budget and keep. far: the widest budget moved past its bucket's edge
      // (up where the tokens allow, else down): its own graph, captured at
      // its second sighting, the first kept.
      const near = shape(c.budget.map((b) => (b < N ? b + 1 : b - 1)), args.keep?.map((k, h) => (c.budget[h] < N ? k : Math.max(0, k - 1))));
      const far = farShape();
      // What wave_step.cu's graph key takes from these shapes (the exact rows are the same).
      const key = (a: { budget: number[]; probe: number }) =>
        `${waveStepBucket(Math.min(N, Math.max(...a.budget)))}|${waveStepBucket(Math.min(N, Math.max(...a.budget.map((b) => a.probe * b))))}`;
      const newKeys = new Set([key(near), key(far)].filter((k) => k !== key(args))).size;
      for (const [name, a2] of [['near', near], ['far', far], ['first', args], ['far', far], ['near', near], ['first', args]] as const)
        check(leanSame(await store.step(a2), await leanStep(a2)), `${name} shape: lean vs full`);
      const after = (await leanStep(args)).graphCaptures;
      check(after === captures + newKeys, `captures ${after - captures} over the other shapes, expected ${newKeys}`);
      const paths = await launchesSame(store, args);
      return { ...r, ok: r.ok && failed.length === 0 && paths, leanSame: failed.length === 0, leanFailed: failed.join('; '), pathsSame: paths, ms: gpu.ms };
    };
    // All on one store, radius first: each later step also checks that the
    // one before left its per-cluster scratch (owner, removed) reset.
    const radius = await run('radius');
    const spread = await run('spread');
    return { radius, spread, 'spread-moments': await run('spread', 'moments'), 'spread+attend': await run('spread', 'rows', true) };
  } finally {
    store.close();
  }
}
