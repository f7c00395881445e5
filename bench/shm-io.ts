// node dist/bench/shm-io.js [--calls 2000] [--dir /dev/shm]
//
// Whether the TypeScript client's shared-memory I/O (clients/ts/shm.ts)
// should use fs's synchronous positional calls or the async ones on its hot
// path: a stacked batch of 32 steps' inputs written into a tmpfs file
// (q [32, 32, 128], k and v [32, 8, 128], 32 positions: one pwritev) and
// its answer read back (out [32, 32, 128], lse [32, 32]: one preadv), f32
// and f16 (q and out), timed as the client does it: writevSync/readvSync
// against FileHandle.writev/readv (libuv's pool), the variants alternated
// call by call (A B A B ...) in one sitting. µs per write or read, p50 and
// p90. Results: bench/results/shm-io-<tag>.md (KVRECALL_BENCH_TAG, default vm).
import { open, type FileHandle } from 'node:fs/promises';
import { closeSync, openSync, readvSync, unlinkSync, writeFileSync, writevSync } from 'node:fs';
import { join } from 'node:path';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';

const get = (name: string, def: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
};
const CALLS = Number(get('calls', '2000'));
const DIR = get('dir', '/dev/shm');
const [N, H, KV, D] = [32, 32, 8, 128];

interface Form {
  name: string;
  write: Uint8Array[];
  read: Uint8Array[];
}
const forms: Form[] = [4, 2].map((qb) => ({
  name: qb === 4 ? 'f32' : 'f16',
  write: [new Uint8Array(N * H * D * qb).fill(1), new Uint8Array(N * KV * D * 2).fill(2), new Uint8Array(N * KV * D * 2).fill(3), new Uint8Array(4 * N)],
  read: [new Uint8Array(N * H * D * qb), new Uint8Array(4 * N * H)],
}));

async function main(): Promise<void> {
  const loadAtStart = machine().loadAverage;
  const path = join(DIR, `kvrecall-bench-${process.pid}`);
  const fd = openSync(path, 'wx+', 0o600);
  const handle: FileHandle = await open(path, 'r+');
  unlinkSync(path);
  const bytes = 8 << 20;
  await handle.truncate(bytes);
  const samples: Record<string, number[]> = {};
  const put = (k: string, us: number) => (samples[k] ??= []).push(us);
  for (let i = 0; i < CALLS + 100; i++)
    for (const f of forms) {
      const into = 2 << 20;
      let t0 = performance.now();
      writevSync(fd, f.write, 0);
      const ws = (performance.now() - t0) * 1000;
      t0 = performance.now();
      await handle.writev(f.write, 0);
      const wa = (performance.now() - t0) * 1000;
      t0 = performance.now();
      readvSync(fd, f.read, into);
      const rs = (performance.now() - t0) * 1000;
      t0 = performance.now();
      await handle.readv(f.read, into);
      const ra = (performance.now() - t0) * 1000;
      if (i < 100) continue;
      put(`${f.name} write sync`, ws);
      put(`${f.name} write async`, wa);
      put(`${f.name} read sync`, rs);
      put(`${f.name} read async`, ra);
    }
  closeSync(fd);
  await handle.close();
  const m = machine();
  const q = (xs: number[], p: number) => quantile(xs, p, 'nearest').toFixed(1);
  const rows = Object.entries(samples).map(([k, xs]) => `| ${k} | ${q(xs, 0.5)} | ${q(xs, 0.9)} |`);
  const size = (f: Form, which: 'write' | 'read') => f[which].reduce((n, b) => n + b.byteLength, 0);
  const md = [
    `# Shared-memory I/O of the TypeScript client: sync or async positional calls (${m.cpu}, ${m.cores} cores)`,
    '',
    `\`node dist/bench/shm-io.js --calls ${CALLS} --dir ${DIR}\`, ${new Date().toISOString()}, Node ${process.version}, load average ${loadAtStart} at the start, ${m.loadAverage} at the end (a shared machine). One tmpfs file (unlinked, as the client's segment), a stacked batch of ${N} steps: the inputs written with one pwritev (f32: ${size(forms[0], 'write')} bytes, f16 q: ${size(forms[1], 'write')}), the answer read with one preadv (f32 out: ${size(forms[0], 'read')} bytes, f16: ${size(forms[1], 'read')}), sync (writevSync/readvSync) and async (FileHandle.writev/readv on libuv's pool) alternated call by call; ${CALLS} of each after 100 warm-up. µs per call.`,
    '',
    '| call | p50 µs | p90 µs |',
    '| --- | ---: | ---: |',
    ...rows,
    '',
  ].join('\n');
  console.log(md);
  const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
  writeFileSync(join(import.meta.dirname, '..', '..', 'bench', 'results', `shm-io-${tag}.md`), md);
}

await main();
