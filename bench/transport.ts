// npm run bench:transport [-- --calls 500 --tokens 4096]
//
// What a decode call costs beyond the server's own work, per transport: the
// client's wall time minus the server's stats.ms, p50 over `calls` attends
// (one layer, 32 q / 8 kv heads, d=128, method exact over a 4K-token
// document), for the TypeScript client over HTTP and over the stream, beside
// a bare GET /v1/health on the same keep-alive connection; and a batch of 32
// sessions' steps in one call against one step. The server is a separate
// process on 127.0.0.1. Results: bench/results/transport-<host>.{json,md}.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import { machine } from './decode/machine.js';
import { quantile } from './stats.js';

const get = (name: string, def: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const CALLS = get('calls', 500), TOKENS = get('tokens', 4096), BATCH = 32;
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
const progress = (msg: string) => process.stderr.write(`[bench:transport] ${msg}\n`);
const p50 = (xs: number[]) => quantile(xs, 0.5, 'nearest');

async function startServer(dir: string): Promise<{ url: string; stop(): void }> {
  const proc = spawn(process.execPath, [join(import.meta.dirname, '..', 'cli', 'cli.js'), 'serve', '--port', '0', '--data', dir, '--gpu-budget', process.env.KVRECALL_GPU_BUDGET ?? '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const url = await new Promise<string>((resolve, reject) => {
    proc.stdout.on('data', (d: Buffer) => {
      const m = /listening on (http:\/\/\S+)/.exec(d.toString());
      if (m) resolve(m[1]);
    });
    proc.once('exit', (c) => reject(new Error(`server exited ${c}`)));
  });
  return { url, stop: () => proc.kill('SIGKILL') };
}

/** GET /v1/health on one keep-alive connection, wall ms per call. */
async function bareHealth(url: string, calls: number): Promise<number[]> {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  const once = () =>
    new Promise<number>((resolve, reject) => {
      const t0 = performance.now();
      request(`${url}/v1/health`, { agent, headers: { accept: 'application/msgpack' } }, (res) => {
        res.on('data', () => undefined);
        res.on('end', () => resolve(performance.now() - t0));
      })
        .on('error', reject)
        .end();
    });
  const out: number[] = [];
  for (let i = 0; i < calls; i++) out.push(await once());
  agent.destroy();
  return out;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'kvr-transport-'));
  const server = await startServer(dir);
  try {
    const client = new KvrecallClient({ url: server.url });
    const n = TOKENS, d = model.headDim;
    const words = new Uint16Array(model.kvHeads * n * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));
    await client.createDocument('doc', model);
    await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: tensor('f16', [model.kvHeads, n, d], words), v: tensor('f16', [model.kvHeads, n, d], words) });
    await client.sealDocument('doc');
    const sids: string[] = [];
    for (let i = 0; i < BATCH; i++) sids.push((await client.createSession({ model, documents: ['doc'], method: 'exact' })).id);
    const q = tensor('f32', [model.qHeads, d], new Float32Array(model.qHeads * d).map(() => Math.random()));
    const body = { layer: 0, q };
    const over = async (call: () => Promise<number>) => {
      for (let i = 0; i < 20; i++) await call(); // warm
      const xs: number[] = [];
      for (let i = 0; i < CALLS; i++) xs.push(await call());
      return xs;
    };
    progress(`server ${server.url}; ${CALLS} calls each`);
    const health = await bareHealth(server.url, CALLS);
    const http = await over(async () => {
      const t0 = performance.now();
      const r = await client.attend(sids[0], body);
      return performance.now() - t0 - r.stats.ms;
    });
    const stream = await client.openStream();
    const streamed = await over(async () => {
      const t0 = performance.now();
      const r = await stream.attend(sids[0], body);
      return performance.now() - t0 - r.stats.ms;
    });
    // A batch: wall minus the server's time for the whole batch (stats.ms of the batch answer).
    const batchOver = await over(async () => {
      const t0 = performance.now();
      const rs = await stream.attendBatch(0, sids.map((session) => ({ session, q })));
      return performance.now() - t0 - (rs.ms ?? NaN);
    });
    stream.close();
    const rows = {
      healthMsP50: p50(health),
      httpOverheadMsP50: p50(http),
      streamOverheadMsP50: p50(streamed),
      batchOverheadMsP50: p50(batchOver),
    };
    const result = { machine: machine(), host: hostname(), date: new Date().toISOString(), calls: CALLS, tokens: TOKENS, model, batch: BATCH, ...rows, httpVsHealth: rows.httpOverheadMsP50 / rows.healthMsP50, streamVsHealth: rows.streamOverheadMsP50 / rows.healthMsP50, batchVsSingleStream: rows.batchOverheadMsP50 / rows.streamOverheadMsP50 };
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
        `TypeScript client, server in its own process on 127.0.0.1, ${CALLS} calls after 20 warm-up; one layer, ${model.qHeads} q / ${model.kvHeads} kv heads, d=${d}, method exact over ${TOKENS} tokens. Overhead = client wall − server stats.ms, p50.`,
        '',
        '| transport | p50 ms | × bare health |',
        '| --- | ---: | ---: |',
        `| bare GET /v1/health (same keep-alive connection) | ${rows.healthMsP50.toFixed(3)} | 1.00 |`,
        `| HTTP attend | ${rows.httpOverheadMsP50.toFixed(3)} | ${result.httpVsHealth.toFixed(2)} |`,
        `| stream attend | ${rows.streamOverheadMsP50.toFixed(3)} | ${result.streamVsHealth.toFixed(2)} |`,
        `| stream batch of ${BATCH} sessions (one call) | ${rows.batchOverheadMsP50.toFixed(3)} | ${(rows.batchOverheadMsP50 / rows.healthMsP50).toFixed(2)} (${result.batchVsSingleStream.toFixed(2)}× one stream attend) |`,
        '',
      ].join('\n'),
    );
    progress(`wrote ${base}.{json,md}`);
  } finally {
    server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
