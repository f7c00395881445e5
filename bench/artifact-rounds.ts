// node dist/bench/artifact-rounds.js [--tokens 131072 --layers 2 --methods wave --rounds 4 --runs 2 --shards 1 --old DIST --tag vm]
//
// Index artifacts round after round in one LMDB store (the store alone, no
// server, no network): each round creates a document of --layers x --tokens
// (8 kv heads, d=128, f16), writes its blocks in batches as a preload does
// (64 blocks of 64 tokens x 8 heads, 16 MiB), seals it with the artifacts
// of --methods for every (layer, kv head), and deletes it. Every round but
// a run's first writes where the deleted documents were: with artifacts in
// the shared main environment their pages are on its freelist, and the
// seal's artifact writes allocate from it. Per round: the seal's wall time
// and the process's CPU seconds over it (every thread: LMDB's commits run
// on libuv's pool), the same for the block writes and the delete, and the
// store's bytes on disk after the delete.
//
// Artifacts: each method's builder runs once, on one kv head of random keys
// and values (and random prefill queries, one token in 4) of --tokens, and
// every (layer, head) of every round stores a copy of those bytes: the
// sizes a real document's artifacts have, without a build per round.
//
// --keep K: each round deletes the document of K rounds before (K documents
// stay in the store), and the artifacts' order (by method) turns by one each
// round, so that freed runs of pages are reused by writes of other sizes.
//
// --old DIST: the dist/ folder of another build (its storage/lmdb-store.js
// is loaded): each run then measures that build and this one, each in a
// fresh child process and store, alternated (old, new, old, new, ...) so
// that the machine's other load hits both alike. Results:
// bench/results/artifact-rounds-<tag>.{json,md}.
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { hostname, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { findMethod } from '../index/registry.js';
import type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStore } from '../storage/document-store.js';
import { machine } from './decode/machine.js';

const opt = (name: string) => (process.argv.includes(`--${name}`) ? process.argv[process.argv.indexOf(`--${name}`) + 1] : undefined);
const num = (name: string, def: number) => Number(opt(name) ?? def);
const TOKENS = num('tokens', 1 << 17), LAYERS = num('layers', 2), ROUNDS = num('rounds', 4), RUNS = num('runs', 2), SHARDS = num('shards', 1), KEEP = num('keep', 0);
const METHODS = (opt('methods') ?? 'wave').split(',');
const TAG = (opt('tag') ?? 'vm').replace(/[^a-z0-9-]/gi, '');
const KV_HEADS = 8, D = 128, BLOCK = 64, BATCH_BLOCKS = 64;
const KV_BYTES = LAYERS * TOKENS * KV_HEADS * D * 2 * 2;
const ROOT = join(import.meta.dirname, '..', '..');
const progress = (msg: string) => process.stderr.write(`[bench:artifact-rounds] ${msg}\n`);

interface Round {
  round: number;
  writeS: number;
  writeCpuS: number;
  sealS: number;
  sealCpuS: number;
  /** Of sealCpuS, the kernel's (system time). */
  sealSysS: number;
  removeS: number;
  removeCpuS: number;
  /** The store folder's bytes on disk after the delete. */
  diskBytes: number;
  load: number;
}

interface Run {
  run: number;
  variant: 'old' | 'new';
  rounds: Round[];
}

/** Random finite f16 words. */
function randomF16(words: number): Uint16Array {
  const w = new Uint32Array(Math.ceil(words / 2));
  randomFillSync(w);
  for (let i = 0; i < w.length; i++) w[i] &= 0xbbffbbff; // exponent below 0x1e: finite, |x| < 2^15
  return new Uint16Array(w.buffer, 0, words);
}

