// node dist/bench/transport-ab.js --before <tree> --after <tree> [--calls 200 --rounds 5 --tag ab --rows health,stream,... --clients own --warm 10 --out name]
//
// Two servers' decode-call overhead side by side: the built trees `before`
// and `after` (each holding dist/cli/cli.js and its addon) serve at once,
// each in its own process on 127.0.0.1, and one TypeScript client (this
// tree's; with --clients own, each tree's own client for its server, so
// client changes are measured too) takes turns between them call block by
// call block, so a shared machine's load falls on both alike. --warm: calls
// per row and side before the rounds (the JIT tiers a path up over its
// first thousands of calls; a decode server makes them in seconds). Rows: bare GET /v1/health, one stream
// attend (f32 and f16 q/out), a stream batch of 32 sessions (f32 and f16),
// an HTTP batch of 32 (f16); one layer, 32 q / 8 kv heads, d=128, exact over
// 4K tokens, as bench/transport.ts. Overhead = client wall − the server's
// stats.ms (of the step or of the whole batch), p50 and p10, and the server's
// stats.ms p50 beside it (work moved into or out of the server's window shows there).
// Results: bench/results/transport-<host tag>-batch-<tag>.{json,md}.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { KvrecallClient } from '../clients/ts/client.js';
import type { KvrecallStream } from '../clients/ts/stream.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { bareHealth, decodeFixture, startServer } from './transport-rows.js';

const arg = (name: string, def?: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
};
const CALLS = Number(arg('calls', '200')), ROUNDS = Number(arg('rounds', '5')), TOKENS = 4096, BATCH = 32;
const trees = { before: resolve(arg('before') ?? '.'), after: resolve(arg('after') ?? '.') };
const OWN_CLIENTS = arg('clients') === 'own', WARM = Number(arg('warm', '10'));
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
const progress = (msg: string) => process.stderr.write(`[bench:transport-ab] ${msg}\n`);

type Call = () => Promise<number>;

/** One server's calls: each returns its overhead (wall − server ms), a health call its wall. */
async function callsOf(url: string, tree: string): Promise<{ calls: Record<string, Call>; stream: KvrecallStream; bare: { close(): void }; lastMs(): number }> {
  // The other tree's client, when asked for: the same API (both are this project's), loaded from its build.
  const Client: typeof KvrecallClient = OWN_CLIENTS ? ((await import(join(tree, 'dist', 'clients', 'ts', 'client.js'))) as { KvrecallClient: typeof KvrecallClient }).KvrecallClient : KvrecallClient;
  const client = new Client({ url });
  const { sids, q, q16 } = await decodeFixture(client, model, TOKENS, BATCH);
  const stream = await client.openStream();
  const bare = bareHealth(url);
  // The last timed call's server ms (NaN after a health call): work moved into or out of the server's window shows there.
  let lastMs = NaN;
  const timed = async (call: () => Promise<number | undefined>) => {
    const t0 = performance.now();
    const ms = (lastMs = (await call()) ?? NaN);
    return performance.now() - t0 - ms;
  };
  const steps = sids.map((session) => ({ session, q }));
  const steps16 = sids.map((session) => ({ session, q: q16, outDtype: 'f16' as const }));
  const calls: Record<string, Call> = {
    health: () => ((lastMs = NaN), bare.call()),
    stream: () => timed(async () => (await stream.attend(sids[0], { layer: 0, q })).stats.ms),
    stream16: () => timed(async () => (await stream.attend(sids[0], { layer: 0, q: q16, outDtype: 'f16' })).stats.ms),
    batch: () => timed(async () => (await stream.attendBatch(0, steps)).ms),
    batch16: () => timed(async () => (await stream.attendBatch(0, steps16)).ms),
    httpBatch16: () => timed(async () => (await client.attendBatch(0, steps16)).ms),
  };
  return { calls, stream, bare, lastMs: () => lastMs };
}

const ALL_ROWS: Record<string, string> = {
  health: 'bare GET /v1/health (wall)',
  stream: 'stream attend',
  stream16: 'stream attend, f16 q and out',
  batch: `stream batch of ${BATCH}`,
  batch16: `stream batch of ${BATCH}, f16`,
  httpBatch16: `HTTP batch of ${BATCH}, f16`,
};
/** The rows run (--rows: a comma list of ALL_ROWS' keys; all by default). */
const ROWS = Object.fromEntries(Object.entries(ALL_ROWS).filter(([k]) => (arg('rows')?.split(',') ?? [k]).includes(k)));

