// npx tsc -p tsconfig.json && node dist/bench/transport-dim.js [--head-dims 64,128 --tokens 16,256,512,1024,2048,4096 --holds 0.1,0.3,0.5,0.7,1 --poll-us 1000 --spin-ms 2 --ahead-ms 0.2 --calls 150 --rounds 5 --floor 1]
//
// Why one stream attend's RPC (client wall − server stats.ms) was 0.086 ms
// at the llama3.2-1b shape (d=64: q and out 8 KiB each way) and 0.278 ms at
// the llama3-8b shape (d=128: 16 KiB each way) in one H200 sitting (issue
// #13; bench/results/decode-full-*-h200-*-cs16-poll.md), where the 8b
// shape's server step was longer too (0.65 against 0.48 ms). Two things
// changed at once: the bytes, and how long the client slept waiting. This
// bench moves them apart, in one sitting:
//   kvrecall rows: one decode-shaped stream attend (q f32 [Q,d], k and v
//   f16 [K,d] appended, method exact, server in its own process with
//   --poll-us) over documents of `tokens` (given for the first head dim;
//   the others get the same K/V bytes, so about the same CPU step), the
//   client asleep while it waits (openStream()), polling (spinMs), or
//   asleep but woken `ahead-ms` before the answer is due and polling from
//   then (what polling costs a core for, bought with a fraction of it);
//   floor rows: no kvrecall, two node:net processes moving frames of the
//   same sizes per head dim, the peer spinning each of `holds` ms before it
//   answers (a step on the loop's thread) and polling after (as --poll-us).
// Bytes matter where a row's RPC moves with d at one step time; the wait
// matters where it moves with the step time at one d. Beside each row, the
// voluntary context switches per call of both processes' main threads (a
// sleep in epoll_wait is one): a message taken in two wake-ups shows as
// more than one per call; and the client's CPU per call (what polling costs).
// Results: bench/results/transport-dim-<tag>.{md,json} (tag: KVRECALL_BENCH_TAG, default vm).
import { fork } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import { packParts } from '../clients/ts/msgpack-parts.js';
import type { KvrecallStream } from '../clients/ts/stream.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { startServer } from './transport-rows.js';
import { tcpLink } from './tcp-link.js';

