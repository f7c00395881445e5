// npm run bench:transport -- --stacked [--calls 300 --tokens 4096]
//
// Issue #14's batch target for the TypeScript client: a batch of 32
// sessions' steps through the stream's shared-memory segment
// (KvrecallStream.attendStacked: one stacked frame, q, k, v and positions
// written into the segment, out and lse read back) against one stream
// attend, f32 and f16 (q and out). Each call is one decode step: q, the new
// token's k and v (f16) and its position, on sessions of the row's own over
// one `exact` document of `tokens` tokens (one layer, 32 q / 8 kv heads,
// d=128). The rows are alternated call by call (every row once a round, in a
// fresh random order each round) in one process
// against one server (its own process on 127.0.0.1, --shm-dir /dev/shm),
// over one stream with a segment attached. Overhead = client wall − the
// server's stats.ms (a batch: its whole ms), p50; client CPU = this
// process's CPU time over the call, p50; and the stacked rows' two copies
// through the segment's file (StackedPlan's write and read, timed where
// they run in the call), p50. Each run is one sitting, appended
// to bench/results/transport-<tag>-ts-stacked.json (KVRECALL_BENCH_TAG,
// default vm) and the .md rewritten from every sitting there.
import { execSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor, type Tensor } from '../clients/ts/client.js';
import { StackedPlan } from '../clients/ts/stacked.js';
import type { KvrecallStream } from '../clients/ts/stream.js';
import { machine, type Machine } from './decode/machine.js';
import { quantile } from './stats.js';

/** The tree a sitting ran: git's commit and changed files; where there is no git (a snapshot on the device host), KVRECALL_BENCH_REV or 'unknown'. */
function treeState(): { commit: string; dirty: string[] } {
  const cwd = join(import.meta.dirname, '..', '..');
  try {
    const opts = { cwd, stdio: ['ignore', 'pipe', 'ignore'] as ['ignore', 'pipe', 'ignore'] };
    return { commit: execSync('git rev-parse --short HEAD', opts).toString().trim(), dirty: execSync('git diff --name-only HEAD', opts).toString().split('\n').filter(Boolean) };
  } catch {
    return { commit: process.env.KVRECALL_BENCH_REV ?? 'unknown (no git)', dirty: [] };
  }
}
import { decodeFixture, startServer } from './transport-rows.js';

const get = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const CALLS = get('calls', 300), TOKENS = get('tokens', 4096), WARMUP = 30, BATCH = 32;
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
const progress = (msg: string) => process.stderr.write(`[bench:transport --stacked] ${msg}\n`);
const p50 = (xs: number[]) => quantile(xs, 0.5, 'nearest');

/** The rows, in the order they take turns. */
const ROWS = ['stream attend', 'stream attend f16', 'stacked(32)', 'stacked(32) into', 'stacked(32) f16', 'stream batch(32)'] as const;
type Row = (typeof ROWS)[number];

interface Sitting {
  date: string;
  commit: string;
  /** Tracked files changed in the working tree the run was built from (others' work in progress on a shared tree). */
  dirty: string[];
  machine: Machine;
  loadAtStart: number;
  loadAtEnd: number;
  calls: number;
  tokens: number;
  overheadUsP50: Record<Row, number>;
  serverMsP50: Record<Row, number>;
  clientCpuUsP50: Record<Row, number>;
  /** The stacked rows' copies through the segment's file within the call (µs, p50): inputs written, answer read. */
  copiesUsP50?: Partial<Record<Row, { write: number; read: number }>>;
}

/** `n` copies of one step's bytes, one after another: a stacked array [n, ...shape]. */
function stack(t: Tensor, n: number): Tensor {
  const data = new Uint8Array(n * t.data.byteLength);
  for (let i = 0; i < n; i++) data.set(t.data, i * t.data.byteLength);
  return { dtype: t.dtype, shape: [n, ...t.shape], data };
}

