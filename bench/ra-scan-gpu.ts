// node dist/bench/ra-scan-gpu.js [--tokens 1048576 --heads 8 --reps 4 --keep 0.08 --tag s29]
//
// Issue #15's search target (all kv heads of one layer-step <= 1 ms at 1M
// keys) met on the device: retrieval-attention's code scan for every head of
// a layer-step in one call (addon/ra-scan.ts), against the same scan on the
// host's cores (RaGraph.searchBatch with codeScan, as the engine calls it
// for a CPU session) in the same run. bench/ra-search-layer.ts's workload,
// graph and heads (bench/ra-search-data.ts: one kv head of the generator at
// 1M, its graph loaded again over a copy of its keys per head; head h at
// step s searching with step (s + h) mod 8's query group), the session's
// default cap (walkOptions with codeScan: the best 3% scored exactly).
//
// Per layer-step: the device call's time on the device (CUDA events around
// its copies and kernels) and on the host (the awaited call), the host
// scan's wall time, and whether the two answer alike (the share of the
// host's ids the device returned, over every head and step; ids differ
// only at near-ties of the cuts) and their top-1% recall of the group's
// attention. Then the stages on the device (a pass with stage events), and
// a pass as a decode session calls it: the sinks and window free and the
// last step's answer as seeds; then that answer's rows attended on the
// device from the store and on the host, as before the store held values.
//
// --keep SHARE: the PQ first pass (a session's scanKeep) on both sides, and
// the bytes each reads a key: every PQ code, the 4-bit codes it keeps, the
// keys scored exactly.
//
// Writes bench/results/ra-scan-gpu-<tokens>-<card>[-keep<SHARE>][-<tag>].md and .json
// (and into $OUT on a device visit). Needs a GPU.
import { cudaAvailable } from '../addon/cuda.js';
import { attend } from '../addon/kernels.js';
import { RaGraph, type RaGraphSearchArgs } from '../addon/ra-graph.js';
import { RaScanStore, type RaScanHeadResult, type RaScanHostMs, type RaScanTimes } from '../addon/ra-scan.js';
import { deviceCallRuns, gpuSyncUs, setGpuSyncUs } from '../addon/device-calls.js';
import { walkOptions } from '../index/retrieval-attention.js';
import { cardName, saveDeviceResult } from './device-results.js';
import { machine } from './host.js';
import { D, G, groupRecall, raSearchData, SINKS, WINDOW } from './ra-search-data.js';
import { median } from './stats.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => (argv.includes(`--${name}`) ? argv[argv.indexOf(`--${name}`) + 1] : dflt);
const tokens = Number(get('tokens', '1048576'));
const heads = Number(get('heads', '8'));
const reps = Number(get('reps', '4'));
const keep = argv.includes('--keep') ? Number(get('keep', '1')) : undefined;
const tag = [keep !== undefined ? `keep${keep}` : '', get('tag', '')].filter(Boolean).join('-');
const keepArg = keep !== undefined ? { scanKeep: keep } : {};
const steps = 8;
const t0 = performance.now();
const at = () => `${((performance.now() - t0) / 1000).toFixed(1)} s`;
const progress = (msg: string) => process.stderr.write(`[bench:ra-scan-gpu] ${msg}\n`);

const info = cudaAvailable();
if (!info.ok) throw new Error(`bench:ra-scan-gpu needs a GPU (${info.error})`);
progress(`${machine()}, ${info.device}`);
const data = await raSearchData(tokens, steps, progress);
const { asked } = data;
const blob = data.graph.save();
const keys = Array.from({ length: heads }, (_, h) => (h === 0 ? data.keys : data.keys.slice()));
const graphs = Array.from({ length: heads }, (_, h) => (h === 0 ? data.graph : RaGraph.load(blob)));
let w = performance.now();
// Values: the keys again (the bench times the attend; a session's store holds the layer's own values).
const store = await RaScanStore.open(graphs, keys, tokens, D, 'f16', G, keys, keep !== undefined);
const storeMs = performance.now() - w;
progress(`[${at()}] store made in ${storeMs.toFixed(0)} ms (codes made on the host for ${heads} heads, uploaded): ${(store.bytes() / 2 ** 20).toFixed(0)} MiB on the device`);

const opts = walkOptions(0, asked, 0, tokens, { codeScan: true, ...keepArg });
const cap = opts.maxScanned ?? Math.ceil(0.03 * tokens);
const stepQ = (s: number) => {
  const q = new Float32Array(heads * G * D);
  for (let h = 0; h < heads; h++) q.set(data.decodeQ[(s + h) % steps], h * G * D);
  return q;
};
const qs = Array.from({ length: steps }, (_, s) => stepQ(s));
/** A head's answer best first (the device returns a set), as groupRecall reads it. */
const bestFirst = (r: RaScanHeadResult) =>
  Int32Array.from([...r.ids.keys()].sort((a, b) => r.scores[b] - r.scores[a] || r.ids[a] - r.ids[b]).map((i) => r.ids[i]));

