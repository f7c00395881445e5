// npx tsc -p tsconfig.json && node dist/bench/ra-gpu-walk.js [--tokens 1048576] [--steps 8] [--broad] [--widths 1,8,32,64,128]
//     [--pools 256,1024,4096] [--pool-widths 32,64,128] [--out bench/results/NAME.md]
//
// Issue #15's GPU walk, measured on the CPU before it is written: the beam
// walk of RaGraph's attention search (native/indexes/ra_graph_beam.h) with
// expandWidth W, W candidates expanded a round and all their new neighbours
// scored as one stream, is the round structure a CTA a kv head would run
// (CAGRA-like). For each W and each stop rule (capped at 3% scanned; the
// session default's quality bound, margin 0.5 and ef 8k) it reports what the
// kernel's cost and quality hang on:
//   - rounds: the walk's sequential depth (each round on a device is a list
//     read, then a gather of the new keys' rows, then a pool merge: two
//     dependent memory latencies and a barrier or more);
//   - keys scored exactly (scanned, the sample and the entry points
//     included) and their mean a round: the round's gather width;
//   - the candidate heap's peak: what a pool in shared memory must hold to be
//     the CPU's walk (the CPU's heap is unbounded);
//   - the group top-1% recall (bench/ra-search.ts's) and the mean output
//     error of sinks + window + the first k retrieved against exact
//     attention (float64, bench/quality.ts; the oracle's beside it: the
//     exact top k of the group's mean probability in the same selection);
//   - a scan instead of a walk, as a device could run it: every key's 4-bit
//     code scored, the best share by that scored exactly (--scan-shares);
//   - the overlap of the retrieved ids with W = 1's (the walk one candidate at
//     a time, the CPU's default): how far a GPU walk's ids may drift from the
//     CPU's while the quality holds, so tests compare recall, not ids.
// --pools: the same with the candidate pool cut to its best P after every
// round (the search option poolCap, an experiment), as
// a fixed pool in shared memory would, at the --pool-widths widths.
// Workload: bench/ra-search-data.ts's (seed 7, one kv head, GQA 4, d 128,
// f16), its values too (generated once and cached); --broad its broad
// configuration (workload/knobs.ts).
import { writeFileSync } from 'node:fs';
import { RaGraph, type RaGraphSearchArgs } from '../addon/ra-graph.js';
import { machine } from './host.js';
import { exactAttention, meanProbs, outputError, widen } from './quality.js';
import { D, G, groupRecall, raSearchData, SINKS, steadySelection, WINDOW } from './ra-search-data.js';
import { median } from './stats.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const list = (s: string) => (s ? s.split(',').map(Number) : []);
const tokens = Number(get('tokens', '1048576'));
const steps = Number(get('steps', '8'));
const broad = argv.includes('--broad');
const widths = list(get('widths', '1,8,32,64,128'));
const pools = list(get('pools', '256,1024,4096'));
const poolWidths = list(get('pool-widths', '32,64,128'));
// The device model's assumptions (the estimate's table): a round's fixed cost in µs (its chain of dependent
// steps: pick W from the pool, read their lists, test-and-set the visited bits, the first gathered bytes, score,
// merge into the pool) and one SM's gather bandwidth in GB/s for 256-byte rows, optimistic,pessimistic each.
const roundUs = list(get('round-us', '3,6'));
const gatherGBs = list(get('gather-gbs', '100,50'));
// The final select of the k best of the keys scored, one CTA a head: SelectTop took 0.149 ms for 65,536 rows a
// head on the H100 (README, visit AE), taken as linear in the rows.
const SELECT_MS_PER_ROW = 0.149 / 65536;
const out = get('out', `bench/results/ra-gpu-walk-${tokens}${broad ? '-broad' : ''}-vm.md`);
const progress = (msg: string) => process.stderr.write(`[bench:ra-gpu-walk] ${msg}\n`);

const data = await raSearchData(tokens, steps, progress, { broad, values: true });
const { keys, values, decodeQ, graph, asked, want } = data;
if (!values) throw new Error('raSearchData gave no values');
// The attention search's strided sample (ra_graph_attention.cc: n/512, 64..4096 keys).
const sample = Math.min(4096, Math.max(64, Math.floor(tokens / 512)), tokens);

