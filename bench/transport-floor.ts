// npx tsc -p tsconfig.json && node dist/bench/transport-floor.js [--calls 200 --rounds 8 --gaps 1,5,25 --req 8300 --res 8500 --hold 1]
//
// What a call costs after a wait with no kvrecall in it (issue #14): the
// floor under bench/transport-gap's rows. Two node:net peers on 127.0.0.1,
// each its own process: the client sends `req` bytes, the peer spins `hold`
// ms (a CPU step) and answers `res` bytes (8 KB each way: a decode step's
// q and out, f32, llama3.2-1b's shape). Round trip − hold, after the client
// waited each of `gaps` ms: asleep (a timer) or busy (spinning), against a
// peer that sleeps between calls or one whose event loop does not sleep
// between them (a setImmediate chain: its CPU never idles). And a libuv-pool round trip
// (a native no-op on libuv's pool, the way an attend went before
// --attend-sync-work) against a native call on the calling thread, after
// the same waits, in this process. Rows take turns in blocks, one sitting.
// Results: bench/results/transport-floor-<tag>.{md,json} (KVRECALL_BENCH_TAG, default vm).
import { fork } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { checksum64, prefault } from '../addon/kernels.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { runInterleaved } from './interleaved.js';
import { tcpLink } from './tcp-link.js';

const get = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const REQ = get('req', 8300), RES = get('res', 8500), HOLD = get('hold', 1);
const spin = (ms: number) => {
  const t = performance.now();
  while (performance.now() - t < ms);
};

/**
 * The peer: answers each whole request after spinning `hold` ms; `hot`:
 * after an answer its event loop does not sleep (a setImmediate chain)
 * until the next request or 100 ms (so it spins only while its rows run:
 * on 2 cores a peer spinning throughout would slow every other row).
 */
function peer(hot: boolean): void {
  const answer = Buffer.alloc(RES, 1);
  let hotUntil = 0;
  const loop = () => {
    if (performance.now() < hotUntil) setImmediate(loop);
  };
  const server = createServer((s) => {
    s.setNoDelay(true);
    let got = 0;
    s.on('data', (d: Buffer) => {
      got += d.byteLength;
      if (got < REQ) return;
      got -= REQ;
      spin(HOLD);
      s.write(answer);
      if (hot) {
        const spinning = performance.now() < hotUntil;
        hotUntil = performance.now() + 100;
        if (!spinning) setImmediate(loop);
      }
    });
  });
  server.listen(0, '127.0.0.1', () => process.send!((server.address() as { port: number }).port));
}

/** A connection to a forked peer: call() resolves when the whole answer is in. */
async function startPeer(hot: boolean): Promise<{ call(): Promise<void>; stop(): void }> {
  const child = fork(process.argv[1], ['--peer', hot ? 'hot' : 'plain', '--req', String(REQ), '--res', String(RES), '--hold', String(HOLD)]);
  const port = await new Promise<number>((r) => child.once('message', (m) => r(m as number)));
  const link = await tcpLink(port, REQ, RES);
  return {
    call: link.call,
    stop: () => {
      link.close();
      child.kill('SIGKILL');
    },
  };
}

