// node dist/bench/ra-search-layer.js [--tokens 1048576 --heads 8 --reps 4 --single-reps 2 --configs capped,code,scan
//   --huge-keys --width 8 --scan-chunks 0,65536 --tag s28]
//
// Issue #15's target as the engine meets it: the graph searches of ALL kv
// heads of one layer-step, at once on the native pool (RaGraph.searchBatch,
// as index/retrieval-attention.ts's searchHeads calls it), <= 1 ms at 1M keys
// on the 16-core GPU host. Made to run there from nothing in one device call:
// the workload, graph and exact top-k of bench/ra-search.ts
// (bench/ra-search-data.ts: built on all cores, every stage timed and
// printed as it goes, cached under the temp directory for the next run).
//
// The heads: building `heads` graphs at 1M would take `heads` times the
// build, so head h is the one graph loaded again (its own copy of the CSR,
// its own sample rows, codes and list slots) over its own copy of the keys:
// no two heads share a line of memory, as `heads` real heads' graphs and
// keys would not, and each search's cache misses are its own. At step s
// head h searches with decode step (s + h) mod steps's query group, so a
// layer-step's searches are all different. Each head's answers are then the
// single graph's, whose fingerprint over the steps equals
// bench/ra-search.ts's for the same configuration (checked here against
// every batch: `batch = single`).
//
// Configurations: the beam capped at 3% scanned (ra-search.ts's), the
// session default beam (effort(0, k): margin 0.5, ef 8k, no cap) and the
// code walk at the session's defaults (walkOptions(0, k, 0, tokens,
// { codeWalk: true }): caps 3% exact / 40% codes, q 1, δ 1, κ 2) and the
// code scan at the session's default (walkOptions(0, k, 0, tokens,
// { codeScan: true }): every key's code, the best 3% exactly). Per
// configuration: one untimed layer-step first (the code walk makes each
// head's codes and list slots there: timed apart), then `reps` × `steps`
// layer-steps timed (wall, and the process's CPU per search), then
// `single-reps` × `steps` group-searches on the calling thread (CPU a
// group: the per-search cost without the pool).
//
// --huge-keys: every measurement also over a second set of heads whose key
// copies are collapsed into 2 MiB pages (addon collapseHugePages; their
// graphs loaded again), the two sets alternated rep by rep: each row then
// says which pages its keys are in. A search reads ~31K random 256-byte rows
// at 1M keys capped at 3%, each on its own 4 KiB page, a TLB miss each
// (bench/results/ra-search-1048576-vm-r6.md: 0.86-0.87 of the CPU a search
// in 2 MiB pages on the 2-core VM); the engine's key storage is in 4 KiB
// pages.
//
// Writes bench/results/ra-search-layer-<tokens>-<machine>[-<tag>].md and
// .json (and into $OUT on a device visit: bench/device-results.ts);
// <machine> is the card's name where CUDA answers (h100, h200), else vm.
import { loadavg } from 'node:os';
import { cudaAvailable } from '../addon/cuda.js';
import { collapseHugePages } from '../addon/kernels.js';
import { RaGraph, type RaGraphSearchArgs, type RaGraphSearchResult } from '../addon/ra-graph.js';
import { walkOptions, effort } from '../index/retrieval-attention.js';
import { cardName, saveDeviceResult } from './device-results.js';
import { machine } from './host.js';
import { D, fnv, G, groupRecall, raSearchData } from './ra-search-data.js';
import { median } from './stats.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => (argv.includes(`--${name}`) ? argv[argv.indexOf(`--${name}`) + 1] : dflt);
const tokens = Number(get('tokens', '1048576'));
const heads = Number(get('heads', '8'));
const steps = 8;
const reps = Number(get('reps', '4'));
const singleReps = Number(get('single-reps', '2'));
const only = get('configs', '');
const tag = get('tag', '');
const hugeKeys = argv.includes('--huge-keys');
const width = argv.includes('--width') ? Number(get('width', '')) : undefined;
// --scan-chunks C1,C2,...: the code scan once per value of its scanChunk (keys a pool task; 0: one pass).
const scanChunks = argv.includes('--scan-chunks') ? get('scan-chunks', '').split(',').map(Number) : undefined;
const t0 = performance.now();
const at = () => `${((performance.now() - t0) / 1000).toFixed(1)} s`;
const progress = (msg: string) => process.stderr.write(`[bench:ra-search-layer] ${msg}\n`);

