// WaveGpuStore.rest (engine/rest-on-device.ts's call: the estimate of what a
// nosa or topk-blocks selection leaves out, on the device) against the host's
// estimate of the same rows (estimateClusters over ClusterIndex.estimateArgs,
// as engine/estimate.ts's estimateRest calls it). Needs a CUDA device.
//
//   node dist/bench/wave-gpu-rest.js [--check] [--bench] [--steps N]
//
// --check runs the comparisons test/native/wave-gpu-rest.test.ts makes: on
// random keys clustered by the real builder, selections given as ranges,
// blocks and ids per kv head (rows listed twice, overlapping ranges, unsorted
// and repeated blocks, blocks past the end, empty ranges, heads with nothing
// selected, a head whose selection is the whole segment); out per q head and
// lse within 1e-4 relative (the device sums f32 tiles merged in float64, the
// host float64), estimated and scanned token counts exactly, the rows given
// counted as the host expands them; the graph-replayed call equal to the one
// launched one by one; a wave step between calls on the same store changes
// nothing; a steady block selection (other blocks, the same counts) replays
// one graph.
//
// --bench: one layer at 1M tokens, 8 kv heads x 4 q heads, d=128, f16,
// clusters of 16 (synthetic, as bench/wave-gpu.ts), a topk-blocks-like
// selection per step (1% of the tokens in random blocks of 64 per head, 64
// sinks, 256 window): the device call and the host's estimateClusters on the
// same rows, alternated step by step; p50/p90 wall ms of each (awaited), the
// device's stream ms, and the first step's answers compared.
// Results: bench/results/wave-gpu-rest-<card>.{json,md} (also to $OUT when set).
import { pathToFileURL } from 'node:url';
import { deviceName } from '../addon/cuda.js';
import { estimateClusters } from '../addon/estimate.js';
import type { KvDtype } from '../addon/kernels.js';
import { WaveGpuStore, type WaveGpuRestArgs, type WaveGpuRestResult } from '../addon/wave-gpu.js';
import { centroidStride } from '../index/wave/cluster-codec.js';
import { ClusterIndex, PROBE, type EstimateOrder } from '../index/wave/cluster-index.js';
import { Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { answerDiff, gpuRanking, keyRows, queries, staticRows, syntheticHead, TOL, type WaveCase } from './wave-gpu.js';
import { caseHeads, words } from './wave-gpu-heads.js';
import { cardName, saveDeviceResult, requireDevice } from './device-results.js';

export interface RestCase extends WaveCase {
  blockSize: number;
}

/** Odd sizes as bench/wave-gpu.ts's cases; clusters of one token (every touched cluster attended whole) among them. */
export function restCases(): RestCase[] {
  const base = { budget: [], sinks: 0, window: 0 };
  return [
    { ...base, dt: 'f16', kvHeads: 3, G: 3, d: 40, tokens: 20011, clusterSize: 8, blockSize: 64, scale: 0.3 },
    { ...base, dt: 'bf16', kvHeads: 2, G: 4, d: 128, tokens: 12345, clusterSize: 5, blockSize: 32, scale: 1 / Math.sqrt(128) },
    { ...base, dt: 'f16', kvHeads: 4, G: 2, d: 128, tokens: 70001, clusterSize: 16, blockSize: 64, scale: 1 / Math.sqrt(128) },
    { ...base, dt: 'f16', kvHeads: 2, G: 5, d: 24, tokens: 3001, clusterSize: 1, blockSize: 16, scale: 0.5 },
  ];
}

export const restCaseName = (c: RestCase) => `${c.dt} d=${c.d} kv=${c.kvHeads} G=${c.G} N=${c.tokens} cluster=${c.clusterSize} block=${c.blockSize}`;

type Rows = Pick<WaveGpuRestArgs, 'ranges' | 'blocks' | 'ids'>;

/** Head h's rows as the host's estimate takes them: the ranges', the blocks' (clamped to the segment), the ids, duplicates kept. */
export function expandRows(r: Rows, h: number, n: number): Int32Array {
  const out: number[] = [];
  const rg = r.ranges[h];
  for (let i = 0; i < rg.length; i += 2) for (let t = rg[i]; t < rg[i + 1]; t++) out.push(t);
  if (r.blocks) for (const b of r.blocks.ids[h]) for (let t = b * r.blocks.size; t < Math.min(n, (b + 1) * r.blocks.size); t++) out.push(t);
  if (r.ids) out.push(...r.ids[h]);
  return Int32Array.from(out);
}

const sortedSample = (rng: Rng, n: number, k: number) => {
  const s = new Set<number>();
  while (s.size < Math.min(k, n)) s.add(rng.int(n));
  return Int32Array.from([...s].sort((a, b) => a - b));
};

/** The selections a case is checked with (see the header). */
function selections(rng: Rng, c: RestCase): { name: string; rows: Rows }[] {
  const { tokens: n, kvHeads: H, blockSize: B } = c, nb = Math.ceil(n / B);
  const sinkWindow = Int32Array.of(0, Math.min(16, n), Math.max(0, n - 64), n);
  const heads = <T>(f: (h: number) => T) => Array.from({ length: H }, (_, h) => f(h));
  const blocks = heads((h) => {
    if (h === H - 1) return new Int32Array(0);
    const ids = sortedSample(rng, nb, Math.max(1, Math.round(nb * 0.02)));
    return h === 0 ? Int32Array.from(new Set([0, ...ids, nb - 1])).sort() : ids;
  });
  const randomRanges = () => {
    const r: number[] = [];
    for (let i = rng.int(4); i > 0; i--) {
      const lo = rng.int(n), hi = Math.min(n, lo + rng.int(200));
      r.push(lo, hi);
    }
    const at = rng.int(n);
    r.push(at, at); // empty
    return Int32Array.from(r);
  };
  const randomIds = (h: number) => {
    if (h === 1 % H) return new Int32Array(0);
    const ids = Array.from({ length: 1 + rng.int(Math.max(1, n >> 6)) }, () => rng.int(n));
    for (let i = rng.int(20); i > 0; i--) ids.push(ids[rng.int(ids.length)]); // listed twice
    ids.push(0, n - 1); // inside the sinks and window too
    return Int32Array.from(ids);
  };
  const mixedBlocks = heads((h) => Int32Array.from([...blocks[h]].reverse().concat(blocks[h].length ? [blocks[h][0], nb + 3] : [])));
  return [
    { name: 'blocks', rows: { ranges: heads(() => sinkWindow), blocks: { size: B, ids: blocks } } },
    { name: 'ids', rows: { ranges: heads(() => randomRanges()), ids: heads(randomIds) } },
    { name: 'mixed', rows: { ranges: heads(() => sinkWindow), blocks: { size: B, ids: mixedBlocks }, ids: heads(randomIds) } },
    { name: 'none', rows: { ranges: heads(() => new Int32Array(0)) } },
    { name: 'whole head 0', rows: { ranges: heads((h) => (h === 0 ? Int32Array.of(0, n) : new Int32Array(0))), ids: heads((h) => (h === 0 ? new Int32Array(0) : randomIds(h))) } },
  ];
}

export interface RestCompare {
  name: string;
  outRel: number;
  lseRel: number;
  estimatedEqual: boolean;
  scannedEqual: boolean;
  rowsEqual: boolean;
  ok: boolean;
}

/** The device's rest against estimateClusters over the same rows. */
export async function compareRest(heads: ClusterIndex[], gpu: WaveGpuRestResult, rows: Rows, q: Float32Array, G: number, d: number, dt: KvDtype,
                                  scale: number, order: EstimateOrder, name: string): Promise<RestCompare> {
  const H = heads.length, n = heads[0].arrays.tokens, qHeads = H * G;
  const expanded = heads.map((_, h) => expandRows(rows, h, n));
  const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(H), scanned = new Float32Array(H);
  const segment = heads.map((x, h) => x.estimateArgs(expanded[h], order));
  await estimateClusters({ q, qHeads, kvHeads: H, headDim: d, centroidStride: centroidStride(d), dtype: dt, scale, segments: [segment], out, lse, estimated, scanned });
  const { outRel, lseRel } = answerDiff(gpu, out, lse, qHeads, d);
  const estimatedEqual = heads.every((_, h) => gpu.estimated[h] === estimated[h]);
  const scannedEqual = heads.every((_, h) => gpu.scanned[h] === scanned[h]);
  const rowsEqual = heads.every((_, h) => gpu.rows[h] === expanded[h].length);
  const ok = outRel <= TOL.out && lseRel <= TOL.lse && estimatedEqual && scannedEqual && rowsEqual;
  return { name, outRel, lseRel, estimatedEqual, scannedEqual, rowsEqual, ok };
}

/** Two answers of the same call: out and lse within 1e-6 relative (touched clusters are listed in atomic order). */
export function sameAnswer(a: WaveGpuRestResult, b: WaveGpuRestResult): boolean {
  const close = (x: number, y: number) => x === y || Math.abs(x - y) <= 1e-6 * Math.max(1, Math.abs(y));
  return a.out.every((x, i) => close(x, b.out[i])) && a.lse.every((x, i) => close(x, b.lse[i])) && a.estimated.every((x, h) => x === b.estimated[h]);
}

/** Builds the case's clusters, then every selection (and orders) on one store: each call also checks the one before left its scratch clean. */
export async function checkRestCase(c: RestCase, seed: number): Promise<(RestCompare & { graphSame: boolean })[]> {
  const rng = new Rng(seed);
  const { dt, d, tokens: N, kvHeads: H, G } = c;
  const { keysF, heads, gpuHeads } = await caseHeads(c, rng, seed);
  const store = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: gpuHeads });
  const fresh = () => queries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G);
  const results: (RestCompare & { graphSame: boolean })[] = [];
  try {
    for (const { name, rows } of selections(rng, c))
      for (const order of (name === 'mixed' ? ['rows', 'moments', 'first'] : ['rows']) as EstimateOrder[]) {
        const q = fresh(), args = { q, qHeads: H * G, scale: c.scale, ...rows, order };
        const staged = await store.rest({ ...args, stages: true });
        const r = await compareRest(heads, staged, rows, q, G, d, dt, c.scale, order, `${name} ${order}`);
        // The engine's call, from a graph: the same answer, and for a fresh query without a new capture.
        const replayed = await store.rest(args);
        const captures = replayed.graphCaptures;
        const q2 = fresh();
        const again = await store.rest({ ...args, q: q2 });
        // A wave step on the same store between rest calls (sessions of both kinds share a layer's store).
        await store.step({ q: q2, qHeads: H * G, scale: c.scale, budget: new Array<number>(H).fill(Math.min(N, 50)), probe: PROBE, ranking: gpuRanking('spread'),
          exact: staticRows(N, 4, 8), attend: true, stages: false });
        const after = await store.rest({ ...args, q: q2, stages: true });
        const graphSame = sameAnswer(replayed, staged) && again.graphCaptures === captures && sameAnswer(again, after) && Object.keys(after.stages).length > 0;
        results.push({ ...r, graphSame, ok: r.ok && graphSame });
      }
    // A steady block selection, as decoding makes it: other blocks every step, the same number a head (never the
    // partial last one, never two adjacent: the same rows and ranges), so the second step replays the first's graph.
    const even = Math.floor((Math.ceil(N / c.blockSize) - 1) / 2), k = Math.max(1, Math.round(even * 0.05));
    const steady = (): Rows => ({
      ranges: Array.from({ length: H }, () => Int32Array.of(0, Math.min(16, N), Math.max(0, N - 64), N)),
      blocks: { size: c.blockSize, ids: Array.from({ length: H }, () => sortedSample(rng, even, k).map((x) => 2 * x)) },
    });
    const q = fresh(), first = await store.rest({ q, qHeads: H * G, scale: c.scale, ...steady() }), rows = steady();
    const second = await store.rest({ q, qHeads: H * G, scale: c.scale, ...rows });
    const r = await compareRest(heads, second, rows, q, G, d, dt, c.scale, 'rows', 'steady blocks');
    const graphSame = second.graphCaptures === first.graphCaptures;
    results.push({ ...r, graphSame, ok: r.ok && graphSame });
  } finally {
    store.close();
  }
  return results;
}

