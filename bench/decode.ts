// End-to-end decode benchmark: preload one long document, then decode as an
// LLM server would, one `attend` over HTTP/msgpack per layer per generated
// token, for one session per retrieval method, and judge every method's
// answers against dense attention on the same steps.
//
//   npm run bench:decode [-- --quick | --full] [--url http://host:port] [--preset llama3-8b|llama3.2-1b|custom
//        --layers L --q-heads Q --kv-heads K --head-dim D] [--tokens N] [--steps S] [--methods exact,hnsw,...]
//        [--budget TOKENS|FRACTION] [--sweep 8K,16K|none] [--layer-data distinct|shared] [--concurrency N] [--help]
//
// What one context point does:
//   1. Preload. The document's K/V and prefill queries come from the seeded
//      workload generator (bench/workload.ts) and are uploaded in chunks of
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
//      document's tokens unless --budget, 16 sinks, 256 window).
//   3. Decode. For each step and each layer, every session (taking turns
//      at going first) gets the same request: the step's query heads
//      q [qHeads, d] f32 and the new token's k, v [kvHeads, d] f16. The wall
//      time of each call (client encode + HTTP + server + decode of the
//      reply) is summed over layers per token. A warm-up pass first (step
//      0's queries, nothing appended) is reported as the cold first token.
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
// Results: bench/results/ (or --out) decode-<mode>-<preset>.{json,md},
// decode-latency.svg, decode-recall.svg. Progress on stderr.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { startServer, type RunningServer } from '../api/server.js';
import { findMethod, methodNames } from '../index/registry.js';
import { bytesOf, convert, nativeThreads } from '../addon/kernels.js';
import { keptTokens, KvrecallClient, KvrecallRequestError, tensor, type AttendReply } from '../clients/ts/client.js';
import { DEFAULTS } from '../core/config.js';
import { attentionRecall, distinctIds, exactAttention, meanProbs, relativeErrors, topKIndices, type ExactAttention } from './quality.js';
import { lineChart, type ChartSeries } from './svg-chart.js';
import { describePhases, PHASE_MEANING, SERVER_PHASES, UploadTally, type UploadPhases } from './upload-tally.js';
import { generateWorkload, ropeFrequencies, type Needle, type Workload } from './workload.js';

// ---------------------------------------------------------------- options

interface Shape {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

/** Full mode's default methods (besides exact): cheap seal builds at 1M tokens. */
const FULL_METHODS = ['nosa', 'topk-blocks'];

const PRESETS: Record<string, Shape> = {
  'llama3-8b': { layers: 32, qHeads: 32, kvHeads: 8, headDim: 128 },
  'llama3.2-1b': { layers: 16, qHeads: 32, kvHeads: 8, headDim: 64 },
};

interface Options {
  mode: 'quick' | 'full';
  url?: string;
  token?: string;
  /** The server's data folder (for data.mdb's size) when --url is given. */
  dataDir?: string;
  serverPid?: number;
  preset: string;
  shape: Shape;
  tokens: number;
  steps: number;
  /** Context lengths of the latency sweep (ascending; includes `tokens`). */
  sweep: number[];
  sweepSteps: number;
  methods: string[];
  /** Session budget: tokens when ≥ 1, else a fraction of the document's tokens. */
  budget: number;
  sinks: number;
  window: number;
  ef?: number;
  chunk?: number;
  span?: number;
  queryStride: number;
  layerData: 'distinct' | 'shared';
  prefillQ: boolean;
  seed: number;
  sampleLayers: number[];
  uploadBytes: number;
  /** Layers uploaded side by side during preload. */
  concurrency: number;
  /** Results folder (default bench/results). */
  out?: string;
}

const USAGE = `npm run bench:decode -- [--quick | --full] [options]
  --url URL              target a running server (default: start one in-process on 127.0.0.1:0, temp data dir)
  --token T              bearer token for --url
  --data DIR             the --url server's data folder (for data.mdb size)
  --server-pid PID       the --url server's pid (for its RSS)
  --preset NAME          llama3-8b | llama3.2-1b | custom (quick: llama3-8b, full: llama3.2-1b)
  --layers L --q-heads Q --kv-heads K --head-dim D   shape (override the preset; custom needs all four)
  --tokens N             document tokens (quick 16K, full 1M; K/M suffixes ok)
  --steps S              decode steps at the main context (quick 32, full 64)
  --sweep LIST|none      context lengths for the latency sweep (quick 4K,8K,16K; full 128K,256K,512K,1M)
  --sweep-steps S        decode steps at the other sweep points (quick 8, full 16)
  --methods a,b          methods (quick: every registered method; full: nosa,topk-blocks, whose seal builds are
                         block summaries; exact, the dense baseline, is always added)
  --budget B             session budget: tokens (≥ 1) or fraction of document tokens (default 0.01)
  --sinks N --window N --ef N --chunk N --span N   session parameters
  --query-stride N       document keeps prefill queries of 1 token in N (quick 4, full 16)
  --prefill-q on|off     upload prefill queries (default on when an indexed method is requested)
  --layer-data distinct|shared   generate every layer (quick) or reuse one generated layer (full)
  --sample-layers LIST   layers whose selections are judged against float64 attention (default 0)
  --seed N               workload seed (default 7)
  --upload-mib N         upload chunk size (default 64)
  --concurrency N        layers uploaded side by side during preload (default 2)
  --out DIR              results folder (default bench/results)`;

function parseCount(s: string, name: string): number {
  const m = /^(\d+(?:\.\d+)?)([kKmM]?)$/.exec(s.trim());
  if (!m) throw new Error(`--${name}: not a count: ${s}`);
  const mult = m[2] === '' ? 1 : m[2].toLowerCase() === 'k' ? 1024 : 1024 * 1024;
  const n = Math.round(Number(m[1]) * mult);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`--${name}: not a count: ${s}`);
  return n;
}