async function rowCalls(client: KvrecallClient, stream: KvrecallStream, q: Tensor, q16: Tensor): Promise<Record<Row, () => Promise<number | undefined>>> {
  const { kvHeads, headDim: d, qHeads } = model;
  const words = new Uint16Array(kvHeads * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));
  const k = tensor('f16', [kvHeads, d], words), v = tensor('f16', [kvHeads, d], words);
  const sessions = async (n: number) => {
    const out: string[] = [];
    for (let i = 0; i < n; i++) out.push((await client.createSession({ model, documents: ['doc'], method: 'exact' })).id);
    return out;
  };
  const [one, one16] = [(await sessions(1))[0], (await sessions(1))[0]];
  const [b32, b32into, b32f16, bytes32] = [await sessions(BATCH), await sessions(BATCH), await sessions(BATCH), await sessions(BATCH)];
  const [qs, qs16, ks, vs] = [stack(q, BATCH), stack(q16, BATCH), stack(k, BATCH), stack(v, BATCH)];
  // Each row's next position (its sessions' own tokens): every call appends one.
  const at: Record<string, number> = {};
  const next = (row: string) => (at[row] = (at[row] ?? -1) + 1);
  const positions = new Int32Array(BATCH);
  const out = new Float32Array(BATCH * qHeads * d), lse = new Float32Array(BATCH * qHeads);
  const stacked = async (row: Row, names: string[], qt: Tensor, opts: { outDtype?: 'f16'; out?: Float32Array; lse?: Float32Array }) => {
    positions.fill(next(row));
    const r = await stream.attendStacked(0, names, qt, ks, vs, positions, opts);
    if (r.errors.length) throw new Error(`${row}: ${JSON.stringify(r.errors[0])}`);
    return r.ms;
  };
  return {
    'stream attend': async () => (await stream.attend(one, { layer: 0, q, k, v, position: next('one') })).stats.ms,
    'stream attend f16': async () => (await stream.attend(one16, { layer: 0, q: q16, outDtype: 'f16', k, v, position: next('one16') })).stats.ms,
    'stacked(32)': () => stacked('stacked(32)', b32, qs, {}),
    'stacked(32) into': () => stacked('stacked(32) into', b32into, qs, { out, lse }),
    'stacked(32) f16': () => stacked('stacked(32) f16', b32f16, qs16, { outDtype: 'f16' }),
    'stream batch(32)': async () => {
      const position = next('bytes');
      return (await stream.attendBatch(0, bytes32.map((session) => ({ session, q, k, v, position })))).ms;
    },
  };
}

/** The last stacked call's copies through the file (µs): StackedPlan's write and read, timed where they run. */
const copies = { write: NaN, read: NaN };
function timeCopies(): void {
  const proto = StackedPlan.prototype as unknown as Record<'write' | 'read', (...a: unknown[]) => unknown>;
  for (const name of ['write', 'read'] as const) {
    const f = proto[name];
    proto[name] = function (this: unknown, ...a: unknown[]) {
      const t0 = performance.now();
      const r = f.apply(this, a);
      copies[name] = (performance.now() - t0) * 1000;
      return r;
    };
  }
}

