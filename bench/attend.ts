// CPU attention benchmark: what one decode step costs on this machine.
//
//   npm run bench:attend            (or: node dist/bench/attend.js [--quick])
//
// Part 1 times the native dense `attend` kernel directly (no HTTP, no
// engine) for one layer of a Llama-3-8B-shaped model (32 q / 8 kv heads,
// d=128, f16 KV) at 8K, 64K and 256K context tokens, and turns the time into
// the memory bandwidth it achieved (K+V bytes read per second).
//
// Part 2 measures what the HTTP path adds: sequential `attend` requests to a
// real in-process kvrecall server over a tiny context, side by side with a
// bare node:http server that reads a body of the same size and answers a
// reply of the same size. The ratio is kvrecall's overhead over the floor
// that Node's HTTP stack and fetch impose anyway.
//
// Results go to bench/results/attend-cpu.{json,md}; the markdown is printed.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { Packr, Unpackr } from 'msgpackr';
import { startServer, type RunningServer } from '../api/server.js';
import { attend, bytesOf, convert, nativeThreads, type AttendSegment } from '../addon/kernels.js';
import { KvrecallClient, tensor } from '../clients/ts/client.js';
import { DEFAULTS } from '../core/config.js';
import { mean, percentile } from './stats.js';

// ---------------------------------------------------------------- settings

const QUICK = process.argv.includes('--quick');

const SHAPE = { qHeads: 32, kvHeads: 8, headDim: 128 } as const;
const CONTEXTS = [8 * 1024, 64 * 1024, 256 * 1024];

/** Timed repetitions per context size; fewer for long contexts, which take longer each. */
const REPS: Record<number, number> = QUICK ? { 8192: 30, 65536: 10, 262144: 5 } : { 8192: 200, 65536: 50, 262144: 20 };
const WARMUP = QUICK ? 2 : 5;

const HTTP_REQUESTS = QUICK ? 400 : 2000;
/** Requests per alternating block: small enough that drift in machine load hits both servers alike. */
const HTTP_BLOCK = 100;
// Latencies kept falling for the first few hundred requests (JIT, undici), so warm up generously.
const HTTP_WARMUP = QUICK ? 100 : 1000;
/** Session tokens uploaded before the attend requests: attention over them costs next to nothing. */
const SESSION_TOKENS = 64;

const RESULTS_DIR = join(import.meta.dirname, '..', '..', 'bench', 'results');

// ----------------------------------------------------------------- helpers

const log = (msg: string): void => void process.stderr.write(`[bench:attend] ${msg}\n`);

function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

const round = (x: number, digits = 3): number => Number(x.toFixed(digits));

function machine(): { cpu: string; cores: number; memoryGiB: number; nativeThreads: number; node: string; platform: string } {
  const line = readFileSync('/proc/cpuinfo', 'utf8')
    .split('\n')
    .find((l) => l.startsWith('model name'));
  return {
    cpu: line ? line.split(':')[1].trim() : (cpus()[0]?.model ?? 'unknown'),
    cores: cpus().length,
    memoryGiB: round(totalmem() / 2 ** 30, 1),
    nativeThreads,
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
  };
}

/**
 * `count` random f16 values in [-1, 1). Generating 2^28 Math.random() values
 * for the 256K case would take longer than the benchmark, so a 1M-value pool
 * is converted once and copied in at random offsets: the bytes are still
 * varied, and the kernel's memory traffic does not depend on their values.
 */
function randomF16(count: number, pool: Uint16Array): Uint16Array {
  const out = new Uint16Array(count);
  const chunk = pool.length / 2;
  for (let at = 0; at < count; at += chunk) {
    const from = Math.floor(Math.random() * (pool.length - chunk));
    out.set(pool.subarray(from, from + Math.min(chunk, count - at)), at);
  }
  return out;
}

function f16Pool(n: number): Uint16Array {
  const f32 = Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
  const f16 = new Uint16Array(n);
  convert(bytesOf(f32), 'f32', bytesOf(f16), 'f16', n);
  return f16;
}

function randomF32(n: number): Float32Array {
  return Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
}

// ------------------------------------------------------ part 1: the kernel

interface KernelResult {
  tokens: number;
  reps: number;
  bytesRead: number;
  medianMs: number;
  p90Ms: number;
  minMs: number;
  gbPerS: number;
  /** Bandwidth at the fastest repetition: on a shared machine, the closest to what the kernel can do. */
  gbPerSBest: number;
  samplesMs: number[];
}