async function main(): Promise<void> {
  const loadAtStart = Number(loadavg()[0].toFixed(2));
  const dirs = { before: mkdtempSync(join(tmpdir(), 'kvr-ab-')), after: mkdtempSync(join(tmpdir(), 'kvr-ab-')) };
  const cli = (tree: string) => join(tree, 'dist', 'cli', 'cli.js');
  const servers = { before: await startServer(cli(trees.before), dirs.before, '0'), after: await startServer(cli(trees.after), dirs.after, '0') };
  const sides = ['before', 'after'] as const;
  try {
    const of = { before: await callsOf(servers.before.url, trees.before), after: await callsOf(servers.after.url, trees.after) };
    const perRow = () => Object.fromEntries(sides.map((s) => [s, Object.fromEntries(Object.keys(ROWS).map((r) => [r, [] as number[]]))])) as Record<(typeof sides)[number], Record<string, number[]>>;
    const samples = perRow(), serverMs = perRow();
    for (const s of sides) for (const r of Object.keys(ROWS)) for (let i = 0; i < WARM; i++) await of[s].calls[r](); // warm
    const loads: number[] = [];
    const per = Math.ceil(CALLS / ROUNDS);
    progress(`${CALLS} calls per row and side in ${ROUNDS} rounds; before ${trees.before}, after ${trees.after}`);
    for (let round = 0; round < ROUNDS; round++) {
      loads.push(Number(loadavg()[0].toFixed(2)));
      // Within a round each row runs on one side then the other, the order swapped every round.
      const order = round % 2 === 0 ? sides : ([...sides].reverse() as unknown as typeof sides);
      for (const row of Object.keys(ROWS))
        for (const s of order)
          for (let i = 0; i < per; i++) {
            samples[s][row].push(await of[s].calls[row]());
            serverMs[s][row].push(of[s].lastMs());
          }
    }
    loads.push(Number(loadavg()[0].toFixed(2)));
    for (const s of sides) {
      of[s].stream.close();
      of[s].bare.close();
    }
    const p = (xs: number[], q: number) => quantile(xs, q, 'nearest');
    const table = Object.fromEntries(
      sides.map((s) => [s, Object.fromEntries(Object.keys(ROWS).map((r) => [r, { p50: p(samples[s][r], 0.5), p10: p(samples[s][r], 0.1), n: samples[s][r].length }]))]),
    ) as Record<(typeof sides)[number], Record<string, { p50: number; p10: number; n: number }>>;
    const at = (s: (typeof sides)[number], r: string, q: 'p50' | 'p10') => table[s][r]?.[q] ?? NaN;
    const ratio = (s: (typeof sides)[number], q: 'p50' | 'p10') => ({
      batchVsStream: at(s, 'batch', q) / at(s, 'stream', q),
      batch16VsStream16: at(s, 'batch16', q) / at(s, 'stream16', q),
      batch16VsStream: at(s, 'batch16', q) / at(s, 'stream', q),
    });
    const m = machine();
    const tag = (arg('tag', 'ab') ?? 'ab').replace(/[^a-z0-9-]/gi, '');
    const host = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
    const result = {
      machine: m, host: hostname(), date: new Date().toISOString(), trees, clients: OWN_CLIENTS ? 'each tree its own' : 'this tree', warm: WARM, calls: CALLS, rounds: ROUNDS, tokens: TOKENS, batch: BATCH, model,
      loadAtStart, loadPerRound: loads, overheadMs: table, serverMsP50: Object.fromEntries(sides.map((s) => [s, Object.fromEntries(Object.keys(ROWS).map((r) => [r, p(serverMs[s][r], 0.5)]))])), ratios: { before: { p50: ratio('before', 'p50'), p10: ratio('before', 'p10') }, after: { p50: ratio('after', 'p50'), p10: ratio('after', 'p10') } },
    };
    // --out: the results' base name (default transport-<host>-batch-<tag>).
    const base = join(import.meta.dirname, '..', '..', 'bench', 'results', (arg('out') ?? `transport-${host}-batch-${tag}`).replace(/[^a-z0-9-]/gi, ''));
    writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
    const f = (x: number) => x.toFixed(3);
    const lines = [
      `# Decode-call overhead, two servers side by side (${m.cpu}, ${m.cores} cores)`,
      '',
      `\`bench/transport-ab.ts\`: the trees before (${trees.before}) and after (${trees.after}) served at once, ${OWN_CLIENTS ? "each tree's own TypeScript client for its server, in one process," : 'one TypeScript client'} taking turns between them (${WARM} warm-up calls per row and side, then ${CALLS} calls per row and side in ${ROUNDS} rounds, each row's block on one side then the other, the order swapped every round). One layer, ${model.qHeads} q / ${model.kvHeads} kv heads, d=${model.headDim}, exact over ${TOKENS} tokens. Overhead = client wall − server stats.ms (ms). Load average at each round's start and at the end: ${loads.join(', ')} (a shared machine: the ratios between sides are what this measures).`,
      '',
      '| row | before p50 | after p50 | after / before | before p10 | after p10 | server ms p50 before / after |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
      ...Object.entries(ROWS).map(([r, name]) => `| ${name} | ${f(table.before[r].p50)} | ${f(table.after[r].p50)} | ${(table.after[r].p50 / table.before[r].p50).toFixed(2)} | ${f(table.before[r].p10)} | ${f(table.after[r].p10)} | ${r === 'health' ? '—' : `${f(p(serverMs.before[r], 0.5))} / ${f(p(serverMs.after[r], 0.5))}`} |`),
      '',
      ...(ROWS.batch && ROWS.stream && ROWS.batch16 && ROWS.stream16
        ? [`Batch of ${BATCH} over one stream attend (p50): before ${result.ratios.before.p50.batchVsStream.toFixed(2)}× (f32), ${result.ratios.before.p50.batch16VsStream16.toFixed(2)}× (f16); after ${result.ratios.after.p50.batchVsStream.toFixed(2)}×, ${result.ratios.after.p50.batch16VsStream16.toFixed(2)}× (target ≤ 2×).`, '']
        : []),
    ];
    writeFileSync(`${base}.md`, lines.join('\n'));
    console.log(lines.join('\n'));
    progress(`wrote ${base}.{json,md}`);
  } finally {
    for (const s of sides) {
      servers[s].stop();
      rmSync(dirs[s], { recursive: true, force: true });
    }
  }
}

await main();
