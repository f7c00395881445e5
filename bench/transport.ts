// npm run bench:transport [-- --calls 500 --tokens 4096 --rounds 5] (-- --stacked: bench/transport-stacked.ts)
//
// What a decode call costs beyond the server's own work, per transport: the
// client's wall time minus the server's stats.ms, p50 over `calls` attends
// (one layer, 32 q / 8 kv heads, d=128, method exact over a 4K-token
// document), for the TypeScript client over HTTP and over the stream, beside
// a bare GET /v1/health on the same keep-alive connection; and a batch of 32
// sessions' steps in one call (over the stream and over HTTP) against one
// step; and the same with q and out in the model's dtype (f16: `outDtype`),
// as an LLM server holding its activations in 16 bits sends them, half the
// bytes. Rows take turns in rounds. The server is a separate
// process on 127.0.0.1. Then the floor under any protocol: bare TCP
// exchanges of the same bytes, back to back and with the peer first waiting
// the server's p50 time for that call (a batch waits ~70 ms on the 2-core
// VM, and a process that waited is slow to wake there). Results:
// bench/results/transport-<host>.{json,md}.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { bareHealth, decodeFixture, startServer } from './transport-rows.js';

const get = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const CALLS = get('calls', 500), TOKENS = get('tokens', 4096), BATCH = 32, ROUNDS = get('rounds', 5);
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
const progress = (msg: string) => process.stderr.write(`[bench:transport] ${msg}\n`);
const p50 = (xs: number[]) => quantile(xs, 0.5, 'nearest');
const p10 = (xs: number[]) => quantile(xs, 0.1, 'nearest');

/** CPU ms (user + system, every thread) a process has used, from /proc (USER_HZ = 100: 10 ms steps). */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) * 10;
}
const ownCpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};
/** Runs `f`, and the CPU ms per call the server and this client spent on it. */
async function metered<T>(pid: number, calls: number, f: () => Promise<T>): Promise<{ value: T; serverCpuMs: number; clientCpuMs: number }> {
  const s0 = cpuMs(pid), c0 = ownCpuMs();
  const value = await f();
  return { value, serverCpuMs: (cpuMs(pid) - s0) / calls, clientCpuMs: (ownCpuMs() - c0) / calls };
}

/**
 * The floor under any protocol: a node:net peer in its own process that
 * answers each `ask` bytes with `answer` bytes (no parsing, no framing),
 * after waiting `pauseMs` (0: at once). With a pause it stands for the
 * server's own time: on a VM a process that waited that long is slow to
 * wake, and loopback moves the bytes slower then (2-core VM: a 271 KB
 * answer's last byte 0.28 ms after the write back to back, 0.6-0.7 ms after
 * 50 ms idle). Per call: wall ms minus the pause the peer actually took.
 */
