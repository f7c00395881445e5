// npm run bench:store [-- --tokens 1048576 --chunk 4096 --attaches 3 --rounds 2]
//
// The two document stores side by side, in one run on one machine: LMDB in
// a temp folder, and a 6-node Redis Cluster (3 masters, 3 replicas) started
// on loopback ports (test/helpers/redis-cluster.ts). For each store, one
// layer of `tokens` tokens (f16, 8 kv heads, d=128: 4 GiB of K/V at 1M):
//
//   preload  PUT (with the tokens hint) → kv uploads of `chunk` tokens →
//            seal, through the engine's Documents as the HTTP routes call it
//            (no HTTP): the time until seal answers, everything durable
//            (LMDB flushed; Redis acknowledged by the replicas via WAIT).
//   attach   a fresh engine on the same store (nothing in memory) attaches
//            the ready document: every block read into host memory, and on
//            Redis every block's checksum checked. Checked byte for byte
//            against what was uploaded.
//
// Rounds alternate LMDB and Redis (the machine may be shared: load moves
// both alike). Speeds are GiB of K/V per second, medians (preload over
// rounds, attach over all attaches); the ratios are Redis / LMDB. The
// uploads cycle through 16 distinct random chunks (the source of 4 GiB is
// not held twice). Memory: the document is held once in this process at a
// time, and on Redis twice (master and replica) plus allocator slack, ~10 GiB
// at 1M tokens; --tokens runs a smaller layer. Results:
// bench/results/store-<tokens>.{json,md}.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { Engine } from '../engine/engine.js';
import { startRedisCluster, type RedisCluster } from '../test/helpers/redis-cluster.js';
import { machine } from './decode/machine.js';

const arg = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const TOKENS = arg('tokens', 1 << 20), CHUNK = arg('chunk', 4096), ATTACHES = arg('attaches', 3), ROUNDS = arg('rounds', 2), SOURCES = 16;
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
const BYTES = TOKENS * model.kvHeads * model.headDim * 2 * 2;
const GiB = 2 ** 30;
const progress = (msg: string) => process.stderr.write(`[bench:store] ${msg}\n`);

/** Random f16 K or V, [kvHeads, CHUNK, d], finite (the exponent's top bit cleared). */
function randomChunk(): Uint8Array {
  const words = new Uint32Array(model.kvHeads * CHUNK * model.headDim / 2);
  randomFillSync(words);
  for (let i = 0; i < words.length; i++) words[i] &= 0xbfffbfff;
  return new Uint8Array(words.buffer);
}

interface Round {
  preloadS: number;
  attachS: number[];
  /** Every token of the first attach equals what was uploaded. */
  verified: boolean;
  /** 1-minute load average when the round started (the machine is shared). */
  load: number;
  redisUsedMemoryGiB?: number;
}

interface StoreResult {
  store: 'lmdb' | 'redis';
  rounds: Round[];
  /** Medians: preload over rounds, attach over every attach. */
  preloadS: number;
  preloadGiBps: number;
  attachS: number;
  attachGiBps: number;
  attachBestGiBps: number;
  verified: boolean;
}

const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor((xs.length - 1) / 2)];

function summary(store: 'lmdb' | 'redis', rounds: Round[]): StoreResult {
  const preloadS = median(rounds.map((r) => r.preloadS));
  const all = rounds.flatMap((r) => r.attachS);
  const attachS = median(all);
  return { store, rounds, preloadS, preloadGiBps: BYTES / GiB / preloadS, attachS, attachGiBps: BYTES / GiB / attachS, attachBestGiBps: BYTES / GiB / Math.min(...all), verified: rounds.every((r) => r.verified) };
}

async function open(store: 'lmdb' | 'redis', dir: string, cluster?: RedisCluster): Promise<Engine> {
  return Engine.open({ dataDir: dir, store: store === 'redis' ? cluster!.url : undefined, memoryBudget: 2 * BYTES + GiB, gpuBudget: 0 });
}

