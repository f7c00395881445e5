// Two builds of the engine's wave layer-step, alternated in one sitting on
// bench/wave-step-host.ts's stand-in store (no device): A B B A ... runs of
// `node ROOT/dist/bench/wave-step-host.js --steps N --json FILE`, and per run
// the p50 of decodeStep's ms, of the store call (to its promise: the
// stand-in, its own tokens' host attend and addon/wave-gpu.ts's JS) and of
// their difference step by step: the JS around the call (engine/decode-step,
// wave-on-device, cache/device-wave and the awaits between them), which is
// what a change to engine/ moves. Only ratios from one sitting mean anything
// (the VM is shared). Each ROOT is a checkout with its dist built and
// build/Release/kvrecall.node beside it, e.g. the base revision:
//
//   git archive BASE | tar -x -C /tmp/base && ln -s $PWD/node_modules /tmp/base/ &&
//     (cd /tmp/base && npx tsc -p tsconfig.json) && mkdir -p /tmp/base/build/Release &&
//     cp build/Release/kvrecall.node /tmp/base/build/Release/
//   node bench/wave-step-host-ab.mjs --rounds 8 --steps 600 base=/tmp/base new=. [--out bench/results/NAME] [-- BENCH ARGS]
//
// --out writes NAME.md and NAME.json (the per-run p50s); otherwise the table
// is printed only. What follows `--` goes to the bench (e.g. --layers 16).
// The bench is each ROOT's own dist/bench/wave-step-host.js: where the
// harness changed between the builds, copy the newer one into the other's
// dist/bench (it imports that build's engine relatively).
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const all = process.argv.slice(2), dash = all.indexOf('--');
const argv = dash >= 0 ? all.slice(0, dash) : all, benchArgs = dash >= 0 ? all.slice(dash + 1) : [];
const opt = (name, def) => (argv.includes(name) ? argv[argv.indexOf(name) + 1] : def);
const rounds = Number(opt('--rounds', 8)), steps = Number(opt('--steps', 600)), out = opt('--out', undefined);
const builds = argv.filter((a, i) => a.includes('=') && !argv[i - 1]?.startsWith('--')).map((a) => {
  const [label, root] = a.split('=');
  return { label, root: resolve(root) };
});
if (builds.length !== 2) throw new Error('give two builds, LABEL=ROOT each (e.g. base=/tmp/base new=.)');

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const WARM = 8; // the bench's own: its first steps left out

const runs = [];
for (let r = 0; r < rounds; r++) {
  // A B, then B A: neither build always runs first.
  const order = r % 2 === 0 ? builds : [...builds].reverse();
  for (const b of order) {
    const file = join(tmpdir(), `wave-step-host-ab-${process.pid}-${b.label}.json`);
    execFileSync(process.execPath, [join(b.root, 'dist/bench/wave-step-host.js'), '--steps', String(steps), '--json', file, ...benchArgs], { stdio: ['ignore', 'ignore', 'inherit'] });
    const rows = JSON.parse(readFileSync(file, 'utf8')).rows.slice(WARM);
    rmSync(file);
    runs.push({
      round: r + 1, build: b.label, steps: rows.length,
      ms: median(rows.map((x) => x.ms)), callMs: median(rows.map((x) => x.callMs)), aroundMs: median(rows.map((x) => x.ms - x.callMs)), ownMs: median(rows.map((x) => x.ownMs)),
    });
  }
}

const f = (x) => x.toFixed(4);
const of = (label, key) => runs.filter((x) => x.build === label).map((x) => x[key]);
const [a, b] = builds.map((x) => x.label);
const ratio = (key) => median(Array.from({ length: rounds }, (_, r) => runs.find((x) => x.round === r + 1 && x.build === b)[key] / runs.find((x) => x.round === r + 1 && x.build === a)[key]));
const keys = [['ms', 'decodeStep ms'], ['callMs', 'store call ms (to its promise)'], ['aroundMs', 'JS around the call ms (decodeStep − store call, per step)'], ['ownMs', 'own attend alone ms']];
const text = [
  `| p50 of the runs' p50s | ${a} | ${b} | ${b}/${a} (median of the rounds' ratios) |`,
  '| --- | ---: | ---: | ---: |',
  ...keys.map(([k, name]) => `| ${name} | ${f(median(of(a, k)))} | ${f(median(of(b, k)))} | ${ratio(k).toFixed(3)} |`),
  '',
  `${rounds} rounds of one run each (${a} ${b}, then ${b} ${a}), ${steps} steps a run (the first ${WARM} left out)${benchArgs.length ? `, bench arguments ${benchArgs.join(' ')}` : ''}; ${cpus()[0].model}, ${cpus().length} cores, load average ${loadavg()[0].toFixed(2)} at the end.`,
].join('\n');
console.log(text);
if (out) {
  writeFileSync(`${out}.json`, JSON.stringify({ builds, rounds, steps, benchArgs, load: loadavg()[0], runs }, null, 1) + '\n');
  writeFileSync(`${out}.md`, text + '\n');
}
