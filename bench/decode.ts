// End-to-end decode benchmark: preload one long document, then decode as an
// LLM server would, one `attend` per layer per generated token, for one
// session per retrieval method, and judge every method's answers against
// dense attention on the same steps.
//
//   npm run bench:decode [-- --quick | --full] [--url http://host:port] [--preset llama3-8b|llama3.2-1b|custom
//        --layers L --q-heads Q --kv-heads K --head-dim D] [--tokens N] [--steps S] [--methods exact,hnsw,...]
//        [--budget TOKENS|FRACTION] [--sweep 8K,16K|none] [--layer-data distinct|shared] [--concurrency N]
//        [--via stream|batch|http|LIST] [--tag NAME] [--help]
//
// What one context point does:
//   1. Preload. The document's K/V and prefill queries come from the seeded
//      workload generator (workload/) and are uploaded in chunks of
//      ~64 MiB, --concurrency layers side by side (each layer's chunks in
//      order). The document is created with a tokens hint (its host memory
//      reserved up front), and each chunk carries q (f16) only for the tokens
//      the document keeps (t % queryStride == 0, declared with queryStride).
//      The upload is reported as wall-time throughput and split by phase from
//      the server's per-upload stats (body read, decode, queue, checks,
//      append, LMDB write wait). The document indexes every requested method
//      that has an index builder; seal is timed per method by polling the
//      document's build progress.
//   2. Sessions. One per method over the document (budget 1% of the
//      document's tokens unless --budget, 16 sinks, 256 window), for each
//      transport of --via (bench/decode/lanes.ts): stream (default; one
//      WebSocket frame per attend, what an LLM server keeping one
//      connection sends), batch (per step and layer one batch frame
//      carrying every session's step) or http (one POST per attend).
//   3. Decode. For each step and each layer, every session (taking turns
//      at going first; the transports too) gets the same request: the
//      step's query heads q [qHeads, d] f32 and the new token's k, v
//      [kvHeads, d] f16. The wall time of each call (client encode +
//      transport + server + decode of the reply; via batch, the step's own
//      server ms plus the batch's wall − server ms) is summed over layers
//      per token, with its RPC share. The transports' answers to the same
//      step must be bit-identical: a difference is reported, and the run
//      exits 1 after writing its files. A warm-up pass first (step 0's
//      queries, nothing appended) is reported as the cold first token.
//   4. Fidelity. Output error of every method's `out` against the exact
//      session's `out` (all layers, all steps). On the sampled layer(s)
//      (default layer 0; kv heads 0 and K-1) the methods also return their
//      selection, which is judged against float64 exact attention
//      (bench/quality.ts): attention recall, the oracle's recall at the same
//      count, top-k recall, and needle hits (the workload's planted needles).
//
// Workload geometry: the generator makes the document's `tokens` tokens and
// the decode queries of `steps` steps at positions tokens + s. It has no K/V
// for the generated tokens, so the new token of step s is token
// tokens − steps + s moved to position tokens + s: its key rotated by RoPE
// through `steps` more positions (pre-RoPE content is position-free in the
// generator, so this is the same content at the new position), its value
// copied. Every position then matches what a real decode would send.
//
// Quick mode: llama3-8b heads with 2 layers, 16K tokens, 32 steps, sweep
// 4K/8K/16K, every method, every layer generated with its own seed (index
// builds dominate: at 32K × 2 layers, sweep 8K/16K/32K, the seven methods'
// seals took 8.5 of 11 minutes on a shared 2-core machine). Full mode: the
// preset's layers (default llama3.2-1b, 16 layers), 1M tokens, 64 steps,
// sweep 128K/256K/512K/1M, methods exact, nosa and topk-blocks (their seal
// builds are block summaries; the others are opt-in with --methods);
// generating 1M tokens × 8 heads takes tens of seconds per layer in JS, so
// by default one layer is generated per context and its K/V reused for every
// layer (--layer-data shared). Only the layers being uploaded are held in JS;
// uploads stream in chunks. The JSON records the backend /v1/health reports
// (cpu, or cuda when attends run on the GPU pool) and, per context, health's
// gpu (pool stats) after the decode.
//
// Results: bench/results/ (or --out) decode-<mode>-<preset>[-<tag>].{json,md},
// decode-latency[-<tag>].svg, decode-recall[-<tag>].svg. Progress on stderr.
//
// This file is the entry (server, sweep, output files); the parts live in
// bench/decode/: options.ts (flags), preload.ts and layer-data.ts (generate,
// upload, seal), context.ts (one context point), lanes.ts (the transports),
// loop.ts (the per-token loop and fidelity), judge.ts, run.ts (measurements), results.ts (the JSON
// schema), report.ts (markdown), charts.ts, machine.ts, util.ts.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, type RunningServer } from '../api/server.js';
import { KvrecallClient } from '../clients/ts/client.js';
import { parseConfig } from '../core/config.js';
import { findMethod } from '../index/registry.js';
import { charts } from './decode/charts.js';
import { Bench } from './decode/context.js';
import { machine } from './decode/machine.js';
import { parseArgs } from './decode/options.js';
import { markdown } from './decode/report.js';
import type { ContextResult } from './decode/results.js';
import { fmtBytes, fmtTokens, log, now, round } from './decode/util.js';

