// npx tsc -p tsconfig.json && node dist/bench/transport-gap.js [--calls 200 --rounds 8 --tokens 4096 --long-tokens 65536 --batch 32 (0: no batch row) --gaps 25 (ms, a list: 1,5,25) --head-dim 64 --ab [pool,loop|loop,pool|inproc]]
//
// Why bench:decode's RPC per call is several times bench:transport's (issue
// #14): bench:transport sends its attends back to back over a 4K-token
// document, so neither process ever waits long; a decode call comes after
// the bench's (or an LLM server's) own work and waits milliseconds for the
// server's. This times one stream attend (exact, 32 q / 8 kv heads, d=64,
// the llama3.2-1b shape, or --head-dim's; server in its own process on 127.0.0.1) in rows
// that differ only in how long the two processes waited before it:
//   back to back (bench:transport's case), the client idle (a timer) each
//   of `gaps` ms before each call, or spinning the longest of them, and a long document whose own server
//   time is that long (bench:decode's case), and a stream batch of `batch`
//   sessions' steps over the short document (a server's running batch).
// Overhead = client wall − server stats.ms. Beside each gap, the bare round
// trips after the same wait: a WebSocket ping on the same stream (no request
// handled) and GET /v1/health on one keep-alive HTTP connection (issue #14's
// yardstick), so each overhead is read against what any call costs then.
// Rows take turns in blocks of calls/rounds, in one sitting.
//
// --ab: two servers side by side, one with every attend on libuv's pool
// (KVRECALL_ATTEND_SYNC_WORK=0 and KVRECALL_GPU_SYNC_US=0, the old way) and one
// with the defaults (a short attend, or a short GPU call on the CUDA backend,
// on the event loop's thread: addon/kernels.ts, addon/device-calls.ts): the attend rows
// of both take turns. Without it, one server with this process's
// environment (set KVRECALL_ATTEND_SYNC_WORK to choose). `--ab loop,pool`
// starts them the other way round (a lane's own bias, e.g. the second
// server's, shows as the rows that run the same code in both differing);
// `--ab inproc` runs one server in this process and sets the way before each
// row's calls (setAttendSyncWork, setGpuSyncUs), so neither has a server
// of its own (the client then shares the server's process and event loop).
// Results: bench/results/transport-gap-<tag>.{md,json} (tag: KVRECALL_BENCH_TAG, default vm).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import type { KvrecallStream } from '../clients/ts/stream.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { ATTEND_SYNC_WORK, setAttendSyncWork } from '../addon/kernels.js';
import { deviceCallRuns, GPU_SYNC_US, setGpuSyncUs } from '../addon/device-calls.js';
import { startServer as startInProcess } from '../api/server.js';
import { parseConfig } from '../core/config.js';
import { bareHealth, startServer } from './transport-rows.js';
import { runInterleaved } from './interleaved.js';

const get = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const CALLS = get('calls', 200), ROUNDS = get('rounds', 8), TOKENS = get('tokens', 4096), LONG = get('long-tokens', 65536), BATCH = get('batch', 32);
const gapsAt = process.argv.indexOf('--gaps');
const GAPS = (gapsAt >= 0 ? process.argv[gapsAt + 1] : '25').split(',').map(Number);
if (GAPS.some((g) => !(g > 0))) throw new Error('--gaps: a list of ms > 0, e.g. 1,5,25');
const GAP = Math.max(...GAPS);
const abAt = process.argv.indexOf('--ab');
const AB = abAt >= 0;
/** The lanes' order (their servers start in it; rows alternate in it): `--ab loop,pool` swaps it, to tell a lane's own bias from the variants'. */
const AB_ORDER = AB && /^(pool,loop|loop,pool)$/.test(process.argv[abAt + 1] ?? '') ? process.argv[abAt + 1].split(',') : ['pool', 'loop'];
/** `--ab inproc`: one server in this process, the two ways taking turns on it (setAttendSyncWork before each row's calls): no lane of its own to bias either. */
const IN_PROCESS = AB && process.argv[abAt + 1] === 'inproc';
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: get('head-dim', 64), dtype: 'f16' as const };
if (!(model.headDim > 0 && model.headDim % 8 === 0)) throw new Error('--head-dim: a multiple of 8');
const progress = (msg: string) => process.stderr.write(`[bench:transport-gap] ${msg}\n`);

