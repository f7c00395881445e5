// node dist/bench/preload-rounds.js [--tokens 131072 --layers 2 --chunk 4096 --rounds 3 --shards 0 --paths ts,python,cli,cli-b --cli-b PATH --server-cli PATH --tag vm-rounds]
//
// The three preload paths against one server, round after round: the
// TypeScript client (KvrecallClient over the stream, as bench/preload.ts),
// the Python client (clients/python `kvrecall.bench_preload --url`, one
// round per run) and the CLI (`kvrecall preload` of a safetensors file
// written once), each preloading a document of --layers x --tokens (8 kv
// heads, d=128, f16; methods: exact only; created with the tokens hint)
// over the stream, sealing it and deleting it; the paths' order turns by
// one each round. One server process and one LMDB store for every round:
// a round writes where the documents before it were deleted, as a server
// that serves for long does (bench/preload.ts starts a fresh server and
// store per round). Per preload: upload and seal wall time, GB/s of K/V
// (10^9 bytes), the server process's CPU seconds over the upload (every
// thread) and, for the two clients, the server's phases summed from the
// answers' stats. The CLI's upload time runs from its start (node's start,
// reading the file included) to its progress bar's 100%; its seal, from
// there to its exit. --server-cli: another build's kvrecall.cjs (or
// cli.js) to serve, for an A/B. Results: bench/results/preload-<tag>.{json,md}.
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, fsyncSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { hostname, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor, type KvUploadStats } from '../clients/ts/client.js';
import { UploadWindow } from '../clients/ts/preload.js';
import { machine } from './decode/machine.js';
import { cpuSeconds, startServer, type BenchServer } from './preload-server.js';

const opt = (name: string) => (process.argv.includes(`--${name}`) ? process.argv[process.argv.indexOf(`--${name}`) + 1] : undefined);
const num = (name: string, def: number) => Number(opt(name) ?? def);
// The server's KVRECALL_LMDB_WRITE_BACK (it inherits this process's environment).
const WRITE_BACK = process.env.KVRECALL_LMDB_WRITE_BACK ?? 'default (256 MiB)';
const TOKENS = num('tokens', 1 << 17), LAYERS = num('layers', 2), CHUNK = num('chunk', 4096), ROUNDS = num('rounds', 3), SHARDS = num('shards', 0);
const TAG = (opt('tag') ?? 'vm-rounds').replace(/[^a-z0-9-]/gi, '');
const SERVER_CLI = opt('server-cli');
const KV_HEADS = 8, D = 128, SOURCES = 8;
const BYTES = LAYERS * TOKENS * KV_HEADS * D * 2 * 2;
const ROOT = join(import.meta.dirname, '..', '..');
const PHASES = ['readMs', 'decodeMs', 'queueMs', 'checkMs', 'appendMs', 'writeMs'] as const;
const CLI_TIMES = ['main', 'clientLoaded', 'created', 'ready', 'firstSent', 'uploaded', 'readWait', 'reads', 'send', 'drain'] as const;
const ALL_PATHS = ['ts', 'python', 'cli', 'cli-b'] as const;
type Path = (typeof ALL_PATHS)[number];
// --cli-b PATH: another build's kvrecall.cjs (or cli.js) preloads too, as path cli-b, for an A/B of the CLI in one sitting.
const CLI_B = opt('cli-b');
// --cli-args "--window 3": more flags for both CLIs (a build that does not know one ignores it).
const CLI_ARGS = opt('cli-args')?.split(' ').filter(Boolean) ?? [];
// --paths ts,cli: a host whose python3 lacks msgpack skips the Python client.
const PATHS: readonly Path[] = ALL_PATHS.filter((p) => (opt('paths') ? opt('paths')!.split(',').includes(p) : p !== 'cli-b') && (p !== 'cli-b' || CLI_B));
const progress = (msg: string) => process.stderr.write(`[bench:preload-rounds] ${msg}\n`);