function parseArgs(argv: string[]): Options {
  const flags = new Set(['quick', 'full', 'help']);
  const values = new Map<string, string>();
  const seen = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}\n${USAGE}`);
    const name = a.slice(2);
    if (flags.has(name)) {
      seen.add(name);
      continue;
    }
    const v = argv[i + 1];
    if (v === undefined) throw new Error(`--${name} needs a value\n${USAGE}`);
    values.set(name, v);
    i++;
  }
  if (seen.has('help')) {
    process.stdout.write(USAGE + '\n');
    process.exit(0);
  }
  const known = [
    'url', 'token', 'data', 'server-pid', 'preset', 'layers', 'q-heads', 'kv-heads', 'head-dim', 'tokens', 'steps', 'sweep',
    'sweep-steps', 'methods', 'budget', 'sinks', 'window', 'ef', 'chunk', 'span', 'query-stride', 'prefill-q', 'layer-data',
    'sample-layers', 'seed', 'upload-mib', 'concurrency', 'out',
  ];
  for (const k of values.keys()) if (!known.includes(k)) throw new Error(`unknown option --${k}\n${USAGE}`);
  if (seen.has('quick') && seen.has('full')) throw new Error('--quick and --full exclude each other');
  const quick = seen.has('quick');
  const get = (k: string) => values.get(k);
  const int = (k: string, dflt: number) => (get(k) === undefined ? dflt : parseCount(get(k)!, k));

  const preset = get('preset') ?? (quick ? 'llama3-8b' : 'llama3.2-1b');
  let shape: Shape;
  if (preset === 'custom') {
    for (const k of ['layers', 'q-heads', 'kv-heads', 'head-dim'])
      if (get(k) === undefined) throw new Error(`--preset custom needs --${k}`);
    shape = { layers: int('layers', 0), qHeads: int('q-heads', 0), kvHeads: int('kv-heads', 0), headDim: int('head-dim', 0) };
  } else {
    const p = PRESETS[preset];
    if (!p) throw new Error(`unknown preset ${preset} (llama3-8b, llama3.2-1b, custom)`);
    shape = {
      layers: int('layers', quick ? 2 : p.layers),
      qHeads: int('q-heads', p.qHeads),
      kvHeads: int('kv-heads', p.kvHeads),
      headDim: int('head-dim', p.headDim),
    };
  }
  if (shape.layers < 1 || shape.kvHeads < 1 || shape.qHeads % shape.kvHeads !== 0 || shape.headDim < 8 || shape.headDim % 2)
    throw new Error(`bad shape ${JSON.stringify(shape)}: qHeads must be a multiple of kvHeads, headDim even ≥ 8`);

  const tokens = int('tokens', quick ? 16384 : 1048576);
  const steps = int('steps', quick ? 32 : 64);
  if (tokens < 2048) throw new Error('--tokens must be at least 2048');
  if (steps < 1 || steps > 1024) throw new Error('--steps must be in [1, 1024]');
  const sweepSteps = int('sweep-steps', quick ? 8 : 16);
  if (sweepSteps < 1 || sweepSteps > 1024) throw new Error('--sweep-steps must be in [1, 1024]');
  const defaultSweep = quick ? [4096, 8192, 16384] : [131072, 262144, 524288, 1048576];
  const sweepRaw = get('sweep');
  const sweep =
    sweepRaw === 'none'
      ? [tokens]
      : [...new Set([...(sweepRaw ? sweepRaw.split(',').map((s) => parseCount(s, 'sweep')) : defaultSweep.filter((t) => t < tokens)), tokens])]
          .filter((t) => t >= 2048)
          .sort((a, b) => a - b);

  const all = [...methodNames];
  // Full mode indexes 1M tokens × every layer at seal: by default only the methods whose build is a
  // block summary per head (seconds per layer); the others are opt-in with --methods.
  const asked = get('methods') ? get('methods')!.split(',').map((s) => s.trim()).filter(Boolean) : quick ? all : FULL_METHODS.filter((m) => all.includes(m));
  for (const m of asked) if (!findMethod(m)) throw new Error(`unknown method ${m} (registered: ${all.join(', ')})`);
  const methods = ['exact', ...asked.filter((m) => m !== 'exact')];
  const indexed = methods.some((m) => findMethod(m)?.builder);

  const layerData = (get('layer-data') ?? (quick ? 'distinct' : 'shared')) as Options['layerData'];
  if (layerData !== 'distinct' && layerData !== 'shared') throw new Error('--layer-data is distinct or shared');
  const pq = get('prefill-q') ?? (indexed ? 'on' : 'off');
  if (pq !== 'on' && pq !== 'off') throw new Error('--prefill-q is on or off');
  const sampleLayers = (get('sample-layers') ?? '0').split(',').map((s) => parseCount(s, 'sample-layers'));
  for (const l of sampleLayers) if (l >= shape.layers) throw new Error(`--sample-layers: layer ${l} ≥ ${shape.layers}`);
  const budget = get('budget') === undefined ? 0.01 : Number(get('budget'));
  if (!(budget > 0)) throw new Error('--budget must be positive');
  const opt = (k: string) => (get(k) === undefined ? undefined : parseCount(get(k)!, k));
  return {
    mode: quick ? 'quick' : 'full',
    url: get('url'),
    token: get('token'),
    dataDir: get('data'),
    serverPid: opt('server-pid'),
    preset,
    shape,
    tokens,
    steps,
    sweep,
    sweepSteps,
    methods,
    budget,
    sinks: int('sinks', 16),
    window: int('window', 256),
    ef: opt('ef'),
    chunk: opt('chunk'),
    span: opt('span'),
    queryStride: Math.max(1, int('query-stride', quick ? 4 : 16)),
    layerData,
    prefillQ: pq === 'on',
    seed: int('seed', 7),
    sampleLayers: [...new Set(sampleLayers)],
    uploadBytes: Math.max(1, int('upload-mib', 64)) * 2 ** 20,
    concurrency: Math.max(1, int('concurrency', 2)),
    out: get('out'),
  };
}

// ---------------------------------------------------------------- helpers

const now = () => performance.now();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/**
 * After long synchronous work: let timers that came due meanwhile run. In
 * process, the server's keep-alive timer (5 s) otherwise fires in the same
 * turn as the next request is written on that socket, and fetch fails with
 * ECONNRESET.
 */
const settle = () => sleep(20);
const log = (msg: string) => void process.stderr.write(`[bench:decode] ${msg}\n`);
const GiB = 2 ** 30, MiB = 2 ** 20;
const fmtBytes = (b: number) => (b >= GiB ? `${(b / GiB).toFixed(2)} GiB` : `${(b / MiB).toFixed(1)} MiB`);
const fmtTokens = (t: number) => (t % 1048576 === 0 ? `${t / 1048576}M` : t % 1024 === 0 ? `${t / 1024}K` : `${t}`);
const round = (x: number, digits = 3) => (Number.isFinite(x) ? Number(x.toFixed(digits)) : x);
const mean = (xs: number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN);

/** Nearest-rank percentile. */
function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

/** A one-line progress bar on stderr (redrawn in place on a TTY, every ~10% otherwise). */
class Progress {
  private readonly t0 = now();
  private lastPrinted = -1;
  private lastDraw = 0;
  constructor(
    private readonly label: string,
    private readonly total: number,
  ) {}

  update(done: number, extra = ''): void {
    const f = this.total > 0 ? Math.min(1, done / this.total) : 1;
    const elapsed = (now() - this.t0) / 1000;
    const eta = f > 0 && f < 1 ? ` eta ${((elapsed * (1 - f)) / f).toFixed(0)}s` : '';
    const width = 24, full = Math.round(f * width);
    const line = `[bench:decode] ${this.label} [${'#'.repeat(full)}${'-'.repeat(width - full)}] ${(f * 100).toFixed(0).padStart(3)}% ${elapsed.toFixed(1)}s${eta}${extra ? ' ' + extra : ''}`;
    if (process.stderr.isTTY) {
      if (now() - this.lastDraw < 100 && f < 1) return;
      this.lastDraw = now();
      process.stderr.write(`\r${line.slice(0, (process.stderr.columns || 120) - 1).padEnd((process.stderr.columns || 120) - 1)}`);
    } else {
      const decile = Math.floor(f * 10);
      if (decile === this.lastPrinted) return;
      this.lastPrinted = decile;
      process.stderr.write(line + '\n');
    }
  }

  finish(extra = ''): void {
    this.update(this.total, extra);
    if (process.stderr.isTTY) process.stderr.write('\n');
  }
}

interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  node: string;
  platform: string;
  nativeThreads: number;
  /** 1-minute load average at the start (a shared machine slows every number). */
  loadAverage: number;
}

function machine(): Machine {
  let cpu = cpus()[0]?.model?.trim() || 'unknown CPU';
  try {
    const line = readFileSync('/proc/cpuinfo', 'utf8').split('\n').find((l) => l.startsWith('model name'));
    if (line) cpu = line.split(':')[1].trim();
  } catch {
    /* not Linux */
  }
  return {
    cpu,
    cores: cpus().length,
    memoryGiB: round(totalmem() / GiB, 1),
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    nativeThreads,
    loadAverage: round(loadavg()[0], 2),
  };
}

function procRss(pid: number): { rss?: number; peak?: number } {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => {
      const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status);
      return m ? Number(m[1]) * 1024 : undefined;
    };
    return { rss: kb('VmRSS'), peak: kb('VmHWM') };
  } catch {
    return {};
  }
}

/**
 * Rows [n, d] of f16 keys (post-RoPE, rotate-half pairs (p, p + d/2)) moved
 * `shift` positions later: R(shift)·k, so R(p)·x becomes R(p + shift)·x.
 */
function shiftKeys(rows: Uint16Array, d: number, shift: number, freq: Float64Array): Uint16Array {
  const n = rows.length / d, half = d >> 1;
  const x = new Float32Array(rows.length);
  convert(bytesOf(rows), 'f16', bytesOf(x), 'f32', rows.length);
  const cs = Float64Array.from(freq, (w) => Math.cos(shift * w)), sn = Float64Array.from(freq, (w) => Math.sin(shift * w));
  for (let i = 0; i < n; i++)
    for (let p = 0; p < half; p++) {
      const a = x[i * d + p], b = x[i * d + p + half];
      x[i * d + p] = a * cs[p] - b * sn[p];
      x[i * d + p + half] = b * cs[p] + a * sn[p];
    }
  return toF16(x);
}

/** Elementwise f32 → f16 words. */
function toF16(x: Float32Array): Uint16Array {
  const out = new Uint16Array(x.length);
  if (x.length) convert(bytesOf(x), 'f32', bytesOf(out), 'f16', x.length);
  return out;
}

const halfCache = new WeakMap<Workload, Uint16Array[]>();

/** A workload's prefill query rows as f16 per kv head, converted once (shared layers reuse them). */
function halfQueries(wl: Workload): Uint16Array[] {
  let half = halfCache.get(wl);
  if (!half) halfCache.set(wl, (half = wl.prefillQ.map(toF16)));
  return half;
}

// ---------------------------------------------------------------- judging selections

/**
 * Exact attention of one sampled kv head group at one step, and what every
 * method's selection is judged against, computed once (quality.ts's
 * compareWithOracle recomputes the per-head top-k and the oracle for each
 * selection, which at 1M tokens costs more than the decode itself).
 */
class Judge {
  private readonly topk: Int32Array[];
  private order: Int32Array = new Int32Array(0);
  private mean?: Float64Array;

  constructor(
    readonly ex: ExactAttention,
    private readonly k: number,
  ) {
    this.topk = ex.probs.map((p) => topKIndices(p, Math.min(k, ex.tokens)));
  }

  /** Attention recall, the oracle's recall at the same count, top-k recall; dup: S held a position twice. */
  judge(S: Int32Array): { recall: number; oracle: number; topK: number; dup: boolean } {
    const ex = this.ex, ids = distinctIds(S, ex.tokens), m = ids.length;
    if (this.order.length < m) {
      this.mean ??= meanProbs(ex);
      this.order = topKIndices(this.mean, Math.min(ex.tokens, Math.max(m, 2 * this.order.length)));
    }
    let oracle = 0;
    for (const p of ex.probs) for (let i = 0; i < m; i++) oracle += p[this.order[i]];
    const inS = new Uint8Array(ex.tokens);
    for (let i = 0; i < m; i++) inS[ids[i]] = 1;
    let topK = 0;
    for (const top of this.topk) {
      let hit = 0;
      for (let i = 0; i < top.length; i++) hit += inS[top[i]];
      topK += hit / Math.max(1, top.length);
    }
    return { recall: attentionRecall(ex, ids), oracle: oracle / ex.heads, topK: topK / ex.heads, dup: m < S.length };
  }
}

// ---------------------------------------------------------------- GPU reference points (DESIGN.md)

/** Per-layer dense decode attention on the lent H100 (torch SDPA, f16, 32 q / 8 kv heads), ms, at 128K and 1M. */
const H100_DENSE: Record<number, [number, number]> = { 128: [0.227, 1.449], 64: [0.122, 0.746] };
const H100_PINNED_GBPS = 54.8;

interface Baselines {
  /** Whole token (all layers), dense attention with the KV resident in HBM. */
  gpuDenseMs?: number;
  /** Whole token, the KV streamed from pinned host memory every step. */
  gpuStreamMs: number;
  /** The dense figure is a straight-line extrapolation outside 128K..1M. */
  extrapolated: boolean;
}

function baselines(shape: Shape, tokens: number): Baselines {
  const kvBytesPerLayer = tokens * shape.kvHeads * shape.headDim * 2 * 2;
  const gpuStreamMs = (shape.layers * kvBytesPerLayer) / (H100_PINNED_GBPS * 1e9) * 1e3;
  const ref = shape.qHeads === 32 && shape.kvHeads === 8 ? H100_DENSE[shape.headDim] : undefined;
  if (!ref) return { gpuStreamMs, extrapolated: false };
  const slope = (ref[1] - ref[0]) / (1048576 - 131072);
  const perLayer = ref[0] + slope * (tokens - 131072);
  return { gpuDenseMs: shape.layers * perLayer, gpuStreamMs, extrapolated: tokens < 131072 || tokens > 1048576 };
}

// ---------------------------------------------------------------- results

interface Preload {
  tokens: number;
  layers: number;
  kvBytes: number;
  /** K/V plus prefill queries as sent. */
  wireBytes: number;
  generateSeconds: number;
  /** Upload wall time (generation excluded), with `concurrency` layers in flight. */
  uploadSeconds: number;
  /** K/V bytes per second of upload wall time. */
  uploadGBps: number;
  concurrency: number;
  /** The upload's split: client wall time and the server's phases (from each reply's stats). */
  upload: UploadPhases;
  sealSeconds: number;
  /** Index build per indexed method (from the document's build progress, ±50 ms). */
  buildSeconds: Record<string, number>;
  /** Seal time after the last index build (the LMDB transaction). */
  sealWriteSeconds: number;
  /** Session create (index load at attach) per method. */
  attachMs: Record<string, number>;
  rssBytes?: number;
  peakRssBytes?: number;
  rssNote: string;
  dataMdbBytes?: number;
  dataMdbAllocatedBytes?: number;
  kvAccountedBytes?: number;
  gpuPool: string;
}

interface MethodResult {
  method: string;
  error?: string;
  steps: number;
  latency: {
    perTokenMs: number[];
    p50Ms: number;
    p99Ms: number;
    meanMs: number;
    /** The warm-up pass (step 0's queries, nothing appended): JIT and lazy per-session work. */
    coldMs: number;
    /** Means per token of: client wall − server stats.ms; stats.selectMs; stats.attendMs; stats.ms − select − attend; transfers. */
    rpcMs: number;
    serverMs: number;
    retrievalMs: number;
    attentionMs: number;
    otherServerMs: number;
    transferMs: number;
    tokensPerSecond: number;
    ratioToExact: number;
  };
  /** Mean over calls (the warm-up pass included) of stats.scanned / stats.tokens. */
  scannedFraction: number;
  /** Mean tokens attended per kv head per call. */
  attended: number;
  /** The GPU block pool's work per call (stats.blocks): measured with the cuda backend, simulated by block methods without it. */
  blocks?: { selectedPerCall: number; hitRate: number; bytesInPerToken: number };
  fidelity: {
    /** Over all layers and steps: mean over calls of the mean over q heads of ‖o − o_exact‖/‖o_exact‖, and the worst head. */
    outputErrorMean: number;
    outputErrorWorst: number;
    /** Sampled layers/heads, vs float64 exact attention. */
    recallMean: number;
    recallWorst: number;
    oracleRecallMean: number;
    topKRecallMean: number;
    recallSamples: number;
    needlesHit: number;
    needles: number;
    /** Selections holding a position twice (server problem if > 0). */
    duplicateSelections: number;
    /** exact only: its out vs float64 exact attention on the sampled heads (worst head). */
    kernelErrorVsFloat64?: number;
  };
}

interface ContextResult {
  tokens: number;
  steps: number;
  budgetTokens: number;
  preload: Preload;
  methods: MethodResult[];
  baselines: Baselines;
  /** GET /v1/health after the decode: the backend the attends ran on and its GPU (pool stats with the cuda backend). */
  server: { backend: string; gpu?: unknown };
}

// ---------------------------------------------------------------- the run

interface LayerDecode {
  /** Per step: q [qHeads, d] f32, new token k, v [kvHeads, d] f16. */
  q: Float32Array[];
  k: Uint16Array[];
  v: Uint16Array[];
  needles: Needle[];
}

interface Sample {
  layer: number;
  head: number;
  /** [tokens + steps, d] f16 of that kv head. */
  keys: Uint16Array;
  values: Uint16Array;
}

class Bench {
  constructor(
    readonly o: Options,
    readonly client: KvrecallClient,
    readonly server: RunningServer | undefined,
    readonly dataDir: string | undefined,
    readonly health: Record<string, unknown>,
  ) {}

  private get shape() {
    return this.o.shape;
  }

  private indexedMethods(): string[] {
    return this.o.methods.filter((m) => findMethod(m)?.builder);
  }

  private generate(layer: number, tokens: number, steps: number): Workload {
    const { qHeads, kvHeads, headDim } = this.shape;
    const G = qHeads / kvHeads;
    const seed = this.o.layerData === 'distinct' ? this.o.seed * 1000 + layer : this.o.seed * 1000;
    const needles = this.o.sampleLayers.includes(layer) || this.o.layerData === 'shared' ? 2 * kvHeads : 0;
    const bar = new Progress(`generate ${fmtTokens(tokens)} layer ${layer}`, 1);
    const wl = generateWorkload(
      {
        seed,
        tokens,
        kvHeads,
        qHeads,
        headDim,
        steps,
        needles,
        prefillQueries: this.o.prefillQ ? G * Math.ceil(tokens / this.o.queryStride) : 0,
      },
      (f) => bar.update(f),
    );
    bar.finish();
    return wl;
  }

  /**
   * Uploads one layer of the document in chunks, one request at a time (its
   * chunks must arrive in order). With prefill queries, each chunk carries q
   * only for the tokens the document keeps (t % queryStride == 0), declared
   * with queryStride: token t = i·stride carries prefill row G·i + j as q
   * head h·G + j.
   */
  private async uploadLayer(doc: string, layer: number, wl: Workload, tokens: number, tally: UploadTally): Promise<void> {
    const { qHeads: Q, kvHeads: K, headDim: d } = this.shape;
    const G = Q / K, stride = this.o.queryStride;
    const perToken = K * d * 2 * 2 + (this.o.prefillQ ? (Q * d * 2) / stride : 0);
    const n = Math.max(64, Math.floor(this.o.uploadBytes / perToken / 64) * 64);
    const kBuf = new Uint16Array(K * n * d), vBuf = new Uint16Array(K * n * d);
    const qBuf = this.o.prefillQ ? new Uint16Array(Q * Math.ceil(n / stride) * d) : undefined;
    const qHalf = this.o.prefillQ ? halfQueries(wl) : [];
    for (let t0 = 0; t0 < tokens; t0 += n) {
      const m = Math.min(n, tokens - t0);
      const k = kBuf.subarray(0, K * m * d), v = vBuf.subarray(0, K * m * d);
      for (let h = 0; h < K; h++) {
        k.set(wl.keys[h].subarray(t0 * d, (t0 + m) * d), h * m * d);
        v.set(wl.values[h].subarray(t0 * d, (t0 + m) * d), h * m * d);
      }
      let q: Uint16Array | undefined;
      const { first, count } = keptTokens(t0, m, stride);
      if (qBuf && count > 0) {
        q = qBuf.subarray(0, Q * count * d);
        q.fill(0);
        for (let c = 0; c < count; c++) {
          const i = (t0 + first + c * stride) / stride;
          for (let h = 0; h < K; h++)
            for (let j = 0; j < G; j++) {
              const r = G * i + j;
              if ((r + 1) * d > qHalf[h].length) continue;
              q.set(qHalf[h].subarray(r * d, (r + 1) * d), ((h * G + j) * count + c) * d);
            }
        }
      }
      const body = {
        layer,
        start: t0,
        k: tensor('f16', [K, m, d], k),
        v: tensor('f16', [K, m, d], v),
        ...(q && { q: tensor('f16', [Q, count, d], q), queryStride: stride }),
      };
      const t = now();
      const r = await this.client.uploadDocumentKv(doc, body);
      tally.request(now() - t, m, k.byteLength + v.byteLength, k.byteLength + v.byteLength + (q?.byteLength ?? 0), r.stats);
    }
  }

  /** What decode and fidelity need of a layer: its steps' queries and new tokens, and the sampled heads. */
  private keepForDecode(l: number, wl: Workload, tokens: number, steps: number, decodeData: LayerDecode[], samples: Sample[]): void {
    const { kvHeads: K, headDim: d } = this.shape;
    // The generated tokens' K/V: tokens − steps.. moved `steps` positions on (see the top).
    const freq = ropeFrequencies(d, wl.knobs.ropeBase, wl.knobs.ropeScaling);
    const src = tokens - steps;
    const newK = wl.keys.map((kh) => shiftKeys(kh.subarray(src * d, tokens * d), d, steps, freq));
    const newV = wl.values.map((vh) => vh.slice(src * d, tokens * d));
    if (this.o.layerData === 'shared' && l > 0) decodeData.push(decodeData[0]);
    else {
      const ld: LayerDecode = { q: [], k: [], v: [], needles: wl.needles.filter((n) => n.step < steps) };
      for (let s = 0; s < steps; s++) {
        ld.q.push(wl.decodeQ[s]);
        const k = new Uint16Array(K * d), v = new Uint16Array(K * d);
        for (let h = 0; h < K; h++) {
          k.set(newK[h].subarray(s * d, (s + 1) * d), h * d);
          v.set(newV[h].subarray(s * d, (s + 1) * d), h * d);
        }
        ld.k.push(k);
        ld.v.push(v);
      }
      decodeData.push(ld);
    }
    if (this.o.sampleLayers.includes(l))
      for (const head of [...new Set([0, K - 1])]) {
        const keys = new Uint16Array((tokens + steps) * d), values = new Uint16Array((tokens + steps) * d);
        keys.set(wl.keys[head].subarray(0, tokens * d));
        keys.set(newK[head], tokens * d);
        values.set(wl.values[head].subarray(0, tokens * d));
        values.set(newV[head], tokens * d);
        samples.push({ layer: l, head, keys, values });
      }
  }

  /** Seals, polling the build progress to time each method's index build. */
  private async seal(doc: string): Promise<{ seconds: number; build: Record<string, number>; write: number }> {
    const methods = this.indexedMethods();
    const M = methods.length;
    const bar = new Progress(`seal (index ${methods.join(', ') || 'none'})`, 1);
    const t0 = now();
    const crossing = new Array<number>(M + 1).fill(NaN);
    crossing[0] = 0;
    let done = false;
    const poll = (async () => {
      while (!done) {
        await sleep(50);
        if (done) break;
        try {
          const info = await this.client.getDocument(doc);
          if (info.phase !== 'building' || info.progress === undefined) continue;
          const t = (now() - t0) / 1000;
          for (let i = 1; i <= M; i++) if (Number.isNaN(crossing[i]) && info.progress >= i / M - 1e-9) crossing[i] = t;
          bar.update(info.progress);
        } catch {
          /* a poll lost is a poll lost */
        }
      }
    })();
    try {
      await this.client.sealDocument(doc);
    } finally {
      done = true;
      await poll;
    }
    const seconds = (now() - t0) / 1000;
    for (let i = 1; i <= M; i++) if (Number.isNaN(crossing[i])) crossing[i] = seconds;
    for (let i = 1; i <= M; i++) crossing[i] = Math.max(crossing[i], crossing[i - 1]);
    const build: Record<string, number> = {};
    methods.forEach((m, i) => (build[m] = crossing[i + 1] - crossing[i]));
    bar.finish();
    return { seconds, build, write: seconds - crossing[M] };
  }

  private memory(): Pick<Preload, 'rssBytes' | 'peakRssBytes' | 'rssNote' | 'dataMdbBytes' | 'dataMdbAllocatedBytes'> {
    let rssBytes: number | undefined, peakRssBytes: number | undefined, rssNote: string;
    if (this.server) {
      rssBytes = process.memoryUsage().rss;
      peakRssBytes = process.resourceUsage().maxRSS * 1024;
      rssNote = 'in-process: server + benchmark (it holds the sampled heads and one step of queries)';
    } else if (this.o.serverPid) {
      const r = procRss(this.o.serverPid);
      rssBytes = r.rss;
      peakRssBytes = r.peak;
      rssNote = `server pid ${this.o.serverPid}`;
    } else rssNote = 'n/a (--url without --server-pid)';
    let dataMdbBytes: number | undefined, dataMdbAllocatedBytes: number | undefined;
    if (this.dataDir)
      try {
        const st = statSync(join(this.dataDir, 'data.mdb'));
        dataMdbBytes = st.size;
        dataMdbAllocatedBytes = st.blocks * 512;
      } catch {
        /* no data.mdb */
      }
    return { rssBytes, peakRssBytes, rssNote, dataMdbBytes, dataMdbAllocatedBytes };
  }

  private gpuPool(h: Record<string, unknown>): string {
    if (h.backend !== 'cuda') return `n/a (${String(h.backend ?? 'unknown')} backend)`;
    const gpu = h.gpu as { pool?: unknown } | undefined;
    const pool = gpu?.pool ?? gpu;
    return pool === undefined ? 'cuda (pool size not reported by /v1/health)' : JSON.stringify(pool);
  }

  async runContext(tokens: number, steps: number, index: number, count: number): Promise<ContextResult> {
    const o = this.o, { layers: L, qHeads: Q, kvHeads: K, headDim: d } = this.shape;
    const G = Q / K;
    const model = { ...this.shape, dtype: 'f16' as const };
    const budgetTokens = o.budget >= 1 ? Math.round(o.budget) : Math.max(1, Math.round(o.budget * tokens));
    const doc = `bench-decode-${process.pid}-${tokens}`;
    log(`context ${index + 1}/${count}: ${fmtTokens(tokens)} tokens × ${L} layers, ${steps} steps, methods ${o.methods.join(', ')}, budget ${budgetTokens}`);

    // Room for it?
    const kvBytes = L * K * d * 2 * 2 * tokens;
    const h0 = (await this.client.health()) as unknown as Record<string, unknown>;
    const mem = h0.memory as { used?: number; budget?: number } | undefined;
    if (mem?.budget !== undefined && kvBytes * 1.02 > mem.budget - (mem.used ?? 0))
      throw new Error(
        `the document needs ${fmtBytes(kvBytes)} of host KV; the server's budget has ${fmtBytes(mem.budget - (mem.used ?? 0))} free. Use fewer --tokens or --layers.`,
      );

    try {
      await this.client.deleteDocument(doc);
    } catch {
      /* not there */
    }
    // The tokens hint reserves the document's host memory up front (no regrowth while uploading).
    await this.client.createDocument(doc, model, { methods: this.indexedMethods(), queryStride: o.queryStride, tokens });

    // Preload: layers in groups of --concurrency, each group generated (or the shared layer reused),
    // then uploaded side by side; keep only what decode and fidelity need.
    const decodeData: LayerDecode[] = [];
    const samples: Sample[] = [];
    const bar = new Progress(`preload ${fmtTokens(tokens)}`, L * tokens);
    const tally = new UploadTally((done, note) => bar.update(done, note));
    let generateSeconds = 0;
    let shared: Workload | undefined;
    for (let g0 = 0; g0 < L; g0 += o.concurrency) {
      const group: { layer: number; wl: Workload }[] = [];
      for (let l = g0; l < Math.min(L, g0 + o.concurrency); l++) {
        let wl: Workload;
        if (o.layerData === 'shared' && shared) wl = shared;
        else {
          const t = now();
          wl = this.generate(l, tokens, steps);
          generateSeconds += (now() - t) / 1000;
          await settle();
          if (o.layerData === 'shared') shared = wl;
        }
        this.keepForDecode(l, wl, tokens, steps, decodeData, samples);
        group.push({ layer: l, wl });
      }
      tally.resume();
      await Promise.all(group.map(({ layer, wl }) => this.uploadLayer(doc, layer, wl, tokens, tally)));
      tally.pause();
    }
    shared = undefined;
    bar.finish(`${tally.kvGBps.toFixed(2)} GB/s K/V`);
    log(`upload ${fmtTokens(tokens)}: ${describePhases(tally.phases, o.concurrency)}`);

    const sealed = await this.seal(doc);

    // Sessions.
    const attachMs: Record<string, number> = {};
    const runs: Run[] = [];
    for (const method of o.methods) {
      const spec = {
        model,
        documents: [doc],
        method,
        budget: budgetTokens,
        sinks: o.sinks,
        window: o.window,
        ...(o.ef !== undefined && { ef: o.ef }),
        ...(o.chunk !== undefined && { chunk: o.chunk }),
        ...(o.span !== undefined && { span: o.span }),
      };
      const t = now();
      try {
        const { id } = await this.client.createSession(spec);
        attachMs[method] = now() - t;
        runs.push(new Run(method, id, steps));
      } catch (e) {
        const run = new Run(method, '', steps);
        run.error = `createSession: ${(e as Error).message}`;
        log(`${method}: ${run.error}`);
        runs.push(run);
      }
    }
    const afterSeal = this.memory();
    const h1 = (await this.client.health()) as unknown as Record<string, unknown>;
    const preload: Preload = {
      tokens,
      layers: L,
      kvBytes,
      wireBytes: tally.phases.wireBytes,
      generateSeconds,
      uploadSeconds: tally.phases.wallSeconds,
      uploadGBps: tally.kvGBps,
      concurrency: o.concurrency,
      upload: tally.phases,
      sealSeconds: sealed.seconds,
      buildSeconds: sealed.build,
      sealWriteSeconds: sealed.write,
      attachMs,
      ...afterSeal,
      kvAccountedBytes: (h1.memory as { used?: number } | undefined)?.used,
      gpuPool: this.gpuPool(h1),
    };
    log(
      `preload: ${fmtBytes(kvBytes)} K/V in ${preload.uploadSeconds.toFixed(1)} s (${preload.uploadGBps.toFixed(2)} GB/s), seal ${sealed.seconds.toFixed(1)} s` +
        (afterSeal.rssBytes ? `, RSS ${fmtBytes(afterSeal.rssBytes)}` : ''),
    );

    // Warm-up (cold) pass: every session, every layer, step 0's queries without k/v (nothing is
    // appended). It pays JIT and lazy per-session work (e.g. infiniretri's retention) outside the
    // timed steps, and is reported as the cold first token.
    for (const run of runs) {
      if (run.error) continue;
      const t = now();
      try {
        for (let l = 0; l < L; l++) {
          const r = await this.client.attend(run.sid, { layer: l, q: tensor('f32', [Q, d], decodeData[l].q[0]) });
          // One-time work (a retention pass) counts towards the scanned fraction, amortised over the decode.
          if (r.stats.tokens > 0) run.scanned.push((r.stats.scanned ?? 0) / r.stats.tokens);
        }
        run.coldMs = now() - t;
      } catch (e) {
        run.error = `warm-up attend: ${(e as Error).message}`;
        log(`${run.method}: ${run.error}`);
      }
    }

    // Decode.
    const exact = runs[0];
    const sampleLayers = new Set(samples.map((s) => s.layer));
    const dbar = new Progress(`decode ${fmtTokens(tokens)}`, steps * L);
    for (let s = 0; s < steps; s++) {
      for (let l = 0; l < L; l++) {
        const ld = decodeData[l];
        const body = { layer: l, q: tensor('f32', [Q, d], ld.q[s]), k: tensor('f16', [K, d], ld.k[s]), v: tensor('f16', [K, d], ld.v[s]) };
        const judged = sampleLayers.has(l);
        const replies = new Map<Run, AttendReply>();
        // Sessions take turns going first, so whatever the call after the fidelity work pays
        // (a GC pause, a cold socket) is spread over the methods.
        const turn = (s * L + l) % runs.length;
        for (const run of [...runs.slice(turn), ...runs.slice(0, turn)]) {
          if (run.error) continue;
          const ret: ('out' | 'selection')[] = judged && run !== exact ? ['out', 'selection'] : ['out'];
          const t = now();
          try {
            const r = await this.client.attend(run.sid, { ...body, return: ret });
            run.record(s, now() - t, r);
            replies.set(run, r);
          } catch (e) {
            run.error = `attend (step ${s}, layer ${l}): ${e instanceof KvrecallRequestError ? e.message : (e as Error).stack}`;
            log(`${run.method}: ${run.error}`);
          }
        }
        // Fidelity, after the timed calls.
        const ex = replies.get(exact);
        if (ex)
          for (const [run, r] of replies) {
            if (run === exact) continue;
            const e = relativeErrors(r.out, ex.out, Q);
            run.outErr.push(mean([...e]));
            run.outErrWorst = Math.max(run.outErrWorst, ...e);
          }
        if (judged) {
          const tj = now();
          for (const sm of samples.filter((x) => x.layer === l)) {
            const q = ld.q[s].subarray(sm.head * G * d, (sm.head + 1) * G * d);
            const judge = new Judge(exactAttention(q, G, sm.keys, sm.values, { headDim: d, dtype: 'f16', tokens: tokens + s + 1 }), budgetTokens);
            for (const [run, r] of replies) {
              if (run === exact) {
                const e = relativeErrors(r.out.subarray(sm.head * G * d, (sm.head + 1) * G * d), judge.ex.out, G);
                run.kernelErr = Math.max(run.kernelErr ?? 0, ...e);
                continue;
              }
              const sel = r.selection?.[sm.head];
              if (!sel) continue;
              try {
                const j = judge.judge(sel);
                if (j.dup) run.duplicates++;
                run.recall.push(j.recall);
                run.oracleRecall.push(j.oracle);
                run.topK.push(j.topK);
              } catch (e) {
                run.error = `selection check (step ${s}, layer ${l}): ${(e as Error).message}`;
                log(`${run.method}: ${run.error}`);
              }
            }
          }
          for (const n of ld.needles) {
            if (n.step !== s) continue;
            for (const [run, r] of replies) {
              if (run === exact || !r.selection) continue;
              run.needles++;
              if (r.selection[n.head].includes(n.position)) run.needlesHit++;
            }
          }
          if (now() - tj > 500) await settle();
        }
        dbar.update(s * L + l + 1, `step ${s + 1}/${steps}`);
      }
    }
    dbar.finish();
    const h2 = (await this.client.health()) as unknown as Record<string, unknown>;
    const server = { backend: String(h2.backend ?? 'unknown'), ...(h2.gpu !== undefined && { gpu: h2.gpu }) };
    if (server.backend === 'cuda') log(`GPU after decode: ${JSON.stringify(h2.gpu)}`);

    // Clean up: sessions, then the document.
    for (const run of runs)
      if (run.sid)
        try {
          await this.client.deleteSession(run.sid);
        } catch {
          /* already gone */
        }
    try {
      await this.client.deleteDocument(doc);
    } catch (e) {
      log(`delete document ${doc}: ${(e as Error).message}`);
    }

    const exactP50 = percentile(exact.perToken(), 50);
    const methods = runs.map((r) => r.result(exactP50, L));
    for (const m of methods)
      log(
        `${fmtTokens(tokens)} ${m.method}: p50 ${m.latency.p50Ms.toFixed(2)} ms/token, recall ${m.fidelity.recallMean.toFixed(3)}, ` +
          `out err ${(m.fidelity.outputErrorMean * 100).toFixed(2)}%, scanned ${(m.scannedFraction * 100).toFixed(2)}%${m.error ? ` (ERROR ${m.error})` : ''}`,
      );
    return { tokens, steps, budgetTokens, preload, methods, baselines: baselines(this.shape, tokens), server };
  }
}