const arg = (name: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const num = (name: string, def: number) => Number(arg(name) ?? def);
const list = (name: string, def: string) => (arg(name) ?? def).split(',').map(Number);
const DIMS = list('head-dims', '64,128'), TOKENS = list('tokens', '16,256,512,1024,2048,4096'), HOLDS = list('holds', '0.1,0.3,0.5,0.7,1');
const Q = num('q-heads', 32), K = num('kv-heads', 8), POLL_US = num('poll-us', 1000), SPIN_MS = num('spin-ms', 2), AHEAD_MS = num('ahead-ms', 0.2);
const CALLS = num('calls', 150), ROUNDS = num('rounds', 5), FLOOR = num('floor', 1) !== 0;
if (DIMS.some((d) => !(d > 0 && d % 8 === 0)) || TOKENS.some((t) => !(t >= 16)) || HOLDS.some((t) => !(t >= 0))) throw new Error('--head-dims: multiples of 8; --tokens: 16 or more; --holds: ms ≥ 0');
const progress = (msg: string) => process.stderr.write(`[bench:transport-dim] ${msg}\n`);
const spin = (ms: number) => {
  const t = performance.now();
  while (performance.now() - t < ms);
};

/** Voluntary context switches of a process's main thread so far (-1 where /proc does not say). */
function sleeps(pid: number): number {
  try {
    const m = /voluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : -1;
  } catch {
    return -1;
  }
}

/**
 * Wakes this process's loop `ms` from now: a worker's timed Atomics.wait,
 * then a message to the main thread (node's timers are whole milliseconds).
 * One wake outstanding: a later after() supersedes an earlier one (its
 * callback is dropped; the worker may still be sleeping out the old wait,
 * which delays the new one).
 */
class Waker {
  private readonly worker = new Worker(
    `const { parentPort, workerData } = require('node:worker_threads');
     const i32 = new Int32Array(workerData);
     parentPort.on('message', ([seq, ms]) => { if (ms > 0) Atomics.wait(i32, 0, 0, ms); parentPort.postMessage(seq); });`,
    { eval: true, workerData: new SharedArrayBuffer(4) },
  );
  private seq = 0;
  private due?: { seq: number; fn: () => void };

  constructor() {
    this.worker.unref();
    this.worker.on('message', (seq: number) => {
      const d = this.due;
      if (d?.seq !== seq) return;
      this.due = undefined;
      d.fn();
    });
  }

  after(ms: number, fn: () => void): void {
    this.due = { seq: ++this.seq, fn };
    this.worker.postMessage([this.seq, ms]);
  }

  close(): void {
    void this.worker.terminate();
  }
}

/** Keeps the loop polling (a setImmediate a turn: libuv polls with a zero timeout) while `pending()`, for at most `capMs`. */
function pollWhile(pending: () => boolean, capMs: number): void {
  const until = performance.now() + capMs;
  const turn = () => {
    if (pending() && performance.now() < until) setImmediate(turn);
  };
  setImmediate(turn);
}

/**
 * The 'ahead' client: asleep while it waits, but woken `AHEAD_MS` before the
 * answer is due (the shortest of the row's last 3 wall times) and polling
 * from then until it comes: the wake-up's cost paid while the server still
 * works, the polling a fraction of the wait. No wake before a row's first call.
 */
function wokenAhead(waker: Waker, call: () => Promise<[number, number]>): () => Promise<[number, number]> {
  const walls: number[] = [];
  return async () => {
    let pending = true;
    if (walls.length > 0) waker.after(Math.max(0, Math.min(...walls) - AHEAD_MS), () => pollWhile(() => pending, AHEAD_MS + Math.max(SPIN_MS, 1)));
    try {
      const [rpc, ms] = await call();
      walls.push(rpc + ms);
      if (walls.length > 3) walls.shift();
      return [rpc, ms];
    } finally {
      pending = false;
    }
  };
}

/**
 * The floor's peer: per connection a 12-byte preamble (request bytes,
 * answer bytes, hold µs, little-endian u32), then each whole request is
 * answered after spinning the hold; `hot`: its loop polls (a setImmediate
 * chain) for 1 ms after each answer, as the server's does under --poll-us.
 */
function peer(hot: boolean): void {
  let hotUntil = 0;
  const loop = () => {
    if (performance.now() < hotUntil) setImmediate(loop);
  };
  const server = createServer((s) => {
    s.setNoDelay(true);
    let pre = Buffer.alloc(0), req = 0, answer = Buffer.alloc(0), hold = 0, got = 0;
    s.on('data', (d: Buffer) => {
      if (req === 0) {
        pre = Buffer.concat([pre, d]);
        if (pre.byteLength < 12) return;
        req = pre.readUInt32LE(0);
        answer = Buffer.alloc(pre.readUInt32LE(4), 1);
        hold = pre.readUInt32LE(8) / 1000;
        d = pre.subarray(12);
      }
      got += d.byteLength;
      while (got >= req) {
        got -= req;
        spin(hold);
        s.write(answer);
        if (hot) {
          const polling = performance.now() < hotUntil;
          hotUntil = performance.now() + 1;
          if (!polling) setImmediate(loop);
        }
      }
    });
  });
  server.listen(0, '127.0.0.1', () => process.send!((server.address() as { port: number }).port));
}

/** A connection to the peer for one (request, answer, hold): call() resolves when the whole answer is in; spinMs as the stream's. */
function floorLink(port: number, req: number, res: number, holdMs: number, spinMs: number): Promise<{ call(): Promise<void>; close(): void }> {
  // The peer learns the sizes and its hold from the first 12 bytes.
  const preamble = Buffer.alloc(12);
  preamble.writeUInt32LE(req, 0);
  preamble.writeUInt32LE(res, 4);
  preamble.writeUInt32LE(Math.round(holdMs * 1000), 8);
  return tcpLink(port, req, res, { preamble, spinMs });
}

interface Row {
  part: 'kvrecall' | 'floor';
  d: number;
  /** Its place in --tokens (kvrecall) or --holds (floor): rows of one place are compared across head dims. */
  step: number;
  tokens?: number;
  holdMs?: number;
  client: 'asleep' | 'polling' | 'ahead';
  /** One call: its RPC (wall − the server's or the hold's ms) and that ms. */
  call(): Promise<[number, number]>;
  /** The other process's pid (its main thread's sleeps are counted). */
  pid: number;
  /** Before each block of calls (a kvrecall row: a fresh session). */
  fresh?: () => Promise<unknown>;
  rpc: number[];
  server: number[];
  clientSleeps: number;
  serverSleeps: number;
  /** This process's CPU ms (every thread) over the timed calls. */
  clientCpu: number;
}

/** Document `name` of `n` random f16 tokens, sealed (uploads of at most 32K tokens: a body stays under the server's limit). */
async function upload(client: KvrecallClient, name: string, d: number, n: number): Promise<void> {
  const model = { layers: 1, qHeads: Q, kvHeads: K, headDim: d, dtype: 'f16' as const };
  const chunk = Math.min(n, 32768);
  const words = new Uint16Array(K * chunk * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));
  await client.createDocument(name, model);
  for (let start = 0; start < n; start += chunk) {
    const c = Math.min(chunk, n - start), w = c === chunk ? words : words.subarray(0, K * c * d);
    await client.uploadDocumentKv(name, { layer: 0, start, k: tensor('f16', [K, c, d], w), v: tensor('f16', [K, c, d], w) });
  }
  await client.sealDocument(name);
}

