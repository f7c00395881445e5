// npx tsc -p tsconfig.json && node dist/bench/ra-code-scan-ab.js --builds OLD.node,NEW.node [--labels old,new]
//     [--tokens 1048576] [--reps 6] [--tag T]
//
// Two builds of the addon (copies of build/Release/kvrecall.node made before
// and after a change) loaded side by side in one process, each with its own
// copy of bench/ra-search.ts's graph and keys, searching with the code scan
// at a session's default cap (walkOptions: 3% of the tokens or 3k), the
// builds alternated search by search (their order swapped every rep), so a
// loaded machine weighs on both alike. Per build: the thread's CPU of the
// search (its profile: sample + walk + refine + final) and of the scan alone
// (walk − the exact scoring), medians over reps × 8 steps; the ids of the
// first rep compared between the builds.
//
// Writes bench/results/ra-code-scan-ab-<tokens>-<machine>[-<tag>].md and .json.
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { cudaAvailable } from '../addon/cuda.js';
import type { RaSearchProfile } from '../addon/ra-graph.js';
import { cardName, saveDeviceResult } from './device-results.js';
import { machine } from './host.js';
import { D, G, raSearchData } from './ra-search-data.js';
import { median } from './stats.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => (argv.includes(`--${name}`) ? argv[argv.indexOf(`--${name}`) + 1] : dflt);
const paths = get('builds', '').split(',').filter(Boolean);
if (paths.length !== 2) throw new Error('--builds OLD.node,NEW.node: two builds of the addon');
const labels = get('labels', 'old,new').split(',');
const tokens = Number(get('tokens', '1048576'));
const reps = Number(get('reps', '6'));
const tag = get('tag', '');
const steps = 8;
const progress = (msg: string) => process.stderr.write(`[bench:ra-code-scan-ab] ${msg}\n`);

interface NativeGraph {
  searchSync(a: Record<string, unknown>): { count: number; profile: RaSearchProfile };
}
const info = cudaAvailable();
const data = await raSearchData(tokens, steps, progress);
const { asked, decodeQ } = data;
const blob = data.graph.save();
const require = createRequire(import.meta.url);
const builds = paths.map((p, i) => {
  const addon = require(resolve(p)) as { RaGraph: { load(b: Uint8Array): NativeGraph } };
  return { label: labels[i] ?? p, path: p, graph: addon.RaGraph.load(blob), keys: data.keys.slice(), scan: [] as number[], search: [] as number[], ids: [] as number[] };
});
const maxScanned = Math.max(Math.ceil(0.03 * tokens), 3 * asked);
const run = (b: (typeof builds)[number], s: number) => {
  const outIds = new Int32Array(asked);
  const r = b.graph.searchSync({ keys: b.keys, tokens, headDim: D, dtype: 0, q: decodeQ[s], group: G, k: asked, ef: asked, aggregate: 1, codeScan: true, maxScanned, outIds, outScores: new Float32Array(asked), profile: true });
  return { p: r.profile, ids: outIds.subarray(0, r.count) };
};
for (const b of builds) run(b, 0); // each build's codes made
for (let rep = 0; rep < reps; rep++)
  for (let s = 0; s < steps; s++)
    for (const b of rep % 2 ? builds : [...builds].reverse()) {
      const { p, ids } = run(b, s);
      b.scan.push(p.walkMs - p.scoreMs);
      b.search.push(p.sampleMs + p.walkMs + p.refineMs + p.finalMs);
      if (rep === 0) b.ids.push(...ids);
    }
const same = builds[0].ids.length === builds[1].ids.length && builds[0].ids.every((x, i) => x === builds[1].ids[i]);
const [a, b] = builds;
const md = [
  `### The code scan, two builds alternated in one process at ${tokens.toLocaleString('en-US')} keys (bench/ra-code-scan-ab.ts)`,
  '',
  `${machine()}${info.ok ? `, ${info.device}` : ''}; ${new Date().toISOString()}. bench/ra-search.ts's workload and graph, the code scan capped at ${maxScanned} keys (a session's default), one group-search at a time on the calling thread, the builds alternated search by search over ${reps} reps × ${steps} steps; thread CPU ms from the search's profile (medians); scan = the walk's time less the exact scoring. Ids of the first rep equal: ${same ? 'yes' : 'NO'}.`,
  '',
  '| build | search ms | scan ms |',
  '| --- | ---: | ---: |',
  ...builds.map((x) => `| ${x.label} (${x.path}) | ${median(x.search).toFixed(2)} | ${median(x.scan).toFixed(2)} |`),
  `| ${b.label} / ${a.label} | ${(median(b.search) / median(a.search)).toFixed(3)} | ${(median(b.scan) / median(a.scan)).toFixed(3)} |`,
  '',
].join('\n');
process.stdout.write(md);
const name = `ra-code-scan-ab-${tokens}-${info.ok ? cardName(info.device) : 'vm'}${tag ? `-${tag}` : ''}`;
saveDeviceResult(name, { machine: machine(), device: info.ok ? info.device : null, date: new Date().toISOString(), tokens, reps, steps, maxScanned, idsEqual: same, builds: builds.map((x) => ({ label: x.label, path: x.path, searchMs: x.search, scanMs: x.scan })) }, md);
progress(`wrote bench/results/${name}.md and .json`);