interface Rule {
  name: string;
  ef: number;
  margin: number;
  maxScanned?: number;
}
const rules: Rule[] = [
  { name: 'capped at 3% scanned', ef: 8 * asked, margin: 3, maxScanned: Math.round(0.03 * tokens) },
  { name: 'session default (margin 0.5, ef 8k)', ef: 8 * asked, margin: 0.5 },
];
interface Variant {
  rule: Rule;
  width: number;
  pool: number; // 0: unbounded
}
const variants: Variant[] = [];
for (const rule of rules) {
  for (const width of widths) variants.push({ rule, width, pool: 0 });
  for (const pool of pools) for (const width of poolWidths) variants.push({ rule, width, pool });
}

const args = (v: Variant, s: number, ids: Int32Array, scores: Float32Array): RaGraphSearchArgs => ({
  keys,
  tokens,
  headDim: D,
  dtype: 'f16',
  q: decodeQ[s],
  group: G,
  k: asked,
  ef: v.rule.ef,
  margin: v.rule.margin,
  maxScanned: v.rule.maxScanned,
  expandWidth: v.width,
  aggregate: 'attention',
  outIds: ids,
  outScores: scores,
  walkStats: true,
  poolCap: v.pool,
});

const selection = (ids: Int32Array) => steadySelection(data, ids);
/** The retrieved ids (outside sinks + window, the first `want`) as a set. */
function retrieved(ids: Int32Array): Set<number> {
  const s = new Set<number>();
  for (const id of ids) if (s.size < want && id >= SINKS && id < tokens - WINDOW) s.add(id);
  return s;
}

