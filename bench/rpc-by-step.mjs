// node bench/rpc-by-step.mjs
//
// Issue #13 asked why one stream attend's RPC (client wall − stats.ms, p50 of
// the plain calls) was 0.086 ms at the llama3.2-1b shape (d=64) and 0.278 ms
// at the llama3-8b shape (d=128) on the H200, and suspected the doubled bytes.
// The 8b step was longer too (0.65 against 0.48 ms). This gathers every GPU
// host's bench:decode --full run already in bench/results (its JSON) into one
// table of plain-call RPC against the server's step (stats.ms p50), by head
// dim, host, lane and run, to see which of the two the RPC follows.
//
// Read it as a correlation across runs, not a measurement: the runs are of
// different days' code, server flags (--poll-us came in at run -poll-at) and
// call orders (2- and 4-layer runs interleave exact's ~1 ms calls with the
// method's; 16- and 8-layer runs time exact apart). The one-sitting test of
// bytes against wait is bench/transport-dim.ts (bench/transport-visit.sh dim).
// Writes bench/results/rpc-by-step.{md,json}.
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

const RESULTS = join(resolve(import.meta.dirname, '..'), 'bench', 'results');
const rows = [];
for (const file of readdirSync(RESULTS).filter((f) => /^decode-full-.*\.json$/.test(f)).sort()) {
  const run = JSON.parse(readFileSync(join(RESULTS, file), 'utf8'));
  const device = run.server?.health?.gpu?.device ?? run.results?.at(-1)?.server?.gpu?.device;
  if (!device) continue;
  const r = run.results.at(-1);
  // Older runs list methods with their via; newer ones group them by transport.
  const lanes = r.transports ?? r.methods.map((m) => ({ via: m.via ?? 'stream', methods: [m] }));
  for (const lane of lanes)
    for (const m of lane.methods) {
      const plain = m.latency?.calls?.plain;
      if (!plain || !(plain.rpcP50Ms > 0)) continue;
      rows.push({
        file: file.replace(/\.json$/, ''),
        device,
        date: run.date,
        headDim: run.options.shape.headDim,
        layers: run.options.shape.layers,
        via: lane.via,
        method: m.method,
        calls: plain.calls,
        stepMsP50: plain.serverP50Ms,
        rpcMsP50: plain.rpcP50Ms,
      });
    }
}
const short = rows.filter((r) => r.stepMsP50 < 5).sort((a, b) => a.device.localeCompare(b.device) || a.stepMsP50 - b.stepMsP50);
const long = rows.filter((r) => r.stepMsP50 >= 5).sort((a, b) => a.device.localeCompare(b.device) || a.stepMsP50 - b.stepMsP50);
const line = (r) => `| ${r.device} | ${r.headDim} | ${r.layers} | ${r.via} | ${r.method} | ${r.stepMsP50.toFixed(3)} | ${r.rpcMsP50.toFixed(3)} | ${r.calls} | ${r.file} |`;
const head = ['| GPU host | d | layers | lane | method | step ms p50 | RPC ms p50 | calls | run (bench/results/) |', '| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |'];
writeFileSync(join(RESULTS, 'rpc-by-step.json'), JSON.stringify({ note: 'plain calls of every decode-full run on a GPU host in bench/results; a correlation across runs (bench/rpc-by-step.mjs)', rows }, null, 1) + '\n');
writeFileSync(
  join(RESULTS, 'rpc-by-step.md'),
  [
    '# One stream attend\'s RPC against the server\'s step, from every GPU-host bench:decode --full run',
    '',
    'Plain calls (asking only `out`) of each run\'s lanes: RPC = client wall − stats.ms, p50, beside the step\'s stats.ms p50, sorted by host and step. A correlation across runs of different code, server flags and call orders (bench/rpc-by-step.mjs says which), not a one-sitting measurement: bench/transport-dim.ts is that.',
    '',
    '## Steps under 5 ms (the methods\', and a 2- or 4-layer run\'s exact)',
    '',
    ...head,
    ...short.map(line),
    '',
    '## Steps of 5 ms and more (exact over the whole 1M document)',
    '',
    ...head,
    ...long.map(line),
    '',
  ].join('\n'),
);
process.stderr.write(`[rpc-by-step] ${rows.length} rows from ${new Set(rows.map((r) => r.file)).size} runs: wrote ${join(RESULTS, 'rpc-by-step')}.{md,json}\n`);
