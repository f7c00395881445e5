// The GPU decode loop over a 1M-token layer, as the server runs it: the
// seeded workload (workload/: 8 kv heads, d=128, drifting decode
// queries with temporal locality) as one sealed document, and 256 steps of
// engine/decode-step.ts's decodeStep per configuration, in process (no HTTP):
//
//   dense        method exact, the whole layer's KV resident in the pool;
//   nosa         NOSA block selection, pool = 5% of the layer's KV;
//   topk-blocks  plain top blocks by q·mean, the same pool, LRU eviction.
//
// Per step: latency (selection, residency + attention), kernel time, blocks
// selected, pool hits and host→device bytes, and the output's error against
// the dense answer of the same step. Part of `npm run bench:gpu` (or
// `node dist/bench/gpu.js --decode [--tokens N --steps S]`); results in
// bench/results/gpu-decode-<device>.{json,md} (h100, h200; with --configs, gpu-decode-<configs>-<device>).
// --pool-path ab runs range parts (sinks, window, exact's whole document) both
// ways in one sitting, alternating step by step on the same pool: block by
// block, and through the pool's range tables (GpuBackend.rangeTables); its
// files are gpu-decode-[<configs>-]pool-ab-<device>. old / new run one way
// (default: new, unless KVRECALL_POOL_RANGES=0).
// --device-sync ab runs the GPU calls both ways in one sitting, alternating
// step by step (addon/device-calls.ts): on libuv's pool (cap 0, the old way;
// even steps) and on the event loop's thread within the cap (KVRECALL_GPU_SYNC_US,
// default GPU_SYNC_US; odd steps); files gpu-decode-[<configs>-]sync-ab-<device>.
// --upload-path ab runs a step's block lists both ways in one sitting,
// alternating step by step on the same pool (GpuBackend.batchUploads): a
// call a kv head (even steps, the old way: a flush each) and one call for
// every head (odd steps: one flush); files gpu-decode-[<configs>-]upload-ab-<device>.
// heads / batch run one way (default batch).
// --gap MS sleeps that long before each step (an LLM's own work between a
// layer's calls: the pool's wake-ups cost most after an idle).
// --select-stages splits a block method's select (issue #13: ≤ 0.1 ms) in the
// loop: the device scorer's call (engine/cache/device-block-scores.ts with
// timeSteps: its graph with two event nodes), of it the host's wait and the
// call's time on the device, and the JS around the call; files
// gpu-decode-[<configs>-]select-stages-<device>.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { blockSummaryBuilder } from '../index/block-select.js';
import { clusterIndexBuilder } from '../index/wave/wave.js';
import { retrievalAttentionBuilder } from '../index/retrieval-attention.js';
import { findMethod } from '../index/registry.js';
import type { HeadIndex, SearchParams } from '../index/method.js';
import { decodeStep } from '../engine/decode-step.js';
import type { LoadedDocument } from '../engine/documents.js';
import { GpuBackend } from '../engine/cache/gpu-pool.js';
import type { ModelShape } from '../core/model.js';
import { DEFAULT_PARAMS } from '../engine/sessions.js';
import { Session } from '../engine/session.js';
import { UNLIMITED } from '../storage/host-budget.js';
import { KvSegment } from '../storage/kv-segment.js';
import { relativeErrors } from './quality.js';
import { generateWorkload } from '../workload/index.js';
import { mean, quantile } from './stats.js';
import { deviceCallRuns, GPU_SYNC_US, setGpuSyncUs } from '../addon/device-calls.js';
import { deviceBlockScorer } from '../engine/cache/device-block-scores.js';

const progress = (msg: string) => process.stderr.write(`[bench:gpu decode] ${msg}\n`);

interface StepRow {
  ms: number;
  selectMs: number;
  attendMs: number;
  residentMs: number;
  kernelMs: number;
  selected: number;
  hits: number;
  bytesIn: number;
  outError: number;
  /** The step's pool path: range tables (holdRange) or block by block. */
  rangeTables: boolean;
  /** The step's block lists: one upload call for every kv head (true) or a call a head. */
  batchUploads: boolean;
  /** The step's GPU calls: sent to the loop's thread within the cap (true) or all to libuv's pool (false), and where they ran. */
  deviceSync: boolean;
  callsOnLoop: number;
  callsOnPool: number;
  /** With --select-stages, a step whose select called the device scorer: the call's wall ms, its host wait, its device time (NaN otherwise). */
  scorerCallMs: number;
  /** A device key scan's search this step: awaited and on the device (NaN: none). */
  scanAwaitedMs: number;
  scanDeviceMs: number;
  scorerWaitMs: number;
  scorerDeviceMs: number;
}

