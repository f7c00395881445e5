// Block selection per layer-step at 1M tokens, host vs device (issue #13
// item 4): 8 kv heads / 32 q heads, d=128, f16, 16,384 blocks of 64 tokens
// per kv head; NOSA's budget of bench/gpu-decode.ts (1% of the tokens per kv
// head: reach = 226 candidate blocks per head). Timed per step, p50/p99 over
// drifting queries:
//
//   host topkHeads      BlockSummary.scoreHeads: the native host pass over
//                       every block mean (the path before the device);
//   device topk         one native call: score every block of every head,
//                       exact top-k, copy back (sync: the caller waits; async:
//                       on a worker thread; again at once: the same call
//                       with the GPU still awake; the engine's call replays
//                       a CUDA graph), and where the time of the same call
//                       launched one by one goes (two kernels from events,
//                       host phases);
//   nosa.select         the whole method (candidates, choose(), classes), on
//                       the host path and with the device scorer: the
//                       decode step's selectMs without the rest of the step.
//
// Each step also checks that the two nosa selections are the same blocks.
//   node dist/bench/block-select-gpu.js [--tokens N --steps S]
// Results: bench/results/block-select-gpu-<device>.{json,md} (and $OUT).
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DeviceBlockScores } from '../addon/block-scores.js';
import { cudaAvailable } from '../addon/cuda.js';
import { convert } from '../addon/kernels.js';
import { deviceBlockScorer } from '../engine/cache/device-block-scores.js';
import { DEFAULT_PARAMS } from '../engine/sessions.js';
import { nosa } from '../index/block-select.js';
import { BlockSummary } from '../index/block-summary.js';
import type { BlockScorer, LayerContext, SearchParams } from '../index/method.js';
import { blockLayerContext } from './block-layer-context.js';
import { Rng } from '../workload/index.js';
import { deviceTag } from './gpu-decode.js';
import { quantile } from './stats.js';
import { numFlag } from './args.js';

const progress = (msg: string) => process.stderr.write(`[bench:block-select-gpu] ${msg}\n`);
const p = (xs: number[], q: number) => quantile(xs, q, 'nearest');

function randomMeans(rng: Rng, blocks: number, d: number): Uint16Array {
  // Block means of unit-variance keys: about N(0, 1/64) per coordinate, plus a per-block drift.
  const f = new Float32Array(blocks * d);
  for (let b = 0; b < blocks; b++) {
    const shift = rng.normal() * 0.05;
    for (let j = 0; j < d; j++) f[b * d + j] = rng.normal() * 0.125 + shift;
  }
  const words = new Uint16Array(blocks * d);
  convert(new Uint8Array(f.buffer), 'f32', new Uint8Array(words.buffer), 'f16', blocks * d);
  return words;
}