// The host's scan, the engine's way (searchBatch on the native pool); its first layer-step untimed.
const hostItems = (s: number): (RaGraphSearchArgs & { graph: RaGraph })[] =>
  Array.from({ length: heads }, (_, h) => ({
    keys: keys[h], tokens, headDim: D, dtype: 'f16', q: data.decodeQ[(s + h) % steps], group: G, k: asked, ...opts,
    outIds: new Int32Array(asked), outScores: new Float32Array(asked), graph: graphs[h],
  }));
await RaGraph.searchBatch(hostItems(0));
const hostMs: number[] = [], hostIds: Int32Array[][] = [];
for (let r = 0; r < reps; r++)
  for (let s = 0; s < steps; s++) {
    const items = hostItems(s);
    w = performance.now();
    const res = await RaGraph.searchBatch(items);
    hostMs.push(performance.now() - w);
    if (r === 0) hostIds.push(items.map((it, h) => it.outIds.subarray(0, res[h].count)));
  }
progress(`[${at()}] host code scan: ${median(hostMs).toFixed(2)} ms a layer-step (p50 of ${hostMs.length})`);

// The device: two untimed calls, then reps × steps timed.
for (let s = 0; s < 2; s++) await store.search({ q: qs[s], group: G, k: asked, maxScanned: cap, ...keepArg });
const devMs: number[] = [], devWall: number[] = [], devHost: number[] = [];
let agree = 0, hostTotal = 0;
const recall = { host: [] as number[], device: [] as number[] }, scanned: number[] = [], kept: number[] = [];
for (let r = 0; r < reps; r++)
  for (let s = 0; s < steps; s++) {
    w = performance.now();
    const res = await store.search({ q: qs[s], group: G, k: asked, maxScanned: cap, ...keepArg });
    devWall.push(performance.now() - w);
    const t = store.lastTimes();
    devMs.push(t.totalMs);
    devHost.push(t.hostMs);
    if (r > 0) continue;
    res.forEach((x, h) => {
      const mine = new Set(x.ids);
      for (const id of hostIds[s][h]) agree += mine.has(id) ? 1 : 0;
      hostTotal += hostIds[s][h].length;
      scanned.push(x.scanned / tokens);
      if (x.codesKept !== undefined) kept.push(x.codesKept / tokens);
      recall.device.push(groupRecall(data, bestFirst(x), (s + h) % steps));
      recall.host.push(groupRecall(data, hostIds[s][h], (s + h) % steps));
    });
  }
const mean = (v: number[]) => v.reduce((a, b) => a + b, 0) / v.length;
progress(`[${at()}] device: ${median(devMs).toFixed(3)} ms on the device, ${median(devWall).toFixed(3)} ms awaited; agreement ${(agree / hostTotal).toFixed(4)}`);

// The stages, and a decode session's call (free sinks + window, the last step's answer as seeds).
const stages: RaScanTimes[] = [];
for (let s = 0; s < steps; s++) {
  await store.search({ q: qs[s], group: G, k: asked, maxScanned: cap, ...keepArg, stageTimes: true });
  stages.push(store.lastTimes());
}
const free = Int32Array.from([...Array.from({ length: SINKS }, (_, i) => i), ...Array.from({ length: WINDOW }, (_, i) => tokens - WINDOW + i)]);
let last: Int32Array[] = Array.from({ length: heads }, () => new Int32Array(0));
const sessMs: number[] = [], sessWall: number[] = [], sessRecall: number[] = [], sessHost: RaScanHostMs[] = [];
for (let r = 0; r < reps; r++)
  for (let s = 0; s < steps; s++) {
    w = performance.now();
    const res = await store.search({ q: qs[s], group: G, k: asked, maxScanned: cap, ...keepArg, free: Array(heads).fill(free), seeds: last });
    sessWall.push(performance.now() - w);
    sessMs.push(store.lastTimes().totalMs);
    sessHost.push({ ...store.lastHost });
    last = res.map((x) => x.ids.slice());
    if (r === 0) res.forEach((x, h) => sessRecall.push(groupRecall(data, bestFirst(x), (s + h) % steps)));
  }