const pct = (xs: number[], p: number) => quantile(xs, p, 'low');

/** Mean over q heads of ‖a_h − b_h‖ / ‖b_h‖. */
const relError = (a: Float32Array, b: Float32Array, heads: number) => mean([...relativeErrors(a, b, heads)]);

/** A result file's device tag: the chip's model (h100, h200), or 'gpu'. */
export const deviceTag = (device: string) => /\b([hab]\d{2,3})\b/i.exec(device)?.[1].toLowerCase() ?? 'gpu';

/**
 * The pool path of range parts (sinks, window, whole documents): 'new' range
 * tables, 'old' block by block, 'ab' both in one run, alternating step by
 * step on the same pool (even steps block by block, odd steps range tables).
 */
export type PoolPath = 'old' | 'new' | 'ab';

/** Where the GPU calls wait: 'loop' within the cap, 'pool' all on libuv's pool, 'ab' both, alternating step by step. */
export type DeviceSync = 'loop' | 'pool' | 'ab';

/** A step's block lists: 'heads' a pool call a kv head, 'batch' one for all, 'ab' both, alternating step by step. */
export type UploadPath = 'heads' | 'batch' | 'ab';

export async function runDecodeBench(opts: { tokens: number; steps: number; device: string; configs?: string[]; poolPath?: PoolPath; deviceSync?: DeviceSync; uploadPath?: UploadPath; gapMs?: number; selectStages?: boolean }): Promise<void> {
  const { tokens, steps } = opts;
  if ([opts.poolPath, opts.deviceSync, opts.uploadPath].filter((x) => x === 'ab').length > 1) throw new Error('--pool-path, --device-sync, --upload-path: one A/B at a time');
  const syncCap = Number(process.env.KVRECALL_GPU_SYNC_US ?? GPU_SYNC_US);
  const gapMs = opts.gapMs ?? 0;
  const scorer = deviceBlockScorer(), selectStages = opts.selectStages === true;
  scorer.timeSteps = selectStages;
  const model: ModelShape = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16', blockSize: 64 };
  const { kvHeads, headDim: d } = model;
  progress(`generating ${tokens} tokens × ${kvHeads} kv heads, ${steps} decode steps`);
  const t0 = performance.now();
  const w = generateWorkload({ seed: 11, tokens, kvHeads, qHeads: model.qHeads, headDim: d, steps, needles: 0 });
  progress(`workload ready (${((performance.now() - t0) / 1e3).toFixed(1)} s); block summaries`);
  const seg = new KvSegment(kvHeads, d, 'f16', 1);
  seg.k = w.keys;
  seg.v = w.values;
  seg.setTokens(tokens);
  const summaries: HeadIndex[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const queries = w.prefillQ[h];
    const bytes = await blockSummaryBuilder.build({ keys: w.keys[h], tokens, headDim: d, dtype: 'f16', queries, queryCount: queries.length / d });
    summaries.push(blockSummaryBuilder.load(bytes, { keys: w.keys[h], tokens, headDim: d, dtype: 'f16' }));
  }
  const doc: LoadedDocument = {
    meta: { id: 'workload', model, status: 'ready', tokens, methods: ['nosa', 'topk-blocks'], createdAt: new Date().toISOString() },
    layers: [seg],
    indexes: new Map(),
  };
  const layerBytes = tokens * kvHeads * d * 2 * 2;
  const sparseBudget = Math.floor(tokens * 0.01);
  const poolShare = 0.05;
  const waveParams = { ...DEFAULT_PARAMS, budget: Math.floor(tokens * 0.02), sinks: 16, window: 64 };
  const all = [
    { name: 'dense (exact)', method: 'exact', poolBytes: Math.ceil(layerBytes * 1.02), params: DEFAULT_PARAMS },
    // wave's defaults (2% exact, sinks 16, window 64, estimate on), the layer held on the device
    // (engine/cache/device-wave.ts): one native call per step; the pool only for what is left.
    { name: 'wave (device)', method: 'wave', poolBytes: 256 << 20, waveBytes: 16 * 2 ** 30, params: waveParams, optIn: true },
    { name: 'nosa', method: 'nosa', poolBytes: Math.floor(layerBytes * poolShare), params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256 } },
    { name: 'topk-blocks + LRU', method: 'topk-blocks', poolBytes: Math.floor(layerBytes * poolShare), params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256 } },
    // A tight pool (1.5% of the KV, just above one step's working set): where eviction choices matter.
    { name: 'nosa, tight pool', method: 'nosa', poolBytes: Math.floor(layerBytes * 0.015), params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256 } },
    { name: 'topk-blocks + LRU, tight pool', method: 'topk-blocks', poolBytes: Math.floor(layerBytes * 0.015), params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256 } },
    // The block methods estimating the rest from wave's clusters of the same layer (as a session over a
    // document with wave's index does by default): on the host (no wave budget: engine/estimate.ts) and on
    // the device (the layer's wave store held: engine/rest-on-device.ts), one after the other. Asked for by
    // key (--configs nosa-estimate,topk-blocks-estimate).
    // Retrieval-attention with the code scan on the device (engine/cache/device-key-scans.ts): the layer's keys,
    // codes and values held there, the search and the selected rows' attention both on the device, the pool for
    // sinks and window. Asked for by key (--configs ra-scan); ra-scan-keep with the PQ first pass (scanKeep 0.08:
    // a sixteenth of each key's bytes read, a quarter for the 8% it keeps).
    { name: 'retrieval-attention (device scan)', key: 'ra-scan', method: 'retrieval-attention', poolBytes: Math.floor(layerBytes * poolShare), scanBytes: 16 * 2 ** 30, params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256, codeScan: true, estimate: false }, optIn: true },
    { name: 'retrieval-attention (device scan, scanKeep 0.08)', key: 'ra-scan-keep', method: 'retrieval-attention', poolBytes: Math.floor(layerBytes * poolShare), scanBytes: 16 * 2 ** 30, params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256, codeScan: true, scanKeep: 0.08, estimate: false }, optIn: true },
    ...(['nosa', 'topk-blocks'] as const).flatMap((method) => [
      { name: `${method} + estimate (host)`, key: `${method}-estimate`, method, estimate: 'host' as const, poolBytes: Math.floor(layerBytes * poolShare), params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256 }, optIn: true },
      { name: `${method} + estimate (device)`, key: `${method}-estimate`, method, estimate: 'device' as const, poolBytes: Math.floor(layerBytes * poolShare), waveBytes: 16 * 2 ** 30, params: { ...DEFAULT_PARAMS, budget: sparseBudget, sinks: 64, window: 256 }, optIn: true },
    ]),
  ];
  // --configs picks by method (dense always runs first: the others' error is against it); wave only when asked.
  const configs = all.filter((c) => (opts.configs ? c.method === 'exact' || opts.configs.includes('key' in c && c.key ? c.key : c.method) : !('optIn' in c)));
  let waveHeads: HeadIndex[] | undefined;
  let waveBuildS: number | undefined;
  const clustersOf = async () => {
    if (waveHeads) return waveHeads;
    const t = performance.now();
    // Clusters of 16 (as fidelity at 128K: bench/results/fidelity-131072-cs16.md), the heads built side by side.
    waveHeads = await Promise.all(Array.from({ length: kvHeads }, async (_, h) => {
      const queries = w.prefillQ[h];
      // k-means on the device, as a GPU server's seal runs it (index/wave/cluster-build.ts).
      const bytes = await clusterIndexBuilder.build({ keys: w.keys[h], values: w.values[h], tokens, headDim: d, dtype: 'f16', queries, queryCount: queries.length / d, clusterSize: 16, device: true });
      return clusterIndexBuilder.load(bytes, { keys: w.keys[h], values: w.values[h], tokens, headDim: d, dtype: 'f16' });
    }));
    waveBuildS = (performance.now() - t) / 1e3;
    progress(`wave clusters built (${waveBuildS.toFixed(1)} s)`);
    return waveHeads;
  };
  const graphsOf = async () => {
    const t = performance.now();
    // Each head's graph from its prefill queries, one after another (each build uses the native pool).
    const out: HeadIndex[] = [];
    for (let h = 0; h < kvHeads; h++) {
      const keys = { keys: w.keys[h], values: w.values[h], tokens, headDim: d, dtype: 'f16' as const };
      const queries = w.prefillQ[h];
      out.push(retrievalAttentionBuilder.load(await retrievalAttentionBuilder.build({ ...keys, queries, queryCount: queries.length / d }), keys));
    }
    progress(`retrieval-attention graphs built (${((performance.now() - t) / 1e3).toFixed(1)} s)`);
    return out;
  };
  const denseOut: Float32Array[] = [];
  const results: Record<string, unknown>[] = [];
  for (const cfg of configs) {
    const waveBytes = 'waveBytes' in cfg ? cfg.waveBytes : undefined;
    // The estimating configs' clusters, built (k-means on the device) before this config's pool is opened.
    const estimating = 'estimate' in cfg;
    const estimateHeads = estimating ? await clustersOf() : undefined;
    const scanBytes = 'scanBytes' in cfg ? cfg.scanBytes : undefined;
    const gpu = GpuBackend.open({ budgetBytes: cfg.poolBytes, stagingBytes: 256 << 20, waveBudgetBytes: waveBytes, scanBudgetBytes: scanBytes });
    if (!gpu) throw new Error('no CUDA device');
    const method = findMethod(cfg.method)!;
    const heads = cfg.method === 'wave' ? await clustersOf() : cfg.method === 'retrieval-attention' ? await graphsOf() : summaries;
    const indexes = method.builder ? [[heads]] : [];
    const reserved = gpu.admit(model, cfg.method, cfg.params as SearchParams, tokens);
    const session = new Session({
      id: cfg.method, model, documents: [doc], method, params: cfg.params as SearchParams, documentIndexes: indexes,
      ...(cfg.method === 'wave' && { clusterIndexes: [[heads]] }), ...(estimateHeads && { clusterIndexes: [[estimateHeads]] }), budget: UNLIMITED, gpu: reserved > 0 ? gpu : undefined, gpuReserved: reserved,
    });
    const rows: StepRow[] = [];
    for (let s = 0; s < steps; s++) {
      if (opts.poolPath) gpu.rangeTables = opts.poolPath === 'ab' ? s % 2 === 1 : opts.poolPath === 'new';
      gpu.batchUploads = opts.uploadPath === 'ab' ? s % 2 === 1 : opts.uploadPath !== 'heads';
      const deviceSync = opts.deviceSync === 'ab' ? s % 2 === 1 : opts.deviceSync !== 'pool';
      setGpuSyncUs(deviceSync ? syncCap : 0);
      if (gapMs > 0) await new Promise((r) => setTimeout(r, gapMs));
      // A loop turn a step, as a server's request has: the per-turn cap of device calls on the loop
      // (addon/device-calls.ts) starts afresh. Back to back in one turn, a step's calls found it spent by the last
      // step's (0.7 calls a step went to libuv's pool in session 30's ra-scan run).
      else await new Promise((r) => setImmediate(r));
      const q = w.decodeQ[s];
      const calls = deviceCallRuns(), scored = scorer.stats.steps;
      const scans = gpu.keyScanner?.stats.steps ?? 0;
      const r = await decodeStep(session, { layer: 0, q, scale: w.scale, want: new Set(['out']) });
      const scan = gpu.keyScanner && gpu.keyScanner.stats.steps > scans ? gpu.keyScanner.lastSearch : undefined;
      const callsAfter = deviceCallRuns();
      const call = selectStages && scorer.stats.steps > scored ? scorer.lastStep : undefined;
      if (cfg.method === 'exact') denseOut.push(r.out);
      // The scan's store is made in the background on the first step (that step searches on the host): wait for it.
      if (s === 0 && gpu.keyScanner) await gpu.keyScanner.settled();
      rows.push({
        ms: r.stats.ms, selectMs: r.stats.selectMs, attendMs: r.stats.attendMs, residentMs: r.stats.gpu?.residentMs ?? NaN, kernelMs: r.stats.gpu?.kernelMs ?? NaN,
        selected: r.stats.blocks?.selected ?? 0, hits: r.stats.blocks?.hits ?? 0, bytesIn: r.stats.blocks?.bytesIn ?? 0,
        outError: cfg.method === 'exact' ? 0 : relError(r.out, denseOut[s], model.qHeads),
        rangeTables: gpu.rangeTables,
        batchUploads: gpu.batchUploads,
        deviceSync, callsOnLoop: callsAfter.loop - calls.loop, callsOnPool: callsAfter.pool - calls.pool,
        scanAwaitedMs: scan?.awaitedMs ?? NaN, scanDeviceMs: scan?.deviceMs ?? NaN,
        scorerCallMs: call?.callMs ?? NaN, scorerWaitMs: call?.native.waitMs ?? NaN, scorerDeviceMs: call?.native.deviceMs ?? NaN,
      });
      if (r.stats.backend !== 'cuda') throw new Error(`${cfg.name}: step ${s} ran on the host (pool too small?)`);
      if (s % 64 === 63) progress(`${cfg.name}: step ${s + 1}/${steps}, ${r.stats.ms.toFixed(2)} ms`);
    }
    if (scanBytes && gpu.keyScanner?.stats.attends !== steps - 1) throw new Error(`${cfg.name}: ${gpu.keyScanner?.stats.attends ?? 0} of ${steps - 1} steps attended on the device`);
    if (cfg.method === 'wave' && !gpu.describe().wave?.stores) throw new Error('wave (device): the layer was not held on the device (the host path ran)');
    if (estimating && cfg.estimate === 'device' && gpu.describe().wave?.rests !== steps) throw new Error(`${cfg.name}: ${gpu.describe().wave?.rests ?? 0} of ${steps} estimates ran on the device`);
    session.release();
    gpu.close();
    // Step 0 fills the pool (every block is a miss): steady state is steps 1..; with both paths, each path's
    // steps from its second (step 1, the first range-table step, builds the tables).
    // --device-sync ab: each way's steps from its second (the first call of a store goes to the pool: its time is not known yet).
    const groups = opts.poolPath === 'ab' ? [false, true].map((rt) => rows.filter((r) => r.rangeTables === rt))
      : opts.deviceSync === 'ab' ? [false, true].map((ds) => rows.filter((r) => r.deviceSync === ds))
      : opts.uploadPath === 'ab' ? [false, true].map((b) => rows.filter((r) => r.batchUploads === b)) : [rows];
    for (const group of groups) {
      const warm = group.slice(1);
      const way = opts.deviceSync === 'ab' ? `, GPU calls ${group[0].deviceSync ? `on the loop within ${syncCap} us` : 'on the pool'}`
        : opts.uploadPath === 'ab' ? `, block lists ${group[0].batchUploads ? 'in one call' : 'a call a kv head'}` : '';
      const sel = warm.reduce((a, r) => a + r.selected, 0), hit = warm.reduce((a, r) => a + r.hits, 0);
      const summary = {
        config: (opts.poolPath === 'ab' ? `${cfg.name}, ${group[0].rangeTables ? 'range tables' : 'block by block'}` : cfg.name) + way,
        method: cfg.method,
        rangeTables: group[0].rangeTables,
        batchUploads: group[0].batchUploads,
        deviceSync: group[0].deviceSync,
        callsOnLoopPerStep: mean(warm.map((r) => r.callsOnLoop)),
        callsOnPoolPerStep: mean(warm.map((r) => r.callsOnPool)),
        poolBytes: cfg.poolBytes,
        poolShareOfKv: cfg.poolBytes / layerBytes,
        budgetTokensPerHead: cfg.method === 'exact' ? tokens : sparseBudget,
        stepMsP50: pct(warm.map((r) => r.ms), 0.5),
        stepMsP99: pct(warm.map((r) => r.ms), 0.99),
        selectMsP50: pct(warm.map((r) => r.selectMs), 0.5),
        attendMsP50: pct(warm.map((r) => r.attendMs), 0.5),
        residentMsP50: pct(warm.map((r) => r.residentMs), 0.5),
        kernelMsP50: pct(warm.map((r) => r.kernelMs), 0.5),
        blocksSelectedPerStep: sel / warm.length,
        hitRate: sel ? hit / sel : NaN,
        bytesInPerStepMean: mean(warm.map((r) => r.bytesIn)),
        bytesInPerStepP99: pct(warm.map((r) => r.bytesIn), 0.99),
        firstStepBytesIn: group[0].bytesIn,
        outErrorMean: mean(warm.map((r) => r.outError)),
        outErrorMax: Math.max(...warm.map((r) => r.outError)),
        // --select-stages: the select's device scorer call, its wait and device time, and the JS around it (steps that called it).
        ...(selectStages && selectSplit(warm)),
        // A device key scan's call (retrieval-attention's): of the select, the search awaited and on the device.
        ...(scanBytes && { scanAwaitedMsP50: pct(warm.map((r) => r.scanAwaitedMs), 0.5), scanDeviceMsP50: pct(warm.map((r) => r.scanDeviceMs), 0.5) }),
      };
      console.log(JSON.stringify(summary));
      results.push({ ...summary, steps: group });
    }
  }
  const result = {
    device: opts.device,
    shape: { tokens, kvHeads, qHeads: model.qHeads, headDim: d, dtype: 'f16', poolBlock: 64, layerKvBytes: layerBytes },
    workload: { seed: 11, steps, generator: 'workload/' },
    poolPath: opts.poolPath ?? (process.env.KVRECALL_POOL_RANGES === '0' ? 'old' : 'new'),
    deviceSync: opts.deviceSync ?? 'loop',
    uploadPath: opts.uploadPath ?? 'batch',
    gpuSyncUs: syncCap,
    gapMs,
    note: 'one layer, in process (decodeStep, no HTTP); no own session tokens; step 0 (pool fill) excluded from the steady-state columns',
    configs: results,
    ...(waveBuildS !== undefined && { waveClustersBuildS: waveBuildS }),
    date: new Date().toISOString(),
  };
  // NaN (a stage the config does not have: no pool for retrieval-attention's device scan) as a dash.
  const f = (x: unknown, n = 2) => (Number.isNaN(Number(x)) ? '—' : Number(x).toFixed(n));
  const md = [
    `# GPU decode loop at ${tokens} tokens per layer (${opts.device})`,
    '',
    `One layer, ${model.qHeads} q / ${kvHeads} kv heads, d=${d}, f16 (${(layerBytes / 2 ** 30).toFixed(1)} GiB of K+V), ${steps} decode steps of the seeded workload through ` +
      "engine/decode-step.ts in process. Sparse methods: budget 1% of tokens per kv head + 64 sinks + 256 window, pool 5% of the layer's KV (tight: 1.5%). " +
      'Steady state (steps 1..), step 0 fills the pool. `wave (device)`: wave\'s defaults (2% exact + 16 sinks + 64 window, the rest estimated; clusters of 16), ' +
      'the layer\'s clusters and K/V held on the device (engine/cache/device-wave.ts), one native call per step (selection, estimate and the exact rows); kernel ms is that call on the stream.' +
      (waveBuildS !== undefined ? ` Its clusters (${kvHeads} heads side by side, k-means on the device as a GPU server's seal runs it) were built in ${waveBuildS.toFixed(1)} s.` : '') +
      (opts.poolPath === 'ab'
        ? ' Range parts (sinks, window, the whole document of `exact`) both ways on the same pool, alternating step by step: block by block (even steps: a page-table lookup, touch and pin per block, the slot ids copied to the device) and range tables (odd steps: one hold per range and head, the table already on the device); each path\'s first step excluded.'
        : ` Range parts: ${result.poolPath === 'old' ? 'block by block' : 'range tables'}.`) +
      (opts.deviceSync === 'ab'
        ? ` GPU calls (the wave step and rest, the pool's attend) both ways, alternating step by step: all on libuv's pool (even steps, the old way) and on the event loop's thread within ${syncCap} us a turn (odd steps, addon/device-calls.ts); each way's first step excluded; calls/step: where they ran (loop / pool).`
        : ` GPU calls ${result.deviceSync === 'pool' ? "all on libuv's pool" : `on the event loop's thread within ${syncCap} us a turn`}.`) +
      (opts.uploadPath === 'ab'
        ? " Block lists both ways on the same pool, alternating step by step: a pool call a kv head (even steps, a flush each: the old way, its copies inline up to 256 KiB) and one call for every head (odd steps, one flush); each way's first step excluded."
        : ` Block lists: ${result.uploadPath === 'heads' ? 'a pool call a kv head' : 'one pool call for every kv head'}.`) +
      (gapMs > 0 ? ` ${gapMs} ms asleep before each step.` : ''),
    '',
    `| config | pool (of KV) | step p50 / p99 ms | select ms | resident+attend ms | of which resident | kernel ms | blocks/step | hit rate | H2D MiB/step (mean / p99) | out error vs dense (mean / max) |${opts.deviceSync === 'ab' ? ' calls/step loop / pool |' : ''}`,
    `| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |${opts.deviceSync === 'ab' ? ' ---: |' : ''}`,
    ...results.map((r) =>
      `| ${r.config} | ${f(Number(r.poolShareOfKv) * 100, 0)}% | ${f(r.stepMsP50)} / ${f(r.stepMsP99)} | ${f(r.selectMsP50)} | ${f(r.attendMsP50)} | ${f(r.residentMsP50)} | ${f(r.kernelMsP50, 3)} | ` +
      `${f(r.blocksSelectedPerStep, 0)} | ${f(r.hitRate, 3)} | ${f(Number(r.bytesInPerStepMean) / 2 ** 20)} / ${f(Number(r.bytesInPerStepP99) / 2 ** 20)} | ${f(r.outErrorMean, 3)} / ${f(r.outErrorMax, 3)} |` +
      (opts.deviceSync === 'ab' ? ` ${f(r.callsOnLoopPerStep, 1)} / ${f(r.callsOnPoolPerStep, 1)} |` : '')),
    '',
    ...results.filter((r) => r.scanAwaitedMsP50 !== undefined).map((r) =>
      `${r.config}: of the select, the device key scan's search ${f(r.scanAwaitedMsP50, 3)} ms awaited (p50), ${f(r.scanDeviceMsP50, 3)} on the device; GPU calls a step ${f(r.callsOnLoopPerStep, 1)} on the loop's thread, ${f(r.callsOnPoolPerStep, 1)} on libuv's pool.`),
    '',
    ...(selectStages
      ? [
          '| config | select ms | of it, the device scorer\'s call | of the call, the host\'s wait | of the call, on the device (events) | the select\'s JS around the call | steps with a call |',
          '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
          ...results.filter((r) => Number(r.selectCalls) > 0).map((r) =>
            `| ${r.config} | ${f(r.selectMsP50, 3)} | ${f(r.scorerCallMsP50, 3)} | ${f(r.scorerWaitMsP50, 3)} | ${f(r.scorerDeviceMsP50, 3)} | ${f(r.selectJsMsP50, 3)} | ${r.selectCalls} |`),
          '',
          'Select split (--select-stages, p50 of the steps whose select called the device scorer, each column its own p50): the scorer\'s call is engine/cache/device-block-scores.ts\'s wall time around ' +
            'the addon call (its JS, the native call, the wait); on the device: two CUDA events in the call\'s graph around its copies and kernels; the JS around the call: the select less the call.',
          '',
        ]
      : []),
  ].join('\n');
  const dir = join('bench', 'results');
  mkdirSync(dir, { recursive: true });
  for (const d of [dir, process.env.OUT].filter(Boolean) as string[]) {
    // A run of some configurations (--configs) has its own file: the README renders the full one.
    const name = `gpu-decode-${opts.configs ? `${opts.configs.join('-')}-` : ''}${selectStages ? 'select-stages-' : ''}${opts.poolPath === 'ab' ? 'pool-ab-' : ''}${opts.deviceSync === 'ab' ? `sync-ab-${gapMs > 0 ? `gap${gapMs}-` : ''}` : ''}${opts.uploadPath === 'ab' ? 'upload-ab-' : ''}${deviceTag(opts.device)}`;
    writeFileSync(join(d, `${name}.json`), JSON.stringify(result, null, 2) + '\n');
    writeFileSync(join(d, `${name}.md`), md);
  }
  console.log(md);
}

/** The select's split over the steps that called the device scorer: each stage's p50, and their count. */
function selectSplit(rows: StepRow[]): Record<string, number> {
  const called = rows.filter((r) => !Number.isNaN(r.scorerCallMs));
  const p50 = (xs: number[]) => (xs.length ? pct(xs, 0.5) : NaN);
  return {
    selectCalls: called.length,
    scorerCallMsP50: p50(called.map((r) => r.scorerCallMs)),
    scorerWaitMsP50: p50(called.map((r) => r.scorerWaitMs)),
    scorerDeviceMsP50: p50(called.map((r) => r.scorerDeviceMs)),
    selectJsMsP50: p50(called.map((r) => r.selectMs - r.scorerCallMs)),
  };
}