const info = cudaAvailable();
const where = info.ok ? cardName(info.device) : 'vm';
progress(`${machine()}${info.ok ? `, ${info.device}` : ''}`);
const data = await raSearchData(tokens, steps, progress);
const { asked } = data;

// The heads: copies of the keys, the graph loaded again over each; with
// --huge-keys a second such set, its keys in 2 MiB pages.
const blob = data.graph.save();
type Head = { keys: Uint16Array; graph: RaGraph };
const makeHeads = (first: boolean): Head[] =>
  Array.from({ length: heads }, (_, h) => ({
    keys: first && h === 0 ? data.keys : data.keys.slice(),
    graph: first && h === 0 ? data.graph : RaGraph.load(blob),
  }));
const sets: { pages: string; head: Head[]; collapsedBytes?: number }[] = [{ pages: '4 KiB', head: makeHeads(true) }];
if (hugeKeys) {
  const head = makeHeads(false);
  const collapsedBytes = await collapseHugePages(head.map((x) => x.keys));
  sets.push({ pages: '2 MiB', head, collapsedBytes });
  progress(`[${at()}] keys in 2 MiB pages: ${(collapsedBytes / 2 ** 20).toFixed(0)} of ${((heads * data.keys.byteLength) / 2 ** 20).toFixed(0)} MB collapsed`);
}
progress(`[${at()}] ${heads} heads ready${hugeKeys ? ' (twice)' : ''} (graph ${(blob.length / 2 ** 20).toFixed(0)} MB, keys ${(data.keys.byteLength / 2 ** 20).toFixed(0)} MB each)`);

interface Config {
  name: string;
  opts: Partial<RaGraphSearchArgs>;
}
const configs: Config[] = ([
  { name: 'beam capped at 3% scanned', opts: { ef: 8 * asked, margin: 3, maxScanned: Math.round(0.03 * tokens), aggregate: 'attention' as const } },
  { name: 'beam, session default (margin 0.5, ef 8k)', opts: effort(0, asked) },
  { name: 'code walk, session defaults (3% exact, 40% codes)', opts: walkOptions(0, asked, 0, tokens, { codeWalk: true }) },
  { name: 'code scan, session default (every code, 3% exact)', opts: walkOptions(0, asked, 0, tokens, { codeScan: true }) },
] as Config[])
  .filter((c) => !only || only.split(',').some((o) => c.name.includes(o)))
  // --width W: the beams' expandWidth (absent: the native default, 1).
  .map((c) => (width !== undefined && !c.opts.codeWalk && !c.opts.codeScan ? { name: `${c.name}, width ${width}`, opts: { ...c.opts, expandWidth: width } } : c))
  .flatMap((c) => (scanChunks && c.opts.codeScan ? scanChunks.map((scanChunk) => ({ name: `${c.name}, chunk ${scanChunk}`, opts: { ...c.opts, scanChunk } })) : [c]));

const search = (head: Head[], c: Config, h: number, s: number, ids: Int32Array): RaGraphSearchArgs & { graph: RaGraph } => ({
  keys: head[h].keys,
  tokens,
  headDim: D,
  dtype: 'f16',
  q: data.decodeQ[s],
  group: G,
  k: asked,
  ef: asked,
  ...c.opts,
  outIds: ids,
  outScores: new Float32Array(asked),
  graph: head[h].graph,
});
const same = (a: Int32Array, b: Int32Array) => a.length === b.length && a.every((x, i) => x === b[i]);
const q = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))];