// ---------------------------------------------------------------- main

const RESULTS_DIR = join(import.meta.dirname, '..', '..', 'bench', 'results');

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const m = machine();
  const date = new Date().toISOString();
  const t0 = now();
  log(`${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB, Node ${m.node}; ${o.mode} mode`);

  let server: RunningServer | undefined;
  let tempDir: string | undefined;
  let url = o.url;
  let dataDir = o.dataDir;
  if (!url) {
    tempDir = mkdtempSync(join(tmpdir(), 'kvrecall-decode-'));
    dataDir = tempDir;
    // The environment's settings as `kvrecall serve` reads them (KVRECALL_GPU_BUDGET, KVRECALL_GPU_WAVE_BUDGET, KVRECALL_GPU_KMEANS, ...).
    server = await startServer({ ...parseConfig([], process.env), host: '127.0.0.1', port: 0, dataDir: tempDir });
    url = server.url;
    log(`in-process server at ${url}, data in ${tempDir}`);
  }
  const stop = async () => {
    await server?.close();
    if (tempDir) rmSync(tempDir, { recursive: true, force: true });
  };
  process.once('SIGINT', () => void stop().finally(() => process.exit(130)));

  try {
    const client = new KvrecallClient({ url, token: o.token });
    const health = (await client.health()) as unknown as Record<string, unknown>;
    log(`server: kvrecall ${String(health.version)}, ${String(health.backend)} backend, ${String(health.threads)} threads`);
    const bench = new Bench(o, client, server, dataDir);
    const { layers: L, qHeads: Q, kvHeads: K, headDim: d } = o.shape;
    const kvTotal = o.sweep.reduce((n, t) => n + L * K * d * 4 * t, 0);
    const qTotal = o.prefillQ ? o.sweep.reduce((n, t) => n + L * Q * d * 2 * Math.ceil(t / o.queryStride), 0) : 0;
    log(
      `plan: contexts ${o.sweep.map(fmtTokens).join(', ')} × ${L} layers; ${fmtBytes(kvTotal)} K/V${qTotal ? ` + ${fmtBytes(qTotal)} prefill q` : ''} to upload, ${o.concurrency} layer(s) at a time; ` +
        `indexes built at seal: ${o.methods.filter((x) => findMethod(x)?.builder).join(', ') || 'none'}`,
    );
    const results: ContextResult[] = [];
    for (let i = 0; i < o.sweep.length; i++) {
      const tokens = o.sweep[i];
      results.push(await bench.runContext(tokens, tokens === o.tokens ? o.steps : o.sweepSteps, i, o.sweep.length));
    }
    const wallSeconds = (now() - t0) / 1000;
    const md = markdown(o, { machine: m, health, date, wallSeconds, loadEnd: loadavg()[0] }, results);
    const { latency, recall } = charts(o, results);
    const dir = o.out ?? RESULTS_DIR;
    mkdirSync(dir, { recursive: true });
    const tag = o.tag ? `-${o.tag}` : '';
    const base = join(dir, `decode-${o.mode}-${o.preset}${tag}`);
    writeFileSync(`${base}.md`, md);
    writeFileSync(
      `${base}.json`,
      JSON.stringify({ machine: m, date, wallSeconds: round(wallSeconds, 1), vias: o.vias, backend: String(health.backend ?? 'unknown'), server: { url: o.url ?? 'in-process', health }, options: o, results }, (_, v) =>
        typeof v === 'number' && !Number.isInteger(v) ? round(v, 5) : v, 2) + '\n',
    );
    writeFileSync(join(dir, `decode-latency${tag}.svg`), latency);
    writeFileSync(join(dir, `decode-recall${tag}.svg`), recall);
    process.stdout.write(md);
    log(`wrote ${base}.{md,json}, decode-latency${tag}.svg, decode-recall${tag}.svg in ${wallSeconds.toFixed(0)} s`);
    const differ = results.flatMap((r) => r.transports.flatMap((t) => t.methods.filter((m) => m.mismatch).map((m) => `${r.tokens} ${m.method} via ${t.via}: ${m.mismatch}`)));
    if (differ.length) {
      log(`answers differ between transports:\n  ${differ.join('\n  ')}`);
      process.exitCode = 1;
    }
  } finally {
    await stop();
  }
}

await main();
