// Where a block method's select spends its time at the issue's shape (issue
// #13: block methods' selection ≤ 0.1 ms at 1M tokens, 32 q / 8 kv heads,
// d=128, f16): nosa and topk-blocks select through the engine's device
// scorer (engine/cache/device-block-scores.ts, timeSteps on), and every step
// is split into
//   - the JS around the scorer's call (the static ranges, the query rows,
//     the choice: addon/block-choose.ts, the selection's parts);
//   - the call's wall time, and of it the wrapper's JS (arguments, answer
//     views), the native call's host stages (staging the inputs, issuing the
//     graph, waiting for the stream, copying the outputs out) and the call's
//     time on the device (two CUDA events around its copies and kernels), so
//     issue + wait − device is what the host waits beyond the device's work;
//   - launched one by one with CUDA events, the same call's score and select
//     kernels and its device time (copies and gaps: device − both kernels);
//   - nosa's select again with the device's answer replayed (no device
//     call before it): the host's own work.
// The same call is launched one by one again on the new paths (the score
// kernel pipelined, block_score_kernels.cuh ScoreBlocksPiped; the select in
// two launches, block_scores.cu SelectMode: both on by default since session
// 28, KVRECALL_BLOCK_SCORES_PIPED=0 / KVRECALL_BLOCK_SELECT_SLICED=0 turn them
// off), its answer checked against the old paths' and the engine's.
// Each method selects twice a step in two contexts making the same choices:
// `cold`, right after the host writes --flush-mib MiB (caches emptied: the
// worst of what the rest of a decode step does between two selects; plus
// --gap MS asleep, an idle GPU), then `warm`, at once after it. The host
// path (no scorer) selects every step in a third context, after the timed
// ones, and all must agree (mismatches, exit code 1).
//   node dist/bench/block-select-stages-gpu.js [--tokens N] [--steps S] [--flush-mib M] [--gap MS] [--stand-in] [--profile]
// --profile: no result files (a run under Nsight Compute: bench/gpu-visit.sh's ncu-blocks stage).
// --stand-in (any host, no device): the native call is a host stand-in
// answering what the device does (precomputed before the step by the host's
// pass over every summary row, its own time taken out of the call), so the
// JS rows are this host's and the device rows are absent.
// Results: bench/results/block-select-stages-gpu-<card>.{json,md} (stand-in: -standin-<host>; with
// KVRECALL_BLOCK_SCORES_PIPED=0 / KVRECALL_BLOCK_SELECT_SLICED=0 in the environment, the engine's scorer on
// the old paths: -unpiped / -unsliced).
import { availableParallelism, loadavg } from 'node:os';
import { cudaAvailable } from '../addon/cuda.js';
import { DeviceBlockScores, type BlockTopKTimes, type HeadTopBlocks, type NativeBlockScores } from '../addon/block-scores.js';
import { topkHeads } from '../addon/kernels.js';
import { DeviceBlockScorer } from '../engine/cache/device-block-scores.js';
import { DEFAULT_PARAMS } from '../engine/sessions.js';
import { nosa, topkBlocks } from '../index/block-select.js';
import { BlockSummary, SUMMARY_REPS, summaryStride } from '../index/block-summary.js';
import type { BlockScorer, RetrievalMethod, SearchParams, Selection } from '../index/method.js';
import { Rng } from '../workload/index.js';
import { blockLayerContext, randomSummaryRows } from './block-layer-context.js';
import { cardName, saveDeviceResult } from './device-results.js';
import { numFlag } from './args.js';
import { quantile } from './stats.js';
import { RecordingScorer, ReplayScorer } from './recorded-scorer.js';

const progress = (msg: string) => process.stderr.write(`[bench:block-select-stages-gpu] ${msg}\n`);
const argv = process.argv;
const tokens = numFlag('--tokens', argv) ?? 1 << 20, steps = numFlag('--steps', argv) ?? 300, warmup = 20;
const flushMiB = numFlag('--flush-mib', argv) ?? 64, gapMs = numFlag('--gap', argv) ?? 0;
const standIn = argv.includes('--stand-in'), profile = argv.includes('--profile');
const kvHeads = 8, qHeads = 32, d = 128, G = qHeads / kvHeads, blockSize = 64, reps = SUMMARY_REPS;
const blocks = Math.ceil(tokens / blockSize), stride = summaryStride(d), rows = blocks * reps;