const rows: Record<string, unknown>[] = [];
for (const c of configs) {
  // Per page set: untimed, the first layer-step makes what a head makes on its first search of this kind.
  const per = [];
  for (const set of sets) {
    const w = performance.now();
    await RaGraph.searchBatch(Array.from({ length: heads }, (_, h) => search(set.head, c, h, h % steps, new Int32Array(asked))));
    per.push({ set, firstMs: performance.now() - w, single: [] as Int32Array[], singleCpu: [] as number[], scanned: [] as number[], codes: [] as number[], recall: [] as number[], print: 2166136261, layer: [] as number[], layerCpu: [] as number[], loads: [] as number[], batchSame: true });
  }
  // One group on the calling thread (head 0): the answers (fingerprint as bench/ra-search.ts's) and the CPU a group.
  for (let r = 0; r < singleReps; r++)
    for (const x of per)
      for (let s = 0; s < steps; s++) {
        const ids = new Int32Array(asked);
        const u = process.cpuUsage();
        const res = x.set.head[0].graph.searchSync(search(x.set.head, c, 0, s, ids));
        const du = process.cpuUsage(u);
        x.singleCpu.push((du.user + du.system) / 1000);
        if (r > 0) continue;
        x.single.push(ids.subarray(0, res.count));
        x.scanned.push(res.scanned / tokens);
        x.codes.push((res.codesRead ?? 0) / tokens);
        x.recall.push(groupRecall(data, ids.subarray(0, res.count), s));
        x.print = fnv(x.print, ids.subarray(0, res.count));
      }
  // The layer-steps, the page sets alternated rep by rep.
  for (let r = 0; r < reps; r++)
    for (const x of per) {
      x.loads.push(loadavg()[0]);
      for (let s = 0; s < steps; s++) {
        const items = Array.from({ length: heads }, (_, h) => search(x.set.head, c, h, (s + h) % steps, new Int32Array(asked)));
        const t = performance.now(), u = process.cpuUsage();
        const res: RaGraphSearchResult[] = await RaGraph.searchBatch(items);
        x.layer.push(performance.now() - t);
        const du = process.cpuUsage(u);
        x.layerCpu.push((du.user + du.system) / 1000 / heads);
        if (r === 0) res.forEach((y, h) => (x.batchSame &&= same(items[h].outIds.subarray(0, y.count), x.single[(s + h) % steps])));
      }
    }
  const mean = (v: number[]) => v.reduce((a, b) => a + b, 0) / v.length;
  for (const x of per) {
    const row = {
      config: c.name,
      keyPages: x.set.pages,
      opts: c.opts,
      firstLayerStepMs: x.firstMs,
      layerStepMs: { p50: median(x.layer), p90: q(x.layer, 0.9), min: Math.min(...x.layer), all: x.layer },
      cpuMsPerSearchInBatch: median(x.layerCpu),
      singleCpuMs: { p50: median(x.singleCpu), all: x.singleCpu },
      scanned: mean(x.scanned),
      codesRead: mean(x.codes),
      groupTopKRecall: mean(x.recall),
      fingerprint: x.print.toString(16).padStart(8, '0'),
      batchSameAsSingle: x.batchSame,
      load: x.loads,
    };
    rows.push(row);
    progress(`[${at()}] ${c.name}, keys in ${x.set.pages} pages: layer-step ${row.layerStepMs.p50.toFixed(2)} ms (p90 ${row.layerStepMs.p90.toFixed(2)}), CPU a group ${row.singleCpuMs.p50.toFixed(2)} ms, first layer-step ${x.firstMs.toFixed(0)} ms, recall ${row.groupTopKRecall.toFixed(3)}, ${row.fingerprint}${x.batchSame ? '' : ' (BATCH DIFFERS)'}`);
  }
}