// The selected rows attended with the sinks and window: on the device from the store (RaScanStore.attend with
// the ranges, as a GPU session's residency does), and on the host (the native kernel over the same rows, as before
// the store held values).
const steadyRanges = Int32Array.of(0, SINKS, tokens - WINDOW, tokens);
const scale = 1 / Math.sqrt(D);
const attDev: number[] = [], attWall: number[] = [], attHost: number[] = [];
let attErr = 0;
for (let r = 0; r < reps; r++)
  for (let s = 0; s < steps; s++) {
    const res = await store.search({ q: qs[s], group: G, k: asked, maxScanned: cap, ...keepArg, free: Array(heads).fill(free), seeds: last });
    last = res.map((x) => x.ids.slice());
    w = performance.now();
    const dev = await store.attend({ q: qs[s], group: G, scale, ids: last, ranges: steadyRanges });
    attWall.push(performance.now() - w);
    attDev.push(store.lastTimes().attendMs);
    const out = new Float32Array(heads * G * D), lse = new Float32Array(heads * G);
    w = performance.now();
    await attend({ q: qs[s], qHeads: heads * G, kvHeads: heads, headDim: D, dtype: 'f16', scale, segments: [{ k: keys, v: keys, tokens, begin: 0, end: SINKS }, { k: keys, v: keys, tokens, begin: tokens - WINDOW, end: tokens }, { k: keys, v: keys, tokens, ids: last }], out, lse });
    attHost.push(performance.now() - w);
    for (let i = 0; i < lse.length; i++) attErr = Math.max(attErr, Math.abs(lse[i] - dev.lse[i]));
    for (let i = 0; i < out.length; i++) attErr = Math.max(attErr, Math.abs(out[i] - dev.out[i]) / (Math.abs(out[i]) + 1e-3));
  }
progress(`[${at()}] attend: ${median(attDev).toFixed(3)} ms on the device (awaited ${median(attWall).toFixed(3)}), ${median(attHost).toFixed(3)} ms on the host; max difference ${attErr.toExponential(1)}`);

