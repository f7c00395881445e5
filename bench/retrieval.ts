// npm run bench:retrieval [-- --tokens 65536,1048576 --heads 1 --steps 6 --methods hnsw,ivf,retrieval-attention --quick]
//
// Each method's per-head index against the oracle on the seeded workload
// (bench/workload.ts): build time, search latency per query group, scanned
// fraction, attention recall (and the oracle's at the same count), top-k
// recall (k = 1% of tokens), output error and needle hits. The selection
// judged is what a session attends: sinks + window + what the index
// retrieves (budget = 1% of tokens), exactly as index/static-plus-retrieved.ts
// composes it. Results: bench/results/retrieval-<tokens>.{json,md}.
import { writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { findMethod } from '../index/registry.js';
import type { HeadIndex, HeadIndexBuilder } from '../index/method.js';
import { nativeThreads } from '../native/index.js';
import { compareWithOracle, exactAttention, type ExactAttention } from './quality.js';
import { generateWorkload, type Workload } from './workload.js';

interface Options {
  tokens: number[];
  heads: number;
  steps: number;
  methods: string[];
  sinks: number;
  window: number;
  budgetFraction: number;
}

/**
 * Search efforts swept per method, given the ids asked for (k) and the
 * tokens: beam widths for the graphs, lists probed for ivf (nlist = 4·√n).
 */
function efSweep(method: string, k: number, tokens: number): number[] {
  const nlist = Math.round(4 * Math.sqrt(tokens));
  switch (method) {
    case 'hnsw':
    case 'retrieval-attention':
      return [k, 2 * k, 4 * k];
    case 'ivf':
      return [0.01, 0.03, 0.1].map((f) => Math.max(1, Math.round(f * nlist)));
    default:
      return [0];
  }
}

function parseArgs(argv: string[]): Options {
  const get = (name: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const quick = argv.includes('--quick');
  return {
    tokens: (get('tokens') ?? (quick ? '16384' : '65536')).split(',').map(Number),
    heads: Number(get('heads') ?? 1),
    steps: Number(get('steps') ?? (quick ? 3 : 6)),
    methods: (get('methods') ?? 'hnsw,ivf,retrieval-attention').split(',').filter((m) => findMethod(m)?.builder),
    sinks: 16,
    window: 256,
    budgetFraction: 0.01,
  };
}

export function machine(): string {
  const cpu = cpus()[0]?.model.trim() ?? 'unknown CPU';
  return `${cpu}, ${cpus().length} cores (native pool ${nativeThreads} threads), ${(totalmem() / 2 ** 30).toFixed(1)} GiB`;
}

const progress = (msg: string) => process.stderr.write(`[bench:retrieval] ${msg}\n`);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : NaN;
}

interface Row {
  method: string;
  ef: number;
  buildSeconds: number;
  searchMs: number;
  scanned: number;
  attentionRecall: number;
  oracleRecall: number;
  topKRecall: number;
  outputError: number;
  needleHits: string;
  selected: number;
}

/** Sinks + window + retrieved (minus what the static part covers), as one id list. */
function selection(tokens: number, retrieved: Int32Array, o: Options, want: number): Int32Array {
  const isStatic = (t: number) => t < o.sinks || t >= tokens - o.window;
  const ids: number[] = [];
  for (let t = 0; t < Math.min(o.sinks, tokens); t++) ids.push(t);
  for (let t = Math.max(o.sinks, tokens - o.window); t < tokens; t++) ids.push(t);
  let n = 0;
  for (const id of retrieved) if (n < want && !isStatic(id)) ids.push(id), n++;
  return Int32Array.from(ids);
}

async function runMethod(
  name: string,
  builder: HeadIndexBuilder,
  wl: Workload,
  exact: ExactAttention[][],
  o: Options,
): Promise<Row[]> {
  const { tokens, headDim: d, qHeads, kvHeads } = wl.spec;
  const G = qHeads / kvHeads, want = Math.round(tokens * o.budgetFraction), dtype = wl.dtype;
  const t0 = performance.now();
  const indexes: HeadIndex[] = [];
  for (let h = 0; h < o.heads; h++) {
    const keys = { keys: wl.keys[h], tokens, headDim: d, dtype };
    const q = wl.prefillQ[h];
    const bytes = await builder.build({ ...keys, queries: q, queryCount: q.length / d });
    indexes.push(builder.load(bytes, keys));
    progress(`${name}: built head ${h + 1}/${o.heads} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  }
  const buildSeconds = (performance.now() - t0) / 1000 / o.heads;
  const rows: Row[] = [];
  for (const ef of efSweep(name, want + o.sinks + o.window, tokens)) {
    const times: number[] = [], scanned: number[] = [], rec: number[] = [], orc: number[] = [], topk: number[] = [], err: number[] = [];
    let hits = 0, needles = 0, count = 0;
    for (let h = 0; h < o.heads; h++)
      for (let s = 0; s < o.steps; s++) {
        const q = wl.decodeQ[s].subarray(h * G * d, (h + 1) * G * d);
        const t = performance.now();
        const res = indexes[h].search(q, G, want + o.sinks + o.window, ef);
        times.push(performance.now() - t);
        scanned.push(res.scanned / tokens);
        const S = selection(tokens, res.ids, o, want);
        const cmp = compareWithOracle(exact[h][s], S, want);
        rec.push(cmp.method.attentionRecall);
        orc.push(cmp.oracle.attentionRecall);
        topk.push(cmp.method.topKRecall);
        err.push(cmp.method.outputError);
        count += cmp.method.count;
        const inS = new Set(S);
        for (const n of wl.needles)
          if (n.head === h && n.step === s) {
            needles++;
            if (inS.has(n.position)) hits++;
          }
      }
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    rows.push({
      method: name,
      ef,
      buildSeconds,
      searchMs: median(times),
      scanned: mean(scanned),
      attentionRecall: mean(rec),
      oracleRecall: mean(orc),
      topKRecall: mean(topk),
      outputError: mean(err),
      needleHits: `${hits}/${needles}`,
      selected: count / (o.heads * o.steps),
    });
    progress(`${name} ef=${ef}: recall ${mean(rec).toFixed(3)} (oracle ${mean(orc).toFixed(3)}), scanned ${(mean(scanned) * 100).toFixed(2)}%`);
  }
  return rows;
}

function markdown(tokens: number, rows: Row[], o: Options): string {
  const pct = (x: number) => `${(x * 100).toFixed(2)}%`;
  const lines = [
    `### Retrieval at ${tokens.toLocaleString('en-US')} tokens per head`,
    '',
    `${machine()}; ${o.heads} kv head(s) × ${o.steps} decode steps, GQA group 4, d=128, f16; budget ${pct(o.budgetFraction)} of tokens + ${o.sinks} sinks + ${o.window} window.`,
    '',
    '| method | ef | build s/head | search ms | scanned | attention recall | oracle recall | top-k recall | output error | needles |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map(
      (r) =>
        `| ${r.method} | ${r.ef} | ${r.buildSeconds.toFixed(2)} | ${r.searchMs.toFixed(3)} | ${pct(r.scanned)} | ${r.attentionRecall.toFixed(4)} | ${r.oracleRecall.toFixed(4)} | ${r.topKRecall.toFixed(3)} | ${pct(r.outputError)} | ${r.needleHits} |`,
    ),
  ];
  return lines.join('\n') + '\n';
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  for (const tokens of o.tokens) {
    progress(`generating ${tokens} tokens × ${o.heads} kv heads`);
    const spec = { seed: 7, tokens, kvHeads: o.heads, qHeads: o.heads * 4, headDim: 128, steps: o.steps, needles: o.heads * o.steps };
    const wl = generateWorkload(spec, (f) => f === 1 && progress('workload ready'));
    const G = 4, d = 128;
    const exact: ExactAttention[][] = [];
    for (let h = 0; h < o.heads; h++) {
      exact.push([]);
      for (let s = 0; s < o.steps; s++) {
        exact[h].push(exactAttention(wl.decodeQ[s].subarray(h * G * d, (h + 1) * G * d), G, wl.keys[h], wl.values[h], { headDim: d, dtype: wl.dtype }));
        progress(`exact attention head ${h} step ${s}`);
      }
    }
    const rows: Row[] = [];
    for (const name of o.methods) rows.push(...(await runMethod(name, findMethod(name)!.builder!, wl, exact, o)));
    const md = markdown(tokens, rows, o);
    writeFileSync(`bench/results/retrieval-${tokens}.md`, md);
    writeFileSync(`bench/results/retrieval-${tokens}.json`, JSON.stringify({ machine: machine(), date: new Date().toISOString(), options: o, rows }, null, 2));
    process.stdout.write(md);
  }
}

await main();
