// node dist/bench/lmdb-write.js [--batches 64 --depth 1 --rounds 3 --shards 1,4]
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
// match (UV_THREADPOOL_SIZE, read at the process's start). Results:
// bench/results/lmdb-write-<tag>.{json,md} (tag: KVRECALL_BENCH_TAG, default vm).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { LmdbStore } from '../storage/lmdb-store.js';
import type { BlockWrite } from '../storage/document-store.js';
import { machine } from './decode/machine.js';

const arg = (name: string, def: number) => (process.argv.includes(`--${name}`) ? Number(process.argv[process.argv.indexOf(`--${name}`) + 1]) : def);
const BATCHES = arg('batches', 64), DEPTH = arg('depth', 1), ROUNDS = arg('rounds', 3);
const SHARDS = (process.argv.includes('--shards') ? process.argv[process.argv.indexOf('--shards') + 1] : '1').split(',').map(Number);
const HEADS = 8, BLOCK = 64, D = 128, BLOCKS_PER_BATCH = 64;
const BYTES = BATCHES * BLOCKS_PER_BATCH * HEADS * BLOCK * D * 2 * 2;

async function round(shards: number): Promise<{ shards: number; seconds: number; cpuS: number; load: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'kvr-lmdb-write-'));
  const { store } = await LmdbStore.open(dir, { shards });
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
    const c = process.cpuUsage(c0);
    return { shards, seconds: (performance.now() - t0) / 1000, cpuS: (c.user + c.system) / 1e6, load };
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const rounds = [];
for (let i = 0; i < ROUNDS; i++)
  for (const shards of SHARDS) {
    const r = await round(shards);
    rounds.push(r);
    process.stderr.write(`[lmdb-write] round ${i}, ${shards} shard(s): ${(BYTES / r.seconds / 1e9).toFixed(2)} GB/s, CPU ${r.cpuS.toFixed(2)} s; load ${r.load.toFixed(1)}\n`);
  }
const pool = process.env.UV_THREADPOOL_SIZE ?? '4 (default)';
const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `lmdb-write-${tag}`);
const m = machine();
writeFileSync(`${base}.json`, JSON.stringify({ machine: m, date: new Date().toISOString(), batches: BATCHES, depth: DEPTH, bytes: BYTES, uvThreadpool: pool, rounds }, null, 1) + '\n');
const lines = [
  `# LMDB block writes alone (${m.cpu}, ${m.cores} cores)`,
  '',
  `bench/lmdb-write.ts: ${BATCHES} batches of 512 values of 32 KiB (16 MiB, an upload of 4096 tokens × 8 kv heads × d=${D} f16), ${(BYTES / 1e9).toFixed(2)} GB, each issued once the batch ${DEPTH} before it committed; noSync as the server runs it; blocks spread over the given shards (LMDB environments, one writer each; libuv pool ${pool}), the counts in turn within each round.`,
  '',
  '| round | shards | load | GB/s | process CPU s |',
  '| ---: | ---: | ---: | ---: | ---: |',
  ...rounds.map((r, i) => `| ${Math.floor(i / SHARDS.length)} | ${r.shards} | ${r.load.toFixed(1)} | ${(BYTES / r.seconds / 1e9).toFixed(2)} | ${r.cpuS.toFixed(2)} |`),
  '',
];
writeFileSync(`${base}.md`, lines.join('\n'));
console.log(lines.join('\n'));
