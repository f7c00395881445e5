// node dist/bench/preload-ab.js --run 'LABEL|TREE|VIA' [--run ...] [--tokens 65536 --reps 3]
//
// Before/after preload runs alternated in one sitting, so that the load of
// a shared machine falls on every variant alike: each rep runs every
// `--run` once, in the order given (a fresh server each), through
// TREE/dist/bench/preload.js (one round; VIA: stream or http). TREE is a
// built checkout (`.` for this one); an older one runs this tree's
// bench/preload.ts, copied in and built there, for the same columns.
// Results: bench/results/preload-ab-<tag>.{json,md} (tag: KVRECALL_BENCH_TAG,
// default vm), every run with the 1-minute load when it began, and per
// variant the medians and their ratio to the first variant's. "Not
// reading": the upload's wall time less the server's summed body reads,
// the time no body was coming in (the server busy between bodies, or the
// client waiting on answers). The LMDB files go under the OS temp folder
// (TMPDIR: /dev/shm keeps a slow disk out of the comparison).
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { machine } from './decode/machine.js';

const args = process.argv.slice(2);
const value = (name: string, def: number) => (args.includes(`--${name}`) ? Number(args[args.indexOf(`--${name}`) + 1]) : def);
const TOKENS = value('tokens', 65536), REPS = value('reps', 3);
const runs = args.flatMap((a, i) => (a === '--run' ? [args[i + 1]] : [])).map((spec) => {
  const [label, tree, via] = spec.split('|');
  if (!label || !tree || (via !== 'stream' && via !== 'http')) throw new Error(`--run 'LABEL|TREE|stream or http', got ${spec}`);
  return { label, tree: resolve(tree), via };
});
if (runs.length === 0) throw new Error("give at least one --run 'LABEL|TREE|VIA'");

interface Round {
  uploadS: number;
  sealS: number;
  serverUploadCpuS: number;
  serverMainCpuS: number;
  clientUploadCpuS: number;
  phases: Record<string, number>;
}

const rows: { rep: number; label: string; via: string; load: number; bytes: number; round: Round }[] = [];
for (let rep = 0; rep < REPS; rep++)
  for (const [i, r] of runs.entries()) {
    const load = loadavg()[0];
    const tag = `abrun${i}`;
    execFileSync(process.execPath, [join(r.tree, 'dist', 'bench', 'preload.js'), '--tokens', String(TOKENS), '--rounds', '1', '--via', r.via], {
      cwd: r.tree,
      env: { ...process.env, KVRECALL_BENCH_TAG: tag },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const j = JSON.parse(readFileSync(join(r.tree, 'bench', 'results', `preload-${tag}.json`), 'utf8')) as { bytes: number; rounds: Round[] };
    rows.push({ rep, label: r.label, via: r.via, load, bytes: j.bytes, round: j.rounds[0] });
    const x = j.rounds[0];
    process.stderr.write(`[preload-ab] ${r.label}: ${(j.bytes / x.uploadS / 1e9).toFixed(2)} GB/s, main thread ${x.serverMainCpuS.toFixed(2)} s; load ${load.toFixed(1)}\n`);
  }

const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `preload-ab-${tag}`);
const m = machine();
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const notReading = (x: Round) => x.uploadS - x.phases.readMs;
const summary = runs.map((r) => {
  const mine = rows.filter((x) => x.label === r.label).map((x) => x.round);
  return {
    label: r.label,
    uploadS: median(mine.map((x) => x.uploadS)),
    notReadingS: median(mine.map(notReading)),
    serverUploadCpuS: median(mine.map((x) => x.serverUploadCpuS)),
    serverMainCpuS: median(mine.map((x) => x.serverMainCpuS)),
    checkS: median(mine.map((x) => x.phases.checkMs)),
    appendS: median(mine.map((x) => x.phases.appendMs)),
  };
});
writeFileSync(`${base}.json`, JSON.stringify({ machine: m, date: new Date().toISOString(), tokens: TOKENS, reps: REPS, tmpdir: tmpdir(), runs, rows, summary }, null, 1) + '\n');
const gb = (bytes: number, s: number) => (bytes / s / 1e9).toFixed(2);
const PH = ['readMs', 'decodeMs', 'queueMs', 'checkMs', 'appendMs', 'writeMs'];
const lines = [
  `# Preload before and after, alternated (${m.cpu}, ${m.cores} cores)`,
  '',
  `bench/preload.ts per run (one round, a fresh server): 2 layers × ${TOKENS} tokens × 8 kv heads × d=128, f16 = ${(rows[0].bytes / 1e9).toFixed(2)} GB of K/V in uploads of 4096 tokens (16 MiB), LMDB store, exact only; the variants alternated ${REPS} times in one sitting; LMDB files under ${tmpdir()}. CPU in seconds over the uploads; "main thread" is the server's event loop; phases are the server's, summed over the uploads (over the stream they overlap: the next upload is read while one is stored).`,
  '',
  '| rep | variant | load | upload s | upload GB/s | not reading s | server CPU s | main thread CPU s | client CPU s | GB per main-thread CPU s | seal GB/s | read | decode | queue | check | append | write |',
  '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ...rows.map(({ rep, label, load, bytes, round: x }) =>
    `| ${rep} | ${label} | ${load.toFixed(1)} | ${x.uploadS.toFixed(2)} | ${gb(bytes, x.uploadS)} | ${notReading(x).toFixed(2)} | ${x.serverUploadCpuS.toFixed(2)} | ${x.serverMainCpuS.toFixed(2)} | ${x.clientUploadCpuS.toFixed(2)} | ${gb(bytes, x.serverMainCpuS)} | ${gb(bytes, x.sealS)} | ${PH.map((p) => x.phases[p].toFixed(2)).join(' | ')} |`,
  ),
  '',
  `Medians per variant, and their ratio to ${runs[0].label}'s:`,
  '',
  '| variant | upload s | not reading s | server CPU s | main thread CPU s | check s | append s |',
  '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ...summary.map((v) => {
    const b = summary[0];
    const cell = (x: number, y: number) => (v === b ? x.toFixed(2) : `${x.toFixed(2)} (${(x / y).toFixed(2)}×)`);
    return `| ${v.label} | ${cell(v.uploadS, b.uploadS)} | ${cell(v.notReadingS, b.notReadingS)} | ${cell(v.serverUploadCpuS, b.serverUploadCpuS)} | ${cell(v.serverMainCpuS, b.serverMainCpuS)} | ${v.checkS.toFixed(2)} | ${v.appendS.toFixed(2)} |`;
  }),
  '',
];
writeFileSync(`${base}.md`, lines.join('\n'));
console.log(lines.join('\n'));