async function session(client: KvrecallClient, name: string, n: number): Promise<string> {
  const d = model.headDim, chunk = Math.min(n, 32768);
  // One chunk's random words, sent for every chunk (a body stays under the server's limit).
  const words = new Uint16Array(model.kvHeads * chunk * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));
  await client.createDocument(name, model);
  for (let start = 0; start < n; start += chunk) {
    const c = Math.min(chunk, n - start), w = c === chunk ? words : words.subarray(0, model.kvHeads * c * d);
    await client.uploadDocumentKv(name, { layer: 0, start, k: tensor('f16', [model.kvHeads, c, d], w), v: tensor('f16', [model.kvHeads, c, d], w) });
  }
  await client.sealDocument(name);
  return (await client.createSession({ model, documents: [name], method: 'exact' })).id;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const spin = (ms: number) => {
  const t = performance.now();
  while (performance.now() - t < ms);
};

/** One server (a variant) with its stream and sessions. */
interface Lane {
  name: string;
  env: Record<string, string>;
  server: { url: string; stop(): void | Promise<void> };
  /** Sets this lane's way before each of its calls (the in-process A/B). */
  set?: () => void;
  client: KvrecallClient;
  stream: KvrecallStream;
  short: string;
  /** Sessions over the short document for the batch row. */
  batch: string[];
  long: string;
}

interface Row {
  name: string;
  lane: string;
  /** The wait before each call (ms; 0 back to back) and how it is spent. */
  gap: number;
  before: () => Promise<void> | void;
  /** One call: its overhead (ms) and the server's stats.ms (0 for the bare round trips). */
  call: () => Promise<[number, number]>;
  kind: 'attend' | 'ping' | 'health';
  overhead: number[];
  server: number[];
  /** GPU calls its timed calls made on the loop's thread and on libuv's pool (in this process: --ab inproc's server). */
  gpuCalls: { loop: number; pool: number };
}