/** One f16 K and V buffer per kv head, sized for the longest context; shorter runs use views of them. */
function buildKv(maxTokens: number): { k: Uint16Array[]; v: Uint16Array[] } {
  const pool = f16Pool(1 << 20);
  const rows = maxTokens * SHAPE.headDim;
  const k: Uint16Array[] = [];
  const v: Uint16Array[] = [];
  for (let h = 0; h < SHAPE.kvHeads; h++) {
    k.push(randomF16(rows, pool));
    v.push(randomF16(rows, pool));
  }
  return { k, v };
}

async function timeKernel(kv: { k: Uint16Array[]; v: Uint16Array[] }, tokens: number): Promise<KernelResult> {
  const { qHeads, kvHeads, headDim } = SHAPE;
  const rows = tokens * headDim;
  const segment: AttendSegment = {
    k: kv.k.map((a) => a.subarray(0, rows)),
    v: kv.v.map((a) => a.subarray(0, rows)),
    tokens,
    begin: 0,
    end: tokens,
  };
  const args = {
    q: randomF32(qHeads * headDim),
    qHeads,
    kvHeads,
    headDim,
    dtype: 'f16' as const,
    scale: 1 / Math.sqrt(headDim),
    segments: [segment],
    out: new Float32Array(qHeads * headDim),
    lse: new Float32Array(qHeads),
  };
  for (let i = 0; i < WARMUP; i++) await attend(args);
  const reps = REPS[tokens];
  const samplesMs: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = nowMs();
    await attend(args);
    samplesMs.push(nowMs() - t0);
  }
  // K and V, every kv head, 2 bytes per element: the bytes one dense step must read.
  const bytesRead = 2 * kvHeads * rows * 2;
  const medianMs = percentile(samplesMs, 50);
  return {
    tokens,
    reps,
    bytesRead,
    medianMs: round(medianMs),
    p90Ms: round(percentile(samplesMs, 90)),
    minMs: round(Math.min(...samplesMs)),
    gbPerS: round(bytesRead / (medianMs / 1e3) / 1e9, 2),
    gbPerSBest: round(bytesRead / (Math.min(...samplesMs) / 1e3) / 1e9, 2),
    samplesMs: samplesMs.map((x) => round(x)),
  };
}

/**
 * A reference point for the bandwidth column: one thread copying 256 MiB
 * (memmove, so it reads and writes). Not a STREAM run, just a sanity floor.
 */
function memcpyGbPerS(): number {
  const src = Buffer.alloc(256 * 2 ** 20, 1);
  const dst = Buffer.alloc(src.length);
  src.copy(dst); // fault the pages in first
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = nowMs();
    src.copy(dst);
    times.push(nowMs() - t0);
  }
  return round((2 * src.length) / (percentile(times, 50) / 1e3) / 1e9, 2);
}

async function benchKernel(): Promise<{ results: KernelResult[]; memcpyGbPerS: number }> {
  const maxTokens = Math.max(...CONTEXTS);
  log(`building random f16 K/V for ${maxTokens} tokens × ${SHAPE.kvHeads} kv heads (${(maxTokens * SHAPE.kvHeads * SHAPE.headDim * 4) / 2 ** 30} GiB)`);
  const kv = buildKv(maxTokens);
  const results: KernelResult[] = [];
  for (const tokens of CONTEXTS) {
    const r = await timeKernel(kv, tokens);
    log(`attend ${tokens} tokens: median ${r.medianMs} ms, p90 ${r.p90Ms} ms, ${r.gbPerS} GB/s (${r.reps} reps)`);
    results.push(r);
  }
  const copy = memcpyGbPerS();
  log(`reference single-thread memcpy: ${copy} GB/s (read + write)`);
  return { results, memcpyGbPerS: copy };
}

// -------------------------------------------------- part 2: the HTTP path

const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false });
const MSGPACK = 'application/msgpack';

/**
 * The one client code path both servers see: global fetch (undici keeps the
 * connection alive), a pre-encoded body, the whole reply read as bytes.
 * Client-side msgpack encode/decode is left out on purpose, for both.
 */