interface Acc {
  scanned: number[];
  rounds: number[];
  expanded: number[];
  startKeys: number[];
  peak: number[];
  recall: number[];
  error: number[];
  overlap: number[];
  cpuMs: number[];
}
const acc = variants.map((): Acc => ({ scanned: [], rounds: [], expanded: [], startKeys: [], peak: [], recall: [], error: [], overlap: [], cpuMs: [] }));
const oracleError: number[] = [];
// The scan a device could run instead of a walk: every key's 4-bit code scored (the code walk's int8 form,
// ra_key_codes.h), the best `share` of keys by that approximate attention scored exactly, the best k of them kept.
const scanShares = list(get('scan-shares', '0.01,0.02,0.03'));
const scanAcc = scanShares.map(() => ({ recall: [] as number[], error: [] as number[], clipRecall: [] as number[], clipError: [] as number[], clipScanned: [] as number[] }));
const allIds = Int32Array.from({ length: tokens }, (_, t) => t);
const K = widen(keys, 'f16'), V = widen(values, 'f16');
// Keys that stand out channel by channel, as the graph's outlier entry points are chosen (tokens/256 keys with the
// largest Σ_c (k_c − μ_c)²/σ_c², ra_graph_build.cc): a code clipped at ±3σ cannot rank them, so the scan scores
// them exactly, as the walk's start does.
const outliers = (() => {
  const mu = new Float64Array(D), sq = new Float64Array(D);
  for (let t = 0; t < tokens; t++) for (let c = 0; c < D; c++) (mu[c] += K[t * D + c]), (sq[c] += K[t * D + c] ** 2);
  const inv = mu.map((m, c) => 1 / Math.max(1e-12, sq[c] / tokens - (m / tokens) ** 2));
  mu.forEach((m, c) => (mu[c] = m / tokens));
  const z = new Float64Array(tokens);
  for (let t = 0; t < tokens; t++) {
    let a = 0;
    for (let c = 0; c < D; c++) a += (K[t * D + c] - mu[c]) ** 2 * inv[c];
    z[t] = a;
  }
  return new Set(Array.from(allIds).sort((a, b) => z[b] - z[a] || a - b).slice(0, Math.floor(tokens / 256)));
})();
// Each key's clipped excess, ‖k − clamp(k, low, low + 16·step)‖ per channel: what its code cannot say (zero for
// keys inside every channel's ± 3σ). A key's logit is at most its code's + scale·‖q_h‖·(this + the levels' half
// step's norm); the clip part alone is what lets a needle hide below the codes' cut.
const clipExcess = (() => {
  const { low, step } = graph.keyCodes({ keys, tokens, headDim: D, dtype: 'f16' });
  const e = new Float64Array(tokens);
  for (let t = 0; t < tokens; t++) {
    let a = 0;
    for (let c = 0; c < D; c++) {
      const x = K[t * D + c], lo = low[c], hi = low[c] + 16 * step[c];
      a += x < lo ? (lo - x) ** 2 : x > hi ? (x - hi) ** 2 : 0;
    }
    e[t] = Math.sqrt(a);
  }
  return e;
})();
for (let s = 0; s < steps; s++) {
  const ex = exactAttention(decodeQ[s], G, K, V, { headDim: D });
  const oracle = new Set<number>([...selection(new Int32Array(0)), ...data.groupTop[s]]);
  oracleError.push(outputError(ex, Int32Array.from(oracle)).mean);
  // W = 1's ids under each rule, unbounded pool: what the others' overlap is against.
  const base = new Map<Rule, Set<number>>();
  variants.forEach((v, i) => {
    const ids = new Int32Array(asked), scores = new Float32Array(asked);
    const u = process.cpuUsage();
    const res = graph.searchSync(args(v, s, ids, scores));
    const du = process.cpuUsage(u);
    const got = ids.subarray(0, res.count);
    if (v.width === 1 && v.pool === 0) base.set(v.rule, retrieved(got));
    const a = acc[i];
    a.cpuMs.push((du.user + du.system) / 1000);
    a.scanned.push(res.scanned / tokens);
    if (!res.walk) throw new Error('the search gave no walk stats');
    a.rounds.push(res.walk.rounds);
    a.expanded.push(res.walk.expanded);
    a.startKeys.push(res.walk.startKeys);
    a.peak.push(res.walk.peakCandidates);
    a.recall.push(groupRecall(data, got, s));
    a.error.push(outputError(ex, selection(got)).mean);
    const b = base.get(v.rule);
    if (b) {
      let hit = 0;
      for (const id of retrieved(got)) hit += b.has(id) ? 1 : 0;
      a.overlap.push(hit / b.size);
    }
  });
  // The code scan: approximate logits of every key, combined over the group with each row's log-partition as the
  // strided sample estimates it before the scan (the search's n/512 keys, exact logits, scaled up to n).
  const stride = tokens / sample;
  const lse = Array.from({ length: G }, (_, h) => {
    let m = -Infinity, z = 0;
    for (let j = 0; j < sample; j++) m = Math.max(m, ex.scores[h][Math.floor(j * stride)] * ex.scale);
    for (let j = 0; j < sample; j++) z += Math.exp(ex.scores[h][Math.floor(j * stride)] * ex.scale - m);
    return m + Math.log(z * stride);
  });
  const approx = graph.codeLogits({ keys, tokens, headDim: D, dtype: 'f16', q: decodeQ[s], group: G, ids: allIds, quantized: true });
  const walkScore = new Float64Array(tokens);
  for (let t = 0; t < tokens; t++) {
    let p = 0;
    for (let h = 0; h < G; h++) p += Math.exp(approx[t * G + h] - lse[h]);
    walkScore[t] = p;
  }
  const byApprox = Float64Array.from(walkScore).sort().reverse();
  const exactMean = meanProbs(ex);
  const qNorm = Array.from({ length: G }, (_, h) => Math.hypot(...decodeQ[s].subarray(h * D, (h + 1) * D)) * ex.scale);
  scanShares.forEach((share, j) => {
    const cut = byApprox[Math.round(share * tokens) - 1];
    // The clip-aware cut: a key also scored exactly where its code's logits lifted by its clipped excess pass the cut.
    const lifted = (t: number) => {
      if (clipExcess[t] === 0) return false;
      let p = 0;
      for (let h = 0; h < G; h++) p += Math.exp(approx[t * G + h] + qNorm[h] * clipExcess[t] - lse[h]);
      return p >= cut;
    };
    const clipKept = allIds.filter((t) => walkScore[t] >= cut || lifted(t)).sort((a, b) => exactMean[b] - exactMean[a] || a - b);
    scanAcc[j].clipScanned.push(clipKept.length / tokens);
    scanAcc[j].clipRecall.push(groupRecall(data, clipKept, s));
    scanAcc[j].clipError.push(outputError(ex, selection(clipKept)).mean);
    const kept = allIds.filter((t) => walkScore[t] >= cut || outliers.has(t)).sort((a, b) => exactMean[b] - exactMean[a] || a - b);
    scanAcc[j].recall.push(groupRecall(data, kept, s));
    scanAcc[j].error.push(outputError(ex, selection(kept)).mean);
  });
  progress(`step ${s}: oracle error ${oracleError[s].toFixed(3)}`);
}

