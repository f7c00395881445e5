// npm run bench:fidelity [-- --tokens 131072 --kv-heads 2 --steps 24 --configs default,broad
//                           --methods wave,topk-blocks,nosa,hnsw --budget 0.02 --cluster-size 8 --probes 8,4,2 --quick --tag T]
// --probes: wave once per probe (candidates rescored = probe × the tokens it keeps, as a session's ef asks).
//
// Attention output error of each method, with and without the estimation
// zone, on the seeded generator (workload/) in two configurations: `default`
// (its concentrated heads) and `broad` (aggregation: topics spread over many
// runs; broadKnobs). Each decode step runs the engine's own decode step in
// process (no HTTP, CPU backend) and is judged against float64 attention
// over the whole context (bench/quality.ts), beside the exact top-k oracle
// at the same exact count (the best any token choice can do). Needles: a
// needle counts as found when the step that asks for it attends it exactly
// (or, estimated, when that q head's output error is under 0.1).
// Results: bench/results/fidelity-<tokens>[-cs<N>][-<tag>].{json,md}.
import { writeFileSync } from 'node:fs';
import { findMethod } from '../index/registry.js';
import { budgetTokens, type HeadIndex, type LayerContext, type RetrievalMethod, type SearchParams, type Selection } from '../index/method.js';
import { staticRanges } from '../index/static-plus-retrieved.js';
import { decodeStep } from '../engine/decode-step.js';
import type { LoadedDocument } from '../engine/documents.js';
import { headKeys } from '../engine/document-indexes.js';
import { DEFAULT_PARAMS } from '../engine/sessions.js';
import { Session } from '../engine/session.js';
import type { ModelShape } from '../core/model.js';
import { UNLIMITED } from '../storage/host-budget.js';
import { KvSegment } from '../storage/kv-segment.js';
import { broadKnobs, defaultKnobs, generateWorkload, type Workload } from '../workload/index.js';
import { machine } from './decode/machine.js';

const describeMachine = () => {
  const m = machine();
  return `${m.cpu}, ${m.cores} cores (native pool ${m.nativeThreads} threads), ${m.memoryGiB} GiB, load ${m.loadAverage}`;
};
import { compareWithOracle, exactAttention, oracleSelection, relativeErrors, type ExactAttention } from './quality.js';
import { mean, median } from './stats.js';
import { strFlag } from './args.js';

interface Options {
  tokens: number;
  kvHeads: number;
  steps: number;
  configs: string[];
  methods: string[];
  budget: number;
  clusterSize: number;
  /** wave's probes (candidates rescored per token kept); empty: its default. */
  probes: number[];
  /** Appended to the results' file name (a partial run beside the full table). */
  tag?: string;
}

const progress = (msg: string) => process.stderr.write(`[bench:fidelity] ${msg}\n`);

function parseArgs(argv: string[]): Options {
  const get = (name: string) => strFlag(`--${name}`, argv);
  const quick = argv.includes('--quick');
  return {
    tokens: Number(get('tokens') ?? (quick ? 32768 : 131072)),
    kvHeads: Number(get('kv-heads') ?? 2),
    steps: Number(get('steps') ?? (quick ? 8 : 24)),
    configs: (get('configs') ?? 'default,broad').split(','),
    methods: (get('methods') ?? 'oracle,wave,topk-blocks,nosa,hnsw').split(','),
    budget: Number(get('budget') ?? 0.02),
    clusterSize: Number(get('cluster-size') ?? 8),
    probes: (get('probes') ?? '').split(',').filter(Boolean).map(Number),
    tag: get('tag'),
  };
}

/** The workload as a ready document, with every method's index built per kv head. */
async function documentOf(w: Workload, model: ModelShape, methods: string[], clusterSize: number): Promise<{ doc: LoadedDocument; indexes: Map<string, HeadIndex[]> }> {
  const seg = new KvSegment(model.kvHeads, model.headDim, 'f16', 1);
  seg.k = w.keys;
  seg.v = w.values;
  seg.setTokens(w.spec.tokens);
  const indexes = new Map<string, HeadIndex[]>();
  for (const name of new Set([...methods, 'wave'])) {
    const builder = findMethod(name)?.builder;
    if (!builder) continue;
    const t0 = performance.now();
    const heads: HeadIndex[] = [];
    for (let h = 0; h < model.kvHeads; h++) {
      const keys = headKeys(seg, h);
      const bytes = await builder.build({ ...keys, queries: w.prefillQ[h], queryCount: w.prefillQ[h].length / model.headDim, clusterSize });
      heads.push(builder.load(bytes, keys));
    }
    indexes.set(name, heads);
    progress(`${name}: built ${model.kvHeads} heads in ${((performance.now() - t0) / 1e3).toFixed(1)} s`);
  }
  const meta = { id: 'workload', model, status: 'ready' as const, tokens: w.spec.tokens, methods: [...indexes.keys()], createdAt: new Date().toISOString() };
  return { doc: { meta, layers: [seg], indexes: new Map() }, indexes };
}

