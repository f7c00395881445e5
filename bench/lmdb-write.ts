// node dist/bench/lmdb-write.js [--batches 64 --depth 1 --rounds 3 --shards 1,4 --write-back 268435456,0]
//
// The LMDB store's ceiling for a preload's block writes, without the
// network or the server: LmdbStore.writeBlocks of batches as an upload of
// 4096 tokens makes them (64 blocks of 64 tokens x 8 kv heads, K then V:
// 512 values of 32 KiB, 16 MiB), each batch issued once the one `depth`
// batches before it committed (a preload waits for the previous upload's,
// depth 1). GB/s of K/V and the process's CPU seconds (LMDB's write thread
// and the native pool's staging copies included). --shards: the store's
// block environments per document (storage/lmdb-doc-envs.ts), each count once per round, in turn
// (so that other load hits each alike); more than 3 need a libuv pool to
// match (UV_THREADPOOL_SIZE, read at the process's start). --write-back:
// the store's bytes between a loading document's write-backs (0: none),
// each value once per round and shard count, in turn; the seal's flush of
// what is left is timed apart (sync s). Results:
// bench/results/lmdb-write-<tag>.{json,md} (tag: KVRECALL_BENCH_TAG, default vm).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { LmdbStore, WRITE_BACK_BYTES } from '../storage/lmdb-store.js';
import type { BlockWrite } from '../storage/document-store.js';
import { machine } from './decode/machine.js';

const arg = (name: string, def: number) => (process.argv.includes(`--${name}`) ? Number(process.argv[process.argv.indexOf(`--${name}`) + 1]) : def);
const BATCHES = arg('batches', 64), DEPTH = arg('depth', 1), ROUNDS = arg('rounds', 3);
const list = (name: string, def: string) => (process.argv.includes(`--${name}`) ? process.argv[process.argv.indexOf(`--${name}`) + 1] : def).split(',').map(Number);
const SHARDS = list('shards', '1'), WRITE_BACK = list('write-back', String(WRITE_BACK_BYTES));
const HEADS = 8, BLOCK = 64, D = 128, BLOCKS_PER_BATCH = 64;
const BYTES = BATCHES * BLOCKS_PER_BATCH * HEADS * BLOCK * D * 2 * 2;

async function round(shards: number, writeBack: number): Promise<{ shards: number; writeBack: number; seconds: number; cpuS: number; syncS: number; load: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'kvr-lmdb-write-'));
  const { store } = await LmdbStore.open(dir, { shards, writeBack });
  try {
    const model = { layers: 1, qHeads: HEADS, kvHeads: HEADS, headDim: D, dtype: 'f16' as const, blockSize: BLOCK };
    await store.create({ id: 'd', model, status: 'loading', tokens: 0, methods: [], queryStride: 4, createdAt: new Date().toISOString() });
    const k = new Uint8Array(BLOCK * D * 2).fill(3), v = new Uint8Array(BLOCK * D * 2).fill(5);
    const load = loadavg()[0];
    const t0 = performance.now(), c0 = process.cpuUsage();
    const inflight: Promise<void>[] = [];
    for (let u = 0; u < BATCHES; u++) {
      const writes: BlockWrite[] = [];
      for (let b = 0; b < BLOCKS_PER_BATCH; b++) for (let h = 0; h < HEADS; h++) writes.push({ layer: 0, head: h, block: u * BLOCKS_PER_BATCH + b, k, v });
      if (inflight.length >= DEPTH) await inflight.shift();
      inflight.push(store.writeBlocks('d', writes));
    }
    await Promise.all(inflight);
    const c = process.cpuUsage(c0), seconds = (performance.now() - t0) / 1000;
    const s0 = performance.now();
    await store.seal({ id: 'd', model, status: 'ready', tokens: BATCHES * BLOCKS_PER_BATCH * BLOCK, methods: [], queryStride: 4, createdAt: new Date().toISOString() }, [], []);
    return { shards, writeBack, seconds, cpuS: (c.user + c.system) / 1e6, syncS: (performance.now() - s0) / 1000, load };
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const rounds = [];
for (let i = 0; i < ROUNDS; i++)
  for (const shards of SHARDS)
    for (const writeBack of WRITE_BACK) {
      const r = await round(shards, writeBack);
      rounds.push(r);
      process.stderr.write(`[lmdb-write] round ${i}, ${shards} shard(s), write-back ${writeBack}: ${(BYTES / r.seconds / 1e9).toFixed(2)} GB/s, CPU ${r.cpuS.toFixed(2)} s, sync ${r.syncS.toFixed(2)} s; load ${r.load.toFixed(1)}\n`);
    }
const pool = process.env.UV_THREADPOOL_SIZE ?? '4 (default)';
const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `lmdb-write-${tag}`);
const m = machine();
writeFileSync(`${base}.json`, JSON.stringify({ machine: m, date: new Date().toISOString(), batches: BATCHES, depth: DEPTH, bytes: BYTES, uvThreadpool: pool, rounds }, null, 1) + '\n');
const lines = [
  `# LMDB block writes alone (${m.cpu}, ${m.cores} cores)`,
  '',
  `bench/lmdb-write.ts: ${BATCHES} batches of 512 values of 32 KiB (16 MiB, an upload of 4096 tokens × 8 kv heads × d=${D} f16), ${(BYTES / 1e9).toFixed(2)} GB, each issued once the batch ${DEPTH} before it committed; noSync as the server runs it; blocks spread over the given shards (LMDB environments, one writer each; libuv pool ${pool}), the counts in turn within each round; write-back: bytes between a loading document's write-backs (written and dropped from the page cache; 0: none), in turn within each count; sync s: the seal's flush after.`,
  '',
  '| round | shards | write-back | load | GB/s | process CPU s | CPU s per GB | sync s |',
  '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ...rounds.map((r, i) => `| ${Math.floor(i / (SHARDS.length * WRITE_BACK.length))} | ${r.shards} | ${r.writeBack} | ${r.load.toFixed(1)} | ${(BYTES / r.seconds / 1e9).toFixed(2)} | ${r.cpuS.toFixed(2)} | ${(r.cpuS / (BYTES / 1e9)).toFixed(2)} | ${r.syncS.toFixed(2)} |`),
  '',
];
writeFileSync(`${base}.md`, lines.join('\n'));
console.log(lines.join('\n'));