/** One head's artifact of each method, built once (parent). */
async function buildArtifacts(file: string): Promise<void> {
  const keys = randomF16(TOKENS * D), values = randomF16(TOKENS * D);
  const group = 4, queryCount = Math.ceil(TOKENS / 4) * group;
  const queries = Float32Array.from({ length: queryCount * D }, () => Math.random() * 2 - 1);
  const parts: { method: string; bytes: number }[] = [];
  const blobs: Uint8Array[] = [];
  for (const method of METHODS) {
    const builder = findMethod(method)?.builder;
    if (!builder) throw new Error(`${method}: not a method that builds an index`);
    const t0 = performance.now();
    const bytes = await builder.build({ keys, values, tokens: TOKENS, headDim: D, dtype: 'f16', queries, queryCount });
    progress(`${method}: one head's artifact ${(bytes.byteLength / 2 ** 20).toFixed(1)} MiB (${((100 * bytes.byteLength) / (TOKENS * D * 4)).toFixed(1)}% of its K/V), built in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    parts.push({ method, bytes: bytes.byteLength });
    blobs.push(bytes);
  }
  writeFileSync(file, Buffer.concat([Buffer.from(JSON.stringify(parts) + '\n'), ...blobs]));
}

function readArtifacts(file: string): ArtifactWrite[] {
  const all = readFileSync(file);
  const nl = all.indexOf(10);
  const parts = JSON.parse(all.subarray(0, nl).toString()) as { method: string; bytes: number }[];
  const out: ArtifactWrite[] = [];
  let at = nl + 1;
  for (const { method, bytes } of parts) {
    const blob = all.subarray(at, at + bytes);
    at += bytes;
    for (let layer = 0; layer < LAYERS; layer++) for (let head = 0; head < KV_HEADS; head++) out.push({ method, layer, head, bytes: blob });
  }
  return out;
}

function diskBytes(path: string): number {
  const s = statSync(path);
  return s.isDirectory() ? readdirSync(path).reduce((n, e) => n + diskBytes(join(path, e)), 0) : s.blocks * 512;
}

const cpu = () => {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1e6;
};
const sys = () => process.cpuUsage().system / 1e6;

/** The rounds in one store of the given build (child). */
async function child(storeModule: string, artifactFile: string, out: string): Promise<void> {
  const { LmdbStore } = (await import(pathToFileURL(storeModule).href)) as { LmdbStore: { open(dir: string, o: { shards: number }): Promise<{ store: DocumentStore }> } };
  const artifacts = readArtifacts(artifactFile);
  const k = randomF16(BLOCK * D), v = randomF16(BLOCK * D);
  const kb = new Uint8Array(k.buffer, k.byteOffset, k.byteLength), vb = new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  const dir = mkdtempSync(join(tmpdir(), 'kvr-artifact-rounds-'));
  const { store } = await LmdbStore.open(dir, { shards: SHARDS });
  const model = { layers: LAYERS, qHeads: 32, kvHeads: KV_HEADS, headDim: D, dtype: 'f16' as const, blockSize: BLOCK };
  const rounds: Round[] = [];
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const id = `doc-${round}`, load = loadavg()[0];
      const meta: DocumentMeta = { id, model, status: 'loading', tokens: 0, methods: METHODS, queryStride: 4, createdAt: new Date().toISOString() };
      await store.create(meta);
      let t = performance.now(), c = cpu();
      for (let layer = 0; layer < LAYERS; layer++)
        for (let b0 = 0; b0 < TOKENS / BLOCK; b0 += BATCH_BLOCKS) {
          const writes: BlockWrite[] = [];
          for (let b = b0; b < Math.min(TOKENS / BLOCK, b0 + BATCH_BLOCKS); b++) for (let head = 0; head < KV_HEADS; head++) writes.push({ layer, head, block: b, k: kb, v: vb });
          await store.writeBlocks(id, writes);
        }
      const writeS = (performance.now() - t) / 1000, writeCpuS = cpu() - c;
      (t = performance.now()), (c = cpu());
      const s0 = sys();
      const turn = KEEP ? (round * artifacts.length) / METHODS.length : 0;
      await store.seal({ ...meta, status: 'ready', tokens: TOKENS, sealedAt: new Date().toISOString() }, [], [...artifacts.slice(turn % artifacts.length), ...artifacts.slice(0, turn % artifacts.length)]);
      const sealS = (performance.now() - t) / 1000, sealCpuS = cpu() - c, sealSysS = sys() - s0;
      (t = performance.now()), (c = cpu());
      if (round >= KEEP) await store.remove(`doc-${round - KEEP}`);
      const removeS = (performance.now() - t) / 1000, removeCpuS = cpu() - c;
      rounds.push({ round, writeS, writeCpuS, sealS, sealCpuS, sealSysS, removeS, removeCpuS, diskBytes: diskBytes(dir), load });
    }
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
  writeFileSync(out, JSON.stringify(rounds));
}

function runChild(storeModule: string, artifactFile: string, out: string): Promise<Round[]> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [import.meta.filename, '--child', storeModule, '--artifacts', artifactFile, '--out', out, ...process.argv.slice(2)], { stdio: ['ignore', 'inherit', 'inherit'] });
    p.once('exit', (code) => (code === 0 ? resolve(JSON.parse(readFileSync(out, 'utf8')) as Round[]) : reject(new Error(`child exited ${code}`))));
  });
}

async function main(): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'kvr-artifact-rounds-'));
  const artifactFile = join(work, 'artifacts.bin');
  const oldDist = opt('old');
  const variants: { variant: Run['variant']; store: string }[] = [
    ...(oldDist ? [{ variant: 'old' as const, store: join(oldDist, 'storage', 'lmdb-store.js') }] : []),
    { variant: 'new', store: join(import.meta.dirname, '..', 'storage', 'lmdb-store.js') },
  ];
  const runs: Run[] = [];
  let artifactBytes = 0;
  try {
    await buildArtifacts(artifactFile);
    artifactBytes = readArtifacts(artifactFile).reduce((n, a) => n + a.bytes.byteLength, 0);
    for (let run = 0; run < RUNS; run++)
      for (const { variant, store } of variants) {
        const rounds = await runChild(store, artifactFile, join(work, 'rounds.json'));
        runs.push({ run, variant, rounds });
        for (const r of rounds) progress(`run ${run} ${variant} round ${r.round}: seal ${r.sealS.toFixed(2)} s, CPU ${r.sealCpuS.toFixed(2)} s (system ${r.sealSysS.toFixed(2)}); blocks ${r.writeCpuS.toFixed(2)} CPU s; delete ${r.removeS.toFixed(2)} s; disk ${(r.diskBytes / 1e6).toFixed(1)} MB; load ${r.load.toFixed(1)}`);
      }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  const result = { machine: machine(), host: hostname(), date: new Date().toISOString(), old: oldDist ?? null, tokens: TOKENS, layers: LAYERS, methods: METHODS, shards: SHARDS, kvBytes: KV_BYTES, artifactBytes, runs };
  const base = join(ROOT, 'bench', 'results', `artifact-rounds-${TAG}`);
  writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
  const f2 = (x: number) => x.toFixed(2), mb = (b: number) => (b / 1e6).toFixed(1);
  const m = result.machine;
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
  const later = (r: Run) => r.rounds.filter((x) => x.round > KEEP);
  const lines = [
    `# Index artifacts round after round in one LMDB store (${m.cpu}, ${m.cores} cores)`,
    '',
    `bench/artifact-rounds.ts: per round a document of ${LAYERS} layer(s) × ${TOKENS} tokens × ${KV_HEADS} kv heads × d=${D} f16 (${mb(KV_BYTES)} MB of K/V, its blocks in batches of 16 MiB), sealed with ${METHODS.join(', ')} artifacts for every (layer, head) (${mb(artifactBytes)} MB: copies of one head's real artifact), then ${KEEP ? `the document of ${KEEP} rounds before deleted (the artifacts' order by method turning each round)` : 'deleted'}, ${ROUNDS} rounds per store; ${SHARDS} block environment(s) per document. Variants in fresh processes and stores, alternated${oldDist ? ' (old: the build before per-document artifact environments)' : ''}. CPU: the process's, every thread.`,
    '',
    '| run | variant | round | load | seal s | seal CPU s | of it system | blocks s | blocks CPU s | delete s | disk after delete MB |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...runs.flatMap((r) => r.rounds.map((x) => `| ${r.run} | ${r.variant} | ${x.round} | ${x.load.toFixed(1)} | ${f2(x.sealS)} | ${f2(x.sealCpuS)} | ${f2(x.sealSysS)} | ${f2(x.writeS)} | ${f2(x.writeCpuS)} | ${f2(x.removeS)} | ${mb(x.diskBytes)} |`)),
    '',
    `Rounds ${KEEP + 1}… of each store (each after a delete), median (range):`,
    '',
    '| run | variant | seal s | seal CPU s | of it system | blocks CPU s |',
    '| ---: | --- | ---: | ---: | ---: | ---: |',
    ...runs.map((r) => {
      const xs = later(r), cell = (f: (x: Round) => number) => `${f2(median(xs.map(f)))} (${f2(Math.min(...xs.map(f)))}–${f2(Math.max(...xs.map(f)))})`;
      return `| ${r.run} | ${r.variant} | ${cell((x) => x.sealS)} | ${cell((x) => x.sealCpuS)} | ${cell((x) => x.sealSysS)} | ${cell((x) => x.writeCpuS)} |`;
    }),
    '',
  ];
  writeFileSync(`${base}.md`, lines.join('\n'));
  console.log(lines.join('\n'));
}

if (process.argv.includes('--child')) await child(opt('child')!, opt('artifacts')!, opt('out')!);
else await main();