/** One session's measurements. */
class Run {
  error?: string;
  readonly wall: number[];
  readonly server: number[];
  readonly select: number[];
  readonly attendK: number[];
  readonly transfer: number[];
  scanned: number[] = [];
  attended: number[] = [];
  blocksSelected = 0;
  blocksHits = 0;
  blocksBytesIn = 0;
  blocksCalls = 0;
  outErr: number[] = [];
  outErrWorst = 0;
  recall: number[] = [];
  oracleRecall: number[] = [];
  topK: number[] = [];
  needles = 0;
  needlesHit = 0;
  duplicates = 0;
  kernelErr?: number;
  coldMs = NaN;

  constructor(
    readonly method: string,
    readonly sid: string,
    readonly steps: number,
  ) {
    this.wall = new Array<number>(steps).fill(0);
    this.server = new Array<number>(steps).fill(0);
    this.select = new Array<number>(steps).fill(0);
    this.attendK = new Array<number>(steps).fill(0);
    this.transfer = new Array<number>(steps).fill(0);
  }

  record(step: number, wallMs: number, r: AttendReply): void {
    const st = r.stats as AttendReply['stats'] & { gpu?: { residentMs: number } };
    this.wall[step] += wallMs;
    this.server[step] += st.ms ?? 0;
    this.select[step] += st.selectMs ?? 0;
    this.attendK[step] += st.attendMs ?? 0;
    this.transfer[step] += st.gpu?.residentMs ?? 0;
    if (st.tokens > 0) this.scanned.push((st.scanned ?? 0) / st.tokens);
    this.attended.push(st.attended ?? 0);
    if (st.blocks) {
      this.blocksCalls++;
      this.blocksSelected += st.blocks.selected;
      this.blocksHits += st.blocks.hits;
      this.blocksBytesIn += st.blocks.bytesIn;
    }
  }