async function tcpFloor(sizes: [ask: number, answer: number, pauseMs: number, calls: number][]): Promise<number[][]> {
  const peer = spawn(process.execPath, ['-e', `
    const net = require('node:net');
    const server = net.createServer((s) => {
      s.setNoDelay(true);
      let want = 0, answer = null, pause = 0, got = 0, header = Buffer.alloc(0);
      s.on('data', (c) => {
        // Each round trip starts with 12 bytes: the ask's and the answer's lengths, the pause in microseconds.
        if (!answer) { header = Buffer.concat([header, c]); if (header.length < 12) return; want = header.readUInt32LE(0); answer = Buffer.alloc(header.readUInt32LE(4), 1); pause = header.readUInt32LE(8) / 1000; c = header.subarray(12); header = Buffer.alloc(0); }
        got += c.length;
        if (got < want) return;
        const a = answer, t0 = performance.now();
        answer = null; got = 0;
        // The answer's first 8 bytes: the pause taken (ms); most of a pause asleep, its last ms spun for precision.
        const send = () => { while (performance.now() - t0 < pause); a.writeDoubleLE(performance.now() - t0, 0); s.write(a); };
        if (pause > 1.5) setTimeout(send, pause - 1); else send();
      });
    });
    server.listen(0, '127.0.0.1', () => console.log(server.address().port));
  `], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve) => peer.stdout.once('data', (d: Buffer) => resolve(Number(d.toString()))));
  const socket = connect(port, '127.0.0.1');
  socket.setNoDelay(true);
  await new Promise((r) => socket.once('connect', r));
  let expect = 0, got = 0, paused = 0, done: () => void = () => undefined;
  socket.on('data', (c: Buffer) => {
    if (got === 0) paused = c.readDoubleLE(0);
    got += c.byteLength;
    if (got >= expect) done();
  });
  const out: number[][] = [];
  for (const [ask, answer, pauseMs, calls] of sizes) {
    const head = Buffer.alloc(12);
    head.writeUInt32LE(ask, 0);
    head.writeUInt32LE(answer, 4);
    head.writeUInt32LE(Math.round(pauseMs * 1000), 8);
    const body = Buffer.alloc(ask, 2);
    const xs: number[] = [];
    const warm = pauseMs > 10 ? 5 : 20;
    for (let i = 0; i < calls + warm; i++) {
      const t0 = performance.now();
      await new Promise<void>((resolve) => {
        expect = answer;
        got = 0;
        done = resolve;
        socket.cork();
        socket.write(head);
        socket.write(body);
        socket.uncork();
      });
      if (i >= warm) xs.push(performance.now() - t0 - paused);
    }
    out.push(xs);
  }
  socket.destroy();
  peer.kill('SIGKILL');
  return out;
}