async function main(): Promise<void> {
  const info = cudaAvailable();
  if (!info.ok) {
    console.log(`no CUDA device (${info.error}): nothing to run`);
    return;
  }
  const argv = process.argv;
  const get = (name: string) => numFlag(name, argv);
  const tokens = get('--tokens') ?? 1 << 20, steps = get('--steps') ?? 300, warmup = 20;
  const kvHeads = 8, qHeads = 32, d = 128, G = qHeads / kvHeads, blockSize = 64;
  const blocks = Math.ceil(tokens / blockSize);
  const rng = new Rng(13);
  progress(`${tokens} tokens: ${kvHeads} × ${blocks} block means`);
  const means = Array.from({ length: kvHeads }, () => randomMeans(rng, blocks, d));
  const heads = means.map((m) => new BlockSummary(blocks, blockSize, tokens, d, 'f16', m, Float32Array.from({ length: blocks }, () => rng.next())));
  const params = { ...DEFAULT_PARAMS, budget: Math.floor(tokens * 0.01), sinks: 64, window: 256 } as SearchParams;
  const budget = Math.ceil(params.budget / blockSize), reach = budget + Math.floor(budget * 0.25) + Math.max(1, Math.ceil(budget * 0.125));

  const ctx = (memo: Map<string, unknown>, blockScorer?: BlockScorer): LayerContext =>
    blockLayerContext(heads, { tokens, qHeads, kvHeads, headDim: d }, memo, blockScorer);

  const t0 = performance.now();
  const device = DeviceBlockScores.create({ means, blocks, headDim: d, dtype: 'f16' });
  const uploadMs = performance.now() - t0;
  const scorer = deviceBlockScorer();
  const rows = {
    hostTopk: [] as number[], deviceSync: [] as number[], deviceTimed: [] as number[], graphIssue: [] as number[], graphWait: [] as number[], deviceBackToBack: [] as number[], deviceAsync: [] as number[], selectHost: [] as number[], selectDevice: [] as number[],
    scoreKernel: [] as number[], selectKernel: [] as number[], prep: [] as number[], issue: [] as number[], wait: [] as number[], copyOut: [] as number[],
  };
  const memoHost = new Map<string, unknown>(), memoDevice = new Map<string, unknown>();
  let q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
  let mismatches = 0;
  const prev = heads.map(() => Int32Array.from({ length: budget }, () => rng.int(blocks)));
  for (let s = 0; s < warmup + steps; s++) {
    q = q.map((x) => 0.9 * x + 0.1 * rng.normal());
    const keep = s >= warmup;
    let t = performance.now();
    const hostTop = await BlockSummary.scoreHeads(heads, q, G, reach);
    if (keep) rows.hostTopk.push(performance.now() - t);
    t = performance.now();
    const r = device.topk({ q, group: G, k: reach, extra: prev });
    if (keep) rows.deviceSync.push(performance.now() - t);
    if (keep) rows.graphIssue.push(device.lastTimes.issueMs), rows.graphWait.push(device.lastTimes.waitMs);
    // The same step launched one by one with CUDA events, for where its time goes (the engine's call above is a graph).
    t = performance.now();
    device.topk({ q, group: G, k: reach, extra: prev, times: true });
    if (keep) rows.deviceTimed.push(performance.now() - t);
    const times = device.lastTimes;
    if (keep) {
      rows.scoreKernel.push(times.scoreMs);
      rows.selectKernel.push(times.selectMs);
      rows.prep.push(times.prepMs);
      rows.issue.push(times.issueMs);
      rows.wait.push(times.waitMs);
      rows.copyOut.push(times.copyOutMs);
    }
    // The same call again at once: the GPU is still awake from the last one.
    t = performance.now();
    device.topk({ q, group: G, k: reach, extra: prev });
    if (keep) rows.deviceBackToBack.push(performance.now() - t);
    if (r.some((x, h) => x.ids.length !== hostTop[h].order.length || x.ids.some((id, i) => id !== hostTop[h].order[i]))) mismatches++;
    t = performance.now();
    await device.topkAsync({ q, group: G, k: reach, extra: prev });
    if (keep) rows.deviceAsync.push(performance.now() - t);
    t = performance.now();
    const selHost = await nosa.select(ctx(memoHost), q, params);
    if (keep) rows.selectHost.push(performance.now() - t);
    t = performance.now();
    const selDevice = await nosa.select(ctx(memoDevice, scorer), q, params);
    if (keep) rows.selectDevice.push(performance.now() - t);
    if (JSON.stringify(selHost.parts.map((x) => x.blocks?.ids.map((a) => Array.from(a)))) !== JSON.stringify(selDevice.parts.map((x) => x.blocks?.ids.map((a) => Array.from(a))))) mismatches++;
    if (s % 100 === 99) progress(`step ${s + 1}/${warmup + steps}`);
  }
  const bytes = device.bytes, graphCaptures = device.graphCaptures;
  device.close();
  const stat = (xs: number[]) => ({ p50: p(xs, 0.5), p99: p(xs, 0.99) });
  const result = {
    device: info.device,
    shape: { tokens, blocks, kvHeads, qHeads, headDim: d, dtype: 'f16', blockSize },
    budgetTokensPerHead: params.budget,
    reach,
    graphCaptures,
    steps,
    uploadMs,
    deviceBytes: bytes,
    deviceScorer: scorer.stats,
    mismatches,
    ms: {
      hostTopk: stat(rows.hostTopk),
      deviceSync: stat(rows.deviceSync),
      deviceTimed: stat(rows.deviceTimed),
      graphIssue: stat(rows.graphIssue),
      graphWait: stat(rows.graphWait),
      deviceBackToBack: stat(rows.deviceBackToBack),
      deviceAsync: stat(rows.deviceAsync),
      scoreKernel: stat(rows.scoreKernel),
      selectKernel: stat(rows.selectKernel),
      hostPrep: stat(rows.prep),
      hostIssue: stat(rows.issue),
      hostWait: stat(rows.wait),
      hostCopyOut: stat(rows.copyOut),
      nosaSelectHost: stat(rows.selectHost),
      nosaSelectDevice: stat(rows.selectDevice),
    },
    date: new Date().toISOString(),
  };
  const f = (x: number) => x.toFixed(3);
  const line = (name: string, what: string, s: { p50: number; p99: number }) => `| ${name} | ${what} | ${f(s.p50)} | ${f(s.p99)} |`;
  const md = [
    `# Block selection per layer-step at ${tokens} tokens (${info.device})`,
    '',
    `${kvHeads} kv heads × ${blocks} block means (d=${d}, f16), ${qHeads} q heads (G=${G}); NOSA budget 1% of the tokens per kv head ` +
      `(${budget} blocks, reach ${reach} candidates per head). ${steps} steps of drifting queries after ${warmup} warm-up steps. ` +
      `Device copy of the means: ${(bytes / 2 ** 20).toFixed(1)} MiB, uploaded in ${uploadMs.toFixed(1)} ms. ` +
      `Selections that differ between host and device: ${mismatches}. CUDA graphs captured by the engine's call: ${graphCaptures}.`,
    '',
    '| what | path | p50 ms | p99 ms |',
    '| --- | --- | ---: | ---: |',
    line('top-k of every head', 'host topkHeads (one native pass)', result.ms.hostTopk),
    line('top-k of every head', 'device, one call (sync, replayed from a CUDA graph: the engine\'s call)', result.ms.deviceSync),
    line('of the engine\'s call', 'host: issue the copies and kernels (one graph launch)', result.ms.graphIssue),
    line('of the engine\'s call', 'host: wait for the stream', result.ms.graphWait),
    line('top-k of every head', 'device, one call launched one by one with CUDA events (the rows below)', result.ms.deviceTimed),
    line('top-k of every head', 'device, the same call again at once', result.ms.deviceBackToBack),
    line('top-k of every head', 'device, one call (async, worker thread)', result.ms.deviceAsync),
    line('of the call launched one by one', 'score kernel (events)', result.ms.scoreKernel),
    line('of the call launched one by one', 'select kernel (events)', result.ms.selectKernel),
    line('of the call launched one by one', 'host: stage inputs', result.ms.hostPrep),
    line('of the call launched one by one', 'host: issue copies + launches', result.ms.hostIssue),
    line('of the call launched one by one', 'host: wait for the stream', result.ms.hostWait),
    line('of the call launched one by one', 'host: copy outputs out', result.ms.hostCopyOut),
    line('nosa.select', 'host path', result.ms.nosaSelectHost),
    line('nosa.select', 'device scorer', result.ms.nosaSelectDevice),
    '',
  ].join('\n');
  const dir = join('bench', 'results');
  mkdirSync(dir, { recursive: true });
  for (const out of [dir, process.env.OUT].filter(Boolean) as string[]) {
    writeFileSync(join(out, `block-select-gpu-${deviceTag(info.device)}.json`), JSON.stringify(result, null, 2) + '\n');
    writeFileSync(join(out, `block-select-gpu-${deviceTag(info.device)}.md`), md);
  }
  console.log(md);
  if (mismatches > 0) process.exitCode = 1;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