async function main(): Promise<void> {
  const CALLS = get('calls', 200), ROUNDS = get('rounds', 8);
  const gapsAt = process.argv.indexOf('--gaps');
  const GAPS = (gapsAt >= 0 ? process.argv[gapsAt + 1] : '1,5,25').split(',').map(Number);
  if (GAPS.some((g) => !(g > 0))) throw new Error('--gaps: a list of ms > 0, e.g. 1,5,25');
  const loadAtStart = machine().loadAverage;
  const plain = await startPeer(false), hot = await startPeer(true);
  const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
  const empty = new Uint8Array(0);
  type Row = { name: string; kind: 'tcp' | 'hop'; series: string; gap: number; before: () => Promise<void> | void; call: () => Promise<number>; ms: number[] };
  const timedTcp = (p: typeof plain) => async () => {
    const t = performance.now();
    await p.call();
    return performance.now() - t - HOLD;
  };
  const rows: Row[] = [];
  for (const g of [0, ...GAPS]) {
    const wait = g ? `the client asleep ${g} ms before each` : 'back to back';
    rows.push({ name: `TCP, peer sleeps between calls, ${wait}`, kind: 'tcp', series: 'plain', gap: g, before: () => (g ? sleep(g) : undefined), call: timedTcp(plain), ms: [] });
    rows.push({ name: `TCP, peer's loop never sleeps between calls, ${wait}`, kind: 'tcp', series: 'hot', gap: g, before: () => (g ? sleep(g) : undefined), call: timedTcp(hot), ms: [] });
    if (g) {
      rows.push({ name: `TCP, peer sleeps between calls, the client busy ${g} ms before each`, kind: 'tcp', series: 'plain', gap: g, before: () => spin(g), call: timedTcp(plain), ms: [] });
      rows.push({ name: `TCP, peer's loop never sleeps between calls, the client busy ${g} ms before each`, kind: 'tcp', series: 'hot', gap: g, before: () => spin(g), call: timedTcp(hot), ms: [] });
    }
    const pool = async () => {
      const t = performance.now();
      await prefault([]);
      return performance.now() - t;
    };
    const onThread = async () => {
      const t = performance.now();
      checksum64(empty);
      await null;
      return performance.now() - t;
    };
    rows.push({ name: `native no-op on libuv's pool (a round trip), ${g ? `the process asleep ${g} ms before each` : 'back to back'}`, kind: 'hop', series: 'pool', gap: g, before: () => (g ? sleep(g) : undefined), call: pool, ms: [] });
    rows.push({ name: `native no-op on the calling thread, ${g ? `the process asleep ${g} ms before each` : 'back to back'}`, kind: 'hop', series: 'thread', gap: g, before: () => (g ? sleep(g) : undefined), call: onThread, ms: [] });
  }
  try {
    await runInterleaved(rows, {
      calls: CALLS,
      rounds: ROUNDS,
      timed: async (r) => void r.ms.push(await r.call()),
      progress: (msg) => process.stderr.write(`[bench:transport-floor] ${msg}\n`),
    });
  } finally {
    plain.stop();
    hot.stop();
  }
  const table = rows.map((r) => ({ row: r.name, kind: r.kind, series: r.series, gapMs: r.gap, calls: r.ms.length, p50Ms: quantile(r.ms, 0.5, 'nearest'), p10Ms: quantile(r.ms, 0.1, 'nearest'), p90Ms: quantile(r.ms, 0.9, 'nearest') }));
  const m = machine();
  const result = { machine: m, loadAtStart, host: hostname(), date: new Date().toISOString(), req: REQ, res: RES, holdMs: HOLD, gapsMs: GAPS, rounds: ROUNDS, rows: table };
  console.log(JSON.stringify(result, null, 1));
  const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
  const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-floor-${tag}`);
  writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
  writeFileSync(
    `${base}.md`,
    [
      `# What a call costs after a wait, without kvrecall (${m.cpu}, ${m.cores} cores)`,
      '',
      `Two node:net processes on 127.0.0.1: ${REQ} bytes out, the peer spins ${HOLD} ms, ${RES} bytes back; ms = round trip − ${HOLD} ms. The native rows: one call in this process, a no-op on libuv's pool (\`prefault([])\`, awaited) or on the calling thread (\`checksum64\` of nothing, then one await). ${table[0].calls} calls per row after 20 warm-up, the rows taking turns in ${ROUNDS} blocks (one sitting). Load average at the start ${loadAtStart}, at the end ${m.loadAverage}. ${result.date}.`,
      '',
      '| row | p50 ms | × back to back | p10 | p90 |',
      '| --- | ---: | ---: | ---: | ---: |',
      ...table.map((t) => {
        const base0 = table.find((u) => u.gapMs === 0 && u.series === t.series)!;
        return `| ${t.row} | ${t.p50Ms.toFixed(3)} | ${(t.p50Ms / base0.p50Ms).toFixed(2)} | ${t.p10Ms.toFixed(3)} | ${t.p90Ms.toFixed(3)} |`;
      }),
      '',
    ].join('\n'),
  );
  process.stderr.write(`[bench:transport-floor] wrote ${base}.{md,json}\n`);
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
