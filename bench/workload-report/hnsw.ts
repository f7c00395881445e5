// Key-only ANN on the workload: recall@100 of an hnswlib inner-product graph
// over one kv head's keys, for the generated data, Gaussian baselines,
// centred keys and ablations (which property makes the graph collapse).
//
// Why not index/hnsw.ts (the project's hnsw method): its semantics differ in
// ways that change these numbers. It always centres the keys (the raw-key
// rows here are the point: they show the collapse that made the method
// centre), it indexes storage-dtype words (the centred keys here are f32 and
// would round), and it merges a query group into one ranked set (recall
// here is per query row against that row's exact top-100). So the report
// keeps its own thin use of hnswlib-node, with the same M and
// efConstruction as the method.
//
// hnswlib-node is resolved at run time, from KVRECALL_HNSWLIB (a package
// folder, e.g. another build) or node_modules; without it the section is
// skipped.
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';
import { generateWorkload, type Workload, type WorkloadKnobs, type WorkloadSpec } from '../../workload/index.js';
import { topKIndices, widen } from '../quality.js';
import { gaussianWorkload } from './properties.js';

type HnswModule = typeof import('hnswlib-node');

function loadHnswlib(): { mod: HnswModule; from: string } | undefined {
  const req = createRequire(import.meta.url);
  for (const from of [process.env.KVRECALL_HNSWLIB, 'hnswlib-node']) {
    if (!from) continue;
    try {
      return { mod: req(from) as HnswModule, from };
    } catch {
      // try the next
    }
  }
  return undefined;
}

export interface HnswResult {
  data: string;
  tokens: number;
  queries: number;
  buildSeconds: number;
  recall: { ef: number; recall: number; msPerQuery: number }[];
}

export const EFS = [100, 200, 400, 800, 1600];

const log = (s: string) => process.stderr.write(s + '\n');

/** Keys minus their per-channel mean (f32 copy). */
function centred(K: Float32Array, tokens: number, d: number): Float32Array {
  const mu = new Float64Array(d);
  for (let t = 0; t < tokens; t++) for (let j = 0; j < d; j++) mu[j] += K[t * d + j] / tokens;
  const out = new Float32Array(tokens * d);
  for (let t = 0; t < tokens; t++) for (let j = 0; j < d; j++) out[t * d + j] = K[t * d + j] - mu[j];
  return out;
}

function hnswRecall(mod: HnswModule, data: string, K: Float32Array, tokens: number, d: number, Q: Float32Array, rows: number): HnswResult {
  const t0 = performance.now();
  const index = new mod.HierarchicalNSW('ip', d);
  index.initIndex(tokens, 16, 200, 100);
  const row: number[] = new Array<number>(d).fill(0);
  for (let t = 0; t < tokens; t++) {
    for (let j = 0; j < d; j++) row[j] = K[t * d + j];
    index.addPoint(row, t);
  }
  const buildSeconds = (performance.now() - t0) / 1000;
  // Exact top-100 by inner product, in float64.
  const truth: Set<number>[] = [];
  const s = new Float64Array(tokens);
  for (let r = 0; r < rows; r++) {
    for (let t = 0; t < tokens; t++) {
      let x = 0;
      for (let j = 0; j < d; j++) x += Q[r * d + j] * K[t * d + j];
      s[t] = x;
    }
    truth.push(new Set(topKIndices(s, 100)));
  }
  const recall = EFS.map((ef) => {
    index.setEf(ef);
    let hit = 0;
    const t1 = performance.now();
    for (let r = 0; r < rows; r++) {
      for (let j = 0; j < d; j++) row[j] = Q[r * d + j];
      const got = index.searchKnn(row, 100).neighbors;
      for (const id of got) if (truth[r].has(id)) hit++;
    }
    return { ef, recall: hit / (rows * 100), msPerQuery: (performance.now() - t1) / rows };
  });
  log(`  hnsw ${data}: built in ${buildSeconds.toFixed(1)} s; recall@100 ${recall.map((r) => `ef${r.ef}=${r.recall.toFixed(3)}`).join(' ')}`);
  return { data, tokens, queries: rows, buildSeconds, recall };
}

export interface HnswInput {
  spec: WorkloadSpec;
  w: Workload;
  /** kv head 0's keys widened, and its group's decode queries [steps·G, d]. */
  K0: Float32Array;
  Q0: Float32Array;
  /** The Gaussian baseline's keys (widened) and queries. */
  gaussKeys: Float32Array;
  gaussQ: Float32Array;
  /** Keys indexed (a prefix of the context). */
  hTokens: number;
}

/** Every row of the report's hnsw table; note says what ran, or why nothing did. */
export function hnswStudy(x: HnswInput): { note: string; results: HnswResult[] } {
  const lib = loadHnswlib();
  if (!lib) return { note: 'hnswlib-node not found (install it or set KVRECALL_HNSWLIB to its folder); skipped.', results: [] };
  const { spec, w, K0, Q0, hTokens } = x, d = spec.headDim, G = spec.qHeads / spec.kvHeads;
  const note = `hnswlib-node from ${lib.from}; space ip, M=16, efConstruction=200, ${hTokens} keys, exact top-100 by q·k in float64.`;
  const hnsw: HnswResult[] = [];
  const rows = spec.steps * G;
  hnsw.push(hnswRecall(lib.mod, 'generated (kv head 0, decode queries of its group)', K0, hTokens, d, Q0, rows));
  hnsw.push(hnswRecall(lib.mod, 'Gaussian keys, Gaussian queries', x.gaussKeys, hTokens, d, x.gaussQ, rows));
  const shifted = gaussianWorkload(spec.tokens, d, rows, spec.seed, 1);
  hnsw.push(hnswRecall(lib.mod, 'Gaussian keys, queries shifted by a fixed N(0, I) mean', x.gaussKeys, hTokens, d, shifted.q, rows));
  // The last prefill rows (every key is causal for them, nearly).
  const pq = w.prefillQ[0], pRows = Math.min(256, w.prefillPos[0].length);
  const last = pq.subarray((w.prefillPos[0].length - pRows) * d);
  hnsw.push(hnswRecall(lib.mod, 'generated, its last prefill queries', K0, hTokens, d, last, pRows));
  // Centred keys: q·(k − μ) = q·k − q·μ ranks keys exactly as q·k, but
  // removes the common mean (outliers, sinks' pull) from the key graph.
  hnsw.push(hnswRecall(lib.mod, 'generated, keys centred (k − mean k; same exact top-100)', centred(K0, hTokens, d), hTokens, d, Q0, rows));
  // Ablations: which property drives the collapse (one kv head, same seed).
  const ablations: [string, Partial<WorkloadKnobs>][] = [
    ['generated without outlier channels and sinks', { outlierScale: 0, sinks: 0 }],
    ['generated without the query shift', { queryShift: 0 }],
    ['generated without outliers, sinks, query shift', { outlierScale: 0, sinks: 0, queryShift: 0 }],
  ];
  for (const [name, knobs] of ablations) {
    const a = generateWorkload({ ...spec, tokens: hTokens, kvHeads: 1, qHeads: G, needles: 0, prefillQueries: 0, knobs });
    const aq = new Float32Array(spec.steps * G * d);
    for (let s = 0; s < spec.steps; s++) aq.set(a.decodeQ[s].subarray(0, G * d), s * G * d);
    hnsw.push(hnswRecall(lib.mod, name, widen(a.keys[0], a.dtype), hTokens, d, aq, rows));
  }
  return { note, results: hnsw };
}
