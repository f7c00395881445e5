// npx tsc -p tsconfig.json && node dist/bench/transport-dim-cost.js [--head-dims 64,128 --tokens 16 --calls 2000 --rounds 20 --reps 4000 --poll-us 1000]
//
// Does one stream attend's per-call cost grow with the head dim by itself?
// Issue #13's H200 runs saw 0.278 ms of RPC a call at the llama3-8b shape
// (32 q / 8 kv heads, d = 128) against 0.086-0.156 at llama3.2-1b's (d = 64)
// while the bytes a call moves only double (q 16 KiB in, out 16 KiB + lse
// back). Two parts, one sitting, the head dims taking turns:
//   wire: the real thing at one short step (method exact over a document
//     of `tokens` tokens, cpu backend, server in its own process with
//     --poll-us), the client asleep while it waits (openStream()); per
//     block of calls each process's main-thread CPU time from
//     /proc/<pid>/task/<pid>/schedstat (ns), so the work a call costs on
//     either side is seen apart from the wait; the ratio d/first is taken
//     per round (blocks next to each other) and its median reported.
//   stages: each step of a call's bytes through this repository's own code,
//     in this process, timed over `reps` calls: the client packing the
//     request into its warm frame (packInto), the server decoding it
//     (unpackView) and checking it (parseAttendRequest: finite checks, the
//     f32 view), packing the answer into its frame (packAttendAnswer, with
//     the stats a real answer of the wire part carried; packParts where it
//     declines them), the client
//     decoding the answer and copying out/lse out (unpackView, attendReply);
//     and one memcpy of the request's and the answer's bytes, for scale.
// Results: bench/results/transport-dim-cost-<tag>.{md,json} (tag: KVRECALL_BENCH_TAG, default vm).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { attendReply, KvrecallClient, tensor, type WireAnswer } from '../clients/ts/client.js';
import { packInto, unpackView } from '../clients/ts/msgpack-parts.js';
import { packAttendAnswer } from '../api/batch-pack.js';
import { attendAnswer } from '../api/attend-answer.js';
import { joinParts, packParts } from '../core/msgpack-parts.js';
import { parseAttendRequest } from '../engine/attend-request.js';
import type { AttendAnswer } from '../engine/sessions.js';
import { DEFAULT_BLOCK_SIZE } from '../core/model.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { startServer } from './transport-rows.js';

const arg = (name: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const num = (name: string, def: number) => Number(arg(name) ?? def);
const DIMS = (arg('head-dims') ?? '64,128').split(',').map(Number);
const Q = num('q-heads', 32), K = num('kv-heads', 8), TOKENS = num('tokens', 16), CALLS = num('calls', 2000), ROUNDS = num('rounds', 20), REPS = num('reps', 4000), POLL_US = num('poll-us', 1000);
if (DIMS.some((d) => !(d > 0 && d % 8 === 0)) || !(TOKENS >= 16)) throw new Error('--head-dims: multiples of 8; --tokens: 16 or more');
const progress = (msg: string) => process.stderr.write(`[bench:transport-dim-cost] ${msg}\n`);
const p50 = (xs: number[]) => quantile(xs, 0.5, 'nearest');

/** A thread's CPU time so far, ns (its first schedstat field), NaN where /proc does not say. */
function cpuNs(pid: number): number {
  try {
    return Number(readFileSync(`/proc/${pid}/task/${pid}/schedstat`, 'utf8').split(' ')[0]);
  } catch {
    return NaN;
  }
}

interface Shape {
  d: number;
  model: { layers: number; qHeads: number; kvHeads: number; headDim: number; dtype: 'f16' };
  body: { layer: number; q: ReturnType<typeof tensor>; k: ReturnType<typeof tensor>; v: ReturnType<typeof tensor> };
  rpc: number[];
  step: number[];
  /** Per block: µs of main-thread CPU a call, client and server. */
  clientUs: number[];
  serverUs: number[];
  /** A real answer's stats (the stages pack the same). */
  stats?: Record<string, unknown>;
}

function shapeOf(d: number): Shape {
  const model = { layers: 1, qHeads: Q, kvHeads: K, headDim: d, dtype: 'f16' as const };
  const q = tensor('f32', [Q, d], new Float32Array(Q * d).map(() => Math.random() - 0.5));
  const kv = tensor('f16', [K, d], new Uint16Array(K * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0)));
  return { d, model, body: { layer: 0, q, k: kv, v: kv }, rpc: [], step: [], clientUs: [], serverUs: [] };
}