interface Preload {
  round: number;
  path: Path;
  uploadS: number;
  sealS: number;
  serverUploadCpuS: number;
  serverSealCpuS: number;
  /** Server phases summed over the uploads, seconds (the CLI reports none). */
  phases?: Record<(typeof PHASES)[number], number>;
  /** The CLI's own split (`--timings 1`), ms from its process start; a build without the flag reports none. */
  cli?: Record<(typeof CLI_TIMES)[number], number>;
  /** The TypeScript client's: ms from its upload's start to the document created and the stream open (the CLI's ready − clientLoaded). */
  tsCreatedMs?: number;
  tsReadyMs?: number;
  load: number;
}

/** Random finite f16 words, [kvHeads, CHUNK, d]. */
function randomChunk(): Uint16Array {
  const words = new Uint32Array((KV_HEADS * CHUNK * D) / 2);
  randomFillSync(words);
  for (let i = 0; i < words.length; i++) words[i] &= 0xbfffbfff;
  return new Uint16Array(words.buffer);
}

/** k.L and v.L, [kvHeads, TOKENS, d] f16, for the CLI: each head's rows from the sources cycled. */
function writeSafetensors(path: string, sources: Uint16Array[]): void {
  const tensorBytes = KV_HEADS * TOKENS * D * 2;
  const header: Record<string, unknown> = {};
  let at = 0;
  for (let l = 0; l < LAYERS; l++)
    for (const kind of ['k', 'v']) {
      header[`${kind}.${l}`] = { dtype: 'F16', shape: [KV_HEADS, TOKENS, D], data_offsets: [at, at + tensorBytes] };
      at += tensorBytes;
    }
  header.__metadata__ = { qHeads: '32' };
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const fd = openSync(path, 'w');
  try {
    writeSync(fd, len);
    writeSync(fd, json);
    const row = CHUNK * D; // one head's rows of a chunk
    let c = 0;
    for (let t = 0; t < 2 * LAYERS * KV_HEADS; t++)
      for (let start = 0; start < TOKENS; start += CHUNK) {
        const src = sources[c++ % SOURCES], n = Math.min(CHUNK, TOKENS - start);
        writeSync(fd, src.subarray((t % KV_HEADS) * row, (t % KV_HEADS) * row + n * D));
      }
    // Flushed before the first path runs: at 1M tokens its 8.6 GB of dirty pages were written back by the
    // kernel while the first path uploaded (visit T's ts path: its commits waited 4.69 s, the next path's 1.77).
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function run(cmd: string, args: string[], cwd: string, onStderr?: (s: string) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d: Buffer) => {
      err = (err + d.toString()).slice(-4000);
      onStderr?.(d.toString());
    });
    p.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

async function viaTs(server: BenchServer, id: string, sources: Uint16Array[]): Promise<Omit<Preload, 'round' | 'path' | 'load'>> {
  const client = new KvrecallClient({ url: server.url });
  const model = { layers: LAYERS, qHeads: 32, kvHeads: KV_HEADS, headDim: D, dtype: 'f16' as const };
  const phases = Object.fromEntries(PHASES.map((p) => [p, 0])) as Record<(typeof PHASES)[number], number>;
  const tally = (r: { stats?: KvUploadStats }) => PHASES.forEach((p) => (phases[p] += (r.stats?.[p] ?? 0) / 1000));
  const c0 = cpuSeconds(server.pid), t0 = performance.now();
  await client.createDocument(id, model, { tokens: TOKENS, methods: ['exact'] });
  const tc = performance.now();
  const stream = await client.openStream();
  const tr = performance.now();
  const uploads = new UploadWindow(stream, 2);
  let c = 0;
  try {
    for (let layer = 0; layer < LAYERS; layer++)
      for (let start = 0; start < TOKENS; start += CHUNK) {
        const n = Math.min(CHUNK, TOKENS - start), shape = [KV_HEADS, n, D];
        const k = sources[c++ % SOURCES], v = sources[c++ % SOURCES];
        await uploads.send(id, { layer, start, k: tensor('f16', shape, k.subarray(0, KV_HEADS * n * D)), v: tensor('f16', shape, v.subarray(0, KV_HEADS * n * D)) }, tally);
      }
    await uploads.drain();
  } finally {
    stream.close();
  }
  const t1 = performance.now(), c1 = cpuSeconds(server.pid);
  await client.sealDocument(id);
  const t2 = performance.now(), c2 = cpuSeconds(server.pid);
  await client.deleteDocument(id);
  return { uploadS: (t1 - t0) / 1000, sealS: (t2 - t1) / 1000, serverUploadCpuS: c1 - c0, serverSealCpuS: c2 - c1, phases, tsCreatedMs: tc - t0, tsReadyMs: tr - t0 };
}

async function viaPython(server: BenchServer, dir: string): Promise<Omit<Preload, 'round' | 'path' | 'load'>> {
  const out = join(dir, 'python.json');
  const python = process.env.KVRECALL_PYTHON ?? '/usr/bin/python3';
  const c0 = cpuSeconds(server.pid);
  await run(python, ['-m', 'kvrecall.bench_preload', '--url', server.url, '--server-pid', String(server.pid), '--rounds', '1', '--tokens', String(TOKENS), '--layers', String(LAYERS), '--chunk', String(CHUNK), '--out', out], join(ROOT, 'clients', 'python'));
  const c1 = cpuSeconds(server.pid);
  const r = (JSON.parse(readFileSync(out, 'utf8')) as { rounds: { uploadS: number; sealS: number; serverCpuS: number; phases: Record<string, number> }[] }).rounds[0];
  const phases = Object.fromEntries(PHASES.map((p) => [p, r.phases[p]])) as Record<(typeof PHASES)[number], number>;
  // Its seal's CPU: the run's, less the upload's (the delete's few ms counted with the seal).
  return { uploadS: r.uploadS, sealS: r.sealS, serverUploadCpuS: r.serverCpuS, serverSealCpuS: c1 - c0 - r.serverCpuS, phases };
}

async function viaCli(server: BenchServer, id: string, file: string, cli: string): Promise<Omit<Preload, 'round' | 'path' | 'load'>> {
  const c0 = cpuSeconds(server.pid), t0 = performance.now();
  let t1 = 0, c1 = 0, err = '';
  // The progress bar ends its line when every upload is answered.
  await run(process.execPath, [cli, 'preload', file, '--id', id, '--url', server.url, '--methods', 'exact', '--chunk', String(CHUNK), '--timings', '1', ...CLI_ARGS], ROOT, (s) => {
    if (!t1 && s.includes('\n')) (t1 = performance.now()), (c1 = cpuSeconds(server.pid));
    err += s;
  });
  const t2 = performance.now(), c2 = cpuSeconds(server.pid);
  await new KvrecallClient({ url: server.url }).deleteDocument(id);
  const line = /kvrecall timings (\{.*\})/.exec(err)?.[1];
  const times = line ? (JSON.parse(line) as Record<string, number>) : undefined;
  const cliTimes = times && (Object.fromEntries(CLI_TIMES.map((k) => [k, times[k] ?? NaN])) as Record<(typeof CLI_TIMES)[number], number>);
  return { uploadS: (t1 - t0) / 1000, sealS: (t2 - t1) / 1000, serverUploadCpuS: c1 - c0, serverSealCpuS: c2 - c1, ...(cliTimes && { cli: cliTimes }) };
}

async function main(): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'kvr-preload-rounds-'));
  const data = join(work, 'data');
  const sources = Array.from({ length: SOURCES }, randomChunk);
  const file = join(work, 'kv.safetensors');
  writeSafetensors(file, sources);
  const server = await startServer(data, { shards: SHARDS, ...(SERVER_CLI && { cli: SERVER_CLI }) });
  const preloads: Preload[] = [];
  try {
    for (let round = 0; round < ROUNDS; round++)
      for (let j = 0; j < PATHS.length; j++) {
        const path = PATHS[(round + j) % PATHS.length], id = `doc-${round}-${path}`, load = loadavg()[0];
        const r = path === 'ts' ? await viaTs(server, id, sources) : path === 'python' ? await viaPython(server, work) : await viaCli(server, id, file, path === 'cli-b' ? CLI_B! : join(import.meta.dirname, '..', 'cli', 'kvrecall.cjs'));
        preloads.push({ round, path, ...r, load });
        progress(`round ${round} ${path}: upload ${r.uploadS.toFixed(2)} s (${(BYTES / r.uploadS / 1e9).toFixed(2)} GB/s), server CPU ${r.serverUploadCpuS.toFixed(2)} s, seal ${r.sealS.toFixed(2)} s (${(BYTES / r.sealS / 1e9).toFixed(2)} GB/s); load ${load.toFixed(1)}`);
      }
  } finally {
    await server.stop();
    rmSync(work, { recursive: true, force: true });
  }
  const result = { machine: machine(), host: hostname(), date: new Date().toISOString(), serverCli: SERVER_CLI ?? 'this build', ...(CLI_B && { cliB: CLI_B }), tokens: TOKENS, layers: LAYERS, chunk: CHUNK, shards: SHARDS || 'default', writeBack: WRITE_BACK, bytes: BYTES, preloads };
  const base = join(ROOT, 'bench', 'results', `preload-${TAG}`);
  writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
  const gbs = (s: number) => (BYTES / s / 1e9).toFixed(2), f2 = (x: number) => x.toFixed(2);
  const m = result.machine;
  const lines = [
    `# Preload rounds against one server: TypeScript client, Python client, CLI (${m.cpu}, ${m.cores} cores)`,
    '',
    `One server process on 127.0.0.1 (${SERVER_CLI ?? 'this build'}), LMDB store, block environments per document: ${SHARDS || "the server's default"}, LMDB write-back every ${WRITE_BACK} (KVRECALL_LMDB_WRITE_BACK); every preload ${LAYERS} layer(s) × ${TOKENS} tokens × ${KV_HEADS} kv heads × d=${D}, f16 = ${(BYTES / 1e9).toFixed(2)} GB of K/V, uploads of ${CHUNK} tokens over the stream (2 unanswered), methods: exact only, then seal, then delete; the paths' order turns each round. Seal = the seal call until durable. CLI: upload from its process start (node, reading the file) to its progress bar's 100%${CLI_B ? `; cli-b: the same with ${CLI_B}` : ''}. Server phases summed over the uploads, seconds.`,
    '',
    '| round | path | load | upload s | upload GB/s | server CPU s | GB per server CPU s | seal s | seal GB/s | seal server CPU s | read | decode | queue | check | append | write |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...preloads.map((r) => `| ${r.round} | ${r.path} | ${f2(r.load)} | ${f2(r.uploadS)} | ${gbs(r.uploadS)} | ${f2(r.serverUploadCpuS)} | ${gbs(r.serverUploadCpuS)} | ${f2(r.sealS)} | ${gbs(r.sealS)} | ${f2(r.serverSealCpuS)} | ${PHASES.map((p) => (r.phases ? f2(r.phases[p]) : '—')).join(' | ')} |`),
    '',
  ];
  const split = preloads.filter((r) => r.cli);
  if (split.length)
    lines.push(
      `The CLI's own split (\`--timings 1\`${CLI_ARGS.length ? `; flags ${CLI_ARGS.join(' ')}` : ''}), ms from its process start: its module running (main), the client loaded, the document created (its memory reserved), the stream open (ready), the first upload in the socket, the last answered; then, summed over the uploads, waiting on reads, the reads' own time (overlapped or not), waiting in send (socket and window), and the last answers.`,
      '',
      '| round | path | main | client loaded | created | ready | first sent | uploaded | read wait | reads | send | drain |',
      '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
      ...split.map((r) => `| ${r.round} | ${r.path} | ${CLI_TIMES.map((k) => r.cli![k].toFixed(0)).join(' | ')} |`),
      '',
      ...preloads.filter((r) => r.tsReadyMs !== undefined).map((r) => `The TypeScript client, round ${r.round}: created ${r.tsCreatedMs!.toFixed(0)} ms, ready ${r.tsReadyMs!.toFixed(0)} ms after its start.`),
      '',
    );
  writeFileSync(`${base}.md`, lines.join('\n'));
  console.log(lines.join('\n'));
}

await main();