  /** Steps completed by every layer (a failed run keeps what it finished). */
  perToken(): number[] {
    return this.wall.filter((w) => w > 0);
  }

  result(exactP50: number, layers: number): MethodResult {
    const wall = this.perToken(), n = wall.length;
    const take = (xs: number[]) => xs.slice(0, n);
    const p50 = percentile(wall, 50);
    const meanMs = mean(wall);
    const serverMs = mean(take(this.server));
    const isExact = this.method === 'exact';
    return {
      method: this.method,
      ...(this.error && { error: this.error }),
      steps: n,
      latency: {
        perTokenMs: wall.map((x) => round(x)),
        p50Ms: p50,
        p99Ms: percentile(wall, 99),
        meanMs,
        coldMs: this.coldMs,
        rpcMs: meanMs - serverMs,
        serverMs,
        retrievalMs: mean(take(this.select)),
        attentionMs: mean(take(this.attendK)),
        otherServerMs: serverMs - mean(take(this.select)) - mean(take(this.attendK)),
        transferMs: mean(take(this.transfer)),
        tokensPerSecond: 1000 / meanMs,
        ratioToExact: p50 / exactP50,
      },
      scannedFraction: mean(this.scanned),
      attended: mean(this.attended),
      ...(this.blocksCalls > 0 && {
        blocks: {
          selectedPerCall: this.blocksSelected / this.blocksCalls,
          hitRate: this.blocksSelected > 0 ? this.blocksHits / this.blocksSelected : NaN,
          bytesInPerToken: (this.blocksBytesIn / this.blocksCalls) * layers,
        },
      }),
      fidelity: {
        outputErrorMean: isExact ? 0 : mean(this.outErr),
        outputErrorWorst: isExact ? 0 : this.outErrWorst,
        recallMean: isExact ? 1 : mean(this.recall),
        recallWorst: isExact ? 1 : this.recall.length ? Math.min(...this.recall) : NaN,
        oracleRecallMean: isExact ? 1 : mean(this.oracleRecall),
        topKRecallMean: isExact ? 1 : mean(this.topK),
        recallSamples: this.recall.length,
        needlesHit: this.needlesHit,
        needles: this.needles,
        duplicateSelections: this.duplicates,
        ...(this.kernelErr !== undefined && { kernelErrorVsFloat64: this.kernelErr }),
      },
    };
  }
}