/** One round on one store: preload, then ATTACHES attaches by fresh engines; the document is deleted after. */
async function run(store: 'lmdb' | 'redis', sources: { k: Uint8Array; v: Uint8Array }[], cluster?: RedisCluster): Promise<Round> {
  const dir = mkdtempSync(join(tmpdir(), 'kvr-bench-store-'));
  const gc = () => (globalThis as { gc?: () => void }).gc?.();
  const load = machine().loadAverage;
  const id = `bench-${TOKENS}`;
  try {
    const preloadS = await preload(store, dir, id, sources, cluster);
    progress(`${store}: preload ${preloadS.toFixed(2)} s (${(BYTES / GiB / preloadS).toFixed(2)} GiB/s)`);
    // The preloaded copy goes before the attaches allocate theirs (run with --expose-gc).
    gc();
    const attachS: number[] = [];
    let verified = true;
    for (let a = 0; a < ATTACHES; a++) {
      const engine = await open(store, dir, cluster);
      const t1 = performance.now();
      const doc = await engine.documents.acquire(id);
      attachS.push((performance.now() - t1) / 1000);
      progress(`${store}: attach ${attachS[a].toFixed(2)} s (${(BYTES / GiB / attachS[a]).toFixed(2)} GiB/s)`);
      if (a === 0) verified = verify(doc.layers[0], sources);
      await engine.close();
      gc();
    }
    let redisUsedMemoryGiB: number | undefined;
    if (cluster) {
      redisUsedMemoryGiB = cluster.nodes.reduce((s, n) => s + Number(/used_memory:(\d+)/.exec(cluster.cli(n.port, 'info', 'memory'))![1]), 0) / GiB;
      const engine = await open(store, dir, cluster);
      await engine.documents.remove(id);
      await engine.close();
    }
    return { preloadS, attachS, verified, load, redisUsedMemoryGiB };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** PUT, uploads, seal through the engine; the seconds until seal answers (everything durable). */
async function preload(store: 'lmdb' | 'redis', dir: string, id: string, sources: { k: Uint8Array; v: Uint8Array }[], cluster?: RedisCluster): Promise<number> {
  const engine = await open(store, dir, cluster);
  const t0 = performance.now();
  await engine.documents.create(id, { model, tokens: TOKENS });
  for (let start = 0, i = 0; start < TOKENS; start += CHUNK, i++) {
    const n = Math.min(CHUNK, TOKENS - start);
    const src = sources[i % SOURCES];
    const cut = (a: Uint8Array) => (n === CHUNK ? a : cutChunk(a, n));
    const shape = [model.kvHeads, n, model.headDim];
    await engine.documents.appendKv(id, { layer: 0, start, k: { dtype: 'f16', shape, data: cut(src.k) }, v: { dtype: 'f16', shape, data: cut(src.v) } });
    if (i % 64 === 63) progress(`${store}: preload ${start + n}/${TOKENS} tokens`);
  }
  await engine.documents.seal(id);
  const s = (performance.now() - t0) / 1000;
  await engine.close();
  return s;
}

/** The first n tokens of each head of a [kvHeads, CHUNK, d] chunk. */
function cutChunk(a: Uint8Array, n: number): Uint8Array {
  const row = model.headDim * 2;
  const out = new Uint8Array(model.kvHeads * n * row);
  for (let h = 0; h < model.kvHeads; h++) out.set(a.subarray(h * CHUNK * row, (h * CHUNK + n) * row), h * n * row);
  return out;
}

/** Every token of the attached layer equals what was uploaded. */
function verify(seg: { k: Uint16Array[]; v: Uint16Array[]; tokens: number }, sources: { k: Uint8Array; v: Uint8Array }[]): boolean {
  const row = model.headDim * 2;
  if (seg.tokens !== TOKENS) return false;
  for (let h = 0; h < model.kvHeads; h++) {
    const k = Buffer.from(seg.k[h].buffer, seg.k[h].byteOffset, TOKENS * row);
    const v = Buffer.from(seg.v[h].buffer, seg.v[h].byteOffset, TOKENS * row);
    for (let start = 0, i = 0; start < TOKENS; start += CHUNK, i++) {
      const n = Math.min(CHUNK, TOKENS - start);
      const src = sources[i % SOURCES];
      const want = (a: Uint8Array) => a.subarray(h * CHUNK * row, (h * CHUNK + n) * row);
      if (Buffer.compare(k.subarray(start * row, (start + n) * row), want(src.k)) !== 0) return false;
      if (Buffer.compare(v.subarray(start * row, (start + n) * row), want(src.v)) !== 0) return false;
    }
  }
  return true;
}

async function main(): Promise<void> {
  const again = process.argv.indexOf('--render');
  if (again >= 0) {
    // Re-renders the Markdown of an earlier run from its JSON.
    const file = process.argv[again + 1];
    writeFileSync(file.replace(/\.json$/, '.md'), render(JSON.parse(readFileSync(file, 'utf8'))));
    return;
  }
  progress(`${TOKENS} tokens × ${model.kvHeads} kv heads × d=${model.headDim} f16: ${(BYTES / GiB).toFixed(2)} GiB of K/V`);
  const sources = Array.from({ length: SOURCES }, () => ({ k: randomChunk(), v: randomChunk() }));
  // Rounds alternate the stores, so that what else runs on the machine weighs on both alike.
  const lmdbRounds: Round[] = [], redisRounds: Round[] = [];
  const cluster = await startRedisCluster({ nodeTimeoutMs: 5000 });
  try {
    for (let r = 0; r < ROUNDS; r++) {
      progress(`round ${r + 1} of ${ROUNDS}`);
      lmdbRounds.push(await run('lmdb', sources));
      redisRounds.push(await run('redis', sources, cluster));
    }
  } finally {
    await cluster.stop();
  }
  const lmdb = summary('lmdb', lmdbRounds), redis = summary('redis', redisRounds);
  const m = machine();
  const result = {
    machine: m,
    host: hostname(),
    date: new Date().toISOString(),
    tokens: TOKENS,
    chunk: CHUNK,
    model,
    bytes: BYTES,
    redis: { version: redisVersion(), nodes: '6 (3 masters, 3 replicas), loopback, no persistence' },
    lmdb,
    redisStore: redis,
    preloadRatio: redis.preloadGiBps / lmdb.preloadGiBps,
    attachRatio: redis.attachGiBps / lmdb.attachGiBps,
  };
  const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `store-${TOKENS}`);
  writeFileSync(`${base}.json`, JSON.stringify(result, null, 2) + '\n');
  writeFileSync(`${base}.md`, render(result));
  progress(`wrote ${base}.{json,md}`);
  process.stdout.write(render(result));
}

function redisVersion(): string {
  try {
    return /v=(\S+)/.exec(execFileSync('redis-server', ['--version'], { encoding: 'utf8' }))![1];
  } catch {
    return 'unknown';
  }
}

function render(r: { machine: ReturnType<typeof machine>; host: string; tokens: number; chunk: number; bytes: number; lmdb: StoreResult; redisStore: StoreResult; preloadRatio: number; attachRatio: number; redis: { version: string } }): string {
  const f = (x: number) => x.toFixed(2);
  const row = (s: StoreResult, name: string) =>
    `| ${name} | ${s.rounds.map((x) => f(x.preloadS)).join(', ')} | ${f(s.preloadGiBps)} | ${s.rounds.flatMap((x) => x.attachS).map(f).join(', ')} | ${f(s.attachGiBps)} | ${f(s.attachBestGiBps)} | ${s.verified ? 'yes' : 'NO'} |`;
  const mem = r.redisStore.rounds[0]?.redisUsedMemoryGiB;
  return [
    `### Document stores: one ${r.tokens.toLocaleString('en-US')}-token layer, LMDB beside a Redis Cluster`,
    '',
    `Machine: ${r.host}, a VM with ${r.machine.cores} cores (${r.machine.cpu}) and ${r.machine.memoryGiB} GiB, Node ${r.machine.node}. One layer of ${r.tokens} tokens × 8 kv heads × d=128, f16 = ${f(r.bytes / 2 ** 30)} GiB of K/V, uploaded in chunks of ${r.chunk} tokens through the engine's Documents (no HTTP). LMDB in a temp folder; Redis ${r.redis.version}: 6-node cluster (3 masters, 3 replicas, no persistence) on loopback ports of the same machine${mem ? `, holding ${f(mem)} GiB over its 6 nodes with the document in` : ''}. ${r.lmdb.rounds.length} rounds alternating the stores; preload = PUT to seal answered (durable: LMDB flushed, Redis acknowledged by the replicas); attach = a fresh engine reading the ready document into host memory (Redis: every block's checksum checked). Load average at each round's start: LMDB ${r.lmdb.rounds.map((x) => x.load).join(', ')}; Redis ${r.redisStore.rounds.map((x) => x.load).join(', ')} (the machine was shared with other work: every number moves with it).`,
    '',
    '| store | preloads s | preload GiB/s (median) | attaches s | attach GiB/s (median) | attach GiB/s (best) | read back equal |',
    '| --- | ---: | ---: | ---: | ---: | ---: | --- |',
    row(r.lmdb, 'LMDB'),
    row(r.redisStore, 'Redis Cluster'),
    '',
    `Redis / LMDB: preload **${f(r.preloadRatio)}×**, attach **${f(r.attachRatio)}×** (medians; ${f(r.redisStore.attachBestGiBps / r.lmdb.attachBestGiBps)}× best to best). Target: ≥ 0.5× for both.`,
    '',
  ].join('\n');
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