const s = data.seconds, b = data.buildStats;
const made = (what: keyof typeof data.cached, sec: number) => (data.cached[what] ? 'cached' : `${sec.toFixed(1)} s`);
const wall = (performance.now() - t0) / 1000;
const f = (x: number) => x.toFixed(2);
const md = [
  `### Graph search, a whole layer-step at ${tokens.toLocaleString('en-US')} keys: ${heads} kv heads at once (bench/ra-search-layer.ts)`,
  '',
  `${machine()}${info.ok ? `, ${info.device}` : ''}; ${new Date().toISOString()}; load ${Math.min(...rows.flatMap((r) => r.load as number[])).toFixed(1)}–${Math.max(...rows.flatMap((r) => r.load as number[])).toFixed(1)}. bench/ra-search.ts's workload and graph (one kv head of the generator, seed 7, GQA group 4, d = 128, f16, k = ${asked} asked: 1% + 16 sinks + 256 window, ranked by the group's attention); ${heads} heads = that graph loaded ${heads} times over ${heads} copies of its keys (no memory shared), head h at step s searching with step (s + h) mod ${steps}'s query group. layer-step = RaGraph.searchBatch of the ${heads} heads' searches on the native pool (wall; median, p90 over ${reps} reps × ${steps} steps), CPU a search in it = the process's CPU time / ${heads}; CPU a group = one search on the calling thread (median over ${singleReps} × ${steps}); first = the untimed first layer-step (the code walk makes each head's codes and list slots there, the code scan its codes). Fingerprint: the ids of steps 0-${steps - 1} on one head, as bench/ra-search.ts's; batch = single: every batch's ids equal the single searches'.`,
  '',
  `Made here: workload ${made('workload', s.workload)}, graph ${made('graph', s.build)}${b ? ` (top-64 of ${b.queriesUsed} queries ${b.knnSeconds.toFixed(1)} s, projection ${b.projectSeconds.toFixed(1)} s, key edges ${b.keySeconds.toFixed(1)} s, entries + connectivity ${b.connectSeconds.toFixed(1)} s)` : ''}, exact top-k ${made('topk', s.topk)}${hugeKeys ? `; keys in 2 MiB pages (--huge-keys, a second set of ${heads} heads alternated rep by rep with the first): ${((sets[1].collapsedBytes ?? 0) / 2 ** 20).toFixed(0)} of ${((heads * data.keys.byteLength) / 2 ** 20).toFixed(0)} MB collapsed` : ''}; the bench's whole wall time ${wall.toFixed(0)} s.`,
  '',
  '| configuration | key pages | ms a layer-step (p50) | p90 | CPU ms a search in it | CPU ms a group (alone) | first layer-step ms | scanned | codes read | top-1% recall (group) | fingerprint | batch = single |',
  '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |',
  ...rows.map((r) => {
    const x = r as { config: string; keyPages: string; layerStepMs: { p50: number; p90: number }; cpuMsPerSearchInBatch: number; singleCpuMs: { p50: number }; firstLayerStepMs: number; scanned: number; codesRead: number; groupTopKRecall: number; fingerprint: string; batchSameAsSingle: boolean };
    return `| ${x.config} | ${x.keyPages} | ${f(x.layerStepMs.p50)} | ${f(x.layerStepMs.p90)} | ${f(x.cpuMsPerSearchInBatch)} | ${f(x.singleCpuMs.p50)} | ${x.firstLayerStepMs.toFixed(0)} | ${(100 * x.scanned).toFixed(2)}% | ${x.codesRead > 0 ? `${(100 * x.codesRead).toFixed(1)}%` : '—'} | ${x.groupTopKRecall.toFixed(3)} | ${x.fingerprint} | ${x.batchSameAsSingle ? 'yes' : 'NO'} |`;
  }),
  '',
].join('\n');
process.stdout.write(md);
const name = `ra-search-layer-${tokens}-${where}${tag ? `-${tag}` : ''}`;
saveDeviceResult(name, { machine: machine(), device: info.ok ? info.device : null, date: new Date().toISOString(), tokens, heads, steps, reps, singleReps, seconds: { ...s, wall }, cached: data.cached, hugeKeys: hugeKeys ? { collapsedBytes: sets[1].collapsedBytes } : null, buildStats: b, rows }, md);
progress(`[${at()}] wrote bench/results/${name}.md and .json`);
for (const set of sets) for (const x of set.head) x.graph.dispose();