/**
 * The exact top-k oracle as a method: sinks and window, then the tokens of
 * highest mean probability over the group (float64, this step's) up to the
 * budget. With estimate on, it shows what the estimation zone adds to the
 * best possible token choice.
 */
function oracleMethod(exact: ExactAttention[][], step: () => number): RetrievalMethod {
  return {
    name: 'oracle',
    async select(ctx: LayerContext, _q: Float32Array, p: SearchParams): Promise<Selection> {
      const segment = ctx.segments[0];
      const ranges = staticRanges(ctx, 0, p);
      const parts: Selection['parts'] = ranges.map(([begin, end]) => ({ segment, begin, end }));
      const inStatic = (t: number) => ranges.some(([a, b]) => t >= a && t < b);
      const ids = exact[step()].map((ex) => {
        const top = oracleSelection(ex, p.budget + ranges.reduce((n, [a, b]) => n + b - a, 0));
        return Int32Array.from([...top].filter((t) => !inStatic(t)).slice(0, p.budget));
      });
      parts.push({ segment, ids });
      const own = ctx.segments[ctx.segments.length - 1];
      if (own !== segment && own.tokens > 0) parts.push({ segment: own, begin: 0, end: own.tokens });
      return { parts, scanned: ctx.tokens };
    },
  };
}

interface Row {
  config: string;
  method: string;
  /** wave's probe where --probes set one. */
  probe?: number;
  estimate: boolean;
  exactShare: number;
  estimatedShare: number;
  outError: number;
  outErrorP90: number;
  oracleError: number;
  needleSteps: number;
  needlesFound: number;
  needleStepError: number;
  selectMsP50: number;
  stepMsP50: number;
}