async function post(url: string, body: Uint8Array<ArrayBuffer>): Promise<Uint8Array> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': MSGPACK, accept: MSGPACK }, body });
  const bytes = new Uint8Array(await res.arrayBuffer());
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}: ${new TextDecoder().decode(bytes)}`);
  return bytes;
}

function packed(value: unknown): Uint8Array<ArrayBuffer> {
  const b = packr.pack(value);
  return new Uint8Array(b.buffer as ArrayBuffer, b.byteOffset, b.byteLength);
}

/** The attend request a decode step sends: q f32 [32,128] plus the new token's k, v f16 [8,128]. */
function attendBody(): Uint8Array<ArrayBuffer> {
  const { qHeads, kvHeads, headDim } = SHAPE;
  const pool = f16Pool(kvHeads * headDim * 2);
  return packed({
    layer: 0,
    q: tensor('f32', [qHeads, headDim], randomF32(qHeads * headDim)),
    k: tensor('f16', [kvHeads, headDim], pool.subarray(0, kvHeads * headDim)),
    v: tensor('f16', [kvHeads, headDim], pool.subarray(kvHeads * headDim)),
  });
}

/**
 * A fresh session holding SESSION_TOKENS own tokens. Each timed block gets
 * its own, because every attend with k, v appends a token: this keeps the
 * context at 64..164 tokens so the dense attention stays negligible and
 * does not drift upward over the run.
 */
async function freshSession(client: KvrecallClient): Promise<string> {
  const { qHeads, kvHeads, headDim } = SHAPE;
  const { id } = await client.createSession({ model: { layers: 1, qHeads, kvHeads, headDim }, method: 'exact' });
  const n = kvHeads * SESSION_TOKENS * headDim;
  const pool = f16Pool(2 * n);
  await client.uploadSessionKv(id, {
    layer: 0,
    start: 0,
    k: tensor('f16', [kvHeads, SESSION_TOKENS, headDim], pool.subarray(0, n)),
    v: tensor('f16', [kvHeads, SESSION_TOKENS, headDim], pool.subarray(n)),
  });
  return id;
}

/** A node:http server that drains the body and answers `reply` bytes: the floor for any Node HTTP service. */
async function startEcho(reply: Uint8Array): Promise<{ url: string; server: Server }> {
  const server = createServer((req, res) => {
    req.on('data', () => {});
    req.on('end', () => {
      res.writeHead(200, { 'content-type': MSGPACK, 'content-length': reply.byteLength });
      res.end(reply);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}/echo`, server };
}

async function timeRequests(url: string, body: Uint8Array<ArrayBuffer>, n: number, into: number[]): Promise<Uint8Array[]> {
  const replies: Uint8Array[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = nowMs();
    replies.push(await post(url, body));
    into.push(nowMs() - t0);
  }
  return replies;
}

interface HttpSeries {
  requests: number;
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
  samplesMs: number[];
}

function series(samplesMs: number[]): HttpSeries {
  return {
    requests: samplesMs.length,
    p50Ms: round(percentile(samplesMs, 50)),
    p99Ms: round(percentile(samplesMs, 99)),
    meanMs: round(mean(samplesMs)),
    samplesMs: samplesMs.map((x) => round(x)),
  };
}

interface HttpResult {
  requestBytes: number;
  replyBytes: number;
  kvrecall: HttpSeries;
  echo: HttpSeries;
  /** Server-side decode time as the attend replies report it (stats.ms). */
  serverDecodeMsP50: number;
  ratioP50: number;
  ratioP99: number;
}

