// node dist/bench/preload.js [--tokens 262144 --layers 2 --chunk 4096 --rounds 2 --inflight 1 --via stream --window 2 --shards 1,4 --pool 16 --warmup 0]
//
// Preload and seal over loopback, as `kvrecall preload` does it: the
// TypeScript client uploads each layer in chunks of `chunk` tokens (8 kv
// heads, d=128, f16; no prefill q; methods: exact only) to a server in its
// own process with an LMDB store, then seals. --via stream (default): the
// uploads go over GET /v1/stream, `window` unanswered at a time; --via
// http: POST /v1/documents/:doc/kv, one at a time per connection.
// --inflight N: N layers upload at once, each on its own connection or
// stream (a layer's chunks stay in order). Per round: the wall time of
// the uploads and of the seal, GB/s of K/V (10^9 bytes), and where the
// server's time went, summed over the uploads from each answer's stats
// (body read, msgpack decode, queue, checks, copy into the segment, block
// writes staged/awaited) beside the client's wall. The source chunks are 8
// distinct random ones cycled (the source is not held whole). The machine
// may be shared: beside wall times, the CPU seconds the server process (all
// its threads: LMDB's writer, the kernel's work on its behalf) and the
// client spent, which move less with other load. Results:
// --shards: the server's LMDB block shards (--lmdb-shards), each count
// once per round, in turn (unset: the server's default); --pool: the
// server's libuv pool (UV_THREADPOOL_SIZE; each shard's commits hold one of
// its threads). --warmup N: N rounds first, not recorded (on the 2-core VM
// the first server of a sitting uploaded at a third of the rest's speed,
// its LMDB writes 3-4x as long, whatever its shard count). Results:
// bench/results/preload-<tag>.{json,md} (tag: KVRECALL_BENCH_TAG, default vm).
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor, type KvUploadStats } from '../clients/ts/client.js';
import { UploadWindow } from '../clients/ts/preload.js';
import { machine } from './decode/machine.js';
import { cpuSeconds, startServer } from './preload-server.js';