async function main(): Promise<void> {
  const loadAtStart = machine().loadAverage;
  const dirs: string[] = [];
  const lanes: Lane[] = [];
  const health: ReturnType<typeof bareHealth>[] = [];
  try {
    const ENV: Record<string, Record<string, string>> = { pool: { KVRECALL_ATTEND_SYNC_WORK: '0', KVRECALL_GPU_SYNC_US: '0' }, loop: {} };
    const variants: { name: string; env: Record<string, string> }[] = AB ? AB_ORDER.map((name) => ({ name, env: ENV[name] })) : [{ name: '', env: {} }];
    if (IN_PROCESS) {
      const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-gap-'));
      dirs.push(dir);
      const running = await startInProcess({ ...parseConfig([], process.env), host: '127.0.0.1', port: 0, dataDir: dir, gpuBudget: Number(process.env.KVRECALL_GPU_BUDGET ?? '0') });
      const server = { url: running.url, stop: () => running.close() };
      const client = new KvrecallClient({ url: server.url });
      const short = await session(client, 'short', TOKENS), long = await session(client, 'long', LONG);
      const batch = await Promise.all(Array.from({ length: BATCH }, async () => (await client.createSession({ model, documents: ['short'], method: 'exact' })).id));
      const stream = await client.openStream();
      for (const name of ['pool', 'loop'])
        lanes.push({ name, env: {}, server, client, short, long, batch, stream, set: () => (setAttendSyncWork(name === 'pool' ? 0 : ATTEND_SYNC_WORK), setGpuSyncUs(name === 'pool' ? 0 : GPU_SYNC_US)) });
    }
    for (const v of IN_PROCESS ? [] : variants) {
      const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-gap-'));
      dirs.push(dir);
      const server = await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir, process.env.KVRECALL_GPU_BUDGET ?? '0', v.env);
      const client = new KvrecallClient({ url: server.url });
      const short = await session(client, 'short', TOKENS), long = await session(client, 'long', LONG);
      const batch = await Promise.all(Array.from({ length: BATCH }, async () => (await client.createSession({ model, documents: ['short'], method: 'exact' })).id));
      lanes.push({ ...v, server, client, short, long, batch, stream: await client.openStream() });
    }
    const hc = (await lanes[0].client.health()) as unknown as { backend?: string; gpu?: { device?: string } };
    // The backend, and its device where it has one (the GPU host's card named in the results).
    const backend = `${hc.backend ?? 'unknown'} backend${hc.gpu?.device ? `, the host's GPU ${hc.gpu.device}` : ''}`;
    const q = tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim).map(() => Math.random() - 0.5));
    const timed = async (f: () => Promise<number>): Promise<[number, number]> => {
      const t = performance.now();
      const server = await f();
      return [performance.now() - t - server, server];
    };
    const attend = (lane: Lane, sid: string) => () => timed(async () => (await lane.stream.attend(sid, { layer: 0, q })).stats.ms);
    const rows: Row[] = [];
    const row = (r: Omit<Row, 'overhead' | 'server' | 'gpuCalls'>) => {
      const set = lanes.find((l) => l.name === r.lane)?.set;
      rows.push({ ...r, ...(set && { before: () => (set(), r.before()) }), overhead: [], server: [], gpuCalls: { loop: 0, pool: 0 } });
    };
    const waits = [0, ...GAPS];
    for (const lane of lanes) {
      const tag = lane.name ? ` [${lane.name}]` : '';
      for (const g of waits)
        row({ name: `${TOKENS} tokens, ${g ? `the client idle ${g} ms (a timer) before each call` : "back to back (bench:transport's case)"}${tag}`, lane: lane.name, gap: g, before: g ? () => sleep(g) : () => undefined, call: attend(lane, lane.short), kind: 'attend' });
      row({ name: `${TOKENS} tokens, the client spinning ${GAP} ms before each call${tag}`, lane: lane.name, gap: -GAP, before: () => spin(GAP), call: attend(lane, lane.short), kind: 'attend' });
      row({ name: `${LONG} tokens, back to back (the server's own time long)${tag}`, lane: lane.name, gap: -1, before: () => undefined, call: attend(lane, lane.long), kind: 'attend' });
      if (BATCH > 0)
        row({
          name: `a batch of ${BATCH} sessions' steps over ${TOKENS} tokens, back to back (overhead = wall − the batch's ms)${tag}`,
          lane: lane.name,
          gap: -2,
          before: () => undefined,
          call: () => timed(async () => (await lane.stream.attendBatch(0, lane.batch.map((session) => ({ session, q })))).ms ?? NaN),
          kind: 'attend',
        });
    }
    // The bare round trips, on the first lane's server (no attend in them: the variants do not differ there).
    const hb = bareHealth(lanes[0].server.url);
    health.push(hb);
    for (const g of waits) {
      const before = g ? () => sleep(g) : () => undefined;
      row({ name: `bare ping on the stream${g ? `, the client idle ${g} ms before each` : ', back to back'}`, lane: '', gap: g, before, call: () => timed(async () => (await lanes[0].stream.ping(), 0)), kind: 'ping' });
      row({ name: `bare GET /v1/health, one keep-alive connection${g ? `, the client idle ${g} ms before each` : ', back to back'}`, lane: '', gap: g, before, call: () => timed(async () => (await hb.call(), 0)), kind: 'health' });
    }
    await runInterleaved(rows, {
      calls: CALLS,
      rounds: ROUNDS,
      timed: async (r) => {
        const calls = deviceCallRuns();
        const [overhead, server] = await r.call();
        const after = deviceCallRuns();
        r.gpuCalls.loop += after.loop - calls.loop;
        r.gpuCalls.pool += after.pool - calls.pool;
        r.overhead.push(overhead);
        r.server.push(server);
      },
      progress,
    });
    const q50 = (xs: number[]) => quantile(xs, 0.5, 'nearest');
    const bare = (kind: Row['kind'], gap: number) => rows.find((r) => r.kind === kind && r.gap === gap);
    const table = rows.map((r) => {
      const ping = bare('ping', r.gap), hl = bare('health', r.gap);
      const o = q50(r.overhead);
      return {
        row: r.name,
        kind: r.kind,
        lane: r.lane,
        gapMs: r.gap,
        calls: r.overhead.length,
        overheadMsP50: o,
        overheadMsP10: quantile(r.overhead, 0.1, 'nearest'),
        overheadMsP90: quantile(r.overhead, 0.9, 'nearest'),
        overheadMsMean: r.overhead.reduce((a, b) => a + b, 0) / r.overhead.length,
        serverMsP50: q50(r.server),
        wallMsP50: q50(r.overhead.map((x, i) => x + r.server[i])),
        ...(IN_PROCESS && r.kind === 'attend' && { gpuCallsLoop: r.gpuCalls.loop, gpuCallsPool: r.gpuCalls.pool }),
        ...(r.kind === 'attend' && ping && { perPingSameWait: o / q50(ping.overhead) }),
        ...(r.kind === 'attend' && hl && { perHealthSameWait: o / q50(hl.overhead) }),
      };
    });
    const m = machine();
    const result = { machine: m, loadAtStart, host: hostname(), date: new Date().toISOString(), backend, model, tokens: TOKENS, longTokens: LONG, gapsMs: GAPS, rounds: ROUNDS, ab: AB, rows: table };
    console.log(JSON.stringify(result, null, 1));
    const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
    const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-gap-${tag}`);
    writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
    const base0 = (lane: string) => table.find((t) => t.kind === 'attend' && t.lane === lane && t.gapMs === 0)!.overheadMsP50;
    const x = (v: number | undefined) => (v === undefined ? '—' : v.toFixed(2));
    writeFileSync(
      `${base}.md`,
      [
        `# A stream attend's overhead after the processes waited (${m.cpu}, ${m.cores} cores, ${backend})`,
        '',
        `TypeScript client, one stream (GET /v1/stream), server ${IN_PROCESS ? 'in the client\'s process' : 'in its own process'} on 127.0.0.1; one layer, ${model.qHeads} q / ${model.kvHeads} kv heads, d=${model.headDim}, method exact, q f32. ${table[0].calls} calls per row after 20 warm-up, the rows taking turns in ${ROUNDS} blocks (one sitting: the ratios are from it). Overhead = client wall − server stats.ms; for the bare rows (a WebSocket ping on the same stream; GET /v1/health on one keep-alive HTTP connection) it is their wall. × ping / × health: the attend's overhead p50 over that bare round trip's p50 after the same wait. Wall = overhead + stats.ms, what the caller waits.${AB ? ` [pool]: every attend on libuv's pool (KVRECALL_ATTEND_SYNC_WORK=0, KVRECALL_GPU_SYNC_US=0); [loop]: the defaults, a short attend or GPU call on the event loop's thread (addon/kernels.ts, addon/device-calls.ts); ${IN_PROCESS ? 'one server in this process, the way set before each row\'s calls' : `servers started, and rows run, in the order ${AB_ORDER.join(', ')}`}.` : ''} Load average at the start ${loadAtStart}, at the end ${m.loadAverage}. ${result.date}.`,
        '',
        '| row | overhead p50 ms | × back to back | × ping, same wait | × health, same wait | p10 | p90 | mean | server stats.ms p50 | wall p50 ms |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
        ...table.map(
          (t) =>
            `| ${t.row} | ${t.overheadMsP50.toFixed(3)} | ${t.kind === 'attend' ? (t.overheadMsP50 / base0(t.lane)).toFixed(2) : '—'} | ${x(t.perPingSameWait)} | ${x(t.perHealthSameWait)} | ${t.overheadMsP10.toFixed(3)} | ${t.overheadMsP90.toFixed(3)} | ${t.overheadMsMean.toFixed(3)} | ${t.kind === 'attend' ? t.serverMsP50.toFixed(2) : '—'} | ${t.wallMsP50.toFixed(3)} |`,
        ),
        '',
        // Where the server's GPU calls waited (the CUDA backend, --ab inproc: its server is this process).
        ...(rows.some((r) => r.gpuCalls.loop + r.gpuCalls.pool > 0)
          ? [`GPU calls of the timed attends, on the event loop's thread / on libuv's pool: ${rows.filter((r) => r.kind === 'attend').map((r) => `${r.name}: ${r.gpuCalls.loop} / ${r.gpuCalls.pool}`).join('; ')}.`, '']
          : []),
      ].join('\n'),
    );
    progress(`wrote ${base}.{md,json}`);
  } finally {
    for (const h of health) h.close();
    for (const l of new Set(lanes.map((x) => x.stream))) l.close();
    for (const stop of new Set(lanes.map((x) => x.server))) await stop.stop();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    process.exit(1);
  },
);