const mean = (x: number[]) => x.reduce((p, q) => p + q, 0) / x.length;
/**
 * Device ms for one kv head's walk (one CTA on one SM): the start (sample + start keys' rows, read as gathers),
 * rounds × (the fixed cost + the round's rows and W lists of 64 B over the SM's gather bandwidth), the final
 * select; `heads8` with the most rounds any step took, since 8 heads on 8 SMs finish with the slowest.
 */
function model(v: Variant, rounds: number, roundsMax: number, perRound: number, startKeys: number, scanned: number) {
  return roundUs.map((us, i) => {
    const bw = gatherGBs[i] * 1e3; // bytes per µs
    const round = us + (perRound * 2 * D + v.width * 64) / bw;
    const fixed = ((sample + startKeys) * 2 * D) / bw + scanned * SELECT_MS_PER_ROW * 1e3;
    return { roundUs: us, gatherGBs: gatherGBs[i], roundMicros: round, headMs: (fixed + rounds * round) / 1e3, heads8Ms: (fixed + roundsMax * round) / 1e3 };
  });
}
const rows = variants.map((v, i) => {
  const a = acc[i];
  const scanned = mean(a.scanned) * tokens;
  // Keys a round scores: the walk's own (not the sample, not the start keys), over its rounds.
  const perRound = (scanned - sample - mean(a.startKeys)) / mean(a.rounds);
  return {
    rule: v.rule.name,
    width: v.width,
    pool: v.pool,
    scanned: mean(a.scanned),
    recall: mean(a.recall),
    error: mean(a.error),
    rounds: mean(a.rounds),
    roundsMax: Math.max(...a.rounds),
    expanded: mean(a.expanded),
    startKeys: mean(a.startKeys),
    keysPerRound: perRound,
    peakCandidates: mean(a.peak),
    peakCandidatesMax: Math.max(...a.peak),
    overlapWithWidth1: a.overlap.length ? mean(a.overlap) : null,
    device: model(v, mean(a.rounds), Math.max(...a.rounds), perRound, mean(a.startKeys), scanned),
    cpuMsMedian: median(a.cpuMs),
    perStep: a,
  };
});
const f = (x: number, dg = 0) => x.toFixed(dg);
const table = (sel: (r: (typeof rows)[number]) => boolean) => [
  '| stop rule | W | pool | scanned | top-1% recall | output error | rounds (mean / max) | expanded | start keys | keys a round | peak candidates (mean / max) | overlap with W 1 | CPU ms |',
  '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ...rows.filter(sel).map((r) => `| ${r.rule} | ${r.width} | ${r.pool || '∞'} | ${f(r.scanned * 100, 2)}% | ${f(r.recall, 3)} | ${f(r.error, 3)} | ${f(r.rounds)} / ${r.roundsMax} | ${f(r.expanded)} | ${f(r.startKeys)} | ${f(r.keysPerRound, 1)} | ${f(r.peakCandidates)} / ${r.peakCandidatesMax} | ${r.overlapWithWidth1 === null ? '—' : f(r.overlapWithWidth1, 3)} | ${f(r.cpuMsMedian, 1)} |`),
];
const estimate = [
  `| stop rule | W | rounds (max) | ${roundUs.map((us, i) => `µs a round (${us} µs + ${gatherGBs[i]} GB/s) | ms a head | ms for 8 heads`).join(' | ')} |`,
  `| --- | ---: | ---: | ${roundUs.map(() => '---: | ---: | ---:').join(' | ')} |`,
  ...rows.filter((r) => r.pool === 0).map((r) => `| ${r.rule} | ${r.width} | ${f(r.rounds)} (${r.roundsMax}) | ${r.device.map((m) => `${f(m.roundMicros, 1)} | ${f(m.headMs, 3)} | ${f(m.heads8Ms, 3)}`).join(' | ')} |`),
];
const scanTable = [
  '| every code scored, then exactly | scanned exactly | codes read | top-1% recall | output error |',
  '| --- | ---: | ---: | ---: | ---: |',
  ...scanShares.map((share, j) => `| the best ${f(share * 100, 1)}% by the codes + the outliers | ${f(share * 100 + (100 * outliers.size) / tokens, 2)}% | 100% | ${f(mean(scanAcc[j].recall), 3)} | ${f(mean(scanAcc[j].error), 3)} |`),
  ...scanShares.map((share, j) => `| the best ${f(share * 100, 1)}% by the codes, clip-aware | ${f(mean(scanAcc[j].clipScanned) * 100, 2)}% | 100% | ${f(mean(scanAcc[j].clipRecall), 3)} | ${f(mean(scanAcc[j].clipError), 3)} |`),
];
const degree = graph.edges / tokens;
const md = [
  `### The beam walk in rounds of W at ${tokens.toLocaleString('en-US')} keys${broad ? ' (broad configuration)' : ''} (bench/ra-gpu-walk.ts)`,
  '',
  `${machine()}; one kv head of the generator (seed 7, ${broad ? 'broadKnobs' : 'default knobs'}), GQA group 4, d = 128, f16, ${steps} decode steps' query groups; k = ${asked} asked (1% = ${want} + ${SINKS} sinks + ${WINDOW} window), ranking by the group's attention. Graph: ${graph.edges.toLocaleString('en-US')} edges (${degree.toFixed(1)} a key, max ${graph.maxDegree}), ${graph.entryPoints} entry points; the sample ${sample} keys. Means over the steps. scanned = keys scored exactly (the sample and the start keys included); rounds = rounds of up to W expansions after the start (the walk's sequential depth; the start, sample + entry points, is one more, wide); expanded = lists read; start keys = entry points + the sample's seeds scored before the first round; keys a round = (scanned − sample − start keys) / rounds; peak candidates = the candidate heap's largest size after a round's scores, before any cut (the CPU's heap is unbounded; pool = it cut to its best P after every round, the search option poolCap); output error = mean over the group's heads of ‖o_S − o‖/‖o‖, S = sinks + window + the first ${want} retrieved (oracle: the exact top ${want} of the group's mean probability, ${f(mean(oracleError), 3)}); overlap with W 1 = the share of W = 1's retrieved ids (same rule, unbounded) that this variant retrieved too; CPU ms = one search on the calling thread (median; the 2-core VM's, not the device's).`,
  '',
  ...table((r) => r.pool === 0),
  '',
  `Device time estimated for a walk on an H100, one CTA a kv head (not measured: a model of the rounds above). A round = a fixed chain of dependent steps (pick W from the pool in shared memory, read their lists, test-and-set the visited bits, the gather's first bytes, score with the group's 4 q rows, merge into the pool and the k-th best's bins) of ${roundUs.join(' or ')} µs, plus the round's rows (keys a round × 256 B) and W lists of 64 B at one SM's gather bandwidth of ${gatherGBs.join(' or ')} GB/s; the start's ${sample} sample rows and start keys' rows read at the same bandwidth; the final select of the k best of the keys scored at SelectTop's one-CTA rate on the H100 (0.149 ms for 65,536 rows). 8 heads run on 8 SMs at once and finish with the slowest: their column takes the most rounds any step took.`,
  '',
  ...estimate,
  '',
  `The alternative on a device, a scan rather than a walk: every key's 4-bit code (64 B a key, ra_key_codes.h, the code walk's int8 form) scored, the best share of keys by that approximate group attention (each row's log-partition estimated from the strided sample of ${sample} keys, as the search does) scored exactly, then ranked by the exact group attention, the best ${want} kept (same selection and error as above). A code clamps each channel at its mean ± 3σ, so a needle that stands out in a quiet channel scores low by its code (at 256K, two keys holding 0.44 of step 0's attention sat far below the cut): + the outliers = also the ${outliers.size} keys that stand out most channel by channel scored exactly (the graph's outlier entry points' rule); clip-aware = also every key whose codes' logits, lifted by scale·‖q_h‖·(its clipped excess, ‖k − clamp(k)‖), pass the cut (scanned counts them).`,
  '',
  ...scanTable,
  '',
  ...(pools.length ? ['With the candidate pool cut to its best P after every round:', '', ...table((r) => r.pool > 0), ''] : []),
].join('\n');
process.stdout.write(md);
writeFileSync(out, md);
writeFileSync(
  out.replace(/\.md$/, '.json'),
  JSON.stringify({ machine: machine(), date: new Date().toISOString(), tokens, steps, broad, sample, codeScan: scanShares.map((share, j) => ({ share, recall: mean(scanAcc[j].recall), error: mean(scanAcc[j].error), perStep: scanAcc[j] })), model: { roundUs, gatherGBs, selectMsPerRow: SELECT_MS_PER_ROW }, edges: graph.edges, maxDegree: graph.maxDegree, entryPoints: graph.entryPoints, oracleError, rows }, null, 2) + '\n',
);
graph.dispose();