// ---------------------------------------------------------------- benchmark

async function runBench(steps: number, log: (s: string) => void) {
  const N = 1 << 20, H = 8, G = 4, d = 128, dt: KvDtype = 'f16', size = 16, B = 64, scale = 1 / Math.sqrt(d);
  const rng = new Rng(20261206);
  const noise = new Float32Array(N * d);
  for (let i = 0; i < noise.length; i++) noise[i] = 0.5 * rng.normal();
  const shared = { noise, values: words(noise, dt), scratch: new Float32Array(N * d) };
  const built = Array.from({ length: H }, () => syntheticHead(rng, N, d, size, dt, shared));
  const heads = built.map((b) => new ClusterIndex(b.arrays, b.head.keys, b.head.values));
  const store = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: dt, tokens: N, heads: built.map((b) => b.head) });
  log('layer on the device');
  const keyRow = keyRows(built.map((b) => b.head), d, dt);
  const sinkWindow = Int32Array.of(0, 64, N - 256, N), nb = N / B, perHead = Math.round((0.01 * N) / B);
  const dev: number[] = [], devMs: number[] = [], host: number[] = [];
  let check: RestCompare | undefined;
  try {
    for (let s = 0; s < steps + 2; s++) {
      const q = queries(rng, keyRow, H, N, d, G);
      const rows: Rows = { ranges: new Array(H).fill(sinkWindow), blocks: { size: B, ids: Array.from({ length: H }, () => sortedSample(rng, nb, perHead)) } };
      const t0 = performance.now();
      const r = await store.rest({ q, qHeads: H * G, scale, ...rows });
      const t1 = performance.now();
      const segment = heads.map((x, h) => x.estimateArgs(expandRows(rows, h, N)));
      const t2 = performance.now();
      const out = new Float32Array(H * G * d), lse = new Float32Array(H * G), estimated = new Float32Array(H), scanned = new Float32Array(H);
      await estimateClusters({ q, qHeads: H * G, kvHeads: H, headDim: d, centroidStride: centroidStride(d), dtype: dt, scale, segments: [segment], out, lse, estimated, scanned });
      const t3 = performance.now();
      if (s === 0) check = await compareRest(heads, r, rows, q, G, d, dt, scale, 'rows', 'bench step 0');
      if (s < 2) continue; // warm-up
      dev.push(t1 - t0);
      devMs.push(r.ms);
      host.push(t3 - t2);
    }
  } finally {
    store.close();
  }
  const p = (xs: number[], x: number) => quantile(xs, x);
  return {
    shape: { tokens: N, kvHeads: H, qHeads: H * G, headDim: d, clusterSize: size, blockSize: B, blocksPerHead: perHead, sinks: 64, window: 256 },
    steps,
    device: { wallP50: p(dev, 0.5), wallP90: p(dev, 0.9), streamP50: p(devMs, 0.5) },
    host: { wallP50: p(host, 0.5), wallP90: p(host, 0.9) },
    check,
  };
}