async function wire(shapes: Shape[]): Promise<{ backend: string; roundRatios: number[][] }> {
  const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-dim-cost-'));
  const server = await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir, process.env.KVRECALL_GPU_BUDGET ?? '0', { KVRECALL_POLL_US: String(POLL_US) });
  const client = new KvrecallClient({ url: server.url });
  const stream = await client.openStream();
  try {
    const hc = (await client.health()) as unknown as { backend?: string };
    for (const s of shapes) {
      const words = new Uint16Array(K * TOKENS * s.d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));
      await client.createDocument(`t-${s.d}`, s.model);
      await client.uploadDocumentKv(`t-${s.d}`, { layer: 0, start: 0, k: tensor('f16', [K, TOKENS, s.d], words), v: tensor('f16', [K, TOKENS, s.d], words) });
      await client.sealDocument(`t-${s.d}`);
    }
    const block = Math.max(1, Math.round(CALLS / ROUNDS));
    const roundRatios: number[][] = [];
    for (let round = 0; round < ROUNDS; round++) {
      const rpcP50: number[] = [];
      for (const s of shapes) {
        // A session per block: its own tokens (one appended a call) stay few beside the document's.
        const sid = (await client.createSession({ model: s.model, documents: [`t-${s.d}`], method: 'exact' })).id;
        for (let i = 0; i < 10; i++) await stream.attend(sid, s.body);
        const rpc: number[] = [];
        const c0 = cpuNs(process.pid), s0 = cpuNs(server.pid);
        for (let i = 0; i < block; i++) {
          const t = performance.now();
          const r = await stream.attend(sid, s.body);
          const wall = performance.now() - t;
          rpc.push(wall - r.stats.ms);
          s.step.push(r.stats.ms);
          s.stats ??= r.stats as unknown as Record<string, unknown>;
        }
        s.clientUs.push((cpuNs(process.pid) - c0) / block / 1000);
        s.serverUs.push((cpuNs(server.pid) - s0) / block / 1000);
        s.rpc.push(...rpc);
        rpcP50.push(p50(rpc));
        await client.deleteSession(sid);
      }
      roundRatios.push(rpcP50.map((x) => x / rpcP50[0]));
      progress(`wire round ${round + 1}/${ROUNDS}`);
    }
    return { backend: `${hc.backend ?? 'unknown'} backend`, roundRatios };
  } finally {
    stream.close();
    server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

const STAGES = ['client pack', 'server decode', 'server check', 'server answer', 'client read', 'memcpy of both'] as const;
type Stage = (typeof STAGES)[number];

/** µs a call of each stage at one head dim, over REPS calls (the median of 8 slices of them). */
function stages(s: Shape): Record<Stage, number> {
  const frame = Buffer.allocUnsafeSlow(1 << 16), answerBuf = Buffer.allocUnsafeSlow(1 << 16), scratch = Buffer.allocUnsafeSlow(1 << 16);
  const request = { ...s.body, session: '5b1c0e2a-6c1e-4d7e-9f0a-2b3c4d5e6f70', id: 1234 };
  const reqEnd = packInto(request, frame, 14);
  const reqBytes = frame.subarray(14, reqEnd);
  const out = new Float32Array(Q * s.d).map(() => Math.random()), lse = new Float32Array(Q).map(() => Math.random());
  const answer = { out, lse, stats: { ...s.stats }, model: s.model, outDtype: 'f32' } as unknown as AttendAnswer;
  // As api/stream.ts answers: packed straight into the frame, or (stats beyond the common ones) through packParts and a join.
  const packAnswer = () => {
    const p = packAttendAnswer(1234, answer);
    if (p) {
      p.fill(answerBuf);
      return p.byteLength;
    }
    return joinParts(packParts({ id: 1234, ...attendAnswer(answer) }), answerBuf).byteLength;
  };
  const ansBytes = answerBuf.subarray(0, packAnswer());
  let sink = 0;
  const work: Record<Stage, () => void> = {
    'client pack': () => void (sink += packInto(request, frame, 14)),
    'server decode': () => void (sink += (unpackView(reqBytes) as { id: number }).id),
    'server check': () => void (sink += parseAttendRequest(unpackView(reqBytes) as Record<string, unknown>, { ...s.model, blockSize: DEFAULT_BLOCK_SIZE }).q.length),
    'server answer': () => void (sink += packAnswer()),
    'client read': () => void (sink += attendReply(unpackView(ansBytes) as WireAnswer).out.length),
    'memcpy of both': () => {
      scratch.set(reqBytes, 0);
      scratch.set(ansBytes, reqBytes.byteLength);
      sink += scratch[7];
    },
  };
  const res = {} as Record<Stage, number>;
  for (const st of STAGES) {
    const slice = Math.max(1, Math.round(REPS / 8)), per: number[] = [];
    for (let i = 0; i < slice; i++) work[st]();
    for (let j = 0; j < 8; j++) {
      const t = performance.now();
      for (let i = 0; i < slice; i++) work[st]();
      per.push(((performance.now() - t) / slice) * 1000);
    }
    res[st] = p50(per);
  }
  // 'server check' decodes too: its own part is the difference.
  res['server check'] -= res['server decode'];
  if (sink === 0.5) progress('');
  return res;
}

async function main(): Promise<void> {
  const loadAtStart = machine().loadAverage;
  const shapes = DIMS.map(shapeOf);
  const { backend, roundRatios } = await wire(shapes);
  // Stages alternate head dims too; the median over rounds.
  const stageRuns = shapes.map(() => [] as Record<Stage, number>[]);
  for (let round = 0; round < 5; round++) shapes.forEach((s, i) => stageRuns[i].push(stages(s)));
  const stageP50 = stageRuns.map((runs) => Object.fromEntries(STAGES.map((st) => [st, p50(runs.map((r) => r[st]))])) as Record<Stage, number>);
  const m = machine();
  const q = (xs: number[], p: number) => quantile(xs, p, 'nearest');
  const rows = shapes.map((s, i) => ({
    headDim: s.d,
    requestBytes: packInto({ ...s.body, session: '5b1c0e2a-6c1e-4d7e-9f0a-2b3c4d5e6f70', id: 1234 }, Buffer.allocUnsafe(1 << 16), 0),
    calls: s.rpc.length,
    stepMsP50: p50(s.step),
    rpcMsP50: p50(s.rpc),
    rpcMsP10: q(s.rpc, 0.1),
    rpcMsP90: q(s.rpc, 0.9),
    rpcRatioP50: p50(roundRatios.map((r) => r[i])),
    clientCpuUsPerCall: p50(s.clientUs),
    serverCpuUsPerCall: p50(s.serverUs),
    stagesUs: stageP50[i],
  }));
  const result = { machine: m, loadAtStart, date: new Date().toISOString(), backend, qHeads: Q, kvHeads: K, tokens: TOKENS, pollUs: POLL_US, rounds: ROUNDS, reps: REPS, rows };
  console.log(JSON.stringify(result, null, 1));
  const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
  const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-dim-cost-${tag}`);
  writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
  const f = (x: number, n = 3) => (Number.isFinite(x) ? x.toFixed(n) : '—');
  const d0 = rows[0];
  const stageSum = (r: (typeof rows)[number]) => STAGES.slice(0, 5).reduce((a, st) => a + r.stagesUs[st], 0);
  writeFileSync(
    `${base}.md`,
    [
      `# A stream attend's per-call cost by head dim (${m.cpu}, ${m.cores} cores, ${backend})`,
      '',
      `Wire: one stream attend as a decode step sends it (q f32 [${Q}, d], k and v f16 [${K}, d] appended, return out), method exact over a document of ${TOKENS} tokens (the step as short as it gets), TypeScript client asleep while it waits (openStream()), server in its own process on 127.0.0.1 with --poll-us ${POLL_US}. ${ROUNDS} rounds, each a block of ${Math.round(CALLS / ROUNDS)} calls per head dim in turn on a fresh session after 10 untimed calls (one sitting). RPC = client wall − stats.ms; × d=${d0.headDim}: the median over rounds of the round's RPC p50 over d=${d0.headDim}'s in the same round. CPU/call: each process's main thread's CPU time (/proc/<pid>/task/<pid>/schedstat) over a block, per call, the median over blocks (the server's includes its step, stats.ms).`,
      '',
      `| d | request B | calls | step ms p50 | RPC p50 ms | p10 | p90 | × d=${d0.headDim} (per round, median) | client CPU µs/call | server CPU µs/call |`,
      '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
      ...rows.map((r) => `| ${r.headDim} | ${r.requestBytes} | ${r.calls} | ${f(r.stepMsP50)} | ${f(r.rpcMsP50)} | ${f(r.rpcMsP10)} | ${f(r.rpcMsP90)} | ${f(r.rpcRatioP50, 2)} | ${f(r.clientCpuUsPerCall, 1)} | ${f(r.serverCpuUsPerCall, 1)} |`),
      '',
      `Stages: the same request and answer through this repository's code in one process, µs a call (median of 5 rounds alternating head dims, each the median of 8 slices of ${REPS} / 8 calls, warm): client pack = packInto into the warm frame; server decode = unpackView of the request; server check = parseAttendRequest (finite checks, f32 view; beyond the decode); server answer = packAttendAnswer and its fill (packParts and a join where the stats are beyond the common ones, as api/stream.ts does); client read = unpackView of the answer and attendReply (out and lse copied out); memcpy of both = one copy of the request's and the answer's bytes.`,
      '',
      `| d | ${STAGES.join(' | ')} | sum of the first five |`,
      `| ---: | ${STAGES.map(() => '---:').join(' | ')} | ---: |`,
      ...rows.map((r) => `| ${r.headDim} | ${STAGES.map((st) => f(r.stagesUs[st], 2)).join(' | ')} | ${f(stageSum(r), 2)} |`),
      '',
      `Load average ${loadAtStart} at the start, ${m.loadAverage} at the end; node ${m.node}. ${result.date}.`,
      '',
    ].join('\n'),
  );
  progress(`wrote ${base}.{md,json}`);
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    process.exit(1);
  },
);
