// npx tsc -p tsconfig.json && node dist/bench/transport-gap.js [--calls 200 --rounds 8 --tokens 4096 --long-tokens 65536 --gaps 25 (ms, a list: 2,5,25)]
//
// Why bench:decode's RPC per call is several times bench:transport's (issue
// #14): bench:transport sends its attends back to back over a 4K-token
// document, so neither process ever waits long; a decode call comes after
// the bench's (or an LLM server's) own work and waits milliseconds for the
// server's. This times one stream attend (exact, 32 q / 8 kv heads, d=64,
// the llama3.2-1b shape; server in its own process on 127.0.0.1) in rows
// that differ only in how long the two processes waited before it:
//   back to back (bench:transport's case), the client idle (a timer) each
//   of `gaps` ms before each call, or spinning the longest of them, and a long document whose own server
//   time is that long (bench:decode's case).
// Overhead = client wall − server stats.ms. Rows take turns in blocks of
// calls/rounds, in one sitting. Results: bench/results/transport-gap-<tag>.{md,json}
// (tag: KVRECALL_BENCH_TAG, default vm).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import type { KvrecallStream } from '../clients/ts/stream.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';
import { startServer } from './transport-rows.js';

const get = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const CALLS = get('calls', 200), ROUNDS = get('rounds', 8), TOKENS = get('tokens', 4096), LONG = get('long-tokens', 65536);
const gapsAt = process.argv.indexOf('--gaps');
const GAPS = (gapsAt >= 0 ? process.argv[gapsAt + 1] : '25').split(',').map(Number);
if (GAPS.some((g) => !(g >= 0))) throw new Error('--gaps: a list of ms, e.g. 2,5,25');
const GAP = Math.max(...GAPS);
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 64, dtype: 'f16' as const };
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

interface Row {
  name: string;
  sid: string;
  before: () => Promise<void> | void;
  overhead: number[];
  server: number[];
}

async function main(): Promise<void> {
  const loadAtStart = machine().loadAverage;
  const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-gap-'));
  const server = await startServer(join(import.meta.dirname, '..', 'cli', 'cli.js'), dir, process.env.KVRECALL_GPU_BUDGET ?? '0');
  let stream: KvrecallStream | undefined;
  try {
    const client = new KvrecallClient({ url: server.url });
    const short = await session(client, 'short', TOKENS), long = await session(client, 'long', LONG);
    const health = (await client.health()) as unknown as { backend?: string; gpu?: { device?: string } };
    // The backend, and its device where it has one (the GPU host's card named in the results).
    const backend = `${health.backend ?? 'unknown'} backend${health.gpu?.device ? `, the host's GPU ${health.gpu.device}` : ''}`;
    const q = tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim).map(() => Math.random() - 0.5));
    stream = await client.openStream();
    const rows: Row[] = [
      { name: `${TOKENS} tokens, back to back (bench:transport's case)`, sid: short, before: () => undefined, overhead: [], server: [] },
      ...GAPS.map((g): Row => ({ name: `${TOKENS} tokens, the client idle ${g} ms (a timer) before each call`, sid: short, before: () => sleep(g), overhead: [], server: [] })),
      { name: `${TOKENS} tokens, the client spinning ${GAP} ms before each call`, sid: short, before: () => spin(GAP), overhead: [], server: [] },
      { name: `${LONG} tokens, back to back (the server's own time long)`, sid: long, before: () => undefined, overhead: [], server: [] },
    ];
    const attend = (sid: string) => stream!.attend(sid, { layer: 0, q });
    for (let w = 0; w < 20; w++) for (const r of rows) await attend(r.sid);
    const block = Math.max(1, Math.round(CALLS / ROUNDS));
    for (let round = 0; round < ROUNDS; round++) {
      for (const r of rows)
        for (let i = 0; i < block; i++) {
          await r.before();
          const t = performance.now();
          const a = await attend(r.sid);
          r.overhead.push(performance.now() - t - a.stats.ms);
          r.server.push(a.stats.ms);
        }
      progress(`round ${round + 1}/${ROUNDS}`);
    }
    const q50 = (xs: number[]) => quantile(xs, 0.5, 'nearest');
    const table = rows.map((r) => ({
      row: r.name,
      calls: r.overhead.length,
      overheadMsP50: q50(r.overhead),
      overheadMsP10: quantile(r.overhead, 0.1, 'nearest'),
      overheadMsP90: quantile(r.overhead, 0.9, 'nearest'),
      overheadMsMean: r.overhead.reduce((a, b) => a + b, 0) / r.overhead.length,
      serverMsP50: q50(r.server),
    }));
    const m = machine();
    const result = { machine: m, loadAtStart, host: hostname(), date: new Date().toISOString(), backend, model, tokens: TOKENS, longTokens: LONG, gapsMs: GAPS, rounds: ROUNDS, rows: table };
    console.log(JSON.stringify(result, null, 1));
    const tag = (process.env.KVRECALL_BENCH_TAG ?? 'vm').replace(/[^a-z0-9-]/gi, '');
    const base = join(import.meta.dirname, '..', '..', 'bench', 'results', `transport-gap-${tag}`);
    writeFileSync(`${base}.json`, JSON.stringify(result, null, 1) + '\n');
    const base0 = table[0].overheadMsP50;
    writeFileSync(
      `${base}.md`,
      [
        `# A stream attend's overhead after the processes waited (${m.cpu}, ${m.cores} cores, ${backend})`,
        '',
        `TypeScript client, one stream (GET /v1/stream), server in its own process on 127.0.0.1; one layer, ${model.qHeads} q / ${model.kvHeads} kv heads, d=${model.headDim}, method exact, q f32. ${table[0].calls} calls per row after 20 warm-up, the rows taking turns in ${ROUNDS} blocks (one sitting: the ratios are from it). Overhead = client wall − server stats.ms. Load average at the start ${loadAtStart}, at the end ${m.loadAverage}. ${result.date}.`,
        '',
        '| row | overhead p50 ms | × back to back | p10 | p90 | mean | server stats.ms p50 |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
        ...table.map((t) => `| ${t.row} | ${t.overheadMsP50.toFixed(3)} | ${(t.overheadMsP50 / base0).toFixed(2)} | ${t.overheadMsP10.toFixed(3)} | ${t.overheadMsP90.toFixed(3)} | ${t.overheadMsMean.toFixed(3)} | ${t.serverMsP50.toFixed(2)} |`),
        '',
      ].join('\n'),
    );
    progress(`wrote ${base}.{md,json}`);
  } finally {
    stream?.close();
    server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    process.exit(1);
  },
);
