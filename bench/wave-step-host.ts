// The host's share of a GPU wave layer-step (issue #13: no host work per
// block; #14: server time per layer-step), in the server's shape: the decode
// step (engine/decode-step.ts → engine/wave-on-device.ts →
// engine/cache/device-wave.ts → addon/wave-gpu.ts) of a session appending
// one own token per step, as bench:decode's sessions do.
//
// Shape: llama3.2-1b's (32 q / 8 kv heads, d=64, f16), a 1M-token document
// in clusters of 8, budget 1% + 16 sinks + 256 window, estimate on.
//
//   node dist/bench/wave-step-host.js [--steps N] [--layers L] [--own-from 0] [--own-to 512] [--device [--graph-ab | --gap-ms MS | --own-ab [A,B]] | --hold-ms MS] [--json FILE]
//
// --layers L (default 1): a token steps through L layers, a step each, as a
// server's frames come (16 for issue #13's llama3.2-1b target); the layers'
// stores are held through the engine's GpuBackend either way.
// --gap-ms: odd steps come after the loop slept MS (a timer), as a server's
// calls come after the client's round trip; even steps back to back.
// --own-ab A,B (default native,beside): even steps attend the own tokens
// the A way, odd steps the B way (engine/wave-on-device.ts OwnAttend:
// native, inside the device call; beside, on libuv's pool during it; after,
// on the loop's thread after it). Formerly: odd steps after the device call, on the
// loop's thread (the old order), even steps beside it on libuv's pool
// (setOwnAttend).
//
// Without --device (any machine): the native store is a stand-in that
// answers at once, with the binding's answer objects: what is left is the
// JS around the call and the own tokens' host attend (--hold-ms: the call
// holds its thread that long, as the device's does on the loop's thread,
// to show what overlaps it). It also counts the
// steps whose CUDA graph the device would capture anew: native/cuda/
// wave_step.cu keys its graph on the step's sizes (the exact rows' count,
// the widest budget, the most candidates, each as its bucket: stepBucket),
// and a stand-in LRU of
// StepGraph's 8 graphs over those sizes tells which steps miss (a key's
// first sighting runs one by one, native/cuda/step_graph.cuh).
// With --device (a CUDA build and a GPU): the real store over synthetic
// clusters (bench/wave-gpu.ts's), and per step the device's own numbers:
// the call on the stream (kernel), graphs captured, the host stages.
//
// Reported p50s per step, split by whether the step's graph was captured
// anew or replayed: decodeStep's stats.ms and selectMs, the store call until
// it returns its promise (the native work included where it ran on the
// loop's thread), its kernel ms, and the own tokens' host attend alone.
import { writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { deviceCallRuns } from '../addon/device-calls.js';
import { nativeThreads } from '../addon/kernels.js';
import { STEP_META, WaveGpuStore, waveStepBucket as stepBucket, type WaveGpuStepArgs, type WaveGpuStepResult } from '../addon/wave-gpu.js';
import type { ModelShape } from '../core/model.js';
import { attendOnHost } from '../engine/cache/residency.js';
import { GpuBackend } from '../engine/cache/gpu-pool.js';
import type { CudaDevice } from '../addon/cuda.js';
import { decodeStep } from '../engine/decode-step.js';
import { setOwnAttend, type OwnAttend } from '../engine/wave-on-device.js';
import type { LoadedDocument } from '../engine/documents.js';
import { Session } from '../engine/session.js';
import { DEFAULT_PARAMS } from '../engine/sessions.js';
import type { SearchParams } from '../index/method.js';
import { findMethod } from '../index/registry.js';
import type { ClusterIndex } from '../index/wave/cluster-index.js';
import type { KvSegment } from '../storage/kv-segment.js';
import { UNLIMITED } from '../storage/host-budget.js';
import { Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { keyRows, queries, syntheticHead } from './wave-gpu.js';
import { words } from './wave-gpu-heads.js';

const argv = process.argv;
const arg = (name: string, def: number) => (argv.includes(name) ? Number(argv[argv.indexOf(name) + 1]) : def);
const steps = arg('--steps', 2000), ownFrom = arg('--own-from', 0), ownTo = arg('--own-to', 512), onDevice = argv.includes('--device');
/** The stand-in's call holds its thread this long (ms), as the device's does where it runs on the loop's thread (0: answers at once). */
const holdMs = arg('--hold-ms', 0);
/** Odd steps launch the device's work one by one (graph: false) instead of from a CUDA graph: what a capture costs against no graph. */
const graphAb = argv.includes('--graph-ab');
const jsonAt = argv.indexOf('--json');
/** Odd steps come after an idle of this many ms (the loop asleep on a timer), even steps back to back (0: none). */
const gapMs = arg('--gap-ms', 0);
/** Even steps attend the own tokens the first way, odd steps the second (setOwnAttend). */
const ownAb = argv.includes('--own-ab');
const ownModes = ((): [OwnAttend, OwnAttend] => {
  const v = argv[argv.indexOf('--own-ab') + 1];
  const modes = ownAb && v && !v.startsWith('--') ? v.split(',') : ['native', 'beside'];
  if (modes.length !== 2 || modes.some((m) => !['native', 'beside', 'after'].includes(m))) throw new Error('--own-ab takes two of native, beside, after (e.g. native,beside)');
  return modes as [OwnAttend, OwnAttend];
})();
if ([gapMs > 0, graphAb, ownAb].filter(Boolean).length > 1) throw new Error('--gap-ms, --graph-ab and --own-ab each split the steps by parity: give one');

/** Layers a token steps through (each step one layer, in turn, as a server's frames come): a token's layers share its sinks and window (engine/wave-on-device.ts). */
const layers = arg('--layers', 1);
const model: ModelShape = { layers, qHeads: 32, kvHeads: 8, headDim: 64, dtype: 'f16', blockSize: 64 };
const { qHeads, kvHeads, headDim: d } = model;
const TOKENS = 1 << 20, CLUSTER = 8, GRAPHS = 8;
const params: SearchParams = { ...DEFAULT_PARAMS, budget: 0.01, sinks: 16, window: 256 };
const rng = new Rng(7);

/**
 * A stand-in for the native store: answers at once with the binding's
 * objects, and counts a graph capture where StepGraph (8 graphs, least
 * recently used evicted) would miss on the sizes wave_step.cu keys on and
 * has seen the key before (the last 16 keys it ran one by one; at once with
 * KVRECALL_STEP_GRAPH_EAGER=1).
 */
function standInStore(): WaveGpuStore {
  const lru: string[] = [], seen: string[] = [], eager = process.env.KVRECALL_STEP_GRAPH_EAGER?.startsWith('1') ?? false;
  let captures = 0;
  const native = {
    step(a: { q: Float32Array; scale: number; exact?: Int32Array; plan: Float64Array; ids?: boolean; estimate?: boolean; graph?: boolean; own?: { k: Uint16Array[]; v: Uint16Array[]; tokens: number };
              out: Float32Array; lse: Float32Array; meta: Float64Array }) {
      // The binding's plan: budget, target, maxClusters[, keep] per kv head.
      const budget = Array.from(a.plan.subarray(0, kvHeads)), target = Array.from(a.plan.subarray(kvHeads, 2 * kvHeads));
      // Asleep, not spinning: on this 2-core VM a spinning hold took the core the pool's thread needs (a GPU host has cores to spare).
      if (holdMs > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, holdMs);
      const most = (xs: number[]) => stepBucket(Math.min(TOKENS, Math.max(0, ...xs)));
      const key = `${stepBucket(a.exact?.length ?? 0)}|${most(budget)}|${most(target)}|${a.ids}|${a.estimate}`;
      let at = a.graph === false ? -2 : lru.indexOf(key);
      if (at === -1 && !eager && !seen.includes(key)) {
        // A key's first sighting runs one by one (native/cuda/step_graph.cuh's Capture::kOnRepeat).
        seen.push(key);
        if (seen.length > 16) seen.shift();
        at = -2;
      }
      if (at >= 0) lru.splice(at, 1);
      else if (at === -1) {
        captures++;
        if (lru.length === GRAPHS) lru.shift();
      }
      if (at !== -2) lru.push(key);
      // As the binding answers: into the caller's arrays (meta: idCounts, candidates, estimated per kv head, then STEP_META's slots).
      a.out.fill(0.01);
      a.lse.fill(3);
      a.meta.fill(budget[0], 0, kvHeads).fill(target[0], kvHeads, 2 * kvHeads).fill(TOKENS - budget[0], 2 * kvHeads, 3 * kvHeads);
      const slot = (k: (typeof STEP_META)[number]) => 3 * kvHeads + STEP_META.indexOf(k);
      a.meta[slot('width')] = budget[0];
      a.meta[slot('graphCaptures')] = captures;
      a.meta[slot('workMs')] = 0.7;
      const answer = undefined;
      // The own tokens, as the binding attends them within the call (their merge left out).
      if (!a.own) return Promise.resolve(answer);
      const segment = { k: a.own.k, v: a.own.v, tokens: a.own.tokens } as unknown as KvSegment;
      const part = { out: new Float32Array(qHeads * d), lse: new Float32Array(qHeads) };
      return attendOnHost(model, [{ segment, begin: 0, end: a.own.tokens }], { layer: 0, q: a.q, scale: a.scale, ...part }).then(() => answer);
    },
  };
  const Store = WaveGpuStore as unknown as new (n: unknown, o: unknown, c: number[]) => WaveGpuStore;
  return new Store(native, { kvHeads, headDim: d, dtype: 'f16', tokens: TOKENS, cacheRows: 0 }, new Array<number>(kvHeads).fill(TOKENS / CLUSTER));
}

/** The real store over synthetic clusters (bench/wave-gpu.ts's), and a query source drawn near its keys. */
function deviceStore(): { store: WaveGpuStore; nextQ: () => Float32Array } {
  const noise = new Float32Array(TOKENS * d);
  for (let i = 0; i < noise.length; i++) noise[i] = 0.5 * rng.normal();
  const shared = { noise, values: words(noise, 'f16'), scratch: new Float32Array(TOKENS * d) };
  const built = Array.from({ length: kvHeads }, () => syntheticHead(rng, TOKENS, d, CLUSTER, 'f16', shared));
  const store = WaveGpuStore.create({ kvHeads, headDim: d, dtype: 'f16', tokens: TOKENS, heads: built.map((b) => b.head) });
  const keyRow = keyRows(built.map((b) => b.head), d, 'f16');
  return { store, nextQ: () => queries(rng, keyRow, kvHeads, TOKENS, d, qHeads / kvHeads) };
}

const f16Row = (n: number) => {
  const f = Float32Array.from({ length: n }, () => 0.5 * rng.normal());
  return new Uint8Array(words(f, 'f16').buffer);
};

interface Row {
  own: number;
  ms: number;
  selectMs: number;
  callMs: number;
  kernelMs: number;
  captured: boolean;
  /** Launched one by one (--graph-ab's odd steps). */
  ungraphed: boolean;
  /** Came after a --gap-ms idle (odd steps). */
  gapped: boolean;
  ownMs: number;
  onLoop: boolean;
  host: Record<string, number>;
}

async function main() {
  const { store, nextQ } = onDevice ? deviceStore() : { store: standInStore(), nextQ: () => Float32Array.from({ length: qHeads * d }, () => rng.normal()) };
  // The store call as the engine makes it, timed until it returns its promise: on the loop's thread
  // (addon/device-calls.ts) the native work is done by then, before the own tokens' attend starts.
  let last: { r: WaveGpuStepResult; wall: number } | undefined;
  const step = store.step.bind(store);
  let ungraphed = false;
  store.step = (a: WaveGpuStepArgs) => {
    const t = performance.now();
    const p = step(ungraphed ? { ...a, graph: false } : a);
    const wall = performance.now() - t;
    return p.then((r) => ((last = { r, wall }), r));
  };
  // The engine's backend over the store (its layers' stores held as a server holds them: GpuBackend.waveLayer, engine/cache/device-wave.ts).
  const gpu = GpuBackend.over({ ok: true, device: onDevice ? 'device store' : 'stand-in', memory: 1 << 30, built: false } as CudaDevice, { budgetBytes: 1 << 30, waveBudgetBytes: Number.MAX_SAFE_INTEGER },
    { waveStore: async () => store });
  const docSeg = { tokens: TOKENS, k: [], v: [] } as unknown as KvSegment; // the step reads only its length (ids are not asked for)
  const doc = { meta: { id: 'doc', tokens: TOKENS }, layers: Array.from({ length: layers }, () => docSeg), indexes: new Map() } as unknown as LoadedDocument;
  // What the stores read of a layer's clusters to size its store (the stand-in's store is made already).
  const heads = Array.from({ length: kvHeads }, () => ({ clusters: TOKENS / CLUSTER, arrays: { tokens: TOKENS, counts: new Int32Array(0) } })) as unknown as ClusterIndex[];
  const perLayer = Array.from({ length: layers }, () => heads);
  const newSession = () => new Session({ id: 's', model, documents: [doc], method: findMethod('wave')!, params, documentIndexes: [perLayer], clusterIndexes: [perLayer], budget: UNLIMITED, gpu });

  let session = newSession();
  const rows: Row[] = [];
  const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
  let captures = 0;
  for (let s = 0; s < steps; s++) {
    const layer = s % layers;
    if (layer === 0 && session.own[0].tokens >= ownTo) {
      session.release();
      session = newSession();
    }
    // The own tokens up to ownFrom, appended outside the timed steps.
    while (session.own[layer].tokens < ownFrom) session.own[layer].append(f16Row(kvHeads * d), f16Row(kvHeads * d), 'f16', 1);
    // Each step in its own event-loop turn, as a server's frames come (the loop's per-turn cap resets).
    await new Promise((r) => setImmediate(r));
    const q = nextQ(), scale = 1 / Math.sqrt(d);
    const k = { data: f16Row(kvHeads * d), dtype: 'f16' as const, shape: [kvHeads, d] };
    const v = { data: f16Row(kvHeads * d), dtype: 'f16' as const, shape: [kvHeads, d] };
    ungraphed = graphAb && s % 2 === 1;
    const gapped = (gapMs > 0 || ownAb) && s % 2 === 1;
    setOwnAttend(ownAb ? ownModes[gapped ? 1 : 0] : 'native');
    if (gapped && gapMs > 0) await new Promise((r) => setTimeout(r, gapMs));
    const runs = deviceCallRuns();
    const r = await decodeStep(session, { layer, q, scale, k, v, want: new Set(['out']) });
    if (r.stats.backend !== 'cuda' || !last) throw new Error('the step did not take the device path');
    const onLoop = deviceCallRuns().loop > runs.loop;
    const own = session.own[layer];
    const t = performance.now();
    await attendOnHost(model, [{ segment: own, begin: 0, end: own.tokens }], { layer: 0, q, scale, out, lse });
    const ownMs = performance.now() - t;
    rows.push({ own: own.tokens, ms: r.stats.ms, selectMs: r.stats.selectMs, callMs: last.wall, kernelMs: last.r.ms, captured: last.r.graphCaptures > captures, ungraphed, gapped, ownMs, onLoop, host: last.r.host });
    captures = last.r.graphCaptures;
  }
  const warm = rows.slice(Math.min(8, rows.length - 1));
  const p50 = (xs: Row[], f: (r: Row) => number) => (xs.length ? quantile(xs.map(f), 0.5) : NaN);
  const f = (x: number) => (Number.isNaN(x) ? '—' : x.toFixed(3));
  const line = (name: string, xs: Row[]) =>
    `| ${name} | ${xs.length} | ${f(p50(xs, (r) => r.ms))} | ${f(p50(xs, (r) => r.selectMs))} | ${f(p50(xs, (r) => r.callMs))} | ${onDevice ? f(p50(xs, (r) => r.kernelMs)) : '—'} | ${f(p50(xs, (r) => r.ownMs))} | ${xs.filter((r) => r.onLoop).length} |`;
  const hostKeys = onDevice ? Object.keys(warm[0]?.host ?? {}) : [];
  const stages = (xs: Row[]) => hostKeys.map((k) => `${k} ${f(p50(xs, (r) => r.host[k] ?? NaN))}`).join(', ');
  const graphed = warm.filter((r) => !r.ungraphed), ungraphedRows = warm.filter((r) => r.ungraphed);
  const captured = graphed.filter((r) => r.captured), replayed = graphed.filter((r) => !r.captured);
  const text = [
    `# Wave layer-step, the host's share (${onDevice ? 'device store' : `stand-in store, no device${holdMs > 0 ? `, its call holding the thread ${holdMs} ms` : ''}`})`,
    '',
    `${steps} steps of one session appending one own token a step (${layers > 1 ? `${layers} layers in turn, a step each; ` : ''}own tokens ${ownFrom}..${ownTo}, then a fresh session); llama3.2-1b shape (32 q / 8 kv heads, d=64, f16), 1M-token document in clusters of 8, budget 1% + 16 sinks + 256 window, estimate on. ` +
      `${cpus()[0].model}, ${cpus().length} cores, ${nativeThreads} native threads, load average ${loadavg()[0].toFixed(2)} at the end. First 8 steps left out.`,
    '',
    '| steps | n | decodeStep ms | select ms | store call ms (to its promise) | kernel ms | own attend alone ms | calls on the loop |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    line('all', warm),
    ...(gapMs > 0 ? [line('back to back (even steps)', warm.filter((r) => !r.gapped)), line(`after ${gapMs} ms idle (odd steps)`, warm.filter((r) => r.gapped))] : []),
    ...(ownAb ? [line(`own tokens ${ownModes[0]} (even steps)`, warm.filter((r) => !r.gapped)), line(`own tokens ${ownModes[1]} (odd steps)`, warm.filter((r) => r.gapped))] : []),
    ...(graphAb ? [line('launched one by one (graph: false, odd steps)', ungraphedRows), line('launched one by one, own tokens < window', ungraphedRows.filter((r) => r.own < params.window))] : []),
    line(`graph captured anew${onDevice ? '' : ' (as the native key would)'}`, captured),
    line('graph replayed, or run one by one (a key seen for the first time, native/cuda/step_graph.cuh)', replayed),
    line('own tokens < window (256)', graphed.filter((r) => r.own < params.window)),
    line('own tokens >= window', graphed.filter((r) => r.own >= params.window)),
    '',
    ...(onDevice ? [`Host stages (p50 ms) of the captured steps: ${stages(captured)}; of the replayed: ${stages(replayed)}${graphAb ? `; launched one by one: ${stages(ungraphedRows)}` : ''}${gapMs > 0 || ownAb ? `; even steps: ${stages(warm.filter((r) => !r.gapped))}; odd steps: ${stages(warm.filter((r) => r.gapped))}` : ''}.`] : []),
  ].join('\n');
  console.log(text);
  if (jsonAt >= 0) writeFileSync(argv[jsonAt + 1], JSON.stringify({ steps, ownFrom, ownTo, onDevice, load: loadavg()[0], rows }));
  if (onDevice) store.close();
}

await main();