// The same session calls with every call on libuv's pool (--gpu-sync-us 0): the wake-ups the loop's thread saves.
const cap0 = gpuSyncUs();
setGpuSyncUs(0);
const poolWall: number[] = [];
for (let s = 0; s < steps; s++) {
  w = performance.now();
  const res = await store.search({ q: qs[s], group: G, k: asked, maxScanned: cap, ...keepArg, free: Array(heads).fill(free), seeds: last });
  poolWall.push(performance.now() - w);
  last = res.map((x) => x.ids.slice());
}
setGpuSyncUs(cap0);
const runs = deviceCallRuns();
const st = (k: keyof RaScanTimes) => median(stages.map((x) => x[k]));
const f = (x: number, p = 3) => x.toFixed(p);
const rows = {
  hostLayerStepMs: { p50: median(hostMs), all: hostMs },
  deviceMs: { p50: median(devMs), all: devMs },
  deviceAwaitedMs: { p50: median(devWall), all: devWall },
  deviceHostMs: median(devHost),
  agreement: agree / hostTotal,
  recall: { host: mean(recall.host), device: mean(recall.device) },
  scanned: mean(scanned),
  /** With --keep: the share of keys whose 4-bit code was read (the entry points and seeds not counted). */
  ...(keep !== undefined && { scanKeep: keep, kept: mean(kept) }),
  /** Bytes read a key, over the f16 key's 2d: every key's PQ code (d/8) and the kept ones' 4-bit codes (d/2) with --keep, else every 4-bit code; the keys scored exactly (2d). */
  bytesShare: ((keep !== undefined ? D / 8 + mean(kept) * (D / 2) : D / 2) + mean(scanned) * 2 * D) / (2 * D),
  stagesMs: { sample: st('sampleMs'), scan: st('scanMs'), cut: st('cutMs'), exact: st('exactMs'), final: st('finalMs'), total: st('totalMs') },
  session: {
    deviceMs: median(sessMs), awaitedMs: median(sessWall), recall: mean(sessRecall), poolAwaitedMs: median(poolWall),
    host: { parseMs: median(sessHost.map((x) => x.parseMs)), prepareMs: median(sessHost.map((x) => x.prepareMs)), searchMs: median(sessHost.map((x) => x.searchMs)) },
  },
  /** Searches run on the event loop's thread and on libuv's pool (addon/device-calls.ts; the cap ${cap0} µs a turn). */
  runs,
  gpuSyncUs: cap0,
  attend: { deviceMs: median(attDev), awaitedMs: median(attWall), hostMs: median(attHost), maxDiff: attErr },
  storeMs,
  deviceBytes: store.bytes(),
};
const md = [
  `### Retrieval-attention's code scan on the device: a whole layer-step at ${tokens.toLocaleString('en-US')} keys, ${heads} kv heads in one call (bench/ra-scan-gpu.ts)`,
  '',
  `${machine()}, ${info.device}; ${new Date().toISOString()}. bench/ra-search-layer.ts's workload, graph and heads (one kv head of the generator, seed 7, GQA group 4, d = 128, f16, k = ${asked} asked: 1% + 16 sinks + 256 window; ${heads} heads = the graph loaded ${heads} times over copies of its keys, head h at step s with step (s + h) mod ${steps}'s group), the session's default cap (${cap} keys scored exactly, ${f((100 * cap) / tokens, 1)}%, ${keep !== undefined ? `scanKeep ${keep}: every key's PQ code read, then the 4-bit codes of the ${f(100 * rows.kept!, 2)}% it kept` : "every key's 4-bit code read"}). Medians over ${reps} reps × ${steps} layer-steps. host = RaGraph.searchBatch with codeScan (the native pool, as the engine calls it); device = one RaScanStore.search for all heads (on the device: CUDA events around its copies and kernels; awaited: the call as JS sees it, run on the event loop's thread where the last call's device time fits --gpu-sync-us ${cap0} µs, else on libuv's pool: ${runs.loop} calls on the loop, ${runs.pool} on the pool). Agreement = the share of the host's ids the device returned (rep 0, every head and step).`,
  '',
  '| search, a layer-step | ms (p50) | top-1% recall (group) | scanned exactly |',
  '| --- | ---: | ---: | ---: |',
  `| host code scan (${heads} heads on the native pool) | ${f(rows.hostLayerStepMs.p50, 2)} | ${f(rows.recall.host)} | ${f(100 * rows.scanned, 2)}% |`,
  `| device code scan, on the device | **${f(rows.deviceMs.p50)}** | ${f(rows.recall.device)} | ${f(100 * rows.scanned, 2)}% |`,
  `| device code scan, awaited from JS | ${f(rows.deviceAwaitedMs.p50)} | | |`,
  `| device, as a session calls it (sinks + window free, the last step's ids as seeds), on the device | ${f(rows.session.deviceMs)} (awaited ${f(rows.session.awaitedMs)}) | ${f(rows.session.recall)} | |`,
  `| the same, every call on libuv's pool (--gpu-sync-us 0), awaited | ${f(rows.session.poolAwaitedMs)} | | |`,
  `| the session's selected rows attended (${asked} a head, with the sinks and window as ranges), on the device from the store | ${f(rows.attend.deviceMs)} (awaited ${f(rows.attend.awaitedMs)}) | | |`,
  `| the same rows attended on the host (the native kernel, ${heads} heads) | ${f(rows.attend.hostMs)} | | |`,
  '',
  `A session's search on the host (p50 ms): the arguments read ${f(rows.session.host.parseMs)}, the query's code weights ${f(rows.session.host.prepareMs)}, the store's Search (staging, launch, the wait, the answer copied out) ${f(rows.session.host.searchMs)}; the rest of the awaited call is the JS around it and, on the pool, the wake-ups.`,
  `The device's attend against the host's: max difference ${rows.attend.maxDiff.toExponential(1)} (lse absolute, out relative to |out| + 1e-3).`,
  `Device over host: ${f(rows.deviceMs.p50 / rows.hostLayerStepMs.p50, 3)}× on the device, ${f(rows.deviceAwaitedMs.p50 / rows.hostLayerStepMs.p50, 3)}× awaited. Agreement with the host's ids: ${f(rows.agreement, 4)}.`,
  `Stages on the device (ms, with stage events): sample ${f(rows.stagesMs.sample)}, scan of the codes ${f(rows.stagesMs.scan)}, the candidates' cut ${f(rows.stagesMs.cut)}, exact scores ${f(rows.stagesMs.exact)}, refine + the answer's cut ${f(rows.stagesMs.final)}; total ${f(rows.stagesMs.total)}.`,
  `Bytes read a key: ${f(100 * rows.bytesShare, 1)}% of the f16 key's (${keep !== undefined ? "PQ codes, the kept keys' 4-bit codes" : '4-bit codes'} and the keys scored exactly).`,
  `Store: made in ${f(storeMs / 1000, 1)} s (the codes made on the host, every head's codes, keys, values and entry points uploaded), ${(rows.deviceBytes / 2 ** 20).toFixed(0)} MiB on the device.`,
  '',
].join('\n');
process.stdout.write(md);
const name = `ra-scan-gpu-${tokens}-${cardName(info.device)}${tag ? `-${tag}` : ''}`;
saveDeviceResult(name, { machine: machine(), device: info.device, date: new Date().toISOString(), tokens, heads, steps, reps, opts, ...rows }, md);
progress(`[${at()}] wrote bench/results/${name}.md and .json`);
store.close();
for (const g of graphs) g.dispose();