async function benchHttp(): Promise<HttpResult> {
  const dataDir = mkdtempSync(join(tmpdir(), 'kvrecall-bench-'));
  let kvr: RunningServer | undefined;
  let echo: { url: string; server: Server } | undefined;
  try {
    kvr = await startServer({ ...DEFAULTS, port: 0, dataDir });
    const client = new KvrecallClient({ url: kvr.url });
    const body = attendBody();

    // Measure the reply size once, then warm both paths (JIT, sockets).
    let sid = await freshSession(client);
    const replyBytes = (await post(`${kvr.url}/v1/sessions/${sid}/attend`, body)).byteLength;
    echo = await startEcho(new Uint8Array(replyBytes));
    await timeRequests(`${kvr.url}/v1/sessions/${sid}/attend`, body, HTTP_WARMUP, []);
    await timeRequests(echo.url, body, HTTP_WARMUP, []);
    await client.deleteSession(sid);

    const kvrMs: number[] = [];
    const echoMs: number[] = [];
    const decodeMs: number[] = [];
    for (let done = 0; done < HTTP_REQUESTS; done += HTTP_BLOCK) {
      const n = Math.min(HTTP_BLOCK, HTTP_REQUESTS - done);
      sid = await freshSession(client);
      const replies = await timeRequests(`${kvr.url}/v1/sessions/${sid}/attend`, body, n, kvrMs);
      await client.deleteSession(sid);
      await timeRequests(echo.url, body, n, echoMs);
      // Decoded after the clock stopped, so it costs the measurement nothing.
      for (const r of replies) decodeMs.push((unpackr.unpack(r) as { stats: { ms: number } }).stats.ms);
      log(`http ${done + n}/${HTTP_REQUESTS}: kvrecall p50 ${round(percentile(kvrMs, 50))} ms, echo p50 ${round(percentile(echoMs, 50))} ms`);
    }
    const k = series(kvrMs);
    const e = series(echoMs);
    return {
      requestBytes: body.byteLength,
      replyBytes,
      kvrecall: k,
      echo: e,
      serverDecodeMsP50: round(percentile(decodeMs, 50)),
      ratioP50: round(k.p50Ms / e.p50Ms, 2),
      ratioP99: round(k.p99Ms / e.p99Ms, 2),
    };
  } finally {
    if (echo) await new Promise<void>((resolve) => echo!.server.close(() => resolve()));
    await kvr?.close();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ report

function markdown(
  m: ReturnType<typeof machine>,
  date: string,
  kernel: Awaited<ReturnType<typeof benchKernel>>,
  http: HttpResult,
): string {
  const { qHeads, kvHeads, headDim } = SHAPE;
  const lines = [
    `## CPU attention, one layer-step (${qHeads} q / ${kvHeads} kv heads, d=${headDim}, f16 KV)`,
    '',
    `${m.cpu}, ${m.cores} cores (native pool: ${m.nativeThreads} threads), ${m.memoryGiB} GiB, Node ${m.node}, ${date}${QUICK ? ' (--quick)' : ''}`,
    '',
    '| context tokens | K+V read | median ms | p90 ms | min ms | GB/s (median) | GB/s (min) | reps |',
    '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...kernel.results.map(
      (r) =>
        `| ${r.tokens.toLocaleString('en-US')} | ${(r.bytesRead / 2 ** 20).toFixed(0)} MiB | ${r.medianMs.toFixed(2)} | ${r.p90Ms.toFixed(2)} | ${r.minMs.toFixed(2)} | ${r.gbPerS.toFixed(2)} | ${r.gbPerSBest.toFixed(2)} | ${r.reps} |`,
    ),
    '',
    `Reference: single-thread memcpy of 256 MiB moves ${kernel.memcpyGbPerS} GB/s (read + write).`,
    '',
    `## HTTP round trip of one attend (sequential, keep-alive fetch, ${http.kvrecall.requests} requests each, alternating blocks of ${HTTP_BLOCK})`,
    '',
    `Request ${http.requestBytes} B (q f32 [${qHeads},${headDim}] + k, v f16 [${kvHeads},${headDim}]), reply ${http.replyBytes} B; kvrecall context ${SESSION_TOKENS}–${SESSION_TOKENS + HTTP_BLOCK + 1} tokens, method exact.`,
    '',
    '| server | p50 ms | p99 ms | mean ms |',
    '| --- | ---: | ---: | ---: |',
    `| kvrecall \`attend\` | ${http.kvrecall.p50Ms.toFixed(3)} | ${http.kvrecall.p99Ms.toFixed(3)} | ${http.kvrecall.meanMs.toFixed(3)} |`,
    `| node:http echo, same sizes | ${http.echo.p50Ms.toFixed(3)} | ${http.echo.p99Ms.toFixed(3)} | ${http.echo.meanMs.toFixed(3)} |`,
    `| ratio kvrecall / echo | ${http.ratioP50.toFixed(2)} | ${http.ratioP99.toFixed(2)} | |`,
    '',
    `kvrecall's own decode time inside those requests (reply stats.ms), p50: ${http.serverDecodeMsP50.toFixed(3)} ms.`,
    '',
  ];
  return lines.join('\n');
}

async function main(): Promise<void> {
  const m = machine();
  const date = new Date().toISOString();
  log(`${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB${QUICK ? ', --quick' : ''}`);
  const kernel = await benchKernel();
  const http = await benchHttp();
  const md = markdown(m, date, kernel, http);
  mkdirSync(RESULTS_DIR, { recursive: true });
  const config = {
    quick: QUICK,
    shape: { ...SHAPE, dtype: 'f16' },
    contexts: CONTEXTS,
    warmup: WARMUP,
    reps: REPS,
    http: { requests: HTTP_REQUESTS, block: HTTP_BLOCK, warmup: HTTP_WARMUP, sessionTokens: SESSION_TOKENS, method: 'exact' },
  };
  writeFileSync(join(RESULTS_DIR, 'attend-cpu.json'), JSON.stringify({ machine: m, date, config, kernel, http }, null, 2) + '\n');
  writeFileSync(join(RESULTS_DIR, 'attend-cpu.md'), md);
  process.stdout.write(md);
}

await main();