async function runConfig(config: string, o: Options): Promise<Row[]> {
  const model: ModelShape = { layers: 1, qHeads: o.kvHeads * 4, kvHeads: o.kvHeads, headDim: 128, dtype: 'f16', blockSize: 64 };
  const knobs = config === 'broad' ? broadKnobs(o.tokens) : defaultKnobs(o.tokens);
  progress(`${config}: generating ${o.tokens} tokens × ${o.kvHeads} kv heads, ${o.steps} steps`);
  const w = generateWorkload({ seed: 7, tokens: o.tokens, kvHeads: o.kvHeads, qHeads: model.qHeads, headDim: 128, steps: o.steps, needles: o.kvHeads * 2, knobs });
  const { doc, indexes } = await documentOf(w, model, o.methods, o.clusterSize);
  const G = model.qHeads / model.kvHeads, d = model.headDim;
  // Float64 references per step and kv head group.
  const exact = w.decodeQ.map((q) => Array.from({ length: model.kvHeads }, (_, h) => exactAttention(q.subarray(h * G * d, (h + 1) * G * d), G, w.keys[h], w.values[h], { headDim: d, scale: w.scale })));
  const rows: Row[] = [];
  const runs = o.methods.flatMap((method): { method: string; probe?: number }[] => (method === 'wave' && o.probes.length ? o.probes.map((probe) => ({ method, probe })) : [{ method, probe: undefined }]));
  for (const { method, probe } of runs)
    for (const estimate of [false, true]) {
      let current = 0;
      const m = method === 'oracle' ? oracleMethod(exact, () => current) : findMethod(method)!;
      // wave keeps the budget plus the sinks and window it searches past (engine/wave-on-device.ts, staticPlusRetrieved).
      const ef = probe ? probe * (budgetTokens(o.budget, o.tokens) + 16 + 64) : 0;
      const params: SearchParams = { ...DEFAULT_PARAMS, budget: o.budget, sinks: 16, window: 64, ef };
      const session = new Session({
        id: method, model, documents: [doc], method: m, params,
        documentIndexes: m.builder ? [[indexes.get(method)!]] : [],
        clusterIndexes: estimate ? [[indexes.get('wave')!]] : undefined,
        budget: UNLIMITED,
      });
      const errs: number[] = [], oracle: number[] = [], sel: number[] = [], ms: number[] = [], att: number[] = [], est: number[] = [];
      let needleSteps = 0, found = 0;
      const needleErr: number[] = [];
      for (let s = 0; s < o.steps; s++) {
        current = s;
        const r = await decodeStep(session, { layer: 0, q: w.decodeQ[s], scale: w.scale, want: new Set(['selection']) });
        sel.push(r.stats.selectMs);
        ms.push(r.stats.ms);
        att.push(r.stats.attended);
        est.push(r.stats.estimated ?? 0);
        for (let h = 0; h < model.kvHeads; h++) {
          const ex = exact[s][h];
          const e = relativeErrors(r.out.subarray(h * G * d, (h + 1) * G * d), ex.out, G);
          errs.push(...e);
          oracle.push(compareWithOracle(ex, r.selection![h]).oracle.outputError);
          for (const n of w.needles.filter((x) => x.step === s && x.head === h)) {
            needleSteps++;
            const qe = e[n.qHead - h * G];
            needleErr.push(qe);
            if (r.selection![h].includes(n.position) || (estimate && qe < 0.1)) found++;
          }
        }
      }
      const sorted = [...errs].sort((a, b) => a - b);
      const row: Row = {
        config, method, ...(probe && { probe }), estimate,
        exactShare: mean(att) / o.tokens, estimatedShare: mean(est) / o.tokens,
        outError: mean(errs), outErrorP90: sorted[Math.floor(0.9 * (sorted.length - 1))], oracleError: mean(oracle),
        needleSteps, needlesFound: found, needleStepError: needleErr.length ? mean(needleErr) : NaN,
        selectMsP50: median(sel), stepMsP50: median(ms),
      };
      progress(`${config} ${method}${probe ? ` (probe ${probe})` : ''}${estimate ? ' +estimate' : ''}: error ${row.outError.toFixed(4)} (oracle ${row.oracleError.toFixed(4)}), exact ${(row.exactShare * 100).toFixed(2)}%, needles ${found}/${needleSteps}`);
      rows.push(row);
      session.release();
    }
  return rows;
}

function markdown(o: Options, rows: Row[], host: string): string {
  const pct = (x: number) => `${(x * 100).toFixed(2)}%`;
  const lines = [
    `# Fidelity: attention output error with and without the estimation zone (${o.tokens} tokens)`,
    '',
    `Machine: ${host}. One layer, ${o.kvHeads} kv heads × 4 q heads, d=128, f16; ${o.steps} decode steps; budget ${o.budget} of the context + 16 sinks + 64 window (block methods round to 64-token blocks); CPU backend, the engine's decode step in process. Errors: ‖o − o_exact‖/‖o_exact‖ per q head against float64, mean (and p90) over heads and steps; oracle: the exact top-k at the same exact count, no estimation.`,
    '',
    '| config | method | estimate | exact | estimated | output error | p90 | oracle (same count) | needles | needle-step error | select p50 ms | step p50 ms |',
    '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map((r) => `| ${r.config} | ${r.method}${r.probe ? ` (probe ${r.probe})` : ''} | ${r.estimate ? 'on' : 'off'} | ${pct(r.exactShare)} | ${pct(r.estimatedShare)} | ${r.outError.toFixed(4)} | ${r.outErrorP90.toFixed(4)} | ${r.oracleError.toFixed(4)} | ${r.needlesFound}/${r.needleSteps} | ${r.needleStepError.toFixed(3)} | ${r.selectMsP50.toFixed(2)} | ${r.stepMsP50.toFixed(2)} |`),
    '',
  ];
  return lines.join('\n');
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const rows: Row[] = [];
  for (const config of o.configs) rows.push(...(await runConfig(config, o)));
  const host = describeMachine();
  const base = `bench/results/fidelity-${o.tokens}${o.clusterSize === 8 ? '' : `-cs${o.clusterSize}`}${o.tag ? `-${o.tag}` : ''}`;
  writeFileSync(`${base}.json`, JSON.stringify({ machine: host, date: new Date().toISOString(), options: o, rows }, null, 1) + '\n');
  writeFileSync(`${base}.md`, markdown(o, rows, host));
  progress(`wrote ${base}.{json,md}`);
}

await main();
