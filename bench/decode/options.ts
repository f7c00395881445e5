// bench:decode's command line: flags, presets, defaults per mode. The
// flags and their defaults are the benchmark's interface (README, results
// headers): change them only together with USAGE.
import { findMethod, methodNames } from '../../index/registry.js';

export interface Shape {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

/**
 * How every attend travels: `stream`, one frame per attend on one open
 * WebSocket (what an LLM server keeping one connection does); `batch`, per
 * (step, layer) one batch frame on a stream carrying every method's session
 * (they stand for a server's running batch); `http`, one POST per attend;
 * `stream-spin`, as stream with the client's event loop polling for up to
 * 2 ms for each answer before it sleeps (openStream({ spinMs })): beside
 * `stream`, the two take turns call by call in one sitting.
 */
export const VIAS = ['stream', 'stream-spin', 'batch', 'http'] as const;
export type Via = (typeof VIAS)[number];

/** Full mode's default methods (besides exact): cheap seal builds at 1M tokens. */
const FULL_METHODS = ['nosa', 'topk-blocks'];

const PRESETS: Record<string, Shape> = {
  'llama3-8b': { layers: 32, qHeads: 32, kvHeads: 8, headDim: 128 },
  'llama3.2-1b': { layers: 16, qHeads: 32, kvHeads: 8, headDim: 64 },
};

export interface Options {
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
  /** retrieval-attention's sessions: the code walk (codeWalk), its codeShare and the exact cap scanShare (absent: the server's defaults). */
  codeWalk?: boolean;
  codeShare?: number;
  scanShare?: number;
  /** The document's `clusterSize` at PUT (wave's clusters; the server's default when absent). */
  clusterSize?: number;
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
  /** Appended to the output files' names (decode-<mode>-<preset>-<tag>.*), so a trial run leaves the committed ones. */
  tag?: string;
  /**
   * Transports, each with sessions of its own over the document, taking
   * turns per (step, layer); the first is the report's main one. Their
   * answers for the same step must be bit-identical.
   */
  vias: Via[];
  /** --timing: every call asks for a device step's host stages (stats.gpu.host). */
  timing: boolean;
  /**
   * --exact: `apart`, the exact sessions' whole decode first, then the other
   * methods' (an LLM server's calls follow its own, not a dense attend
   * over the whole context); `interleaved`, every session in turn per
   * (step, layer), as before.
   */
  exact: 'apart' | 'interleaved';
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
  --code-walk [--code-share F] [--scan-share F]   retrieval-attention's sessions search with the code walk (more recall
                         for more CPU; codes read at most F of the tokens, default 0.4); --scan-share caps the keys it
                         scores exactly (either walk; default with the code walk 3% or 3x the budget)
  --cluster-size N       the document's clusterSize at PUT (wave's tokens per cluster; the server's default, 16, when absent)
  --query-stride N       document keeps prefill queries of 1 token in N (quick 4, full 16)
  --prefill-q on|off     upload prefill queries (default on when an indexed method is requested)
  --layer-data distinct|shared   generate every layer (quick) or reuse one generated layer (full)
  --sample-layers LIST|none   layers whose selections are judged against float64 attention (default 0); none: no
                         selection asked or judged, every call back to back (an LLM server's; no recall figures)
  --seed N               workload seed (default 7)
  --upload-mib N         upload chunk size (default 64)
  --concurrency N        layers uploaded side by side during preload (default 2)
  --via LIST             stream | stream-spin | batch | http, or several (e.g. stream,batch): each its own sessions,
                         taking turns per (step, layer), answers checked bit for bit against the first's (default
                         stream); stream-spin: a stream whose client polls up to 2 ms for each answer before it
                         sleeps (one core busy for the wait; openStream({ spinMs: 2 }))
  --timing               every call asks return: ['timing']: a device wave step's host stages (stats.gpu.host),
                         reported as p50s per call kind
  --exact apart|interleaved   apart (default): the exact sessions' whole decode first (their replies kept for the
                         fidelity), then the other methods', so no method's call follows a dense attend over the
                         whole context (29 ms a call at 1M on the H100 host, after which a wave call came cold);
                         interleaved: every session in turn per (step, layer), the order before
  --out DIR              results folder (default bench/results)
  --tag NAME             output files decode-<mode>-<preset>-NAME.{md,json} and charts decode-latency-NAME.svg, ...`;

function parseCount(s: string, name: string): number {
  const m = /^(\d+(?:\.\d+)?)([kKmM]?)$/.exec(s.trim());
  if (!m) throw new Error(`--${name}: not a count: ${s}`);
  const mult = m[2] === '' ? 1 : m[2].toLowerCase() === 'k' ? 1024 : 1024 * 1024;
  const n = Math.round(Number(m[1]) * mult);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`--${name}: not a count: ${s}`);
  return n;
}

/** Splits argv into the boolean flags seen and the --name value pairs; --help prints USAGE and exits. */
function readArgv(argv: string[]): { seen: Set<string>; values: Map<string, string> } {
  const flags = new Set(['quick', 'full', 'help', 'timing', 'code-walk']);
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
    'sample-layers', 'seed', 'upload-mib', 'concurrency', 'out', 'tag', 'via', 'cluster-size', 'exact', 'code-share', 'scan-share',
  ];
  for (const k of values.keys()) if (!known.includes(k)) throw new Error(`unknown option --${k}\n${USAGE}`);
  if (seen.has('quick') && seen.has('full')) throw new Error('--quick and --full exclude each other');
  return { seen, values };
}

type Get = (k: string) => string | undefined;
type Int = (k: string, dflt: number) => number;

/** The model shape: a preset (quick mode keeps 2 of its layers) with per-field overrides, or custom. */
function parseShape(get: Get, int: Int, quick: boolean): { preset: string; shape: Shape } {
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
  return { preset, shape };
}

/** The sweep's context lengths, ascending, always including `tokens`. */
function parseSweep(raw: string | undefined, tokens: number, quick: boolean): number[] {
  const defaultSweep = quick ? [4096, 8192, 16384] : [131072, 262144, 524288, 1048576];
  if (raw === 'none') return [tokens];
  return [...new Set([...(raw ? raw.split(',').map((s) => parseCount(s, 'sweep')) : defaultSweep.filter((t) => t < tokens)), tokens])]
    .filter((t) => t >= 2048)
    .sort((a, b) => a - b);
}

/** exact first (the reference every other method is judged against), then the asked methods. */
function parseMethods(raw: string | undefined, quick: boolean): string[] {
  const all = [...methodNames];
  // Full mode indexes 1M tokens × every layer at seal: by default only the methods whose build is a
  // block summary per head (seconds per layer); the others are opt-in with --methods.
  const asked = raw ? raw.split(',').map((s) => s.trim()).filter(Boolean) : quick ? all : FULL_METHODS.filter((m) => all.includes(m));
  for (const m of asked) if (!findMethod(m)) throw new Error(`unknown method ${m} (registered: ${all.join(', ')})`);
  return ['exact', ...asked.filter((m) => m !== 'exact')];
}

function parseExact(raw: string | undefined): Options['exact'] {
  const v = raw ?? 'apart';
  if (v !== 'apart' && v !== 'interleaved') throw new Error('--exact is apart or interleaved');
  return v;
}

function parseVias(raw: string | undefined): Via[] {
  const vias = (raw ?? 'stream').split(',').map((s) => s.trim()).filter(Boolean);
  for (const v of vias) if (!(VIAS as readonly string[]).includes(v)) throw new Error(`--via: ${v} is not one of ${VIAS.join(', ')}`);
  if (vias.length === 0 || new Set(vias).size !== vias.length) throw new Error('--via: a list of distinct transports');
  return vias as Via[];
}

export function parseArgs(argv: string[]): Options {
  const { seen, values } = readArgv(argv);
  const quick = seen.has('quick');
  const get: Get = (k) => values.get(k);
  const int: Int = (k, dflt) => (get(k) === undefined ? dflt : parseCount(get(k)!, k));
  const { preset, shape } = parseShape(get, int, quick);

  const tokens = int('tokens', quick ? 16384 : 1048576);
  const steps = int('steps', quick ? 32 : 64);
  if (tokens < 2048) throw new Error('--tokens must be at least 2048');
  if (steps < 1 || steps > 1024) throw new Error('--steps must be in [1, 1024]');
  const sweepSteps = int('sweep-steps', quick ? 8 : 16);
  if (sweepSteps < 1 || sweepSteps > 1024) throw new Error('--sweep-steps must be in [1, 1024]');
  const sweep = parseSweep(get('sweep'), tokens, quick);
  const methods = parseMethods(get('methods'), quick);
  const indexed = methods.some((m) => findMethod(m)?.builder);

  const layerData = (get('layer-data') ?? (quick ? 'distinct' : 'shared')) as Options['layerData'];
  if (layerData !== 'distinct' && layerData !== 'shared') throw new Error('--layer-data is distinct or shared');
  const pq = get('prefill-q') ?? (indexed ? 'on' : 'off');
  if (pq !== 'on' && pq !== 'off') throw new Error('--prefill-q is on or off');
  const sampleArg = get('sample-layers') ?? '0';
  const sampleLayers = sampleArg === 'none' ? [] : sampleArg.split(',').map((s) => parseCount(s, 'sample-layers'));
  for (const l of sampleLayers) if (l >= shape.layers) throw new Error(`--sample-layers: layer ${l} ≥ ${shape.layers}`);
  const budget = get('budget') === undefined ? 0.01 : Number(get('budget'));
  if (!(budget > 0)) throw new Error('--budget must be positive');
  const tag = get('tag');
  if (tag !== undefined && !/^[A-Za-z0-9._-]+$/.test(tag)) throw new Error('--tag: letters, digits, . _ - only');
  const opt = (k: string) => (get(k) === undefined ? undefined : parseCount(get(k)!, k));
  // Checked by the server (422); here only that it is a number.
  const share = (k: string) => {
    if (get(k) === undefined) return undefined;
    const v = Number(get(k));
    if (!Number.isFinite(v)) throw new Error(`--${k} must be a number in (0, 1]`);
    return v;
  };
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
    ...(seen.has('code-walk') && { codeWalk: true }),
    ...(share('code-share') !== undefined && { codeShare: share('code-share') }),
    ...(share('scan-share') !== undefined && { scanShare: share('scan-share') }),
    clusterSize: opt('cluster-size'),
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
    tag,
    vias: parseVias(get('via')),
    timing: seen.has('timing'),
    exact: parseExact(get('exact')),
  };
}