// ---------------------------------------------------------------- report

const pct = (x: number, digits = 2) => (Number.isFinite(x) ? `${(x * 100).toFixed(digits)}%` : '—');
const ms = (x: number | undefined) => (x === undefined || !Number.isFinite(x) ? '—' : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));

function markdown(o: Options, m: Machine, health: Record<string, unknown>, date: string, results: ContextResult[], wallSeconds: number, loadEnd: number): string {
  const main = results.find((r) => r.tokens === o.tokens)!;
  const s = o.shape;
  const lines: string[] = [];
  lines.push(
    `## Decode, ${o.mode}: ${o.preset} shape (${s.layers} layer${s.layers === 1 ? '' : 's'}, ${s.qHeads} q / ${s.kvHeads} kv heads, d=${s.headDim}, f16), ${fmtTokens(o.tokens)}-token document`,
    '',
    `${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB, Node ${m.node} (${m.platform}); server ${o.url ? o.url : 'in-process'}: kvrecall ${String(health.version)}, ${String(health.backend)} backend, ${String(health.threads)} native threads. ${date}, ${(wallSeconds / 60).toFixed(1)} min; load average ${m.loadAverage} at the start, ${loadEnd.toFixed(2)} at the end.`,
    '',
    `Workload: bench/workload.ts, seed ${o.seed}, ${o.layerData === 'distinct' ? 'every layer generated with its own seed' : 'one layer generated per context and its K/V reused for every layer'}; prefill queries ${o.prefillQ ? `uploaded for the tokens the server keeps (f16, 1 token in ${o.queryStride}, declared with queryStride)` : 'not uploaded'}. Sessions: budget ${o.budget >= 1 ? `${o.budget} tokens` : `${pct(o.budget, 0)} of the document (${main.budgetTokens} tokens)`} per kv head + ${o.sinks} sinks + ${o.window} window${o.ef !== undefined ? `, ef ${o.ef}` : ''}. Each step sends every layer one attend (q f32 [${s.qHeads},${s.headDim}], new k/v f16 [${s.kvHeads},${s.headDim}]) to every session in turn.`,
    '',
    '### Preload',
    '',
    '| context | K/V | sent (with q) | generate s | upload s | upload GB/s (K/V) | seal s | index build s | seal write s | host RSS | data.mdb (allocated) | KV accounted | GPU pool |',
    '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |',
  );
  for (const r of results) {
    const p = r.preload;
    const build = Object.entries(p.buildSeconds).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ') || '—';
    lines.push(
      `| ${fmtTokens(r.tokens)} | ${fmtBytes(p.kvBytes)} | ${fmtBytes(p.wireBytes)} | ${p.generateSeconds.toFixed(1)} | ${p.uploadSeconds.toFixed(1)} | ${p.uploadGBps.toFixed(2)} | ${p.sealSeconds.toFixed(1)} | ${build} | ${p.sealWriteSeconds.toFixed(2)} | ${p.rssBytes ? fmtBytes(p.rssBytes) : 'n/a'} | ${p.dataMdbBytes !== undefined ? `${fmtBytes(p.dataMdbBytes)} (${fmtBytes(p.dataMdbAllocatedBytes ?? 0)})` : 'n/a'} | ${p.kvAccountedBytes !== undefined ? fmtBytes(p.kvAccountedBytes) : 'n/a'} | ${p.gpuPool} |`,
    );
  }
  lines.push(
    '',
    `Host RSS: ${main.preload.rssNote}, after seal and session attach; peak ${main.preload.peakRssBytes ? fmtBytes(main.preload.peakRssBytes) : 'n/a'}. Session attach (index load) at ${fmtTokens(main.tokens)}: ${Object.entries(main.preload.attachMs).map(([k, v]) => `${k} ${ms(v)} ms`).join(', ')}.`,
    '',
    `Upload at ${fmtTokens(main.tokens)}: ${describePhases(main.preload.upload, main.preload.concurrency)}. Phases: ${SERVER_PHASES.map((ph) => `${ph} = ${PHASE_MEANING[ph]}`).join('; ')}. Seal write = the seal's own LMDB transaction and flush.`,
    ...(main.server.backend === 'cuda' ? ['', `GPU after the decode (/v1/health): ${JSON.stringify(main.server.gpu)}.`] : []),
    '',
    `### Decode at ${fmtTokens(main.tokens)} tokens (${main.steps} steps × ${s.layers} layers)`,
    '',
    'Per generated token = the sum over layers of one attend each, client wall time (encode, HTTP, server, decode). Cold first = a warm-up pass before the timed steps (step 0\'s queries, no k/v appended): JIT, lazy per-session work such as infiniretri\'s retention. Scanned = mean over calls (warm-up included, so one-time passes are amortised over the steps) of stats.scanned / stats.tokens. RPC = wall − server stats.ms; retrieval = stats.selectMs; attention = stats.attendMs; other = the rest of stats.ms (parse, append, selection positions); transfers = stats.gpu.residentMs, making the selected blocks resident in the GPU pool (page tables, copies of misses issued; part of attention; 0 on the CPU backend). Split columns are means per token.',
    '',
    '| method | p50 ms/token | p99 | cold first | RPC | retrieval | attention | other | transfers | tokens/s | × exact | scanned | attended/head | attn recall mean | worst | oracle @count | top-k recall | out err mean | worst | needles |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const r of main.methods) {
    const L = r.latency, F = r.fidelity, isExact = r.method === 'exact';
    lines.push(
      `| ${r.method}${r.error ? ' ⚠' : ''} | ${ms(L.p50Ms)} | ${ms(L.p99Ms)} | ${ms(L.coldMs)} | ${ms(L.rpcMs)} | ${ms(L.retrievalMs)} | ${ms(L.attentionMs)} | ${ms(L.otherServerMs)} | ${ms(L.transferMs)} | ${L.tokensPerSecond.toFixed(1)} | ${L.ratioToExact.toFixed(3)} | ${pct(r.scannedFraction)} | ${r.attended.toFixed(0)} | ${isExact ? '1 (dense)' : F.recallMean.toFixed(4)} | ${isExact ? '—' : F.recallWorst.toFixed(4)} | ${isExact ? '—' : F.oracleRecallMean.toFixed(4)} | ${isExact ? '—' : F.topKRecallMean.toFixed(3)} | ${isExact ? '0 (ref.)' : pct(F.outputErrorMean)} | ${isExact ? '—' : pct(F.outputErrorWorst)} | ${isExact ? '—' : `${F.needlesHit}/${F.needles}`} |`,
    );
  }
  const b = main.baselines;
  lines.push(
    '',
    `GPU reference per token at ${fmtTokens(main.tokens)} (DESIGN.md, H100): dense SDPA with the KV in HBM ${b.gpuDenseMs !== undefined ? `${ms(b.gpuDenseMs)} ms${b.extrapolated ? ' (straight-line extrapolation of the 128K/1M figures)' : ''}` : 'n/a for this shape'}; KV streamed from pinned host memory at ${H100_PINNED_GBPS} GB/s ${ms(b.gpuStreamMs)} ms.`,
    '',
    `Fidelity: output error = ‖o − o_exact‖/‖o_exact‖ per q head against the exact session's reply (all layers, all steps; worst = worst head). Attention recall, oracle recall at the same count, top-k recall (k = budget) and needles: layer(s) ${o.sampleLayers.join(', ')}, kv heads 0 and ${s.kvHeads - 1}, every step, the method's returned selection against float64 exact attention (bench/quality.ts); needles are the workload's planted needles on the sampled layer(s), hit when the needle's step selects its position in its kv head. Exact session vs float64: worst head error ${pct(main.methods[0].fidelity.kernelErrorVsFloat64 ?? NaN, 4)}.`,
  );
  const blocks = main.methods.filter((r) => r.blocks);
  if (blocks.length)
    lines.push(
      '',
      `${main.server.backend === 'cuda' ? 'GPU block pool, measured' : 'Simulated GPU block pool'} (stats.blocks): ${blocks.map((r) => `${r.method} ${r.blocks!.selectedPerCall.toFixed(0)} blocks/call, hit rate ${pct(r.blocks!.hitRate, 1)}, ${fmtBytes(r.blocks!.bytesInPerToken)} host→device per token`).join('; ')}.`,
    );
  for (const r of results) for (const m of r.methods) if (m.error) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method}: ${m.error}`);
  for (const r of results)
    for (const m of r.methods)
      if (m.fidelity.duplicateSelections > 0) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method}: ${m.fidelity.duplicateSelections} selections held a position twice.`);

  if (results.length > 1) {
    lines.push(
      '',
      '### Latency vs context (p50 ms per token, all layers)',
      '',
      `| method | ${results.map((r) => fmtTokens(r.tokens)).join(' | ')} |`,
      `| --- | ${results.map(() => '---:').join(' | ')} |`,
    );
    for (const name of o.methods)
      lines.push(`| ${name} | ${results.map((r) => ms(r.methods.find((m) => m.method === name)?.latency.p50Ms)).join(' | ')} |`);
    lines.push(`| H100 dense, HBM (DESIGN.md) | ${results.map((r) => ms(r.baselines.gpuDenseMs)).join(' | ')} |`);
    lines.push(`| H100 streamed at ${H100_PINNED_GBPS} GB/s | ${results.map((r) => ms(r.baselines.gpuStreamMs)).join(' | ')} |`);
    lines.push(
      '',
      '### Recall and scanned fraction vs context',
      '',
      `| method | ${results.map((r) => `${fmtTokens(r.tokens)} recall / scanned`).join(' | ')} |`,
      `| --- | ${results.map(() => '---:').join(' | ')} |`,
    );
    for (const name of o.methods.filter((n) => n !== 'exact'))
      lines.push(
        `| ${name} | ${results
          .map((r) => {
            const m = r.methods.find((x) => x.method === name);
            return m ? `${m.fidelity.recallMean.toFixed(3)} / ${pct(m.scannedFraction)}` : '—';
          })
          .join(' | ')} |`,
      );
    lines.push('', `Sweep points other than ${fmtTokens(o.tokens)} ran ${o.sweepSteps} steps each.`);
  }
  lines.push('', 'Charts: decode-latency.svg (latency vs context), decode-recall.svg (recall vs scanned fraction).', '');
  return lines.join('\n');
}

