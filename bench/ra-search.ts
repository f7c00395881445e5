// npm run bench:ra-search [-- --tokens 1048576 --steps 8 --reps 3 --out bench/results/ra-search-1048576-vm.md]
//
// The RetrievalAttention graph's SEARCH speed (issue #15: all kv heads of a
// layer-step searched in <= 1 ms at 1M keys on the 16-core host). One kv
// head of the seeded workload (default knobs, seed 7, GQA group 4, d=128,
// f16); the graph is built once and cached under the OS temp directory
// (rebuilding takes ~2 min per head at 1M on the 2-core VM), as are the exact
// group top-k sets. Each configuration is timed two ways:
//   - per group: searchSync on the calling thread, each step's 4 q heads;
//   - per layer-step: searchBatch of `steps` searches at once on the native
//     pool, one per step's query group, all over the one graph. A real
//     layer-step has 8 kv heads, each with its own graph and keys; here they
//     share one 256 MB key array, which changes little: a search touches
//     ~13 MB of keys scattered over it, far beyond any cache either way.
// and reports scanned share, the group top-k recall (the selection of
// sinks + window + retrieved, against the exact top-k of the group's mean
// probability, k = 1% of tokens, as bench/retrieval.ts does) and a
// fingerprint of every id returned, so a change that should leave answers
// alone can be checked (before/after fingerprints equal). With
// `--profile` the native search's phase times are summed and shown too;
// `--width W` sets the walk's expandWidth (absent: the native default; 1 is
// the walk one candidate at a time, whose ids the fingerprints of earlier
// rounds are). The code-gated walk (RaSearchOptions::codeWalk) runs at
// bench/retrieval-code-walk.ts's settings beside the beam walk: its codes
// are made on its first search, timed apart (codesBuildMs in the json);
// `codes read` is its share of keys read as 4-bit codes; `--code-width W`
// sets its codeWidth (absent: the native default). `--walk-lists csr`
// sets KVR_RA_WALK_LISTS: the code walk reads the graph's CSR rather than
// its lists' slots (ra_walk_lists.h). (`--walk-order O`, at commit
// ea05509 only: the walk's own numbering of the keys, measured, not kept.)
import { writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { RaGraph, type RaGraphSearchArgs } from '../addon/ra-graph.js';
import { machine } from './host.js';
import { fnv, G, D as d, groupRecall as recallOf, raSearchData, SINKS as sinks, WINDOW as window } from './ra-search-data.js';
import { median } from './stats.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const tokens = Number(get('tokens', '1048576'));
const steps = Number(get('steps', '8'));
const reps = Number(get('reps', '3'));
const out = get('out', '');
const only = get('configs', '');
const profile = argv.includes('--profile');
const width = argv.includes('--width') ? Number(get('width', '')) : undefined;
const codeWidth = argv.includes('--code-width') ? Number(get('code-width', '')) : undefined;
if (argv.includes('--walk-lists')) process.env.KVR_RA_WALK_LISTS = get('walk-lists', '');
// `--env NAME=VALUE` (repeatable): a native switch read at the first search (an experiment's, for ra-search-ab.ts's ARGS).
argv.forEach((a, i) => {
  if (a !== '--env') return;
  const [k, ...v] = argv[i + 1].split('=');
  process.env[k] = v.join('=');
});
const progress = (msg: string) => process.stderr.write(`[bench:ra-search] ${msg}\n`);

// The workload, graph and exact top-k, cached (bench/ra-search-data.ts).
const data = await raSearchData(tokens, steps, progress);
const { keys, decodeQ, graph, asked } = data;
const keyArgs = { keys, tokens, headDim: d, dtype: 'f16' as const };
const groupRecall = (ids: Int32Array, s: number) => recallOf(data, ids, s);

interface Config {
  name: string;
  ef: number;
  margin?: number;
  maxScanned?: number;
  /** The code-gated walk (RaSearchOptions::codeWalk): q, δ, the cap on codes read. */
  code?: { q: number; delta: number; maxCodes: number };
}
const configs: Config[] = [
  { name: 'ef = k', ef: asked },
  { name: 'margin 0.5, ef 8k (the session default with no free seeds; with them: effort() in index/retrieval-attention.ts)', ef: 8 * asked, margin: 0.5 },
  { name: 'capped at 3% scanned', ef: 8 * asked, margin: 3, maxScanned: Math.round(0.03 * tokens) },
  // The code-gated walk at bench/retrieval-code-walk.ts's settings: ≤ 3% scored exactly, codes of ≤ 20% / 40% read.
  ...[[1, 0.5, 0.2], [1, 0.5, 0.4], [3, 0, 0.4]].map(([q, delta, codes]) => ({
    name: `code walk q ${q}, δ ${delta}, ≤ 3% exact, ≤ ${codes * 100}% codes`,
    ef: asked,
    maxScanned: Math.round(0.03 * tokens),
    code: { q, delta, maxCodes: Math.round(codes * tokens) },
  })),
].filter((c) => !only || only.split(',').some((o) => c.name.startsWith(o)));

type Phases = Record<string, number>;
const args = (c: Config, s: number, ids: Int32Array, scores: Float32Array): RaGraphSearchArgs => ({
  ...keyArgs,
  q: decodeQ[s],
  group: G,
  k: asked,
  ef: c.ef,
  margin: c.margin,
  maxScanned: c.maxScanned,
  ...(width !== undefined && !c.code && { expandWidth: width }),
  // codeAdapt 0: the fixed cutoff these rows were measured at (the session's moves with the caps: walkOptions).
  ...(c.code && { codeWalk: true, codeQuantile: c.code.q, codeDelta: c.code.delta, codeAdapt: 0, maxCodes: c.code.maxCodes }),
  ...(c.code && codeWidth !== undefined && { codeWidth }),
  aggregate: 'attention',
  outIds: ids,
  outScores: scores,
  ...(profile && { profile: true }),
});

const rows: string[] = [];
let codesBuilt: number | undefined;
const json: unknown[] = [];
for (const c of configs) {
  const ids = Array.from({ length: steps }, () => new Int32Array(asked));
  const scores = Array.from({ length: steps }, () => new Float32Array(asked));
  const single: number[] = [], batch: number[] = [], cpu: number[] = [], batchCpu: number[] = [], scanned: number[] = [], recall: number[] = [], codes: number[] = [];
  // The graph makes its keys' codes on the first code walk: timed apart, not in the searches'.
  let codesMs: number | undefined;
  if (c.code && codesBuilt === undefined) {
    const t = performance.now();
    graph.searchSync(args(c, 0, ids[0], scores[0]));
    codesMs = codesBuilt = performance.now() - t;
    progress(`codes made (first code walk) in ${codesMs.toFixed(0)} ms`);
  }
  const phases: Phases = {};
  let print = 2166136261;
  const loads: number[] = [];
  for (let r = 0; r < reps; r++) {
    loads.push(loadavg()[0]);
    for (let s = 0; s < steps; s++) {
      const t = performance.now(), u = process.cpuUsage();
      const res = graph.searchSync(args(c, s, ids[s], scores[s]));
      single.push(performance.now() - t);
      const du = process.cpuUsage(u);
      cpu.push((du.user + du.system) / 1000);
      if (r === 0) {
        scanned.push(res.scanned / tokens);
        codes.push((res.codesRead ?? 0) / tokens);
        recall.push(groupRecall(ids[s].subarray(0, res.count), s));
        print = fnv(print, ids[s].subarray(0, res.count));
      }
      for (const [k, v] of Object.entries(res.profile ?? {})) phases[k] = (phases[k] ?? 0) + v / (reps * steps);
    }
    const t = performance.now(), u = process.cpuUsage();
    await RaGraph.searchBatch(Array.from({ length: steps }, (_, s) => ({ ...args(c, s, ids[s], scores[s]), graph })));
    batch.push(performance.now() - t);
    const du = process.cpuUsage(u);
    batchCpu.push((du.user + du.system) / 1000 / steps);
  }
  const mean = (x: number[]) => x.reduce((a, b) => a + b, 0) / x.length;
  const load = `${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)}`;
  const ph = Object.entries(phases).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ');
  rows.push(`| ${c.name} | ${(mean(scanned) * 100).toFixed(2)}% | ${c.code ? `${(mean(codes) * 100).toFixed(1)}%` : '—'} | ${mean(recall).toFixed(3)} | ${median(single).toFixed(2)} | ${median(cpu).toFixed(2)} | ${median(batch).toFixed(2)} | ${median(batchCpu).toFixed(2)} | ${print.toString(16).padStart(8, '0')} | ${load} |${profile ? ` ${ph} |` : ''}`);
  json.push({ config: c, scanned: mean(scanned), codesRead: mean(codes), codesBuildMs: codesMs ?? null, groupTopKRecall: mean(recall), singleMs: single, singleCpuMs: cpu, batchMs: batch, batchCpuMsPerSearch: batchCpu, fingerprint: print, load: loads, phases });
  progress(rows[rows.length - 1]);
}

const md = [
  `### RetrievalAttention graph search at ${tokens.toLocaleString('en-US')} keys (bench/ra-search.ts)`,
  '',
  `${machine()}; one kv head, GQA group 4, d=128, f16, k = ${asked} asked (1% + ${sinks} sinks + ${window} window), ranking by the group's attention; walk expandWidth ${width ?? 'default (1)'}, code walk codeWidth ${codeWidth ?? 'default (16)'}; scanned = keys scored exactly (the sample included), codes read = keys read as 4-bit codes (code walk); ${steps} decode steps' query groups, ${reps} reps. per group = searchSync on the calling thread (median over steps × reps), wall and CPU time (process.cpuUsage: under load the wall time includes waiting for a core); layer-step = searchBatch of the ${steps} groups at once on the native pool (median over reps), and the process's CPU time in it per search. load = 1-minute load average at each rep.`,
  '',
  `| configuration | scanned | codes read | top-k recall (group) | ms per group | CPU ms per group | ms per layer-step (${steps} searches) | CPU ms per search in the batch | ids fingerprint | load |${profile ? ' phases, ms per search |' : ''}`,
  `| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |${profile ? ' --- |' : ''}`,
  ...rows,
].join('\n') + '\n';
process.stdout.write(md);
if (out) {
  writeFileSync(out, md);
  writeFileSync(out.replace(/\.md$/, '.json'), JSON.stringify({ machine: machine(), date: new Date().toISOString(), tokens, steps, reps, expandWidth: width ?? null, codeWidth: codeWidth ?? null, rows: json }, null, 2));
}
graph.dispose();