/** The stand-in's answer for one step: every row's score and each head's top rows (the host pass over every row). */
interface Answer {
  aug: Float32Array;
  all: Float32Array[];
  topIds: Int32Array[];
  topScores: Float32Array[];
}
const TOP_ROWS = 4096;

/**
 * The device's contract on the host (addon/block-scores.ts NativeBlockScores),
 * from the step's precomputed answer: the top k rows, or the first k distinct
 * groups of reps rows as their first row with the best row's score, and the
 * extra rows' scores; its time in `ms`, taken out of the call's.
 */
class StandInNative implements NativeBlockScores {
  answer?: Answer;
  ms = 0;
  topk(a: Parameters<NativeBlockScores['topk']>[0]): number {
    const t = performance.now(), x = this.answer!, R = a.reps ?? 1;
    if (a.q.length !== x.aug.length || a.q.some((v, i) => !Object.is(v, x.aug[i]))) throw new Error('stand-in: the call\'s query rows are not the precomputed step\'s');
    const kk = Math.min(a.k, Math.floor(rows / R));
    for (let h = 0; h < kvHeads; h++) {
      const ids = x.topIds[h], sc = x.topScores[h];
      let n = 0;
      const seen = new Set<number>();
      for (let i = 0; i < ids.length && n < kk; i++) {
        const g = Math.floor(ids[i] / R);
        if (seen.has(g)) continue;
        seen.add(g);
        a.outIds[h * kk + n] = g * R;
        a.outScores[h * kk + n++] = sc[i];
      }
      if (n < kk) throw new Error(`stand-in: ${TOP_ROWS} rows hold ${n} of ${kk} groups`);
    }
    if (a.extraIds) {
      let at = 0;
      for (let h = 0; h < kvHeads; h++) for (let i = 0; i < a.extraCounts![h]; i++, at++) a.extraScores![at] = x.all[h][a.extraIds[at]];
    }
    this.ms += performance.now() - t;
    return kk;
  }
  bytes(): number {
    return 0;
  }
  lastTimes(): BlockTopKTimes {
    return { scoreMs: 0, selectMs: 0, deviceMs: 0, prepMs: 0, issueMs: 0, waitMs: 0, copyOutMs: 0 };
  }
  graphCaptures(): number {
    return 0;
  }
  pipedScores(): boolean {
    return false;
  }
  slicedSelect(): boolean {
    return false;
  }
  close(): void {}
}

const STAGES = ['select', 'jsAround', 'call', 'wrapperJs', 'prep', 'issue', 'wait', 'copyOut', 'device', 'beyondDevice'] as const;
type Stage = (typeof STAGES)[number];
const STAGE_NAMES: Record<Stage, string> = {
  select: 'the select, whole',
  jsAround: '  the JS around the scorer call (ranges, query rows, the choice, parts)',
  call: '  the scorer call, wall',
  wrapperJs: '    of it, the wrapper\'s JS (arguments, answer views)',
  prep: '    native: stage the inputs (pinned copy)',
  issue: '    native: issue the graph launch',
  wait: '    native: wait for the stream',
  copyOut: '    native: copy the outputs out',
  device: 'the call on the device (events: copies, kernels, gaps)',
  beyondDevice: 'host issue + wait beyond the device time',
};

