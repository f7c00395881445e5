// npx tsc -p tsconfig.json && node dist/bench/decode-rpc-spin.js [--calls 600 --rounds 12 --tokens 4096 --spin-ms 2 --url URL --tag vm]
//
// bench:decode's stream call with the TypeScript client sleeping while it
// awaits the answer (the default) against polling (openStream({ spinMs }):
// the event loop turns with a zero timeout until the answer is read, for
// up to spinMs, default 2). Issue #14: a decode call waits the server's step (~0.8 ms for a
// wave step at 1M on the H100) and the client's thread goes idle; waking it
// when the answer lands is part of wall − stats.ms, and more so the longer
// it slept (bench/results/transport-gap-*.md). The calls are bench:decode's
// (llama3.2-1b shape: q f32 [32, 64], the new token's k, v f16 [8, 64]
// appended, `out` asked), one session per row over one exact document of
// `tokens`, each row on a stream of its own, the rows taking turns in
// blocks (one sitting). Per row: overhead p50 (wall − stats.ms), the
// server's stats.ms p50 (a spinning client takes a core the server may have
// used), and the client's CPU per call (process.cpuUsage over its blocks:
// what the polling costs). Server: its own process on 127.0.0.1 (started
// here, or --url: one started by hand, e.g. pinned with taskset apart from
// this one). Results: bench/results/decode-rpc-spin-<tag>.{md,json}.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import type { KvrecallStream } from '../clients/ts/stream.js';
import { machine } from './decode/machine.js';
import { runInterleaved } from './interleaved.js';
import { quantile } from './stats.js';
import { startServer } from './transport-rows.js';

const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const CALLS = Number(arg('calls') ?? 600);
const ROUNDS = Number(arg('rounds') ?? 12);
const TOKENS = Number(arg('tokens') ?? 4096);
const URL_ARG = arg('url');
const TAG = arg('tag') ?? 'vm';
const SPIN_MS = Number(arg('spin-ms') ?? 2);
if (!/^[A-Za-z0-9._-]+$/.test(TAG)) throw new Error('--tag: letters, digits, . _ - only');
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 64, dtype: 'f16' as const };
const progress = (msg: string) => process.stderr.write(`[bench:decode-rpc-spin] ${msg}\n`);

interface Row {
  name: string;
  spin: boolean;
  stream: KvrecallStream;
  sid: string;
  /** The next token's position in the session (each call appends one). */
  overhead: number[];
  server: number[];
  cpuUs: number;
  timedCalls: number;
  before(): void;
  call(): Promise<[number, number]>;
}

/** Random f16 words near 1 (finite, the generator's range does not matter for the transport). */
const words = (n: number) => new Uint16Array(n).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));

async function main(): Promise<void> {
  const dir = URL_ARG ? undefined : mkdtempSync(join(tmpdir(), 'kvr-spin-'));
  const server = URL_ARG ? { url: URL_ARG, stop: () => undefined } : await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir!, '0');
  const client = new KvrecallClient({ url: server.url });
  const d = model.headDim, doc = `spin-${process.pid}`;
  await client.createDocument(doc, model);
  for (let start = 0; start < TOKENS; start += 32768) {
    const c = Math.min(32768, TOKENS - start), w = words(model.kvHeads * c * d);
    await client.uploadDocumentKv(doc, { layer: 0, start, k: tensor('f16', [model.kvHeads, c, d], w), v: tensor('f16', [model.kvHeads, c, d], w) });
  }
  await client.sealDocument(doc);
  const q = tensor('f32', [model.qHeads, d], new Float32Array(model.qHeads * d).map(() => Math.random()));
  const kv = tensor('f16', [model.kvHeads, d], words(model.kvHeads * d));
  const rows: Row[] = [];
  for (const spin of [false, true]) {
    const stream = await client.openStream({ spinMs: spin ? SPIN_MS : 0 });
    const sid = (await client.createSession({ model, documents: [doc], method: 'exact' })).id;
    const row: Row = {
      name: spin ? `spin: the loop polls up to ${SPIN_MS} ms for the answer` : 'sleep: the default (the loop waits in epoll)',
      spin, stream, sid, overhead: [], server: [], cpuUs: 0, timedCalls: 0,
      before: () => undefined,
      call: async () => {
        const t = performance.now();
        const a = await stream.attend(sid, { layer: 0, q, k: kv, v: kv, return: ['out'] });
        return [performance.now() - t - a.stats.ms, a.stats.ms];
      },
    };
    rows.push(row);
  }
  const load0 = loadavg()[0];
  await runInterleaved(rows, {
    calls: CALLS,
    rounds: ROUNDS,
    progress,
    timed: async (row) => {
      const c0 = process.cpuUsage();
      const [o, s] = await row.call();
      const c = process.cpuUsage(c0);
      row.cpuUs += c.user + c.system;
      row.timedCalls++;
      row.overhead.push(o);
      row.server.push(s);
    },
  });
  const load1 = loadavg()[0];
  for (const r of rows) r.stream.close();
  server.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });

  const m = machine();
  const p = (xs: number[], q: number) => quantile(xs, q);
  const out = rows.map((r) => ({
    name: r.name, spin: r.spin, calls: r.timedCalls,
    overheadP50Ms: p(r.overhead, 0.5), overheadP10Ms: p(r.overhead, 0.1), overheadP90Ms: p(r.overhead, 0.9),
    serverP50Ms: p(r.server, 0.5), clientCpuMsPerCall: r.cpuUs / 1000 / r.timedCalls,
  }));
  const base = out[0].overheadP50Ms;
  const lines = [
    `# bench:decode's stream call, the client sleeping or polling while it awaits the answer (${m.cpu}, ${m.cores} cores)`,
    '',
    `TypeScript client, one stream per row, server ${URL_ARG ? `at ${URL_ARG} (started by hand)` : 'in its own process on 127.0.0.1'}; calls of bench:decode's form (q f32 [32, 64], the new token's k, v f16 [8, 64] appended, \`out\` asked), one exact session per row over a ${TOKENS}-token document. ${CALLS} calls per row after 20 warm-up, the rows taking turns in ${ROUNDS} blocks (one sitting). Overhead = client wall − server stats.ms. Client CPU = this process's user + system time over the row's timed calls. Load average at the start ${load0.toFixed(2)}, at the end ${load1.toFixed(2)}. ${new Date().toISOString()}.`,
    '',
    '| row | overhead p50 ms | × sleep | p10 | p90 | server stats.ms p50 | client CPU ms per call |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...out.map((r) => `| ${r.name} | ${r.overheadP50Ms.toFixed(3)} | ${(r.overheadP50Ms / base).toFixed(2)} | ${r.overheadP10Ms.toFixed(3)} | ${r.overheadP90Ms.toFixed(3)} | ${r.serverP50Ms.toFixed(3)} | ${r.clientCpuMsPerCall.toFixed(3)} |`),
    '',
  ];
  const file = join(import.meta.dirname, '..', '..', 'bench', 'results', `decode-rpc-spin-${TAG}`);
  writeFileSync(`${file}.md`, lines.join('\n'));
  writeFileSync(`${file}.json`, JSON.stringify({ machine: m, spinMs: SPIN_MS, tokens: TOKENS, calls: CALLS, rounds: ROUNDS, url: URL_ARG ?? null, loadStart: load0, loadEnd: load1, rows: out }, null, 1) + '\n');
  process.stdout.write(lines.join('\n') + '\n');
  progress(`wrote ${file}.{md,json}`);
}

await main();