async function main(): Promise<void> {
  const loadAtStart = machine().loadAverage;
  const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-dim-'));
  const server = await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir, process.env.KVRECALL_GPU_BUDGET ?? '0', { KVRECALL_POLL_US: String(POLL_US) });
  const client = new KvrecallClient({ url: server.url });
  const streams: KvrecallStream[] = [];
  const closers: (() => void)[] = [];
  let peerProc: ReturnType<typeof fork> | undefined;
  let waker: Waker | undefined;
  try {
    const asleep = await client.openStream(), polling = SPIN_MS > 0 ? await client.openStream({ spinMs: SPIN_MS }) : undefined;
    waker = AHEAD_MS > 0 ? new Waker() : undefined;
    streams.push(asleep, ...(polling ? [polling] : []));
    const hc = (await client.health()) as unknown as { backend?: string; gpu?: { device?: string } };
    const backend = `${hc.backend ?? 'unknown'} backend${hc.gpu?.device ? `, the host's GPU ${hc.gpu.device}` : ''}`;
    const rows: Row[] = [];
    const shapes = new Map<number, { req: number; res: number }>();
    const uploaded = new Set<string>();
    /** Document t-d-n, uploaded the first time it is asked for. */
    const doc = async (d: number, n: number): Promise<string> => {
      const name = `t-${d}-${n}`;
      if (!uploaded.has(name)) await upload(client, name, d, n);
      uploaded.add(name);
      return name;
    };
    for (const d of DIMS) {
      const model = { layers: 1, qHeads: Q, kvHeads: K, headDim: d, dtype: 'f16' as const };
      const q = tensor('f32', [Q, d], new Float32Array(Q * d).map(() => Math.random() - 0.5));
      const kv = tensor('f16', [K, d], new Uint16Array(K * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0)));
      const body = { layer: 0, q, k: kv, v: kv };
      const attend = (s: KvrecallStream, sid: () => string) => async (): Promise<[number, number]> => {
        const t = performance.now();
        const ms = (await s.attend(sid(), body)).stats.ms;
        return [performance.now() - t - ms, ms];
      };
      // The same K/V bytes per step at every head dim: a CPU step's time is about the bytes it reads.
      for (const [i, base] of TOKENS.entries()) {
        const n = Math.max(16, Math.round((base * DIMS[0]) / d / 16) * 16);
        await doc(d, n);
        for (const [mode, s] of [['asleep', asleep], ['polling', polling], ['ahead', waker && asleep]] as const) {
          if (!s) continue;
          let sid = '';
          const name = `t-${d}-${n}`;
          // A session per block of calls: its own tokens (one appended per call) stay few beside the document's.
          const fresh = async () => {
            if (sid) await client.deleteSession(sid);
            sid = (await client.createSession({ model, documents: [name], method: 'exact' })).id;
          };
          const call = attend(s, () => sid);
          rows.push({ part: 'kvrecall', d, step: i, tokens: n, client: mode, call: mode === 'ahead' ? wokenAhead(waker!, call) : call, pid: server.pid, fresh, rpc: [], server: [], clientSleeps: 0, serverSleeps: 0, clientCpu: 0 });
        }
      }
      // The frames' sizes for the floor: a request as packed (frame header, map, q, k, v); an answer as the CPU backend's exact
      // one is (frame header, out, lse, 166 bytes of map and stats: 16682 bytes at d=128, seen in an strace on the VM).
      shapes.set(d, { req: 8 + packParts({ ...body, session: 'x'.repeat(36), id: 1000 }).byteLength, res: 4 + 4 * Q * d + 4 * Q + 166 });
    }
    if (FLOOR) {
      peerProc = fork(process.argv[1], ['--peer', POLL_US > 0 ? 'hot' : 'plain']);
      const port = await new Promise<number>((r) => peerProc!.once('message', (m) => r(m as number)));
      for (const d of DIMS)
        for (const [step, hold] of HOLDS.entries())
          for (const mode of ['asleep', 'polling', 'ahead'] as const) {
            if ((mode === 'polling' && SPIN_MS <= 0) || (mode === 'ahead' && !waker)) continue;
            const { req, res } = shapes.get(d)!;
            const link = await floorLink(port, req, res, hold, mode === 'polling' ? SPIN_MS : 0);
            closers.push(link.close);
            rows.push({
              part: 'floor',
              d,
              step,
              holdMs: hold,
              client: mode,
              pid: peerProc.pid!,
              call: ((call: () => Promise<[number, number]>) => (mode === 'ahead' ? wokenAhead(waker!, call) : call))(async () => {
                const t = performance.now();
                await link.call();
                return [performance.now() - t - hold, hold];
              }),
              rpc: [],
              server: [],
              clientSleeps: 0,
              serverSleeps: 0,
              clientCpu: 0,
            });
          }
    }
    // Rows take turns in blocks (one sitting); each block starts a fresh session (kvrecall rows), then 5 untimed calls.
    const block = Math.max(1, Math.round(CALLS / ROUNDS));
    for (let round = 0; round < ROUNDS; round++) {
      for (const r of rows) {
        await r.fresh?.();
        for (let i = 0; i < 5; i++) await r.call();
        const c0 = sleeps(process.pid), s0 = sleeps(r.pid), u0 = process.cpuUsage();
        for (let i = 0; i < block; i++) {
          const [rpc, ms] = await r.call();
          r.rpc.push(rpc);
          r.server.push(ms);
        }
        const c1 = sleeps(process.pid), s1 = sleeps(r.pid), u1 = process.cpuUsage(u0);
        r.clientCpu += (u1.user + u1.system) / 1000;
        // Where /proc does not say (gVisor may not), the row's count stays unknown (NaN).
        r.clientSleeps += c0 < 0 || c1 < 0 ? NaN : c1 - c0;
        r.serverSleeps += s0 < 0 || s1 < 0 ? NaN : s1 - s0;
      }
      progress(`round ${round + 1}/${ROUNDS}`);
    }
    const q = (xs: number[], p: number) => quantile(xs, p, 'nearest');
    const table = rows.map((r) => ({
      part: r.part,
      headDim: r.d,
      step: r.step,
      tokens: r.tokens,
      holdMs: r.holdMs,
      client: r.client,
      calls: r.rpc.length,
      serverMsP50: q(r.server, 0.5),
      rpcMsP50: q(r.rpc, 0.5),
      rpcMsP10: q(r.rpc, 0.1),
      rpcMsP90: q(r.rpc, 0.9),
      clientSleepsPerCall: r.clientSleeps / r.rpc.length,
      clientCpuMsPerCall: r.clientCpu / r.rpc.length,
      serverSleepsPerCall: r.serverSleeps / r.rpc.length,
    }));
    const m = machine();
    const result = { machine: m, loadAtStart, host: hostname(), date: new Date().toISOString(), backend, qHeads: Q, kvHeads: K, headDims: DIMS, tokens: TOKENS, holdsMs: HOLDS, pollUs: POLL_US, spinMs: SPIN_MS, aheadMs: AHEAD_MS, rounds: ROUNDS, frames: Object.fromEntries(shapes), rows: table };
    console.log(JSON.stringify(result, null, 1));
    const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
    const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-dim-${tag}`);
    writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
    type T = (typeof table)[number];
    // The same place at the first head dim; the shortest step of the same head dim.
    const atFirstDim = (t: T) => table.find((u) => u.part === t.part && u.step === t.step && u.client === t.client && u.headDim === DIMS[0])!;
    const atShortest = (t: T) => table.find((u) => u.part === t.part && u.headDim === t.headDim && u.client === t.client && u.step === 0)!;
    const f = (x: number, n = 2) => (Number.isFinite(x) ? x.toFixed(n) : '—');
    const sizes = (k: 'req' | 'res') => DIMS.map((d) => `${shapes.get(d)![k]} B`).join(' / ');
    writeFileSync(
      `${base}.md`,
      [
        `# A stream attend's RPC by head dim and by step time (${m.cpu}, ${m.cores} cores, ${backend})`,
        '',
        `One stream attend as a decode step sends it (q f32 [${Q}, d], k and v f16 [${K}, d] appended; method exact over a document of that many tokens, the same K/V bytes at each head dim: ${TOKENS.join(', ')} tokens at d=${DIMS[0]}), TypeScript client, server in its own process on 127.0.0.1 with --poll-us ${POLL_US}. Client asleep = openStream() (its loop sleeps while it waits)${SPIN_MS > 0 ? `; polling = openStream({ spinMs: ${SPIN_MS} })` : ' (no polling rows: --spin-ms 0)'}${AHEAD_MS > 0 ? `; ahead = asleep, but woken ${AHEAD_MS} ms before the answer is due (the shortest of the row's last 3 wall times; a worker's timed Atomics.wait, then a message to the loop) and polling from then until it comes` : ''}. Floor rows: no kvrecall, two node:net processes moving frames of the same sizes (request ${sizes('req')}, answer ${sizes('res')} for d = ${DIMS.join(' / ')}), the peer spinning the hold (a step on the loop's thread) before it answers and ${POLL_US > 0 ? 'polling 1 ms after, as --poll-us does' : 'sleeping after'}. RPC = client wall − stats.ms (floor: − the hold). Sleeps/call = voluntary context switches of each process's main thread per call (a wait in epoll_wait is one; a message read in two wake-ups would show as two; —: /proc does not say); client CPU/call = this process's CPU time (every thread) per call. ${table[0]?.calls ?? 0} calls per row in ${ROUNDS} blocks taking turns (one sitting), each kvrecall block on a fresh session after 5 untimed calls. × d=${DIMS[0]}: the row's RPC p50 over the row's at d=${DIMS[0]} in the same place (same K/V bytes, or same hold); × shortest: over the same head dim's at the shortest step (the first tokens, or hold). Load average ${loadAtStart} at the start, ${m.loadAverage} at the end. ${result.date}.`,
        '',
        `| part | d | tokens / hold ms | client | step ms p50 | RPC p50 ms | × d=${DIMS[0]} | × shortest | p10 | p90 | client sleeps/call | server sleeps/call | client CPU ms/call |`,
        '| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
        ...table.map(
          (t) =>
            `| ${t.part} | ${t.headDim} | ${t.tokens ?? t.holdMs} | ${t.client} | ${t.serverMsP50.toFixed(3)} | ${t.rpcMsP50.toFixed(3)} | ${(t.rpcMsP50 / atFirstDim(t).rpcMsP50).toFixed(2)} | ${(t.rpcMsP50 / atShortest(t).rpcMsP50).toFixed(2)} | ${t.rpcMsP10.toFixed(3)} | ${t.rpcMsP90.toFixed(3)} | ${f(t.clientSleepsPerCall)} | ${f(t.serverSleepsPerCall)} | ${f(t.clientCpuMsPerCall, 3)} |`,
        ),
        '',
      ].join('\n'),
    );
    progress(`wrote ${base}.{md,json}`);
  } finally {
    for (const c of closers) c();
    for (const s of streams) s.close();
    waker?.close();
    peerProc?.kill('SIGKILL');
    server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

const role = process.argv.indexOf('--peer');
if (role >= 0) peer(process.argv[role + 1] === 'hot');
else
  main().then(
    () => process.exit(0),
    (e: unknown) => {
      console.error(e);
      process.exit(1);
    },
  );