async function main(): Promise<void> {
  const info = cudaAvailable();
  if (!standIn && !info.ok) {
    console.log(`no CUDA device (${info.error}): nothing to run (--stand-in runs the host's part anywhere)`);
    return;
  }
  const rng = new Rng(13);
  progress(`${tokens} tokens: ${kvHeads} kv heads × ${blocks} blocks × ${reps} rows${standIn ? ' (stand-in for the device)' : ''}`);
  const heads = Array.from({ length: kvHeads }, () =>
    new BlockSummary(blocks, blockSize, tokens, d, 'f16', randomSummaryRows(rng, blocks, reps, d, blockSize), Float32Array.from({ length: blocks }, () => rng.next()), 0.3, reps));
  const params = { ...DEFAULT_PARAMS, budget: Math.floor(tokens * 0.01), sinks: 64, window: 256 } as SearchParams;
  const native = standIn ? new StandInNative() : undefined;
  const scorer = native
    ? new DeviceBlockScorer({ create: (o) => DeviceBlockScores.over(native, { heads: o.means.length, blocks: o.blocks, headDim: o.headDim }), supported: () => true })
    : new DeviceBlockScorer();
  scorer.timeSteps = true;
  const recording = new RecordingScorer(scorer), replay = new ReplayScorer();
  // The kernels launched one by one: a second device copy of the same rows (the scorer's own is private), and a
  // third on the new paths, each an A/B read when a copy is made: the score kernel overlapping its copies with its
  // sums (KVRECALL_BLOCK_SCORES_PIPED=1) and the select in two launches (KVRECALL_BLOCK_SELECT_SLICED=1). The
  // engine's scorer takes the variables as the process has them.
  const SWITCHES = ['KVRECALL_BLOCK_SCORES_PIPED', 'KVRECALL_BLOCK_SELECT_SLICED'];
  const copy = (on: boolean) => {
    const before = SWITCHES.map((v) => process.env[v]);
    for (const v of SWITCHES) process.env[v] = on ? '1' : '0';
    try {
      return DeviceBlockScores.create({ means: heads.map((s) => s.rows), blocks: rows, headDim: stride, dtype: 'f16' });
    } finally {
      SWITCHES.forEach((v, i) => (before[i] === undefined ? delete process.env[v] : (process.env[v] = before[i])));
    }
  };
  const oneByOne = native ? undefined : copy(false), oneByOneNew = native ? undefined : copy(true);
  if (oneByOneNew && !(oneByOneNew.pipedScores && oneByOneNew.slicedSelect)) throw new Error('the switches did not give the new paths');
  const ctx = (by?: BlockScorer) => blockLayerContext(heads, { tokens, qHeads, kvHeads, headDim: d }, new Map(), by);
  const methods: RetrievalMethod[] = [nosa, topkBlocks];
  const ctxs = methods.map(() => ({ cold: ctx(recording), warm: ctx(recording), host: ctx() }));
  const replayCtx = ctx(replay);
  const flush = new Uint8Array(flushMiB << 20);
  const times = methods.map(() => ({ cold: new Map<Stage, number[]>(STAGES.map((s) => [s, []])), warm: new Map<Stage, number[]>(STAGES.map((s) => [s, []])) }));
  const kernels = { score: [] as number[], select: [] as number[], device: [] as number[], copiesAndGaps: [] as number[], pipedScore: [] as number[], slicedSelect: [] as number[], pipedDevice: [] as number[] };
  const replayed: number[] = [];
  let mismatches = 0;
  const load = loadavg()[0];
  const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
  const answer: Answer = { aug: new Float32Array(0), all: heads.map(() => new Float32Array(rows)), topIds: heads.map(() => new Int32Array(TOP_ROWS)), topScores: heads.map(() => new Float32Array(TOP_ROWS)) };
  for (let s = 0; s < warmup + steps; s++) {
    for (let i = 0; i < q.length; i++) q[i] = 0.9 * q[i] + 0.1 * rng.normal();
    const keep = s >= warmup;
    if (native) {
      answer.aug = BlockSummary.augment(heads, q, G);
      await topkHeads({ q: answer.aug, group: G, headDim: stride, dtype: 'f16', k: TOP_ROWS, heads: heads.map((x, h) => ({ keys: x.rows, tokens: rows, outIds: answer.topIds[h], outScores: answer.topScores[h], allScores: answer.all[h] })) });
      native.answer = answer;
    }
    for (const [m, method] of methods.entries()) {
      const picked: Partial<Record<'cold' | 'warm', Selection>> = {};
      for (const pass of ['cold', 'warm'] as const) {
        if (pass === 'cold') {
          flush.fill(s & 255);
          if (gapMs > 0) await new Promise((r) => setTimeout(r, gapMs));
        }
        const standInBefore = native?.ms ?? 0, calls = scorer.stats.steps;
        const t0 = performance.now();
        picked[pass] = await method.select(ctxs[m][pass], q, params);
        const ms = performance.now() - t0, st = scorer.lastStep!, standInMs = (native?.ms ?? 0) - standInBefore;
        if (scorer.stats.steps !== calls + 1) throw new Error(`${method.name}: the select did not call the device scorer once (failures ${scorer.stats.failures})`);
        if (!keep) continue;
        const n = st.native, call = st.callMs - standInMs, inNative = n.prepMs + n.issueMs + n.waitMs + n.copyOutMs;
        const row: Record<Stage, number> = {
          select: ms - standInMs, jsAround: ms - st.callMs, call, wrapperJs: call - inNative,
          // The stand-in has no native stages: blank, not 0.
          prep: native ? NaN : n.prepMs, issue: native ? NaN : n.issueMs, wait: native ? NaN : n.waitMs, copyOut: native ? NaN : n.copyOutMs,
          device: native ? NaN : n.deviceMs, beyondDevice: native ? NaN : n.issueMs + n.waitMs - n.deviceMs,
        };
        for (const stage of STAGES) times[m][pass].get(stage)!.push(row[stage]);
      }
      if (blocksOf(picked.cold!) !== blocksOf(picked.warm!)) mismatches++;
      if (method === nosa) {
        const call = recording.last!;
        if (oneByOne && oneByOneNew) {
          const args = { q: call.q, group: call.group, k: call.k, extra: call.extra, reps: call.reps, times: true, deviceTime: true };
          const a = oneByOne.topk(args), t = oneByOne.lastTimes;
          const b = oneByOneNew.topk(args), tp = oneByOneNew.lastTimes;
          if (keep) {
            kernels.score.push(t.scoreMs), kernels.select.push(t.selectMs), kernels.device.push(t.deviceMs), kernels.copiesAndGaps.push(t.deviceMs - t.scoreMs - t.selectMs);
            kernels.pipedScore.push(tp.scoreMs), kernels.slicedSelect.push(tp.selectMs), kernels.pipedDevice.push(tp.deviceMs);
          }
          // The new paths' answer must be the old ones', bit for bit, and both the engine's.
          const same = (x: HeadTopBlocks[], y: HeadTopBlocks[]) =>
            x.every((r, h) => ['ids', 'scores', 'extraScores'].every((f) => { const u = r[f as 'ids'], v = y[h][f as 'ids']; return u.length === v.length && u.every((e, i) => Object.is(e, v[i])); }));
          if (!same(a, b) || (call.answer && !same(a, call.answer))) mismatches++;
        }
        replay.answer = call;
        replay.ms = 0;
        const t0 = performance.now();
        const again = await nosa.select(replayCtx, q, params);
        if (keep) replayed.push(performance.now() - t0 - replay.ms);
        if (blocksOf(again) !== blocksOf(picked.warm!)) mismatches++;
      }
      // The host path selects every step (its state is the method's: nosa's choice depends on the step before), after the timed ones.
      if (blocksOf(await method.select(ctxs[m].host, q, params)) !== blocksOf(picked.warm!)) mismatches++;
    }
    if (s % 100 === 99) progress(`step ${s + 1}/${warmup + steps}`);
  }
  oneByOne?.close();
  oneByOneNew?.close();
  const stat = (xs: number[]) => ({ p50: quantile(xs, 0.5, 'nearest'), p99: quantile(xs, 0.99, 'nearest') });
  const stages = methods.map((method, m) => ({
    method: method.name,
    cold: Object.fromEntries(STAGES.map((st) => [st, stat(times[m].cold.get(st)!)])) as Record<Stage, { p50: number; p99: number }>,
    warm: Object.fromEntries(STAGES.map((st) => [st, stat(times[m].warm.get(st)!)])) as Record<Stage, { p50: number; p99: number }>,
  }));
  const oneByOneMs = oneByOne ? Object.fromEntries(Object.entries(kernels).map(([k, xs]) => [k, stat(xs)])) : undefined;
  const card = info.ok ? info.device : 'no device';
  const device = native ? `stand-in on a ${availableParallelism()}-core host` : card;
  const result = {
    device, standIn, enginePiped: process.env.KVRECALL_BLOCK_SCORES_PIPED !== '0', engineSliced: process.env.KVRECALL_BLOCK_SELECT_SLICED !== '0', shape: { tokens, blocks, reps, kvHeads, qHeads, headDim: d, stride }, params: { budget: params.budget, sinks: params.sinks, window: params.window },
    steps, warmup, flushMiB, gapMs, load: [load, loadavg()[0]], mismatches, stages, oneByOne: oneByOneMs, replayedHostMs: stat(replayed), date: new Date().toISOString(),
  };
  const f = (x: number) => (Number.isNaN(x) ? '' : x.toFixed(3));
  const cell = (x: { p50: number; p99: number }) => (Number.isNaN(x.p50) ? '' : `${f(x.p50)} / ${f(x.p99)}`);
  const md = [
    `# Block selection's stages at ${tokens} tokens (${device})`,
    '',
    `${kvHeads} kv heads × ${blocks} blocks × ${reps} summary rows (stride ${stride}, f16), ${qHeads} q heads (G=${G}); budget ${params.budget} tokens ` +
      `(1%), sinks ${params.sinks}, window ${params.window}; random summaries (bench/block-layer-context.ts). ${steps} steps after ${warmup}. ` +
      `Each method selects through the engine's device scorer (engine/cache/device-block-scores.ts, timeSteps) twice a step in two contexts making ` +
      `the same choices: cold, after the host wrote ${flushMiB} MiB${gapMs > 0 ? ` and slept ${gapMs} ms` : ''}; warm, at once after it. ` +
      (native ? 'Stand-in: the native call answers on the host from a precomputed pass (its time taken out), so the native and device rows are blank. ' : '') +
      (result.enginePiped ? "The engine's scorer runs the pipelined score kernel (the default). " : "The engine's scorer runs the staged score kernel (KVRECALL_BLOCK_SCORES_PIPED=0). ") +
      (result.engineSliced ? "The engine's scorer selects in two launches (the default). " : "The engine's scorer selects in one launch (KVRECALL_BLOCK_SELECT_SLICED=0). ") +
      `Mismatches (cold against warm, the replay, the host path, no scorer, in a third context every step, and the new paths' answers against the old ones'): ${mismatches}. Load ${load.toFixed(2)}. p50 / p99 ms.`,
    '',
    `| stage | ${stages.map((x) => `${x.method} cold | ${x.method} warm`).join(' | ')} |`,
    `| --- | ${stages.map(() => '---: | ---:').join(' | ')} |`,
    ...STAGES.map((st) => `| ${STAGE_NAMES[st].replace(/^ +/, (sp) => '&nbsp;'.repeat(sp.length))} | ${stages.map((x) => `${cell(x.cold[st])} | ${cell(x.warm[st])}`).join(' | ')} |`),
    '',
    ...(oneByOneMs
      ? [
          "nosa's call launched one by one with CUDA events (the same arguments as its warm call, right after it):",
          '',
          '| what | p50 / p99 ms |',
          '| --- | ---: |',
          `| score kernel (every summary row of every head, the group's best row) | ${cell(oneByOneMs.score)} |`,
          `| select kernel (top k groups a head, extra rows' scores) | ${cell(oneByOneMs.select)} |`,
          `| the call on the device (copies, kernels, gaps) | ${cell(oneByOneMs.device)} |`,
          `| of it, the copies and gaps | ${cell(oneByOneMs.copiesAndGaps)} |`,
          `| new paths (the same answers): score kernel, its copies overlapping its sums (KVRECALL_BLOCK_SCORES_PIPED=1) | ${cell(oneByOneMs.pipedScore)} |`,
          `| new paths: select in two launches, slices then candidates (KVRECALL_BLOCK_SELECT_SLICED=1) | ${cell(oneByOneMs.slicedSelect)} |`,
          `| new paths: the call on the device | ${cell(oneByOneMs.pipedDevice)} |`,
          '',
        ]
      : []),
    `nosa's select again with its device answer replayed (no device call before it): the host's own work ${cell(result.replayedHostMs)} ms.`,
    '',
  ].join('\n');
  if (!profile) saveDeviceResult(`block-select-stages-gpu-${native ? `standin-${hostTag()}` : cardName(card)}${result.enginePiped ? '' : '-unpiped'}${result.engineSliced ? '' : '-unsliced'}`, result, md);
  console.log(md);
  if (mismatches > 0) process.exitCode = 1;
}

/** A selection's blocks and classes, for comparing two selections. */
function blocksOf(sel: Selection): string {
  return JSON.stringify(sel.parts.map((p) => [p.begin, p.end, p.blocks?.ids.map((a) => Array.from(a)), p.blocks?.priority?.map((c) => Array.from(c))]));
}

/** The stand-in run's host, for its file name: 'vm' on a 2-core VM, else the core count. */
function hostTag(): string {
  const cores = availableParallelism();
  return cores <= 2 ? 'vm' : `${cores}core`;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
