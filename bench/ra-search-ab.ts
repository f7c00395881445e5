// node dist/bench/ra-search-ab.js --run 'LABEL|TREE[|ARGS]' [--run ...] [--tokens 1048576 --reps 5
//   --configs 'capped,code walk' --out bench/results/ra-search-1048576-vm-codes-ab.md]
//
// Graph searches before and after a change, alternated in one sitting, so
// that the load of a shared machine falls on every variant alike: each rep
// runs every `--run` once, in the order given, as a fresh process of
// TREE/dist/bench/ra-search.js (one rep of its steps; `--configs` passed
// on: comma-separated prefixes of its configuration names; ARGS, split at
// spaces, after them: e.g. `--code-width 16`). TREE is a built checkout
// (`.` for this one): its addon and its bench, so an older one answers
// with the code it had. Every run shares bench/ra-search.ts's
// cached graph, keys and exact top-k (one workload). Per configuration and
// variant: the median over reps × steps of one group-search's CPU time on
// the calling thread, of a layer-step's wall time (the steps' searches at
// once on the native pool), the ratio of each to the first variant's
// median and the median of the per-rep ratios (each rep's pair ran back to
// back), and the scanned share, codes read, recall and ids fingerprint
// (the same in every rep of a variant: the searches are deterministic).
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { machine } from './host.js';
import { median } from './stats.js';

const args = process.argv.slice(2);
const get = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1] : def);
const tokens = Number(get('tokens', '1048576')), reps = Number(get('reps', '5'));
const configs = get('configs', 'capped,code walk'), out = get('out', '');
const runs = args.flatMap((a, i) => (a === '--run' ? [args[i + 1]] : [])).map((spec) => {
  const [label, tree, extra] = spec.split('|');
  if (!label || !tree) throw new Error(`--run 'LABEL|TREE[|ARGS]', got ${spec}`);
  return { label, tree: resolve(tree), extra: extra ? extra.split(' ').filter((a) => a) : [] };
});
if (runs.length === 0) throw new Error("give at least one --run 'LABEL|TREE'");

/** One configuration's row of ra-search.ts's json (the fields read here). */
interface Row {
  config: { name: string };
  scanned: number;
  codesRead: number;
  groupTopKRecall: number;
  singleCpuMs: number[];
  batchMs: number[];
  fingerprint: number;
}

const results: { rep: number; label: string; load: number; rows: Row[] }[] = [];
for (let rep = 0; rep < reps; rep++)
  for (const [i, r] of runs.entries()) {
    const load = loadavg()[0];
    const file = join(tmpdir(), `kvrecall-ra-search-ab-${process.pid}-${i}.md`);
    execFileSync(process.execPath, [join(r.tree, 'dist', 'bench', 'ra-search.js'), '--tokens', String(tokens), '--reps', '1', '--configs', configs, '--out', file, ...r.extra], {
      cwd: r.tree,
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const rows = (JSON.parse(readFileSync(file.replace(/\.md$/, '.json'), 'utf8')) as { rows: Row[] }).rows;
    results.push({ rep, label: r.label, load, rows });
    process.stderr.write(`[ra-search-ab] rep ${rep} ${r.label}: ${rows.map((x) => `${x.config.name.slice(0, 24)} ${median(x.singleCpuMs).toFixed(2)} ms`).join('; ')}; load ${load.toFixed(1)}\n`);
  }

const names = results[0].rows.map((x) => x.config.name);
const of = (label: string, name: string) =>
  results.filter((x) => x.label === label).map((x) => ({ rep: x.rep, row: x.rows.find((y) => y.config.name === name)! }));
const summary = names.flatMap((name) =>
  runs.map((r) => {
    const mine = of(r.label, name), base = of(runs[0].label, name);
    const cpu = median(mine.flatMap((x) => x.row.singleCpuMs)), layer = median(mine.flatMap((x) => x.row.batchMs));
    const pairs = mine.map((x) => median(x.row.singleCpuMs) / median(base.find((y) => y.rep === x.rep)!.row.singleCpuMs));
    const first = mine[0].row;
    return {
      name,
      label: r.label,
      cpuMs: cpu,
      layerMs: layer,
      cpuRatio: cpu / median(base.flatMap((x) => x.row.singleCpuMs)),
      pairRatio: median(pairs),
      layerRatio: layer / median(base.flatMap((x) => x.row.batchMs)),
      scanned: first.scanned,
      codesRead: first.codesRead,
      recall: first.groupTopKRecall,
      fingerprint: first.fingerprint.toString(16).padStart(8, '0'),
      sameIdsEveryRep: mine.every((x) => x.row.fingerprint === first.fingerprint),
    };
  }),
);

const m = machine();
const loads = results.map((x) => x.load);
const md = [
  `### Graph searches at ${tokens.toLocaleString('en-US')} keys, variants alternated (bench/ra-search-ab.ts)`,
  '',
  `${m}; each rep ran every variant once in this order, each a fresh process of its tree's bench/ra-search.ts (${reps} reps; one kv head, GQA group 4, d=128, f16, 8 decode steps, the bench's cached graph and workload). Variants: ${runs.map((r) => `${r.label} (${r.tree}${r.extra.length ? ` ${r.extra.join(' ')}` : ''})`).join(', ')}. CPU ms = one group-search on the calling thread (median over reps × steps); layer-step = the 8 steps' searches at once on the native pool (wall, median over reps); ratios to ${runs[0].label}: of the medians, and the median of each rep's ratio (its pair back to back). scanned = keys scored exactly, codes = keys read as 4-bit codes, recall = the group's top-1% recall (bench/ra-search.ts). 1-minute load ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)}.`,
  '',
  '| configuration | variant | CPU ms a group | × | × per rep (median) | ms a layer-step | × | scanned | codes read | top-1% recall (group) | ids fingerprint |',
  '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |',
  ...summary.map((s) =>
    `| ${s.name} | ${s.label} | ${s.cpuMs.toFixed(2)} | ${s.cpuRatio.toFixed(2)} | ${s.pairRatio.toFixed(2)} | ${s.layerMs.toFixed(1)} | ${s.layerRatio.toFixed(2)} | ${(100 * s.scanned).toFixed(3)}% | ${s.codesRead > 0 ? `${(100 * s.codesRead).toFixed(2)}%` : '—'} | ${s.recall.toFixed(4)} | ${s.fingerprint}${s.sameIdsEveryRep ? '' : ' (varied)'} |`,
  ),
  '',
].join('\n');
process.stdout.write(md);
if (out) {
  writeFileSync(out, md);
  writeFileSync(out.replace(/\.md$/, '.json'), JSON.stringify({ machine: m, date: new Date().toISOString(), tokens, reps, configs, runs, summary, results }, null, 1) + '\n');
}