async function main(): Promise<void> {
  timeCopies();
  const loadAtStart = machine().loadAverage;
  const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-stacked-'));
  const server = await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir, process.env.KVRECALL_GPU_BUDGET ?? '0');
  try {
    const client = new KvrecallClient({ url: server.url });
    const { q, q16 } = await decodeFixture(client, model, TOKENS, 0);
    const stream = await client.openStream();
    await stream.attachShm({ bytes: 16 << 20 });
    const calls = await rowCalls(client, stream, q, q16);
    const overhead = Object.fromEntries(ROWS.map((r) => [r, [] as number[]])) as Record<Row, number[]>;
    const serverMs = Object.fromEntries(ROWS.map((r) => [r, [] as number[]])) as Record<Row, number[]>;
    const cpu = Object.fromEntries(ROWS.map((r) => [r, [] as number[]])) as Record<Row, number[]>;
    const copied = Object.fromEntries(ROWS.map((r) => [r, { write: [] as number[], read: [] as number[] }])) as Record<Row, { write: number[]; read: number[] }>;
    progress(`server ${server.url}; ${CALLS} calls per row after ${WARMUP} warm-up, rows alternated call by call`);
    const order = ROWS.slice();
    for (let i = 0; i < WARMUP + CALLS; i++) {
      // Every row once a round, in a fresh order: no row always follows the same one (a call after a batch's
      // ~70 ms wait finds this VM's processes slow to wake, which a fixed order would charge to one row).
      for (let j = order.length - 1; j > 0; j--) {
        const r = Math.floor(Math.random() * (j + 1));
        [order[j], order[r]] = [order[r], order[j]];
      }
      for (const row of order) {
        const c0 = process.cpuUsage(), t0 = performance.now();
        const ms = (await calls[row]()) ?? NaN;
        const wall = performance.now() - t0, c = process.cpuUsage(c0);
        if (i < WARMUP) continue;
        overhead[row].push((wall - ms) * 1000);
        serverMs[row].push(ms);
        cpu[row].push(c.user + c.system);
        if (row.startsWith('stacked')) {
          copied[row].write.push(copies.write);
          copied[row].read.push(copies.read);
        }
      }
      if ((i + 1) % 100 === 0) progress(`${i + 1}/${WARMUP + CALLS}`);
    }
    stream.close();
    const each = (xs: Record<Row, number[]>) => Object.fromEntries(ROWS.map((r) => [r, p50(xs[r])])) as Record<Row, number>;
    const sitting: Sitting = {
      date: new Date().toISOString(),
      ...treeState(),
      machine: machine(),
      loadAtStart,
      loadAtEnd: machine().loadAverage,
      calls: CALLS,
      tokens: TOKENS,
      overheadUsP50: each(overhead),
      serverMsP50: each(serverMs),
      clientCpuUsP50: each(cpu),
      copiesUsP50: Object.fromEntries(ROWS.filter((r) => r.startsWith('stacked')).map((r) => [r, { write: p50(copied[r].write), read: p50(copied[r].read) }])),
    };
    console.log(JSON.stringify(sitting, null, 1));
    const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
    const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-${tag}-ts-stacked`);
    const sittings: Sitting[] = existsSync(`${base}.json`) ? (JSON.parse(readFileSync(`${base}.json`, 'utf8')) as { sittings: Sitting[] }).sittings : [];
    sittings.push(sitting);
    writeFileSync(`${base}.json`, JSON.stringify({ sittings }, null, 1) + '\n');
    writeFileSync(`${base}.md`, report(sittings));
    progress(`wrote ${base}.{json,md}`);
  } finally {
    server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

function report(sittings: Sitting[]): string {
  const m = sittings[0].machine;
  const cols = sittings.map((_, i) => String(i + 1));
  const head = (first: string) => [`| ${first} | ${cols.join(' | ')} |`, `| --- |${cols.map(() => ' ---: |').join('')}`];
  const table = (pick: (s: Sitting, r: Row) => string) => ROWS.map((r) => `| ${r} | ${sittings.map((s) => pick(s, r)).join(' | ')} |`);
  const ratio = (s: Sitting, a: Row, b: Row) => `${(s.overheadUsP50[a] / s.overheadUsP50[b]).toFixed(2)}×`;
  return [
    `# TypeScript client: the stacked batch through the shared-memory segment (issue #14's batch target), ${m.cpu}, ${m.cores} cores`,
    '',
    `\`npm run bench:transport -- --stacked --calls N\` (bench/transport-stacked.ts). TypeScript client, Node ${m.node}, server (cpu backend, ${m.nativeThreads} native threads) in its own process on 127.0.0.1 with --shm-dir /dev/shm; one stream with a 16 MiB segment attached. One layer, ${model.qHeads} q / ${model.kvHeads} kv heads, d=${model.headDim}, \`exact\` over a ${sittings[0].tokens}-token document; each call is one decode step per session: q f32 (f16 rows: q and out f16), the new token's k and v f16 and its position, each row on sessions of its own. Rows alternated call by call: every row once a round, in a fresh random order each round (so no row always follows a batch's long wait), ${WARMUP} warm-up rounds. Overhead = client wall − the server's stats.ms (a batch: its whole ms), p50 in µs; client CPU = this process's user + system time over the call (every thread of it, the kernel's socket and file work included), p50 in µs. Server and client ran from dist/ as the shared tree's latest build left it (the commit and the files changed in the tree are listed per sitting).`,
    '',
    'Rows:',
    '- `stream attend`, `stream attend f16`: one stream attend (bytes), the ratios\' unit;',
    '- `stacked(32)`: `stream.attendStacked(0, sessions, q [32, 32, 128], k, v [32, 8, 128], positions)`: q, k, v and positions written into the segment (one pwritev), one stacked frame, out and lse read back (one preadv) into new arrays; `into`: into the caller\'s arrays; `f16`: q f16 and `outDtype: \'f16\'`;',
    '- `stream batch(32)`: `stream.attendBatch` of the same 32 steps in bytes (the byte form, for comparison).',
    '',
    'Sittings (load average at start–end; the commit run, and the tracked files others had changed in the shared working tree it was built from):',
    '',
    '| sitting | UTC | load | commit | changed in the tree | calls per row |',
    '| --- | --- | --- | --- | --- | ---: |',
    ...sittings.map((s, i) => `| ${i + 1} | ${s.date.slice(0, 16).replace('T', ' ')} | ${s.loadAtStart}–${s.loadAtEnd} | ${s.commit} | ${(s.dirty ?? []).join(', ') || '—'} | ${s.calls} |`),
    '',
    'Overhead p50 (µs):',
    '',
    ...head('row'),
    ...table((s, r) => s.overheadUsP50[r].toFixed(0)),
    '',
    'Client CPU p50 (µs):',
    '',
    ...head('row'),
    ...table((s, r) => s.clientCpuUsP50[r].toFixed(0)),
    '',
    'The stacked rows\' two copies through the segment\'s file within the call, p50 µs (the inputs\' pwritev / the answer\'s preadv, timed around StackedPlan.write and read; after the batch\'s wait the caches are cold, so these take more than bench/results/shm-io-vm.md\'s back-to-back copies):',
    '',
    ...head('row'),
    ...ROWS.filter((r) => r.startsWith('stacked')).map((r) => `| ${r} | ${sittings.map((s) => (s.copiesUsP50?.[r] ? `${s.copiesUsP50[r]!.write.toFixed(0)} / ${s.copiesUsP50[r]!.read.toFixed(0)}` : '—')).join(' | ')} |`),
    '',
    'Server ms p50:',
    '',
    ...head('row'),
    ...table((s, r) => s.serverMsP50[r].toFixed(2)),
    '',
    'A batch of 32\'s overhead over one stream attend\'s (issue #14: ≤ 2×):',
    '',
    ...head('ratio'),
    `| stacked(32) / stream attend | ${sittings.map((s) => ratio(s, 'stacked(32)', 'stream attend')).join(' | ')} |`,
    `| stacked(32) into / stream attend | ${sittings.map((s) => ratio(s, 'stacked(32) into', 'stream attend')).join(' | ')} |`,
    `| stacked(32) f16 / stream attend f16 | ${sittings.map((s) => ratio(s, 'stacked(32) f16', 'stream attend f16')).join(' | ')} |`,
    `| stream batch(32) / stream attend | ${sittings.map((s) => ratio(s, 'stream batch(32)', 'stream attend')).join(' | ')} |`,
    '',
  ].join('\n');
}

export { main as stackedMain };
