// npm run bench:retrieval [-- --tokens 65536,1048576 --heads 1 --steps 6 --methods hnsw,ivf,retrieval-attention --budgets 0.01 --quick]
//                          [--broad (workload/knobs.ts broadKnobs; results in retrieval-broad-<tokens>.*)]
//                          [--hard (the generator's HARD_KNOBS on top: facts no prefill query asks about, decode query shift;
//                           results in retrieval[-broad]-hard-<tokens>.*)]
//                          [--positional 1 --degree 16 --key-neighbors 8 --key-ef 48 --kbuild 64 --max-queries 8192
//                           (retrieval-attention's positional edges each side, projected degree, key-key edges,
//                           exact top keys per build query, build queries kept)]
//                          [--ranking max (retrieval-attention's swept rows ranked by the max over the group's q·k,
//                           as before the attention ranking; with --degree 32 --key-neighbors 0 the method as it was)]
//                          [--prefill N (prefill query rows per kv head; default tokens/16)]
//                          [--margins 0.5,0.75,1,1.5 (retrieval-attention's rows: only the session's default search
//                           before 5dcddba, and the session's search now at each margin; bench/results/retrieval-margin-vm.md)]
// npm run bench:documents (the same with --suite documents: squeezed, squeezed-2l, infiniretri,
//                          retrieval-attention and exact at kept fractions 1%, 3%, 10%)
//
// Each method against the oracle on the seeded workload (workload/):
// build (seal) time and artifact size per kv head, load (attach) time, search
// latency per query group, scanned fraction, attention recall (and the
// oracle's, the exact top tokens of the same count), top-k recall (k = the
// budget), output error and needle hits. The selection judged is what a
// session attends: sinks + window + what the method retrieves, exactly as
// index/static-plus-retrieved.ts composes it. `exact` here is the oracle
// itself. `infiniretri` (index/infiniretri.ts): the seal's read with the
// document's prefill queries, stored and loaded, extended by the question's
// read, where the question is the decode steps' query rows (the paper reads
// the question before answering); one kept set serves every step, and its
// scanned share is the question's read of every key amortised over the
// steps. `infiniretri-seal` is the seal's evidence alone (no question),
// `infiniretri-question` the question's read alone. Results are written after
// every method: bench/results/<suite>-<tokens>.{json,md}.
//
// retrieval-attention is swept over the fixed beam (ef = k, 2k), over the
// quality-bound stop (margin m logits: stop once the best unexpanded
// candidate scores m below the k-th best; ef = 8k only caps the work), over a
// cap on the keys scored (2%, 3%, 5% of them), seeded with the previous step's
// ids, with the steady zone (sinks + window) as free start keys (not counted
// as scanned, outside the k asked, as the session searches), and
// exhaustively (ef = tokens) by both rankings: the group's attention (the
// session's) and the max over the group of q·k (v3's); and as a session's code
// walk and code scan (codeWalk / codeScan, the code scan also with a first pass
// on PQ codes keeping 8% of the keys, scanKeep 0.08: index/retrieval-attention.ts
// walkOptions) search, steady zone free, cold and seeded. "top-k recall
// (group)" is |selection ∩ exact top-k of the group's attention (mean
// probability over its heads)| / k, k = the budget: the recall target of
// issue #15, which is the paper's recall of the exact top-k by q·k when a
// group has one q head. "search recall" is |retrieved ∩ exact top-k by the
// row's ranking| / k, k = the ids asked (budget + sinks + window; a steady
// row's ids are the budget alone, the steady zone counted as found): what an
// ANN search is judged by; "top-k recall" is against each head's own
// attention top-k (budget only), which a set shared by the group cannot
// fully cover (the oracle's own top-k recall is shown beside it).
import { writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { RA_GRAPH_DEFAULTS, RaGraph, type RaAggregate } from '../addon/ra-graph.js';
import { infiniretriBuilder, KeptHead, mergeKept } from '../index/infiniretri.js';
import { encodeKept } from '../index/infiniretri-artifact.js';
import { readChunks } from '../index/infiniretri-read.js';
import { findMethod } from '../index/registry.js';
import { DEFAULT_CODE_SHARE, walkOptions } from '../index/retrieval-attention.js';
import type { HeadIndex, SearchResult } from '../index/method.js';
import { machine } from './host.js';
import { strFlag } from './args.js';
import { compareWithOracle, exactAttention, meanProbs, oracleSelection, topKIndices, type ExactAttention } from './quality.js';
import { broadKnobs, defaultKnobs, generateWorkload, HARD_KNOBS, type Workload } from '../workload/index.js';
import { mean, median } from './stats.js';

interface Options {
  suite: 'retrieval' | 'documents';
  tokens: number[];
  heads: number;
  steps: number;
  methods: string[];
  budgets: number[];
  sinks: number;
  window: number;
  broad: boolean;
  /** The generator's hard knobs (HARD_KNOBS) on top of the configuration. */
  hard: boolean;
  positional: number;
  degree: number;
  /** retrieval-attention's exact top keys per build query, and the build queries kept (addon/ra-graph.ts defaults when absent). */
  kBuild?: number;
  maxQueries?: number;
  /** retrieval-attention's key-key edges per key (addon/ra-graph.ts default when absent). */
  keyNeighbors?: number;
  /** The beam width of the key-key edges' searches (addon/ra-graph.ts default when absent). */
  keyEf?: number;
  /** retrieval-attention's ranking for the swept rows ('attention' as sessions search; 'max' as it was before). */
  ranking: RaAggregate;
  /** Prefill query rows per kv head (the generator's default tokens/16 when absent). */
  prefill?: number;
  /** With --margins: retrieval-attention swept over the session's quality-bound margin only (marginSweep). */
  margins?: string[];
}

const SUITES = {
  retrieval: { methods: 'hnsw,ivf,retrieval-attention', budgets: '0.01' },
  documents: { methods: 'exact,squeezed,squeezed-2l,infiniretri,retrieval-attention', budgets: '0.01,0.03,0.1' },
};

function parseArgs(argv: string[]): Options {
  const get = (name: string) => strFlag(`--${name}`, argv);
  const quick = argv.includes('--quick');
  const suite = get('suite') === 'documents' ? 'documents' : 'retrieval';
  return {
    suite,
    tokens: (get('tokens') ?? (quick ? '16384' : '65536')).split(',').map(Number),
    heads: Number(get('heads') ?? 1),
    steps: Number(get('steps') ?? (quick ? 3 : 6)),
    methods: (get('methods') ?? SUITES[suite].methods).split(',').filter((m) => m === 'exact' || m.startsWith('infiniretri') || findMethod(m)?.builder),
    budgets: (get('budgets') ?? SUITES[suite].budgets).split(',').map(Number),
    sinks: 16,
    window: 256,
    broad: argv.includes('--broad'),
    hard: argv.includes('--hard'),
    positional: Number(get('positional') ?? 1),
    degree: Number(get('degree') ?? RA_GRAPH_DEFAULTS.degree),
    kBuild: get('kbuild') === undefined ? undefined : Number(get('kbuild')),
    maxQueries: get('max-queries') === undefined ? undefined : Number(get('max-queries')),
    keyNeighbors: get('key-neighbors') === undefined ? undefined : Number(get('key-neighbors')),
    keyEf: get('key-ef') === undefined ? undefined : Number(get('key-ef')),
    ranking: get('ranking') === 'max' ? 'max' : 'attention',
    prefill: get('prefill') === undefined ? undefined : Number(get('prefill')),
    margins: get('margins')?.split(','),
  };
}

const progress = (msg: string) => process.stderr.write(`[bench:${process.argv.includes('documents') ? 'documents' : 'retrieval'}] ${msg}\n`);


interface Row {
  method: string;
  budget: number;
  ef: number;
  /** Quality-bound margin in logits (retrieval-attention), or null for none. */
  margin: number | null;
  /** How the group's rows rank a key (retrieval-attention): 'max' over rows of q·k, or the group's 'attention'. */
  aggregate: RaAggregate | null;
  /** Seeded by the previous step's ids (step 0 cold). */
  seeded: boolean;
  /** Cap on the keys scored, as a share of the tokens (retrieval-attention), or null. */
  cap: number | null;
  /** The steady zone (sinks + window) as free start keys, not counted as scanned, outside the k asked. */
  steady: boolean;
  /** The code walk (a session's codeWalk) with this codeShare, or null for the beam walk. */
  codes: number | null;
  /** The code scan (a session's codeScan): every key's code scored, the best `cap` share (null: the default) exactly. */
  codeScan: boolean;
  /** The code scan's PQ first pass (a session's scanKeep): the share of the keys it keeps for the 4-bit codes, or null. */
  scanKeep: number | null;
  /** Keys read as 4-bit codes, as a share of the tokens (mean), or null for the beam walk. */
  codesRead: number | null;
  /** The keys' bytes read (mean share of n·2d): a 4-bit code d/2 bytes, a PQ code d/8, an exact row 2d; null for the beam walk. */
  bytesRead: number | null;
  buildSeconds: number;
  artifactMB: number;
  loadMs: number;
  searchMs: number;
  scanned: number;
  attentionRecall: number;
  oracleRecall: number;
  topKRecall: number;
  oracleTopKRecall: number;
  /** |selection ∩ exact top-k of the group's attention (mean probability)| / k, k = the budget. */
  groupTopKRecall: number;
  searchRecall: number;
  outputError: number;
  oracleError: number;
  needleHits: string;
  selected: number;
}

/**
 * Issue #15's comparison: hnsw at the ef of its least output error against retrieval-attention as a session searches
 * (margin 0.5, the steady zone free), capped at 3% scanned, and with the code walk: error, scanned, codes read,
 * the group's top-k recall. Empty without both methods in the run.
 */
function versusHnsw(rows: Row[], pct: (x: number) => string): string[] {
  const hnsw = rows.filter((r) => r.method === 'hnsw').sort((a, b) => a.outputError - b.outputError)[0];
  const ra = rows.filter((r) => r.method === 'retrieval-attention' && r.steady && r.aggregate === 'attention');
  const picks = ra.filter((r) => r.codes !== null || r.codeScan || (r.cap === 0.03 && !r.seeded) || (!r.seeded && r.cap === null && r.margin === 0.5));
  if (!hnsw || picks.length === 0) return [];
  // Key bytes: the codes read and the rows scored exactly (Row.bytesRead); a walk without codes reads the rows it scores.
  const bytes = (r: Row) => r.bytesRead ?? r.scanned;
  const line = (name: string, r: Row) =>
    `| ${name} | ${pct(r.outputError)} | ${pct(r.scanned)} | ${r.codesRead === null ? '—' : pct(r.codesRead)} | ${pct(bytes(r))} | ${r.groupTopKRecall.toFixed(3)} | ${(r.scanned / hnsw.scanned).toFixed(2)} | ${(bytes(r) / bytes(hnsw)).toFixed(2)} | ${r.searchMs.toFixed(2)} | ${r.needleHits} |`;
  return [
    '',
    `Against hnsw at the ef of its least error (ef ${hnsw.ef}), steady zone free for retrieval-attention, at the same attended count (estimate off). Key bytes read: the keys scored exactly (2d bytes each) plus the codes read (a 4-bit code d/2 bytes, a PQ code d/8; with scanKeep every key's PQ code and the kept keys' 4-bit codes), over the f16 keys' bytes; neighbour lists left out (hnsw's and the walks'):`,
    '',
    '| search | output error | scanned | codes read | key bytes read | top-k recall (group) | scanned / hnsw\'s | bytes / hnsw\'s | search ms | needles |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    line(`hnsw, ef ${hnsw.ef}`, hnsw),
    ...picks.map((r) =>
      line(`retrieval-attention${r.codeScan ? `, code scan (≤ ${r.cap ? pct(r.cap) : '3% / 3k'} scored exactly${r.scanKeep ? `, scanKeep ${r.scanKeep}` : ''})` : r.codes !== null ? `, code walk (codes ≤ ${pct(r.codes)})` : r.cap ? `, ≤ ${pct(r.cap)} scanned` : `, margin ${r.margin}`}${r.seeded ? ', seeded' : ''}`, r)),
  ];
}

/** The code scan's PQ first pass in the swept rows (a session's scanKeep): issue #15's bytes setting at 1M. */
const SCAN_KEEP = 0.08;

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

/**
 * Search efforts swept per method, given the ids asked for (k) and the
 * tokens: beam widths for the graphs, lists probed for ivf (nlist = 4·√n).
 */
type Effort = [ef: number, margin: number | null, aggregate: RaAggregate | null, seeded?: boolean, cap?: number, steady?: boolean, codes?: number, scan?: boolean, keep?: number];

function efSweep(method: string, k: number, tokens: number, ranking: RaAggregate): Effort[] {
  const nlist = Math.round(4 * Math.sqrt(tokens));
  switch (method) {
    case 'hnsw':
      return [k, 2 * k, 4 * k].map((ef) => [ef, null, null]);
    case 'retrieval-attention':
      // Ranked by the group's attention as the session searches (index/retrieval-attention.ts), and one
      // exhaustive row ranked by the max over the group's rows of q·k: the ceiling of the old ranking.
      return [
        [k, null, ranking],
        [2 * k, null, ranking],
        ...[0, 0.5, 1, 2, 3].map((m): Effort => [8 * k, m, ranking]),
        [Math.min(32 * k, tokens), 3, ranking],
        // Capped at a share of the keys scored (the issue's "≤ 3% scanned"): recall where the cap stops it.
        ...[0.02, 0.03, 0.05].map((cap): Effort => [8 * k, 3, ranking, false, cap]),
        // Seeded by the previous step's ids (step 0 starts cold): consecutive decode queries are alike.
        ...[0, 0.5, 1].map((m): Effort => [8 * k, m, ranking, true]),
        // Seeded and capped: what a session's chained steps reach at the issue's small scanned shares.
        ...[0.02, 0.03, 0.05].map((cap): Effort => [8 * k, 3, ranking, true, cap]),
        // The steady zone (sinks + window) as free start keys: scored, not counted as scanned (the attention over
        // them computes those dot products), outside the k asked (the budget alone), as the session searches.
        ...[0.02, 0.03, 0.05].map((cap): Effort => [8 * k, 3, ranking, false, cap, true]),
        ...[0, 0.5, 1].map((m): Effort => [8 * k, m, ranking, false, undefined, true]),
        ...[0.02, 0.03, 0.05].map((cap): Effort => [8 * k, 3, ranking, true, cap, true]),
        // The code walk as a session with codeWalk: true searches (index/retrieval-attention.ts walkOptions: codes
        // of codeShare of the keys read at most, 3% or 3k scored exactly at most), steady zone free; seeded as the
        // session is from its second step, and at half the default codeShare.
        ...[false, true].map((seeded): Effort => [0, null, 'attention', seeded, undefined, true, DEFAULT_CODE_SHARE]),
        [0, null, 'attention', true, undefined, true, DEFAULT_CODE_SHARE / 2],
        // The code scan as a session with codeScan: true searches (walkOptions: every key's code scored, the best 3%
        // or 3k exactly; and at scanShare 2%), steady zone free, cold and seeded as the session is from its second step.
        ...[undefined, 0.02].flatMap((cap) => [false, true].map((seeded): Effort => [0, null, 'attention', seeded, cap, true, undefined, true])),
        // With the session's scanKeep: a first pass on PQ codes keeps 8% of the keys (and the PQ codes' outliers) for the
        // 4-bit codes, the setting that read 11.2% of the keys' bytes at 1M (bench/results/ra-code-scan-1048576-vm-pq.md).
        ...[false, true].map((seeded): Effort => [0, null, 'attention', seeded, undefined, true, undefined, true, SCAN_KEEP]),
        [tokens, null, 'attention', false, undefined, true],
        [tokens, null, 'attention'],
        [tokens, null, 'max'],
      ];
    case 'ivf':
      return [0.01, 0.03, 0.1].map((f): [number, null, null] => [Math.max(1, Math.round(f * nlist)), null, null]);
    default:
      return [[0, null, null]];
  }
}

/**
 * The session's own search (index/retrieval-attention.ts, ef 0) at each margin, against the session's default before
 * 5dcddba: then k = budget + sinks + window, beam 8k, margin 0.5, no free start keys; now k = the budget alone with
 * the steady zone free and beam 8·budget (effort(): 8 × the k asked). The searcher takes the steady zone's count off a
 * steady row's ef, so ef = 8·want + free is the session's beam; "wide beam" keeps 8·(budget + sinks + window), the
 * beam before, to show whether the beam or the margin stops the walk. Plain and seeded with the previous step's ids
 * (the session seeds from SearchMemo.last), and the exhaustive steady row as the ceiling.
 */
function marginSweep(margins: string[], want: number, asked: number, tokens: number, ranking: RaAggregate): Effort[] {
  const free = asked - want;
  // "s<b>": 0.5 + b·ln(1 + free / want), the old bound's reference rank (want + free) moved to rank want if a key's
  // probability falls as 1/rank.
  const ms = margins.map((m) => (m.startsWith('s') ? 0.5 + Number(m.slice(1)) * Math.log(1 + free / want) : Number(m)));
  return [false, true].flatMap((seeded): Effort[] => [
    [8 * asked, 0.5, ranking, seeded],
    ...ms.map((m): Effort => [8 * want + free, m, ranking, seeded, undefined, true]),
    ...ms.map((m): Effort => [8 * asked + free, m, ranking, seeded, undefined, true]),
  ]).concat([[tokens, null, 'attention', false, undefined, true]]);
}

/** Per kv head, something that answers "the tokens to attend for this step". */
type Searcher = (h: number, step: number, q: Float32Array, k: number, ef: number, margin: number | null, aggregate: RaAggregate | null, seeds?: Int32Array, cap?: number, steady?: Int32Array, codes?: number, scan?: boolean, keep?: number) => Promise<SearchResult & { kept?: number }>;

interface Prepared {
  search: Searcher;
  buildSeconds: number;
  artifactMB: number;
  loadMs: number;
}

/** The seal's reads per workload (kept-set artifacts per kv head) and their time per head. */
const sealReads = new WeakMap<Workload, { artifacts: Uint8Array[]; seconds: number }>();

async function prepare(name: string, wl: Workload, exact: ExactAttention[][], o: Options, budget: number): Promise<Prepared> {
  const { tokens, headDim: d } = wl.spec;
  const keysOf = (h: number) => ({ keys: wl.keys[h], tokens, headDim: d, dtype: wl.dtype });
  if (name === 'exact')
    return { buildSeconds: 0, artifactMB: 0, loadMs: 0, search: async (h, s, _q, k) => ({ ids: oracleSelection(exact[h][s], k), scanned: tokens }) };
  if (name.startsWith('infiniretri')) {
    // The seal's read (the document's prefill queries), stored and loaded as the engine does; then the
    // question's read. The question is the decode steps' query rows of the head's group: the paper's
    // setting, where the question is read before the answer and asks what the answer needs.
    // The seal's read does not depend on the budget: done once per workload, its time reported with every budget.
    let seal0 = sealReads.get(wl);
    if (!seal0 && name !== 'infiniretri-question') {
      const t0 = performance.now(), artifacts: Uint8Array[] = [];
      for (let h = 0; h < o.heads; h++) {
        artifacts.push(await infiniretriBuilder.build({ ...keysOf(h), queries: wl.prefillQ[h], queryCount: wl.prefillQ[h].length / d }));
        progress(`${name}: seal read head ${h + 1}/${o.heads} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
      }
      seal0 = { artifacts, seconds: (performance.now() - t0) / 1000 / o.heads };
      sealReads.set(wl, seal0);
    }
    const none = encodeKept({ ids: new Int32Array(0), scores: new Float32Array(0), tokens, chunk: 0, span: 0 });
    const artifacts = name === 'infiniretri-question' || !seal0 ? Array.from({ length: o.heads }, () => none) : seal0.artifacts;
    const buildSeconds = name === 'infiniretri-question' || !seal0 ? 0 : seal0.seconds;
    const t1 = performance.now();
    const seal = artifacts.map((b, h) => (infiniretriBuilder.load(b, keysOf(h)) as KeptHead).kept);
    const loadMs = (performance.now() - t1) / o.heads;
    const G = wl.spec.qHeads / wl.spec.kvHeads, want = Math.round(tokens * budget);
    const retained: Int32Array[] = [];
    for (let h = 0; h < o.heads; h++) {
      const rows = new Float32Array(o.steps * G * d);
      for (let s = 0; s < o.steps; s++) rows.set(wl.decodeQ[s].subarray(h * G * d, (h + 1) * G * d), s * G * d);
      const read = name === 'infiniretri-seal' ? seal[h] : await readChunks(keysOf(h), rows, o.steps * G, { chunk: 4096, span: 2, budget: want, scale: 1 / Math.sqrt(d) });
      retained.push(mergeKept(seal[h], read, want));
    }
    const scanned = name === 'infiniretri-seal' ? 0 : tokens / o.steps;
    return { buildSeconds, artifactMB: artifacts.reduce((n, a) => n + a.byteLength, 0) / o.heads / 2 ** 20, loadMs, search: async (h) => ({ ids: retained[h], scanned }) };
  }
  if (name === 'retrieval-attention') {
    // The graph directly, for the margin sweep and the positional option.
    const t0 = performance.now();
    const graphs: RaGraph[] = [];
    for (let h = 0; h < o.heads; h++) {
      const q = wl.prefillQ[h];
      graphs.push(await RaGraph.build({ ...keysOf(h), queries: q, positional: o.positional, degree: o.degree, kBuild: o.kBuild, maxQueries: o.maxQueries, keyNeighbors: o.keyNeighbors, keyEf: o.keyEf }));
      progress(`${name}: built head ${h + 1}/${o.heads} (${((performance.now() - t0) / 1000).toFixed(1)} s) ${JSON.stringify(graphs[h].buildStats)}`);
    }
    const buildSeconds = (performance.now() - t0) / 1000 / o.heads;
    const bytes = graphs.map((g) => g.save());
    const t1 = performance.now();
    const loaded = bytes.map((b) => RaGraph.load(b));
    const loadMs = (performance.now() - t1) / o.heads;
    graphs.forEach((g) => g.dispose());
    const G = wl.spec.qHeads / wl.spec.kvHeads;
    return {
      buildSeconds,
      artifactMB: bytes.reduce((n, a) => n + a.byteLength, 0) / o.heads / 2 ** 20,
      loadMs,
      search: async (h, _s, q, k, ef, margin, aggregate, seeds, cap, steady, codes, scan, keep) => {
        // Free start keys are outside the k asked (k counts them, as the session's does).
        const free = steady?.length ?? 0;
        const n = Math.min(k - free, tokens - free), outIds = new Int32Array(n), outScores = new Float32Array(n);
        if (codes !== undefined || scan) {
          // The session's own options for its code walk or code scan.
          const walk = walkOptions(0, n, free, tokens, scan ? { codeScan: true, ...(cap && { scanShare: cap }), ...(keep && { scanKeep: keep }) } : { codeWalk: true, codeShare: codes, ...(cap && { scanShare: cap }) });
          const r = loaded[h].searchSync({ ...keysOf(h), q, group: G, k: n, outIds, outScores, seeds, ...(steady && { freeSeeds: steady }), ...walk });
          return { ids: outIds.subarray(0, r.count), scanned: r.scanned, codes: r.codesRead, ...(r.codesKept !== undefined && { kept: r.codesKept }) };
        }
        // Margins are stated in logits; the 'max' ranking's scores are unscaled q·k.
        const units = aggregate === 'max' ? Math.sqrt(d) : 1;
        const r = loaded[h].searchSync({ ...keysOf(h), q, group: G, k: n, ef: Math.max(ef >= tokens ? tokens : ef - free, n), outIds, outScores, margin: margin === null ? undefined : margin * units, aggregate: aggregate ?? 'attention', seeds, maxScanned: cap ? Math.round(cap * tokens) : undefined, ...(steady && { freeSeeds: steady }) });
        return { ids: outIds.subarray(0, r.count), scanned: r.scanned };
      },
    };
  }
  const builder = findMethod(name)!.builder!;
  const t0 = performance.now();
  const artifacts: Uint8Array[] = [];
  for (let h = 0; h < o.heads; h++) {
    const q = wl.prefillQ[h];
    artifacts.push(await builder.build({ ...keysOf(h), queries: q, queryCount: q.length / d }));
    progress(`${name}: built head ${h + 1}/${o.heads} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  }
  const buildSeconds = (performance.now() - t0) / 1000 / o.heads;
  const t1 = performance.now();
  const indexes: HeadIndex[] = artifacts.map((bytes, h) => builder.load(bytes, keysOf(h)));
  const loadMs = (performance.now() - t1) / o.heads;
  return {
    buildSeconds,
    artifactMB: artifacts.reduce((n, a) => n + a.byteLength, 0) / o.heads / 2 ** 20,
    loadMs,
    search: async (h, _s, q, k, ef) => indexes[h].search(q, wl.spec.qHeads / wl.spec.kvHeads, k, ef),
  };
}

async function runMethod(name: string, wl: Workload, exact: ExactAttention[][], o: Options, budget: number, prepared?: Prepared): Promise<{ rows: Row[]; prepared: Prepared }> {
  const { tokens, headDim: d, qHeads, kvHeads } = wl.spec;
  const G = qHeads / kvHeads, want = Math.round(tokens * budget);
  const p = prepared ?? (await prepare(name, wl, exact, o, budget));
  const rows: Row[] = [];
  const asked = want + o.sinks + o.window;
  // Per (head, step): the exact top-`asked` by max over the group of q·k and by the group's
  // attention (mean probability), and the exact top-`want` by the latter (the group top-k).
  const exactTop = exact.map((steps) =>
    steps.map((ex) => {
      const best = new Float64Array(ex.tokens).fill(-Infinity);
      for (const sc of ex.scores) for (let t = 0; t < ex.tokens; t++) best[t] = Math.max(best[t], sc[t]);
      const mp = meanProbs(ex);
      return { max: new Set(topKIndices(best, asked)), attention: new Set(topKIndices(mp, asked)), group: topKIndices(mp, want) };
    }),
  );
  const steadyIds = Int32Array.from({ length: o.sinks + o.window }, (_, i) => (i < o.sinks ? i : tokens - o.window + (i - o.sinks)));
  const sweep = o.margins && name === 'retrieval-attention' ? marginSweep(o.margins, want, asked, tokens, o.ranking) : efSweep(name, asked, tokens, o.ranking);
  for (const [ef, margin, aggregate, seeded, cap, steady, codes, scan, keep] of sweep) {
    const times: number[] = [], codesRead: number[] = [], bytesRead: number[] = [], scanned: number[] = [], rec: number[] = [], orc: number[] = [], topk: number[] = [], otopk: number[] = [], gtopk: number[] = [], srec: number[] = [], err: number[] = [], oerr: number[] = [];
    let hits = 0, needles = 0, count = 0;
    for (let h = 0; h < o.heads; h++)
      for (let s = 0, prev: Int32Array | undefined; s < o.steps; s++) {
        const q = wl.decodeQ[s].subarray(h * G * d, (h + 1) * G * d);
        const t = performance.now();
        const res = await p.search(h, s, q, asked, ef, margin, aggregate, seeded ? prev : undefined, cap, steady ? steadyIds : undefined, codes, scan, keep);
        if (res.codes !== undefined) codesRead.push(res.codes / tokens);
        // With scanKeep every key's PQ code (d/8 bytes) is read and the kept keys' 4-bit codes (d/2; codesRead counts
        // every PQ code, codesKept the 4-bit ones); else every code read is 4-bit. The keys scored exactly, 2d bytes each.
        if (res.codes !== undefined) bytesRead.push(((res.kept !== undefined ? res.codes * (d / 8) + res.kept * (d / 2) : res.codes * (d / 2)) + res.scanned * 2 * d) / (tokens * 2 * d));
        prev = Int32Array.from(res.ids);
        times.push(performance.now() - t);
        const own = exactTop[h][s][aggregate === 'max' ? 'max' : 'attention'];
        let found = 0;
        for (const id of res.ids) found += own.has(id) ? 1 : 0;
        // A steady-free search leaves the steady zone out of its ids: it counts as found, as the session attends it.
        if (steady) for (const id of steadyIds) found += own.has(id) ? 1 : 0;
        srec.push(found / asked);
        scanned.push(res.scanned / tokens);
        const S = selection(tokens, res.ids, o, want);
        const inSel = new Set(S);
        let gHit = 0;
        for (const id of exactTop[h][s].group) gHit += inSel.has(id) ? 1 : 0;
        gtopk.push(gHit / want);
        const cmp = compareWithOracle(exact[h][s], S, want);
        rec.push(cmp.method.attentionRecall);
        orc.push(cmp.oracle.attentionRecall);
        topk.push(cmp.method.topKRecall);
        otopk.push(cmp.oracle.topKRecall);
        err.push(cmp.method.outputError);
        oerr.push(cmp.oracle.outputError);
        count += cmp.method.count;
        const inS = new Set(S);
        for (const n of wl.needles)
          if (n.head === h && n.step === s) {
            needles++;
            if (inS.has(n.position)) hits++;
          }
      }
    rows.push({
      method: name,
      budget,
      ef,
      margin,
      aggregate,
      seeded: seeded ?? false,
      cap: cap ?? null,
      steady: steady ?? false,
      codes: codes ?? null,
      codeScan: scan ?? false,
      scanKeep: keep ?? null,
      codesRead: codesRead.length ? mean(codesRead) : null,
      bytesRead: bytesRead.length ? mean(bytesRead) : null,
      buildSeconds: p.buildSeconds,
      artifactMB: p.artifactMB,
      loadMs: p.loadMs,
      searchMs: median(times),
      scanned: mean(scanned),
      attentionRecall: mean(rec),
      oracleRecall: mean(orc),
      topKRecall: mean(topk),
      oracleTopKRecall: mean(otopk),
      groupTopKRecall: mean(gtopk),
      searchRecall: mean(srec),
      outputError: mean(err),
      oracleError: mean(oerr),
      needleHits: `${hits}/${needles}`,
      selected: count / (o.heads * o.steps),
    });
    progress(`${name} budget ${budget} ef=${ef} margin=${margin} ${aggregate ?? ''}${seeded ? ' seeded' : ''}${steady ? ' steady free' : ''}${cap ? ` cap ${cap}` : ''}${codes ? ` code walk ≤ ${codes} (read ${(mean(codesRead) * 100).toFixed(1)}%)` : ''}${scan ? ` code scan${keep ? ` scanKeep ${keep}` : ''} (read ${(mean(codesRead) * 100).toFixed(1)}%, key bytes ${(mean(bytesRead) * 100).toFixed(1)}%)` : ''}: recall ${mean(rec).toFixed(3)} (oracle ${mean(orc).toFixed(3)}), group top-k recall ${mean(gtopk).toFixed(3)}, search recall ${mean(srec).toFixed(3)}, error ${mean(err).toFixed(3)}, scanned ${(mean(scanned) * 100).toFixed(2)}%, ${median(times).toFixed(2)} ms`);
  }
  return { rows, prepared: p };
}

function markdown(tokens: number, rows: Row[], o: Options, loads: number[]): string {
  const pct = (x: number) => `${(x * 100).toFixed(2)}%`;
  return [
    `### ${o.suite === 'documents' ? 'Documents' : 'Retrieval'} at ${tokens.toLocaleString('en-US')} tokens per kv head${o.broad ? ' (broad configuration)' : ''}${o.hard ? ' (hard knobs)' : ''}`,
    '',
    `${machine()}; load average (1 min) ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)} at the run's start and after each method; ${o.heads} kv head(s) × ${o.steps} decode steps, GQA group 4, d=128, f16; workload knobs: ${o.broad ? 'broadKnobs' : 'defaults'}${o.hard ? ` + HARD_KNOBS (unasked ${HARD_KNOBS.unasked}, decodeShift ${HARD_KNOBS.decodeShift})` : ''}; selection = ${o.sinks} sinks + ${o.window} window + the method's tokens (budget = kept fraction of tokens). Oracle = the exact top tokens by attention, same count. retrieval-attention: degree ${o.degree} + ${o.keyNeighbors ?? RA_GRAPH_DEFAULTS.keyNeighbors} key-key edges (beam ${o.keyEf ?? RA_GRAPH_DEFAULTS.keyEf}) + positional edges ${o.positional} each side, kBuild ${o.kBuild ?? RA_GRAPH_DEFAULTS.kBuild}, build queries ≤ ${o.maxQueries ?? RA_GRAPH_DEFAULTS.maxQueries}; margin = the quality-bound stop in logits (— = fixed beam); "≤ x% scanned" = the walk capped at that share of keys scored (maxScanned); ef = tokens is the exhaustive ceiling; ranking = how the group's 4 q heads rank a key: attention = the key's probability summed over the heads (each head's log-partition estimated from a strided sample of n/512 keys, counted as scanned), max = the largest q·k. Top-k recall (group): the selection against the exact top-k of the group's attention (mean probability over the group's heads, the oracle's ranking), k = the budget: the index's recall target. Top-k recall: against each head's own top-k, which one set shared by the group cannot cover (the oracle's beside it). Search recall: against the exact top-k by the row's own ranking (the group's attention for the other methods), k = budget + sinks + window. Prefill query rows per kv head: ${o.prefill ?? 'tokens/16'}. "steady free" = the ${o.sinks + o.window} sinks + window keys are the search's free start keys: scored, NOT counted as scanned (the attention over them computes those dot products anyway), and outside the k asked (the budget alone).${o.methods.some((m) => m.startsWith('infiniretri')) ? ' infiniretri: build = the seal\'s read by the prefill queries (artifact = its kept set, 1% of tokens); the question = the decode steps\' query rows, read once (scanned = every key, amortised over the steps); one kept set serves every step; -seal = the seal\'s evidence alone, -question = the question\'s read alone.' : ''}`,
    '',
    '| method | kept | ef | margin | ranking | build s/head | artifact MB/head | load ms/head | search ms | scanned | attention recall | oracle recall | top-k recall (group) | search recall | top-k recall | oracle top-k recall | output error | oracle error | needles |',
    '| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map(
      (r) =>
        `| ${r.method} | ${pct(r.budget)} | ${r.ef} | ${r.margin ?? '—'} | ${r.aggregate ?? '—'}${r.seeded ? ', seeded' : ''}${r.steady ? ', steady free' : ''}${r.cap ? `, ≤ ${pct(r.cap)} scanned` : ''}${r.codes ? `, code walk (codes ≤ ${pct(r.codes)}, read ${pct(r.codesRead ?? 0)})` : ''}${r.codeScan ? `, code scan (${r.cap ? '' : '≤ 3% / 3k scored, '}${r.scanKeep ? `scanKeep ${r.scanKeep}, PQ codes read ${pct(r.codesRead ?? 0)}, key bytes ${pct(r.bytesRead ?? 0)}` : `codes read ${pct(r.codesRead ?? 0)}`})` : ''} | ${r.buildSeconds.toFixed(2)} | ${r.artifactMB.toFixed(2)} | ${r.loadMs.toFixed(1)} | ${r.searchMs.toFixed(3)} | ${pct(r.scanned)} | ${r.attentionRecall.toFixed(4)} | ${r.oracleRecall.toFixed(4)} | ${r.groupTopKRecall.toFixed(3)} | ${r.searchRecall.toFixed(3)} | ${r.topKRecall.toFixed(3)} | ${r.oracleTopKRecall.toFixed(3)} | ${pct(r.outputError)} | ${pct(r.oracleError)} | ${r.needleHits} |`,
    ),
    ...versusHnsw(rows, pct),
  ].join('\n') + '\n';
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const out = process.env.KVRECALL_BENCH_OUT ?? 'bench/results';
  for (const tokens of o.tokens) {
    progress(`generating ${tokens} tokens × ${o.heads} kv heads`);
    const spec = { seed: 7, tokens, kvHeads: o.heads, qHeads: o.heads * 4, headDim: 128, steps: o.steps, needles: o.heads * o.steps, ...(o.prefill !== undefined ? { prefillQueries: o.prefill } : {}), knobs: (o.broad ? broadKnobs : defaultKnobs)(tokens, o.hard ? HARD_KNOBS : {}) };
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
    // The machine may be shared: its load beside the timings.
    const loads = [loadavg()[0]];
    const write = () => {
      loads.push(loadavg()[0]);
      const md = markdown(tokens, rows, o, loads);
      const name = `${o.suite}${o.broad ? '-broad' : ''}${o.hard ? '-hard' : ''}-${tokens}${process.env.KVRECALL_BENCH_TAG ?? ''}`;
      writeFileSync(`${out}/${name}.md`, md);
      writeFileSync(`${out}/${name}.json`, JSON.stringify({ machine: machine(), date: new Date().toISOString(), loads, options: o, rows }, null, 2));
      return md;
    };
    for (const name of o.methods) {
      let prepared: Prepared | undefined;
      for (const budget of o.budgets) {
        // Indexes do not depend on the budget; infiniretri's retention does.
        const r = await runMethod(name, wl, exact, o, budget, name.startsWith('infiniretri') ? undefined : prepared);
        prepared = r.prepared;
        rows.push(...r.rows);
        write();
      }
    }
    process.stdout.write(write());
  }
}

await main();