async function main(): Promise<void> {
  // The load as the run starts (machine() at the end would give the load the run itself added to).
  const loadAtStart = machine().loadAverage;
  const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-'));
  const server = await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir, process.env.KVRECALL_GPU_BUDGET ?? '0');
  try {
    const client = new KvrecallClient({ url: server.url });
    const d = model.headDim;
    const { sids, q, q16 } = await decodeFixture(client, model, TOKENS, BATCH);
    const body = { layer: 0, q };
    // The same q in f16 (what a 16-bit model holds), the answer's out in f16 too.
    const body16 = { layer: 0, q: q16, outDtype: 'f16' as const };
    const stream = await client.openStream();
    const bare = bareHealth(server.url);
    // Each call's overhead: wall minus the server's time (stats.ms of the step, or of the whole batch); that time kept in lastMs.
    let lastMs = 0;
    const timed = async (call: () => Promise<number | undefined>) => {
      const t0 = performance.now();
      lastMs = (await call()) ?? NaN;
      return performance.now() - t0 - lastMs;
    };
    const httpAttend = () => timed(async () => (await client.attend(sids[0], body)).stats.ms);
    const streamAttend = () => timed(async () => (await stream.attend(sids[0], body)).stats.ms);
    const httpAttend16 = () => timed(async () => (await client.attend(sids[0], body16)).stats.ms);
    const streamAttend16 = () => timed(async () => (await stream.attend(sids[0], body16)).stats.ms);
    const steps = sids.map((session) => ({ session, q }));
    const streamBatch = () => timed(async () => (await stream.attendBatch(0, steps)).ms);
    const httpBatch = () => timed(async () => (await client.attendBatch(0, steps)).ms);
    const steps16 = sids.map((session) => ({ session, q: body16.q, outDtype: body16.outDtype }));
    const streamBatch16 = () => timed(async () => (await stream.attendBatch(0, steps16)).ms);
    const httpBatch16 = () => timed(async () => (await client.attendBatch(0, steps16)).ms);
    const health = async () => {
      lastMs = 0;
      return bare.call();
    };
    const calls = { health, http: httpAttend, stream: streamAttend, batch: streamBatch, httpBatch, http16: httpAttend16, stream16: streamAttend16, batch16: streamBatch16, httpBatch16 };
    type Row = keyof typeof calls;
    // Rows take turns, ROUNDS blocks each (a shared machine's load drifts: no row gets only the quiet or the busy minutes).
    const samples = Object.fromEntries(Object.keys(calls).map((k) => [k, [] as number[]])) as Record<Row, number[]>;
    const serverMs = Object.fromEntries(Object.keys(calls).map((k) => [k, [] as number[]])) as Record<Row, number[]>;
    const cpuSums = Object.fromEntries(Object.keys(calls).map((k) => [k, { serverMs: 0, clientMs: 0 }])) as Record<Row, { serverMs: number; clientMs: number }>;
    progress(`server ${server.url}; ${CALLS} calls per row in ${ROUNDS} rounds`);
    for (const f of Object.values(calls)) for (let i = 0; i < 20; i++) await f(); // warm
    for (let round = 0; round < ROUNDS; round++)
      for (const [name, f] of Object.entries(calls) as [Row, () => Promise<number>][]) {
        const n = Math.ceil(CALLS / ROUNDS);
        const m = await metered(server.pid, n, async () => {
          for (let i = 0; i < n; i++) {
            samples[name].push(await f());
            serverMs[name].push(lastMs);
          }
        });
        cpuSums[name].serverMs += m.serverCpuMs / ROUNDS;
        cpuSums[name].clientMs += m.clientCpuMs / ROUNDS;
      }
    stream.close();
    bare.close();
    // The bytes each call moves (request, answer), and the floor for them: a bare TCP round trip of the same sizes.
    const { packParts } = await import('../clients/ts/msgpack-parts.js');
    const r = await client.attend(sids[0], body);
    const r16 = await client.attend(sids[0], body16);
    const answer = { out: tensor('f32', [model.qHeads, d], r.out), lse: tensor('f32', [model.qHeads], r.lse), stats: r.stats };
    const answer16 = { out: tensor('f16', [model.qHeads, d], r16.out), lse: tensor('f32', [model.qHeads], r16.lse), stats: r16.stats };
    const single = [packParts({ ...body, session: sids[0], id: 1 }).byteLength, packParts({ id: 1, ...answer }).byteLength] as [number, number];
    const batchBytes = [packParts({ layer: 0, steps, id: 1 }).byteLength, packParts({ id: 1, results: sids.map(() => answer), stats: { ms: 1.5 } }).byteLength] as [number, number];
    const single16 = [packParts({ ...body16, session: sids[0], id: 1 }).byteLength, packParts({ id: 1, ...answer16 }).byteLength] as [number, number];
    const batchBytes16 = [packParts({ layer: 0, steps: steps16, id: 1 }).byteLength, packParts({ id: 1, results: sids.map(() => answer16), stats: { ms: 1.5 } }).byteLength] as [number, number];
    // Back to back, and after the server's p50 time for that call (fewer batch calls: each waits ~the batch's time).
    const pauseOf = (row: Row) => p50(serverMs[row]);
    const batchCalls = Math.min(CALLS, 150);
    const [floorSingle, floorBatch, floorSingle16, floorBatch16, pausedSingle, pausedBatch, pausedSingle16, pausedBatch16] = await tcpFloor([
      [...single, 0, CALLS], [...batchBytes, 0, CALLS], [...single16, 0, CALLS], [...batchBytes16, 0, CALLS],
      [...single, pauseOf('stream'), CALLS], [...batchBytes, pauseOf('batch'), batchCalls], [...single16, pauseOf('stream16'), CALLS], [...batchBytes16, pauseOf('batch16'), batchCalls],
    ]);
    const paused = {
      serverMsP50: { stream: pauseOf('stream'), batch: pauseOf('batch'), stream16: pauseOf('stream16'), batch16: pauseOf('batch16') },
      singleMsP50: p50(pausedSingle), batchMsP50: p50(pausedBatch), single16MsP50: p50(pausedSingle16), batch16MsP50: p50(pausedBatch16),
    };
    const { health: healthMs, http, stream: streamed, batch: batchOver, httpBatch: httpBatchOver } = samples;
    const rows = {
      healthMsP50: p50(healthMs),
      httpOverheadMsP50: p50(http),
      streamOverheadMsP50: p50(streamed),
      batchOverheadMsP50: p50(batchOver),
      httpBatchOverheadMsP50: p50(httpBatchOver),
      tcpFloorSingleMsP50: p50(floorSingle),
      tcpFloorBatchMsP50: p50(floorBatch),
    };
    // q and out in f16: the same calls with half the tensor bytes.
    const half = {
      httpOverheadMsP50: p50(samples.http16),
      streamOverheadMsP50: p50(samples.stream16),
      batchOverheadMsP50: p50(samples.batch16),
      httpBatchOverheadMsP50: p50(samples.httpBatch16),
      tcpFloorSingleMsP50: p50(floorSingle16),
      tcpFloorBatchMsP50: p50(floorBatch16),
      httpOverheadMsP10: p10(samples.http16),
      streamOverheadMsP10: p10(samples.stream16),
      batchOverheadMsP10: p10(samples.batch16),
      httpBatchOverheadMsP10: p10(samples.httpBatch16),
    };
    const halfRatios = {
      batchVsSingleStream: half.batchOverheadMsP50 / half.streamOverheadMsP50,
      batchVsSingleStreamF32: half.batchOverheadMsP50 / rows.streamOverheadMsP50,
      httpBatchVsSingleHttp: half.httpBatchOverheadMsP50 / half.httpOverheadMsP50,
      tcpFloorBatchVsSingle: half.tcpFloorBatchMsP50 / half.tcpFloorSingleMsP50,
      tcpFloorBatchVsSingleF32: half.tcpFloorBatchMsP50 / rows.tcpFloorSingleMsP50,
    };
    // Less moved by other load than p50 on a shared machine: the 10th percentile, and CPU ms per call
    // (server process, every thread, the engine's work included; this client).
    const p10s = { healthMsP10: p10(healthMs), httpOverheadMsP10: p10(http), streamOverheadMsP10: p10(streamed), batchOverheadMsP10: p10(batchOver), httpBatchOverheadMsP10: p10(httpBatchOver) };
    const cpu = cpuSums;
    const result = { machine: machine(), loadAtStart, host: hostname(), date: new Date().toISOString(), calls: CALLS, tokens: TOKENS, model, batch: BATCH, ...rows, httpVsHealth: rows.httpOverheadMsP50 / rows.healthMsP50, streamVsHealth: rows.streamOverheadMsP50 / rows.healthMsP50, batchVsSingleStream: rows.batchOverheadMsP50 / rows.streamOverheadMsP50, httpBatchVsSingleHttp: rows.httpBatchOverheadMsP50 / rows.httpOverheadMsP50, tcpFloorBatchVsSingle: rows.tcpFloorBatchMsP50 / rows.tcpFloorSingleMsP50, bytes: { single, batch: batchBytes, single16, batch16: batchBytes16 }, rounds: ROUNDS, ...p10s, cpuPerCall: cpu, f16: { ...half, ...halfRatios }, pausedFloor: paused };
    console.log(JSON.stringify(result, null, 1));
    const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
    const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-${tag}`);
    writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
    const m = result.machine;
    writeFileSync(
      `${base}.md`,
      [
        `# Decode-call overhead per transport (${m.cpu}, ${m.cores} cores)`,
        '',
        `TypeScript client, server in its own process on 127.0.0.1, ${CALLS} calls per row after 20 warm-up, the rows taking turns in ${ROUNDS} rounds (one run: every ratio below is from it); one layer, ${model.qHeads} q / ${model.kvHeads} kv heads, d=${d}, method exact over ${TOKENS} tokens. Overhead = client wall − server stats.ms, p50. Load average at the start: ${loadAtStart}, at the end ${m.loadAverage} (a shared machine moves every number).`,
        '',
        'p10: the 10th percentile of the same calls; CPU ms per call: the server process (every thread, its engine work included) and this client.',
        '',
        '| transport | p50 ms | × bare health | p10 ms | p10 × bare health | server CPU ms/call | client CPU ms/call |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
        `| bare GET /v1/health (same keep-alive connection) | ${rows.healthMsP50.toFixed(3)} | 1.00 | ${p10s.healthMsP10.toFixed(3)} | 1.00 | ${cpu.health.serverMs.toFixed(3)} | ${cpu.health.clientMs.toFixed(3)} |`,
        `| HTTP attend | ${rows.httpOverheadMsP50.toFixed(3)} | ${result.httpVsHealth.toFixed(2)} | ${p10s.httpOverheadMsP10.toFixed(3)} | ${(p10s.httpOverheadMsP10 / p10s.healthMsP10).toFixed(2)} | ${cpu.http.serverMs.toFixed(3)} | ${cpu.http.clientMs.toFixed(3)} |`,
        `| stream attend | ${rows.streamOverheadMsP50.toFixed(3)} | ${result.streamVsHealth.toFixed(2)} | ${p10s.streamOverheadMsP10.toFixed(3)} | ${(p10s.streamOverheadMsP10 / p10s.healthMsP10).toFixed(2)} | ${cpu.stream.serverMs.toFixed(3)} | ${cpu.stream.clientMs.toFixed(3)} |`,
        `| stream batch of ${BATCH} sessions (one call) | ${rows.batchOverheadMsP50.toFixed(3)} | ${(rows.batchOverheadMsP50 / rows.healthMsP50).toFixed(2)} (${result.batchVsSingleStream.toFixed(2)}× one stream attend) | ${p10s.batchOverheadMsP10.toFixed(3)} | ${(p10s.batchOverheadMsP10 / p10s.healthMsP10).toFixed(2)} (${(p10s.batchOverheadMsP10 / p10s.streamOverheadMsP10).toFixed(2)}× one stream attend) | ${cpu.batch.serverMs.toFixed(3)} | ${cpu.batch.clientMs.toFixed(3)} |`,
        `| HTTP batch of ${BATCH} sessions (one call) | ${rows.httpBatchOverheadMsP50.toFixed(3)} | ${(rows.httpBatchOverheadMsP50 / rows.healthMsP50).toFixed(2)} (${result.httpBatchVsSingleHttp.toFixed(2)}× one HTTP attend) | ${p10s.httpBatchOverheadMsP10.toFixed(3)} | ${(p10s.httpBatchOverheadMsP10 / p10s.healthMsP10).toFixed(2)} (${(p10s.httpBatchOverheadMsP10 / p10s.httpOverheadMsP10).toFixed(2)}× one HTTP attend) | ${cpu.httpBatch.serverMs.toFixed(3)} | ${cpu.httpBatch.clientMs.toFixed(3)} |`,
        `| HTTP attend, f16 q and out | ${half.httpOverheadMsP50.toFixed(3)} | ${(half.httpOverheadMsP50 / rows.healthMsP50).toFixed(2)} | ${half.httpOverheadMsP10.toFixed(3)} | ${(half.httpOverheadMsP10 / p10s.healthMsP10).toFixed(2)} | ${cpu.http16.serverMs.toFixed(3)} | ${cpu.http16.clientMs.toFixed(3)} |`,
        `| stream attend, f16 q and out | ${half.streamOverheadMsP50.toFixed(3)} | ${(half.streamOverheadMsP50 / rows.healthMsP50).toFixed(2)} | ${half.streamOverheadMsP10.toFixed(3)} | ${(half.streamOverheadMsP10 / p10s.healthMsP10).toFixed(2)} | ${cpu.stream16.serverMs.toFixed(3)} | ${cpu.stream16.clientMs.toFixed(3)} |`,
        `| stream batch of ${BATCH}, f16 q and out | ${half.batchOverheadMsP50.toFixed(3)} | ${(half.batchOverheadMsP50 / rows.healthMsP50).toFixed(2)} (${halfRatios.batchVsSingleStream.toFixed(2)}× one f16 stream attend, ${halfRatios.batchVsSingleStreamF32.toFixed(2)}× one f32) | ${half.batchOverheadMsP10.toFixed(3)} | ${(half.batchOverheadMsP10 / p10s.healthMsP10).toFixed(2)} (${(half.batchOverheadMsP10 / half.streamOverheadMsP10).toFixed(2)}× one f16 stream attend) | ${cpu.batch16.serverMs.toFixed(3)} | ${cpu.batch16.clientMs.toFixed(3)} |`,
        `| HTTP batch of ${BATCH}, f16 q and out | ${half.httpBatchOverheadMsP50.toFixed(3)} | ${(half.httpBatchOverheadMsP50 / rows.healthMsP50).toFixed(2)} (${halfRatios.httpBatchVsSingleHttp.toFixed(2)}× one f16 HTTP attend) | ${half.httpBatchOverheadMsP10.toFixed(3)} | ${(half.httpBatchOverheadMsP10 / p10s.healthMsP10).toFixed(2)} (${(half.httpBatchOverheadMsP10 / half.httpOverheadMsP10).toFixed(2)}× one f16 HTTP attend) | ${cpu.httpBatch16.serverMs.toFixed(3)} | ${cpu.httpBatch16.clientMs.toFixed(3)} |`,
        '',
        `The floor under any protocol: a bare TCP round trip (node:net, a peer process answering a fixed number of bytes, no parsing) of a single call's sizes (${single[0]} bytes out, ${single[1]} back) takes ${rows.tcpFloorSingleMsP50.toFixed(3)} ms p50, of a batch's (${batchBytes[0]} out, ${batchBytes[1]} back) ${rows.tcpFloorBatchMsP50.toFixed(3)} ms (${result.tcpFloorBatchVsSingle.toFixed(2)}×): moving the batch's bytes alone costs ${(rows.tcpFloorBatchMsP50 - rows.tcpFloorSingleMsP50).toFixed(3)} ms more than a single call's. With f16 q and out: a single call ${single16[0]} out, ${single16[1]} back, ${half.tcpFloorSingleMsP50.toFixed(3)} ms; a batch ${batchBytes16[0]} out, ${batchBytes16[1]} back, ${half.tcpFloorBatchMsP50.toFixed(3)} ms (${halfRatios.tcpFloorBatchVsSingle.toFixed(2)}× the f16 single, ${halfRatios.tcpFloorBatchVsSingleF32.toFixed(2)}× the f32 single).`,
        '',
        `The floor after the server's time: the same peer waiting, before it answers, the server's p50 time for the call (so both ends wait as they do here: on this VM a process that waited is slow to wake, and the bytes move slower then): a single f16 call (${paused.serverMsP50.stream16.toFixed(2)} ms pause) ${paused.single16MsP50.toFixed(3)} ms beyond the pause, a batch of ${BATCH} f16 (${paused.serverMsP50.batch16.toFixed(1)} ms pause) ${paused.batch16MsP50.toFixed(3)} ms (${(paused.batch16MsP50 / paused.single16MsP50).toFixed(2)}×); f32: ${paused.singleMsP50.toFixed(3)} and ${paused.batchMsP50.toFixed(3)} ms (${(paused.batchMsP50 / paused.singleMsP50).toFixed(2)}×). Overhead above that floor: one f16 stream attend ${(half.streamOverheadMsP50 - paused.single16MsP50).toFixed(3)} ms, the f16 stream batch ${(half.batchOverheadMsP50 - paused.batch16MsP50).toFixed(3)} ms; f32 ${(rows.streamOverheadMsP50 - paused.singleMsP50).toFixed(3)} and ${(rows.batchOverheadMsP50 - paused.batchMsP50).toFixed(3)} ms.`,
        '',
      ].join('\n'),
    );
    progress(`wrote ${base}.{json,md}`);
  } finally {
    server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

// --stacked: the stacked batch through the shared-memory segment against one stream attend (bench/transport-stacked.ts).
if (process.argv.includes('--stacked')) await (await import('./transport-stacked.js')).stackedMain();
else await main();