function charts(o: Options, results: ContextResult[]): { latency: string; recall: string } {
  const s = o.shape;
  const shapeText = `${o.preset}: ${s.layers} layers, ${s.qHeads}q/${s.kvHeads}kv, d=${s.headDim}; ${o.mode}`;
  const latencySeries: ChartSeries[] = o.methods.map((name) => ({
    name,
    points: results.flatMap((r) => {
      const m = r.methods.find((x) => x.method === name);
      return m && Number.isFinite(m.latency.p50Ms) ? [{ x: r.tokens, y: m.latency.p50Ms }] : [];
    }),
  }));
  const xs = results.map((r) => r.tokens);
  if (results.some((r) => r.baselines.gpuDenseMs !== undefined))
    latencySeries.push({ name: 'H100 dense, HBM', dashed: true, color: '#555555', points: results.map((r) => ({ x: r.tokens, y: r.baselines.gpuDenseMs ?? NaN })) });
  latencySeries.push({ name: 'H100 streamed, PCIe', dashed: true, color: '#aaaaaa', points: results.map((r) => ({ x: r.tokens, y: r.baselines.gpuStreamMs })) });
  const latency = lineChart({
    title: 'Decode latency per token vs context length',
    subtitle: `${shapeText}; p50 over steps of the sum over layers, RPC included\ndashed: DESIGN.md's H100 references (dense in HBM; streamed from pinned host memory)`,
    xLabel: 'context tokens',
    yLabel: 'ms per token (log)',
    xScale: 'log2',
    yScale: 'log10',
    xDomain: xs.length > 1 ? [Math.min(...xs) / 1.25, Math.max(...xs) * 1.25] : undefined,
    series: latencySeries,
  });
  const recallSeries: ChartSeries[] = o.methods.map((name) => ({
    name,
    points: results.flatMap((r) => {
      const m = r.methods.find((x) => x.method === name);
      if (!m || !Number.isFinite(m.fidelity.recallMean) || !Number.isFinite(m.scannedFraction)) return [];
      return [{ x: Math.max(m.scannedFraction, 1e-4), y: m.fidelity.recallMean, ...(name !== 'exact' && { label: fmtTokens(r.tokens) }) }];
    }),
  }));
  const recall = lineChart({
    title: 'Attention recall vs scanned fraction',
    subtitle: `${shapeText}; mean over steps and sampled heads; one point per context length`,
    xLabel: 'scanned fraction of the context (stats.scanned / stats.tokens, log)',
    yLabel: 'attention recall (mass kept)',
    xScale: 'log10',
    yScale: 'linear',
    yDomain: [0, 1.05],
    xFormat: (x) => (x >= 0.01 ? `${+(x * 100).toPrecision(3)}%` : `${+(x * 100).toPrecision(2)}%`),
    series: recallSeries,
  });
  return { latency, recall };
}

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
    server = await startServer({ ...DEFAULTS, host: '127.0.0.1', port: 0, dataDir: tempDir });
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
    const bench = new Bench(o, client, server, dataDir, health);
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
    const md = markdown(o, m, health, date, results, wallSeconds, loadavg()[0]);
    const { latency, recall } = charts(o, results);
    const dir = o.out ?? RESULTS_DIR;
    mkdirSync(dir, { recursive: true });
    const base = join(dir, `decode-${o.mode}-${o.preset}`);
    writeFileSync(`${base}.md`, md);
    writeFileSync(
      `${base}.json`,
      JSON.stringify({ machine: m, date, wallSeconds: round(wallSeconds, 1), backend: String(health.backend ?? 'unknown'), server: { url: o.url ?? 'in-process', health }, options: o, results }, (_, v) =>
        typeof v === 'number' && !Number.isInteger(v) ? round(v, 5) : v, 2) + '\n',
    );
    writeFileSync(join(dir, 'decode-latency.svg'), latency);
    writeFileSync(join(dir, 'decode-recall.svg'), recall);
    process.stdout.write(md);
    log(`wrote ${base}.{md,json}, decode-latency.svg, decode-recall.svg in ${wallSeconds.toFixed(0)} s`);
  } finally {
    await stop();
  }
}

await main();