const arg = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const TOKENS = arg('tokens', 1 << 18), LAYERS = arg('layers', 2), CHUNK = arg('chunk', 4096), ROUNDS = arg('rounds', 2), INFLIGHT = arg('inflight', 1), WINDOW = arg('window', 2), SOURCES = 8;
const SHARDS = process.argv.includes('--shards') ? process.argv[process.argv.indexOf('--shards') + 1].split(',').map(Number) : [0];
const POOL = arg('pool', 0), WARMUP = arg('warmup', 0);
const VIA = process.argv.includes('--via') ? process.argv[process.argv.indexOf('--via') + 1] : 'stream';
if (VIA !== 'stream' && VIA !== 'http') throw new Error('--via stream|http');
const model = { layers: LAYERS, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
const BYTES = LAYERS * TOKENS * model.kvHeads * model.headDim * 2 * 2;
const progress = (msg: string) => process.stderr.write(`[bench:preload] ${msg}\n`);
const PHASES = ['readMs', 'decodeMs', 'queueMs', 'checkMs', 'appendMs', 'writeMs'] as const;

const clientCpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** Random finite f16 words, [kvHeads, CHUNK, d]. */
function randomChunk(): Uint16Array {
  const words = new Uint32Array((model.kvHeads * CHUNK * model.headDim) / 2);
  randomFillSync(words);
  for (let i = 0; i < words.length; i++) words[i] &= 0xbfffbfff;
  return new Uint16Array(words.buffer);
}

interface Round {
  /** The server's --lmdb-shards (0: its default). */
  shards: number;
  uploadS: number;
  sealS: number;
  /** CPU seconds of the server process over the uploads and over the seal, and of the client over the uploads. */
  serverUploadCpuS: number;
  /** Of those, the server's main thread (its event loop: the one that bounds a preload where cores are free). */
  serverMainCpuS: number;
  serverSealCpuS: number;
  clientUploadCpuS: number;
  /** Server phases summed over the uploads, seconds. */
  phases: Record<(typeof PHASES)[number], number>;
  load: number;
}

async function round(sources: Uint16Array[], i: number, shards: number): Promise<Round> {
  const dir = mkdtempSync(join(tmpdir(), 'kvr-preload-'));
  const server = await startServer(dir, { shards, pool: POOL });
  try {
    const client = new KvrecallClient({ url: server.url });
    const load = loadavg()[0];
    const phases = Object.fromEntries(PHASES.map((p) => [p, 0])) as Round['phases'];
    const c0 = cpuSeconds(server.pid), m0 = cpuSeconds(server.pid, server.pid), k0 = clientCpu();
    const t0 = performance.now();
    await client.createDocument(`doc${i}`, model, { tokens: TOKENS });
    let c = 0;
    const tally = (r: { stats?: KvUploadStats }) => {
      for (const p of PHASES) phases[p] += (r.stats?.[p] ?? 0) / 1000;
    };
    const lane = async (first: number) => {
      const stream = VIA === 'stream' ? await client.openStream() : undefined;
      const uploads = stream && new UploadWindow(stream, WINDOW);
      try {
        for (let layer = first; layer < LAYERS; layer += INFLIGHT)
          for (let start = 0; start < TOKENS; start += CHUNK) {
            const n = Math.min(CHUNK, TOKENS - start);
            const k = sources[c++ % SOURCES], v = sources[c++ % SOURCES];
            const shape = [model.kvHeads, n, model.headDim];
            const body = { layer, start, k: tensor('f16', shape, n === CHUNK ? k : k.subarray(0, model.kvHeads * n * model.headDim)), v: tensor('f16', shape, n === CHUNK ? v : v.subarray(0, model.kvHeads * n * model.headDim)) };
            if (uploads) await uploads.send(`doc${i}`, body, tally);
            else tally(await client.uploadDocumentKv(`doc${i}`, body));
          }
        await uploads?.drain();
      } finally {
        stream?.close();
      }
    };
    await Promise.all(Array.from({ length: Math.min(INFLIGHT, LAYERS) }, (_, j) => lane(j)));
    const t1 = performance.now();
    const c1 = cpuSeconds(server.pid), m1 = cpuSeconds(server.pid, server.pid), k1 = clientCpu();
    await client.sealDocument(`doc${i}`);
    const t2 = performance.now();
    const c2 = cpuSeconds(server.pid);
    return { shards, uploadS: (t1 - t0) / 1000, sealS: (t2 - t1) / 1000, serverUploadCpuS: c1 - c0, serverMainCpuS: m1 - m0, serverSealCpuS: c2 - c1, clientUploadCpuS: k1 - k0, phases, load };
  } finally {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const sources = Array.from({ length: SOURCES }, randomChunk);
  const rounds: Round[] = [];
  for (let i = 0; i < WARMUP; i++) progress(`warm-up ${i}: upload ${(await round(sources, i, SHARDS[0])).uploadS.toFixed(2)} s, not recorded`);
  for (let i = 0; i < ROUNDS; i++)
    for (const shards of SHARDS) {
      rounds.push(await round(sources, i, shards));
      const r = rounds[rounds.length - 1];
      progress(`round ${i}, shards ${shards || 'default'}: upload ${r.uploadS.toFixed(2)} s (${(BYTES / r.uploadS / 1e9).toFixed(2)} GB/s), seal ${r.sealS.toFixed(2)} s; load ${r.load.toFixed(1)}`);
    }
  const best = rounds.reduce((a, b) => (b.uploadS + b.sealS < a.uploadS + a.sealS ? b : a));
  const result = { machine: machine(), host: hostname(), date: new Date().toISOString(), tokens: TOKENS, layers: LAYERS, chunk: CHUNK, inflight: INFLIGHT, via: VIA, shards: SHARDS, warmup: WARMUP, uvThreadpool: POOL || process.env.UV_THREADPOOL_SIZE || 16, window: WINDOW, model, bytes: BYTES, rounds, best };
  const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
  const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `preload-${tag}`);
  writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
  const gbs = (s: number) => (BYTES / s / 1e9).toFixed(2);
  const m = result.machine;
  const lines = [
    `# Preload and seal over loopback (${m.cpu}, ${m.cores} cores)`,
    '',
    `TypeScript client → server in its own process on 127.0.0.1, LMDB store; ${LAYERS} layer(s) × ${TOKENS} tokens × ${model.kvHeads} kv heads × d=${model.headDim}, f16 = ${(BYTES / 1e9).toFixed(2)} GB of K/V, uploads of ${CHUNK} tokens (${((CHUNK * model.kvHeads * model.headDim * 4) / 2 ** 20).toFixed(0)} MiB bodies) ${VIA === 'stream' ? `over the stream, ${WINDOW} unanswered per layer in flight` : 'over HTTP, one at a time per layer in flight'}, ${INFLIGHT} layer(s) in flight, created with the tokens hint, methods: exact only; LMDB block shards ${SHARDS.map((n) => n || "the server's default").join(', ')}${SHARDS.length > 1 ? ' in turn within each round' : ''}, the server's libuv pool ${POOL || process.env.UV_THREADPOOL_SIZE || "16 (kvrecall's default)"}. ${WARMUP ? `${WARMUP} warm-up round(s) first, not shown. ` : ''}Seal = the seal call until durable. Server phases summed over the uploads (from each answer's stats).`,
    '',
    'Seconds; "GB per server CPU s": the K/V bytes over the server process\'s CPU seconds for the uploads (every thread), the cost that moves least with other load.',
    '',
    '| round | shards | load | upload s | upload GB/s | server CPU s | of it main thread | client CPU s | GB per server CPU s | GB per main-thread CPU s | seal s | seal GB/s | read | decode | queue | check | append | write |',
    '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rounds.map((r, i) => `| ${Math.floor(i / SHARDS.length)} | ${r.shards || 'default'} | ${r.load.toFixed(1)} | ${r.uploadS.toFixed(2)} | ${gbs(r.uploadS)} | ${r.serverUploadCpuS.toFixed(2)} | ${r.serverMainCpuS.toFixed(2)} | ${r.clientUploadCpuS.toFixed(2)} | ${gbs(r.serverUploadCpuS)} | ${gbs(r.serverMainCpuS)} | ${r.sealS.toFixed(2)} | ${gbs(r.sealS)} | ${PHASES.map((p) => r.phases[p].toFixed(2)).join(' | ')} |`),
    '',
  ];
  writeFileSync(`${base}.md`, lines.join('\n'));
  console.log(lines.join('\n'));
}

await main();