async function main() {
  const args = process.argv.slice(2);
  const all = !args.includes('--check') && !args.includes('--bench');
  const steps = args.includes('--steps') ? Number(args[args.indexOf('--steps') + 1]) : 30;
  const info = requireDevice();
  let failed = 0;
  if (all || args.includes('--check')) {
    let seed = Date.now() % 1_000_000;
    for (const c of restCases())
      for (const r of await checkRestCase(c, seed++)) {
        if (!r.ok) failed++;
        console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${restCaseName(c)} ${r.name}: out ${r.outRel.toExponential(2)} lse ${r.lseRel.toExponential(2)} estimated ${r.estimatedEqual} scanned ${r.scannedEqual} rows ${r.rowsEqual} graph ${r.graphSame}`);
      }
  }
  if (all || args.includes('--bench')) {
    const r = await runBench(steps, console.log);
    const f = (x: number) => x.toFixed(2);
    const md = [
      `# The estimate of a block selection at 1M tokens: device (WaveGpuStore.rest) vs host (estimateClusters), ${deviceName(info)}`,
      '',
      `One layer, ${r.shape.kvHeads} kv / ${r.shape.qHeads} q heads, d=${r.shape.headDim}, f16, clusters of ${r.shape.clusterSize}; per step ${r.shape.blocksPerHead} random blocks of ${r.shape.blockSize} per head + ${r.shape.sinks} sinks + ${r.shape.window} window attended, the rest estimated. ${r.steps} steps, the two alternated step by step (after 2 warm-ups).`,
      '',
      '| estimate | wall p50 ms | wall p90 ms | stream p50 ms |',
      '| --- | ---: | ---: | ---: |',
      `| device | ${f(r.device.wallP50)} | ${f(r.device.wallP90)} | ${f(r.device.streamP50)} |`,
      `| host | ${f(r.host.wallP50)} | ${f(r.host.wallP90)} | |`,
      '',
      `Step 0 against the host: out ${r.check?.outRel.toExponential(2)}, lse ${r.check?.lseRel.toExponential(2)} relative; estimated equal ${r.check?.estimatedEqual}, scanned equal ${r.check?.scannedEqual}.`,
      '',
    ].join('\n');
    console.log(JSON.stringify(r, null, 2));
    console.log(md);
    if (!r.check?.ok) failed++;
    saveDeviceResult(`wave-gpu-rest-${cardName(info.device)}`, { ...r, date: new Date().toISOString() }, md);
  }
  process.exit(failed ? 1 : 0);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) main().catch((e) => {
  console.error(e);
  process.exit(1);
});
