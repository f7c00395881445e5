// npx tsc -p tsconfig.json && node dist/bench/retrieval-model.js [-- --dir /tmp/kvrecall-qk --lengths 16384,32768
//   --steps 8 --probes 40 --hnsw --out bench/results/retrieval-model-vm]
//
// Issue #15's recall target (the group's top 1% at <= 3% scanned) on a REAL
// model's keys and queries instead of workload/'s generator: kvrecall-code-13M
// (../shared/data/models, 6 layers, 2 kv heads, GQA 4, d=64), tensors dumped
// by bench/model/dump_qk.py (keys f16 post-RoPE, prefill queries at stride 4,
// the teacher-forced decode queries of the context's last positions). Per
// (layer, kv head) the graph is built at its defaults from the group's prefill
// queries, as index/retrieval-attention.ts builds it; per decode query group:
//
// - recall of T = the exact top k (k = 1% of the document's keys) by the
//   group's mean softmax probability (float64, bench/quality.ts), of the
//   selection sinks + window + retrieved as bench/retrieval.ts counts it, and
//   of T outside sinks + window by the retrieved ids alone (what the graph
//   must find itself), against the scanned share, at several efforts: capped
//   at 1/2/3/5/10% scanned, the session's default margin, wider margins;
// - bench/retrieval-reach.ts's statistics (bench/results/retrieval-reach-vm.md
//   has them for the generator): the share of a T key's out-edges leading into
//   T, the same for its exact 24 nearest keys by centred cosine, T keys with no
//   in-edge from T, the oracle walk expanding the top 2k / 3k;
// - with --hnsw, index/hnsw.ts (centred keys, M 16, efConstruction 200) at ef =
//   k, 2k, 4k (bench/retrieval.ts sweeps the same);
// - with --seeds, each effort also with the steady zone as free start keys
//   (freeSeeds = sinks + window: scored by the search, NOT counted as scanned,
//   since the attention over them computes the same dot products; k asked =
//   1%, the steady zone being outside it), and that plus the query-aware
//   entry (RoarGraph's): the decode group's mean query is compared with
//   n/256 of the prefill queries (--entry-share; every such dot product
//   counted as one key scanned), and the stored exact top 8 keys
//   (--entry-top) of its 4 nearest (--entry-nearest) by cosine are extra
//   seeds, scored and counted. Variants alternate per query group.
//   --no-reach skips the neighbour statistics and the ideal walk.
// - with --margins 0.5,0.75,1,1.5, instead of the efforts above: the
//   session's default search before 5dcddba (k = 1% + sinks + window, beam
//   8k, margin 0.5, no free start keys) and the session's search now at each
//   margin (steady zone free, k = 1%, beam 8k; and with the wider beam of
//   before, 8·(1% + sinks + window)), plus index/retrieval-attention.ts's
//   searchHeads itself with the steady zone in its memo (the session's
//   default: equals "margin s0.75, wide beam"; a margin "s<b>" is
//   0.5 + b·ln(1 + (sinks + window) / k)). With values dumped (dump_qk.py --values) each
//   selection's output error against exact attention and the exact top
//   1%'s (the oracle's) beside it; pass-key digits = of the plant's 5 digit
//   keys, those selected at the question's position (the dump's last).
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { RaGraph } from '../addon/ra-graph.js';
import { machine } from './host.js';
import { hnswBuilder } from '../index/hnsw.js';
import { DEFAULT_MARGIN, retrievalAttentionBuilder } from '../index/retrieval-attention.js';
import { compareWithOracle, exactAttention, meanProbs, topKIndices, widen, type ExactAttention } from './quality.js';
import { oracleWalk, readCsr, type Csr } from './ra-graph-csr.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const dir = get('dir', '/tmp/kvrecall-qk');
const lengths = get('lengths', '16384,32768').split(',').map(Number);
const stepsPerHead = Number(get('steps', '8'));
const probes = Number(get('probes', '40'));
const withHnsw = argv.includes('--hnsw');
const withSeeds = argv.includes('--seeds');
const withReach = !argv.includes('--no-reach');
// A margin "s<b>" is 0.5 + b·ln(1 + (sinks + window) / k): the old bound's reference rank k + sinks + window moved to
// rank k, if a key's probability falls as 1/rank.
const margins = argv.includes('--margins') ? get('margins', '').split(',') : undefined;
const marginOf = (m: string, want: number) => (m.startsWith('s') ? 0.5 + Number(m.slice(1)) * Math.log(1 + (SINKS + WINDOW) / want) : Number(m));
const out = get('out', 'bench/results/retrieval-model-vm');
const SINKS = 16, WINDOW = 256, BUDGET = 0.01, NN = 24;
const progress = (msg: string) => process.stderr.write(`[retrieval-model] ${msg}\n`);

/** A .npy file's shape and little-endian data (f2 as 16-bit words, f4). */
function readNpy(path: string): { shape: number[]; data: Uint16Array | Float32Array } {
  const b = readFileSync(path);
  if (b.toString('latin1', 1, 6) !== 'NUMPY') throw new Error(`${path}: not a .npy file`);
  const major = b[6];
  const hlen = major === 1 ? b.readUInt16LE(8) : b.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = b.toString('latin1', start, start + hlen);
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error(`${path}: Fortran order`);
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? '').split(',').filter((s) => s.trim()).map(Number);
  const body = b.buffer.slice(b.byteOffset + start + hlen, b.byteOffset + b.byteLength);
  if (descr === '<f2') return { shape, data: new Uint16Array(body) };
  if (descr === '<f4') return { shape, data: new Float32Array(body) };
  throw new Error(`${path}: dtype ${descr}; expected <f2 or <f4`);
}

interface Effort {
  name: string;
  ef: number;
  margin?: number;
  cap?: number;
}

function efforts(asked: number, n: number): Effort[] {
  return [
    ...[0.01, 0.02, 0.03, 0.05, 0.1].map((cap) => ({ name: `cap ${cap * 100}%`, ef: 8 * asked, margin: 3, cap })),
    { name: `margin ${DEFAULT_MARGIN} (default)`, ef: 8 * asked, margin: DEFAULT_MARGIN },
    ...[1, 2, 3].map((m) => ({ name: `margin ${m}`, ef: 8 * asked, margin: m })),
    { name: 'ef = k', ef: asked },
    { name: 'exhaustive', ef: n },
  ];
}

/** The search variants compared with --seeds (one table each). */
const VARIANTS = ['plain', 'steady free', 'steady free + query entry'] as const;
type Variant = (typeof VARIANTS)[number];
/** Query-aware entry: prefill queries kept per key (n / ENTRY_SHARE), nearest taken, stored top keys each. */
const ENTRY_SHARE = Number(get('entry-share', '256')), ENTRY_NEAREST = Number(get('entry-nearest', '4')), ENTRY_TOP = Number(get('entry-top', '8'));

interface QueryEntry {
  /** [m, d] the kept prefill queries, unit length. */
  unit: Float32Array;
  /** [m, ENTRY_TOP] each one's exact top keys by q·k. */
  tops: Int32Array;
  m: number;
}

/** n / ENTRY_SHARE prefill query rows, evenly strided, with their exact top ENTRY_TOP keys (what a build would store). */
function queryEntry(queries: Float32Array, K: Float32Array, n: number, d: number): QueryEntry {
  const rows = queries.length / d, m = Math.max(1, Math.min(rows, Math.round(n / ENTRY_SHARE)));
  const unit = new Float32Array(m * d), tops = new Int32Array(m * ENTRY_TOP), sc = new Float64Array(n);
  for (let i = 0; i < m; i++) {
    const r = Math.floor(((i + 0.5) * rows) / m);
    const q = queries.subarray(r * d, (r + 1) * d);
    for (let t = 0; t < n; t++) {
      let s = 0;
      for (let j = 0; j < d; j++) s += q[j] * K[t * d + j];
      sc[t] = s;
    }
    tops.set(topKIndices(sc, ENTRY_TOP), i * ENTRY_TOP);
    let norm = 0;
    for (let j = 0; j < d; j++) norm += q[j] * q[j];
    for (let j = 0; j < d; j++) unit[i * d + j] = q[j] / Math.sqrt(norm || 1);
  }
  return { unit, tops, m };
}

/** Seeds for a decode group: the stored top keys of the kept prefill queries nearest its mean query; m dot products. */
function entrySeeds(e: QueryEntry, q: Float32Array, G: number, d: number): Int32Array {
  const mean = new Float32Array(d);
  for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) mean[j] += q[g * d + j];
  const cos = new Float64Array(e.m);
  for (let i = 0; i < e.m; i++) {
    let s = 0;
    for (let j = 0; j < d; j++) s += mean[j] * e.unit[i * d + j];
    cos[i] = s;
  }
  const ids = new Set<number>();
  for (const i of topKIndices(cos, ENTRY_NEAREST)) for (let j = 0; j < ENTRY_TOP; j++) ids.add(e.tops[i * ENTRY_TOP + j]);
  return Int32Array.from(ids);
}

interface Point {
  recall: number; // selection (sinks + window + retrieved) against T
  retrievedRecall: number; // T outside sinks + window, by the retrieved ids
  scanned: number;
  /** With --margins and values: ‖o_S − o‖/‖o‖ over the group's rows, and the oracle's (exact top tokens, same count). */
  error?: number;
  oracleError?: number;
  /** With --margins: pass-key digit keys selected at the question's position (of 5), and the oracle's. */
  digits?: number;
  oracleDigits?: number;
}

/** --margins: the searches compared (k asked, beam, margin, steady zone free). */
interface MarginRun {
  name: string;
  k: number;
  ef: number;
  margin: number;
  free: boolean;
}

function marginRuns(ms: string[], want: number, asked: number): MarginRun[] {
  return [
    { name: 'before 5dcddba (default)', k: asked, ef: 8 * asked, margin: 0.5, free: false },
    ...ms.map((m) => ({ name: `margin ${m}`, k: want, ef: 8 * want, margin: marginOf(m, want), free: true })),
    ...ms.map((m) => ({ name: `margin ${m}, wide beam`, k: want, ef: 8 * asked, margin: marginOf(m, want), free: true })),
  ];
}

/** Sinks + window + the first `want` retrieved ids outside them, as the session attends. */
function selectionOf(ids: Int32Array, n: number, want: number): Int32Array {
  const out: number[] = [];
  for (let t = 0; t < SINKS; t++) out.push(t);
  for (let t = n - WINDOW; t < n; t++) out.push(t);
  let m = 0;
  for (const id of ids) if (m < want && id >= SINKS && id < n - WINDOW) out.push(id), m++;
  return Int32Array.from(out);
}

/** A --margins point: recall and scanned as score() counts them, output error with values, pass-key digits at the question. */
function marginPoint(ex: ExactAttention, withValues: boolean, ids: Int32Array, T: Int32Array, n: number, want: number, scanned: number, digits?: number[]): Point {
  const pt = score(ids, T, n, want, scanned);
  const S = selectionOf(ids, n, want);
  if (withValues) {
    const cmp = compareWithOracle(ex, S, want);
    (pt.error = cmp.method.outputError), (pt.oracleError = cmp.oracle.outputError);
  }
  if (digits) {
    const inS = new Set(S), inO = new Set([...selectionOf(T, n, want), ...T]);
    (pt.digits = digits.filter((t) => inS.has(t)).length), (pt.oracleDigits = digits.filter((t) => inO.has(t)).length);
  }
  return pt;
}

interface Reach {
  precision: number;
  knnPrecision: number;
  knnCos: number;
  noInEdge: number;
  walk2k: [number, number];
  walk3k: [number, number];
}

/** bench/retrieval-reach.ts's measureStep, reduced to the columns retrieval-reach-vm.md compares. */
function reach(g: Csr, centred: Float32Array, d: number, mp: Float64Array, k: number): Reach {
  const { n, off, nbr } = g;
  const order = topKIndices(mp, Math.min(n, 3 * k));
  const rank = new Int32Array(n).fill(2 ** 30);
  order.forEach((t, i) => (rank[t] = i));
  let inT = 0, all = 0, noIn = 0;
  const inDegree = new Int32Array(n);
  for (let r = 0; r < k; r++)
    for (let i = off[order[r]]; i < off[order[r] + 1]; i++) (inT += rank[nbr[i]] < k ? 1 : 0), all++, inDegree[nbr[i]]++;
  for (let r = 0; r < k; r++) noIn += inDegree[order[r]] === 0 ? 1 : 0;
  const cos = new Float64Array(n);
  let hit = 0, cnt = 0, cosSum = 0;
  const p = Math.min(probes, k);
  for (let i = 0; i < p; i++) {
    const u = order[Math.floor(((i + 0.5) * k) / p)];
    for (let v = 0; v < n; v++) {
      let s = 0;
      for (let j = 0; j < d; j++) s += centred[u * d + j] * centred[v * d + j];
      cos[v] = s;
    }
    cos[u] = -Infinity;
    for (const v of topKIndices(cos, NN)) (hit += rank[v] < k ? 1 : 0), cnt++, (cosSum += cos[v]);
  }
  const walk = (B: number): [number, number] => {
    const w = oracleWalk(g, rank, k, B);
    return [w.recall, w.scanned];
  };
  return { precision: inT / all, knnPrecision: hit / cnt, knnCos: cosSum / cnt, noInEdge: noIn / k, walk2k: walk(2 * k), walk3k: walk(3 * k) };
}

/** Components of the centred keys' covariance holding 90% of the variance (Jacobi eigenvalues, float64). */
function dims90(K: Float32Array, n: number, d: number, mu: Float64Array): number {
  const C = new Float64Array(d * d);
  const x = new Float64Array(d);
  for (let t = 0; t < n; t++) {
    for (let j = 0; j < d; j++) x[j] = K[t * d + j] - mu[j];
    for (let a = 0; a < d; a++) for (let b = a; b < d; b++) C[a * d + b] += (x[a] * x[b]) / n;
  }
  for (let a = 0; a < d; a++) for (let b = 0; b < a; b++) C[a * d + b] = C[b * d + a];
  for (let sweep = 0; sweep < 30; sweep++) {
    let offNorm = 0;
    for (let p = 0; p < d; p++) for (let q = p + 1; q < d; q++) offNorm += C[p * d + q] ** 2;
    if (offNorm < 1e-22) break;
    for (let p = 0; p < d; p++)
      for (let q = p + 1; q < d; q++) {
        const apq = C[p * d + q];
        if (Math.abs(apq) < 1e-300) continue;
        const th = (C[q * d + q] - C[p * d + p]) / (2 * apq);
        const t = Math.sign(th || 1) / (Math.abs(th) + Math.sqrt(th * th + 1));
        const c = 1 / Math.sqrt(t * t + 1), s = t * c;
        for (let r = 0; r < d; r++) {
          const arp = C[r * d + p], arq = C[r * d + q];
          C[r * d + p] = c * arp - s * arq;
          C[r * d + q] = s * arp + c * arq;
        }
        for (let r = 0; r < d; r++) {
          const apr = C[p * d + r], aqr = C[q * d + r];
          C[p * d + r] = c * apr - s * aqr;
          C[q * d + r] = s * apr + c * aqr;
        }
      }
  }
  const ev = Array.from({ length: d }, (_, i) => Math.max(0, C[i * d + i])).sort((a, b) => b - a);
  const total = ev.reduce((a, b) => a + b, 0);
  let acc = 0;
  for (let i = 0; i < d; i++) if ((acc += ev[i]) >= 0.9 * total) return i + 1;
  return d;
}

/**
 * A best-first walk on the graph ranked by the EXACT log mean probability (a search with a perfect score, as
 * retrieval-reach-vm.md's split.mjs), capped at `cap` of the keys scored: what this graph allows at that share.
 * With `freeStatic`, the sinks and the window (attended in full anyway, so their scores cost the walk nothing)
 * are the starting points besides the entries and are not counted as scanned.
 */
function idealWalk(g: Csr, mp: Float64Array, T: Int32Array, cap: number, freeStatic: boolean): Point {
  const { n, off, nbr, entries } = g;
  const isStatic = (t: number) => t < SINKS || t >= n - WINDOW;
  const inT = new Uint8Array(n);
  for (const t of T) inT[t] = 1;
  const seen = new Uint8Array(n);
  const heap: number[] = []; // ids, max-heap by mp
  const push = (v: number) => {
    heap.push(v);
    for (let i = heap.length - 1; i > 0; ) {
      const p = (i - 1) >> 1;
      if (mp[heap[p]] >= mp[heap[i]]) break;
      [heap[p], heap[i]] = [heap[i], heap[p]];
      i = p;
    }
  };
  const pop = () => {
    const top = heap[0], last = heap.pop()!;
    if (heap.length) {
      heap[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < heap.length && mp[heap[l]] > mp[heap[m]]) m = l;
        if (r < heap.length && mp[heap[r]] > mp[heap[m]]) m = r;
        if (m === i) break;
        [heap[m], heap[i]] = [heap[i], heap[m]];
        i = m;
      }
    }
    return top;
  };
  let scanned = 0, dynHit = 0, dyn = 0;
  for (const t of T) dyn += isStatic(t) ? 0 : 1;
  const visit = (v: number, free: boolean) => {
    seen[v] = 1;
    if (!free) scanned++;
    if (inT[v] && !isStatic(v)) dynHit++;
    push(v);
  };
  if (freeStatic) for (let t = 0; t < n; t++) if (isStatic(t)) visit(t, true);
  for (const e of entries) if (!seen[e]) visit(e, false);
  while (heap.length && scanned < cap * n) {
    const u = pop();
    for (let i = off[u]; i < off[u + 1]; i++) if (!seen[nbr[i]]) visit(nbr[i], false);
  }
  return { recall: (T.length - dyn + dynHit) / T.length, retrievedRecall: dyn ? dynHit / dyn : 1, scanned: scanned / n };
}

interface LayerResult {
  length: number;
  layer: number;
  groups: number;
  buildSeconds: number;
  unretrieved: number;
  dims90: number[];
  staticShareOfT: number;
  ra: Record<string, Point>;
  /** With --seeds: per variant, per effort. */
  seeded: Partial<Record<Variant, Record<string, Point>>>;
  /** With --margins: per search compared (marginRuns), means over the query groups; digits summed over kv heads. */
  margins?: Record<string, Point>;
  hnsw: Record<string, Point>;
  ideal: Record<string, Point>;
  reach: Reach;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);

/** --margins points averaged over query groups; errors where measured; digits summed (the question's groups only). */
function averageMargin(ps: Point[]): Point {
  const errs = ps.filter((p) => p.error !== undefined), dig = ps.filter((p) => p.digits !== undefined);
  return {
    recall: mean(ps.map((p) => p.recall)),
    retrievedRecall: mean(ps.map((p) => p.retrievedRecall)),
    scanned: mean(ps.map((p) => p.scanned)),
    ...(errs.length > 0 && { error: mean(errs.map((p) => p.error!)), oracleError: mean(errs.map((p) => p.oracleError!)) }),
    ...(dig.length > 0 && { digits: dig.reduce((a, p) => a + p.digits!, 0), oracleDigits: dig.reduce((a, p) => a + p.oracleDigits!, 0) }),
  };
}

function score(ids: Int32Array, T: Int32Array, n: number, want: number, scanned: number): Point {
  const isStatic = (t: number) => t < SINKS || t >= n - WINDOW;
  const sel = new Uint8Array(n);
  let m = 0;
  for (const id of ids) if (m < want && !isStatic(id)) (sel[id] = 1), m++;
  let hit = 0, dyn = 0, dynHit = 0;
  for (const t of T) {
    if (isStatic(t)) hit++;
    else (dyn++, sel[t] && (hit++, dynHit++));
  }
  return { recall: hit / T.length, retrievedRecall: dyn ? dynHit / dyn : 1, scanned: scanned / n };
}

async function runLength(length: number): Promise<LayerResult[]> {
  const base = join(dir, `ctx${length}`);
  const meta = JSON.parse(readFileSync(join(base, 'meta.json'), 'utf8')) as { n_doc: number; steps: number; layers: number; kv_heads: number; group: number; head_dim: number; scale: number; plant_at: number };
  const { n_doc: n, group: G, head_dim: d } = meta;
  const want = Math.round(n * BUDGET), asked = want + SINKS + WINDOW;
  // Decode positions evenly spread over the dumped tail (the last one asks for the pass key).
  const picks = Array.from({ length: stepsPerHead }, (_, i) => Math.round(((i + 1) * meta.steps) / stepsPerHead) - 1);
  const results: LayerResult[] = [];
  for (let layer = 0; layer < meta.layers; layer++) {
    const ra: Record<string, Point[]> = {}, hn: Record<string, Point[]> = {}, ideal: Record<string, Point[]> = {}, mr: Record<string, Point[]> = {};
    // The pass key's five digits (after "\x1fpass key: "), asked for at the dump's last position.
    const digits = Array.from({ length: 5 }, (_, i) => meta.plant_at + 11 + i);
    const seeded: Partial<Record<Variant, Record<string, Point[]>>> = {};
    const steady = Int32Array.from({ length: SINKS + WINDOW }, (_, i) => (i < SINKS ? i : n - WINDOW + (i - SINKS)));
    const reaches: Reach[] = [], staticShare: number[] = [], dims: number[] = [];
    let buildSeconds = 0, unretrieved = 0, groups = 0;
    for (let h = 0; h < meta.kv_heads; h++) {
      const stem = join(base, `L${layer}h${h}`);
      const keys = readNpy(`${stem}.keys.npy`).data as Uint16Array;
      const withValues = margins !== undefined && existsSync(`${stem}.values.npy`);
      const values = withValues ? (readNpy(`${stem}.values.npy`).data as Uint16Array) : keys;
      const queries = readNpy(`${stem}.prefill.npy`).data as Float32Array;
      const decode = readNpy(`${stem}.decode.npy`).data as Float32Array;
      const keyArgs = { keys, tokens: n, headDim: d, dtype: 'f16' as const };
      const t0 = performance.now();
      const graph = await RaGraph.build({ ...keyArgs, queries });
      buildSeconds += (performance.now() - t0) / 1000;
      unretrieved += graph.buildStats?.unretrieved ?? NaN;
      const csr = readCsr(graph.save());
      const K = widen(keys, 'f16');
      const mu = new Float64Array(d);
      for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) mu[j] += K[t * d + j] / n;
      dims.push(dims90(K, n, d, mu));
      const centred = new Float32Array(n * d);
      for (let t = 0; t < n; t++) {
        let s = 0;
        for (let j = 0; j < d; j++) s += (centred[t * d + j] = K[t * d + j] - mu[j]) ** 2;
        const r = s > 0 ? 1 / Math.sqrt(s) : 0;
        for (let j = 0; j < d; j++) centred[t * d + j] *= r;
      }
      const entry = withSeeds ? queryEntry(queries, K, n, d) : undefined;
      const sessionHead = margins ? retrievalAttentionBuilder.load(graph.save(), keyArgs) : undefined;
      const hnswHead = withHnsw ? hnswBuilder.load(await hnswBuilder.build({ ...keyArgs, queries: new Float32Array(0), queryCount: 0 }), keyArgs) : undefined;
      for (const s of picks) {
        const q = decode.subarray(s * G * d, (s + 1) * G * d);
        groups++;
        const ex = exactAttention(q, G, K, withValues ? widen(values, 'f16') : K, { headDim: d, outputs: withValues, scale: meta.scale });
        const mp = meanProbs(ex);
        const T = topKIndices(mp, want);
        staticShare.push(T.reduce((a, t) => a + (t < SINKS || t >= n - WINDOW ? 1 : 0), 0) / want);
        if (withReach) {
          reaches.push(reach(csr, centred, d, mp, want));
          for (const cap of [0.02, 0.03, 0.05])
            for (const free of [false, true]) (ideal[`${free ? 'static free, ' : ''}cap ${cap * 100}%`] ??= []).push(idealWalk(csr, mp, T, cap, free));
        }
        const qSeeds = entry && entrySeeds(entry, q, G, d);
        if (margins) {
          const atQuestion = s === meta.steps - 1 ? digits : undefined;
          for (const run of marginRuns(margins, want, asked)) {
            const ids = new Int32Array(run.k), scores = new Float32Array(run.k);
            const res = graph.searchSync({ ...keyArgs, q, group: G, k: run.k, ef: run.ef, margin: run.margin, aggregate: 'attention', scale: meta.scale, outIds: ids, outScores: scores, ...(run.free && { freeSeeds: steady }) });
            (mr[run.name] ??= []).push(marginPoint(ex, withValues, ids.subarray(0, res.count), T, n, want, res.scanned, atQuestion));
          }
          // The session's search itself (ef 0 = its default), the steady zone in its memo.
          const [r] = await retrievalAttentionBuilder.searchHeads!([sessionHead!], q, G, [asked], 0, { steady });
          (mr['session (searchHeads)'] ??= []).push(marginPoint(ex, withValues, r.ids, T, n, want, r.scanned, atQuestion));
          continue;
        }
        for (const e of efforts(asked, n))
          for (const variant of withSeeds ? VARIANTS : (['plain'] as const)) {
            // The free variants ask for the 1% alone: the steady zone is outside the k searched for.
            const free = variant !== 'plain', kk = free ? want : asked, extra = variant === 'steady free + query entry' ? entry!.m : 0;
            const ids = new Int32Array(kk), scores = new Float32Array(kk);
            const ef = e.ef >= n ? n : free ? e.ef - (asked - want) : e.ef;
            const cap = e.cap && Math.max(1, Math.round(e.cap * n) - extra);
            const res = graph.searchSync({ ...keyArgs, q, group: G, k: kk, ef, margin: e.margin, maxScanned: cap, aggregate: 'attention', scale: meta.scale, outIds: ids, outScores: scores, ...(free && { freeSeeds: steady }), ...(extra > 0 && { seeds: qSeeds }) });
            const pt = score(ids.subarray(0, res.count), T, n, want, res.scanned + extra);
            if (variant === 'plain') (ra[e.name] ??= []).push(pt);
            if (withSeeds) ((seeded[variant] ??= {})[e.name] ??= []).push(pt);
          }
        if (hnswHead)
          for (const f of [1, 2, 4]) {
            const r = hnswHead.search(q, G, asked, f * asked);
            (hn[`ef ${f}k`] ??= []).push(score(r.ids, T, n, want, r.scanned));
          }
      }
      graph.dispose();
    }
    const avg = (pts: Record<string, Point[]>) =>
      Object.fromEntries(Object.entries(pts).map(([name, ps]) => [name, { recall: mean(ps.map((p) => p.recall)), retrievedRecall: mean(ps.map((p) => p.retrievedRecall)), scanned: mean(ps.map((p) => p.scanned)) }]));
    const r: LayerResult = {
      length,
      layer,
      groups,
      buildSeconds: buildSeconds / meta.kv_heads,
      unretrieved: unretrieved / meta.kv_heads / n,
      dims90: dims,
      staticShareOfT: mean(staticShare),
      ra: avg(ra),
      margins: margins && Object.fromEntries(Object.entries(mr).map(([name, ps]) => [name, averageMargin(ps)])),
      hnsw: avg(hn),
      ideal: avg(ideal),
      seeded: Object.fromEntries(Object.entries(seeded).map(([v, pts]) => [v, avg(pts)])),
      reach: {
        precision: mean(reaches.map((x) => x.precision)),
        knnPrecision: mean(reaches.map((x) => x.knnPrecision)),
        knnCos: mean(reaches.map((x) => x.knnCos)),
        noInEdge: mean(reaches.map((x) => x.noInEdge)),
        walk2k: [mean(reaches.map((x) => x.walk2k[0])), mean(reaches.map((x) => x.walk2k[1]))],
        walk3k: [mean(reaches.map((x) => x.walk3k[0])), mean(reaches.map((x) => x.walk3k[1]))],
      },
    };
    progress(`${length} layer ${layer} (load ${loadavg()[0].toFixed(1)}): ${JSON.stringify(r)}`);
    results.push(r);
  }
  return results;
}

/** The scanned share where the mean recall curve (efforts sorted by scanned) first reaches `target`, linearly interpolated. */
function shareAt(points: Record<string, Point>, target: number, key: 'recall' | 'retrievedRecall'): number | null {
  const ps = Object.values(points).sort((a, b) => a.scanned - b.scanned);
  let best = 0, prev: Point | undefined;
  for (const p of ps) {
    if (p[key] < best) continue; // a costlier effort that recalls less is off the curve
    if (p[key] >= target) return prev ? prev.scanned + ((target - prev[key]) / (p[key] - prev[key])) * (p.scanned - prev.scanned) : p.scanned;
    (best = p[key]), (prev = p);
  }
  return null;
}

async function main(): Promise<void> {
  const loads: number[] = [loadavg()[0]];
  const t0 = performance.now();
  const all: LayerResult[] = [];
  for (const length of lengths) all.push(...(await runLength(length))), loads.push(loadavg()[0]);
  const f = (x: number, p = 3) => x.toFixed(p);
  const pct = (x: number | null) => (x === null ? '> max' : `${(100 * x).toFixed(1)}%`);
  const names = Object.keys(all[0].ra);
  const md: string[] = [
    `### RetrievalAttention's graph on a real model's keys: kvrecall-code-13M (issue #15; 2-core VM)`,
    '',
    `AMD EPYC, 2-core VM (${machine()}), shared with other work (1-minute load ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)} during the run; ${f((performance.now() - t0) / 1000, 0)} s). ` +
      `Tensors: \`/usr/bin/python3 bench/model/dump_qk.py --lengths ${lengths.join(',')}${margins ? ' --values' : ''}\` (one held-out pass-key context per length, kvdecode.make_trial's draw, seed 0; numpy prefill of the whole context; keys f16 post-RoPE; prefill queries every 4th token as bench:model pushes them; decode queries = the teacher-forced last 48 positions). ` +
      `Bench: \`node dist/bench/retrieval-model.js --lengths ${lengths.join(',')} --steps ${stepsPerHead} --probes ${probes}${withHnsw ? ' --hnsw' : ''}${withSeeds ? ` --seeds --entry-share ${ENTRY_SHARE} --entry-nearest ${ENTRY_NEAREST} --entry-top ${ENTRY_TOP}` : ''}${withReach ? '' : ' --no-reach'}${margins ? ` --margins ${margins.join(',')}` : ''}\` (bench/retrieval-model.ts). ` +
      `Per layer: 2 kv heads × ${stepsPerHead} decode positions = ${all[0].groups} query groups (GQA 4, d=64). Graph per (layer, kv head) at its defaults from the group's prefill queries (index/retrieval-attention.ts's build); search ranked by the group's attention, k asked = 1% + ${SINKS} sinks + ${WINDOW} window (bench/retrieval.ts). ` +
      `T = the exact top 1% of the document's keys by the group's mean softmax probability (float64). Recall = the selection (sinks + window + retrieved) against T, as bench/retrieval.ts's "top-k recall (group)"; "dyn" = the share of T outside sinks + window that the retrieved ids hold (what the graph must find). ` +
      `Efforts: "cap x%" = ef 8k, margin 3, at most x% of keys scored; margins with ef 8k; the session's default is margin ${DEFAULT_MARGIN}. Scanned includes the 'attention' ranking's sample (n/512, at least 64 keys).`,
    '',
  ];
  for (const length of lengths) {
    const rows = all.filter((r) => r.length === length);
    md.push(`#### ${length.toLocaleString('en-US')}-byte context (document ${(length - 48).toLocaleString('en-US')} keys, k = ${Math.round((length - 48) * BUDGET)})`, '');
    if (margins) {
      md.push(`Margin sweep (recall (dyn) @ scanned; output error against exact attention, the oracle's = the exact top tokens of the same count; pass-key digits selected at the question's position, of 5 per kv head, the oracle's = sinks + window + the exact top 1%):`, '');
      md.push('| layer | search | recall | dyn | scanned | output error | oracle error | digits (oracle) |', '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |');
      for (const r of rows)
        for (const [nm, p] of Object.entries(r.margins ?? {}))
          md.push(`| ${r.layer} | ${nm} | ${f(p.recall)} | ${f(p.retrievedRecall, 2)} | ${pct(p.scanned)} | ${p.error === undefined ? '—' : `${(100 * p.error).toFixed(2)}%`} | ${p.oracleError === undefined ? '—' : `${(100 * p.oracleError).toFixed(2)}%`} | ${p.digits ?? '—'} (${p.oracleDigits ?? '—'}) |`);
      md.push('');
    }
    if (!withSeeds && !margins) {
      md.push(`Graph: recall (dyn) @ scanned, mean over the layer's ${rows[0].groups} query groups.`, '');
      md.push(`| layer | ${names.join(' | ')} | 0.9 reached at |`, `| ---: |${names.map(() => ' --- |').join('')} ---: |`);
      for (const r of rows) md.push(`| ${r.layer} | ${names.map((nm) => `${f(r.ra[nm].recall)} (${f(r.ra[nm].retrievedRecall, 2)}) @ ${pct(r.ra[nm].scanned)}`).join(' | ')} | ${pct(shareAt(r.ra, 0.9, 'recall'))} |`);
      md.push('');
    }
    if (withHnsw) {
      const hn = Object.keys(rows[0].hnsw);
      md.push(`hnsw (centred keys, M 16, efConstruction 200; max over the group's rows; scanned = candidates hnswlib examined, summed over the group's 4 rows as index/hnsw.ts counts them):`, '');
      md.push(`| layer | ${hn.join(' | ')} |`, `| ---: |${hn.map(() => ' --- |').join('')}`);
      for (const r of rows) md.push(`| ${r.layer} | ${hn.map((nm) => `${f(r.hnsw[nm].recall)} (${f(r.hnsw[nm].retrievedRecall, 2)}) @ ${pct(r.hnsw[nm].scanned)}`).join(' | ')} |`);
      md.push('');
    }
    if (withSeeds && !margins) {
      md.push(`Seeds, variants alternated per query group in the same sitting (recall (dyn) @ scanned). "steady free": the ${SINKS + WINDOW} sinks + window keys are free start keys: scored, NOT counted as scanned (the attention over them computes those dot products anyway), k asked = 1% (they are outside it). "+ query entry": also the stored exact top ${ENTRY_TOP} keys of the ${ENTRY_NEAREST} kept prefill queries (n/${ENTRY_SHARE} of them) nearest the group's mean query by cosine, seeds scored and counted; the n/${ENTRY_SHARE} query dot products are counted as scanned too (a cap includes them).`, '');
      for (const v of VARIANTS) {
        const vn = Object.keys(rows[0].seeded[v] ?? {});
        md.push(`${v}:`, '', `| layer | ${vn.join(' | ')} | 0.9 reached at |`, `| ---: |${vn.map(() => ' --- |').join('')} ---: |`);
        for (const r of rows) {
          const pts = r.seeded[v]!;
          md.push(`| ${r.layer} | ${vn.map((nm) => `${f(pts[nm].recall)} (${f(pts[nm].retrievedRecall, 2)}) @ ${pct(pts[nm].scanned)}`).join(' | ')} | ${pct(shareAt(pts, 0.9, 'recall'))} |`);
        }
        md.push('');
      }
    }
    if (!withReach) continue;
    const iw = Object.keys(rows[0].ideal);
    md.push(`Ideal walk on the same graph: best-first by the EXACT group probability (a perfect score), capped; "static free" = sinks + window are starting points and not counted as scanned (they are attended in full anyway):`, '');
    md.push(`| layer | ${iw.join(' | ')} |`, `| ---: |${iw.map(() => ' --- |').join('')}`);
    for (const r of rows) md.push(`| ${r.layer} | ${iw.map((nm) => `${f(r.ideal[nm].recall)} (${f(r.ideal[nm].retrievedRecall, 2)}) @ ${pct(r.ideal[nm].scanned)}`).join(' | ')} |`);
    md.push('');
    md.push(`Neighbour statistics (bench/retrieval-reach.ts's, means over query groups; generator at 64K: graph 0.222–0.235, exact 24-NN 0.160–0.184, no in-edge 0.195–0.217, neighbours' centred cosine ~0.6):`, '');
    md.push('| layer | T in sinks + window | P(neighbour in T \\| key in T): graph | exact 24-NN (centred cosine) | their mean centred cosine | T keys with no in-edge from T | oracle walk 2k | oracle walk 3k | dims for 90% of key variance (per kv head) | keys in no build query\'s list | build s/head |', '| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |');
    for (const r of rows)
      md.push(`| ${r.layer} | ${f(r.staticShareOfT)} | ${f(r.reach.precision)} | ${f(r.reach.knnPrecision)} | ${f(r.reach.knnCos)} | ${f(r.reach.noInEdge)} | ${f(r.reach.walk2k[0])} @ ${pct(r.reach.walk2k[1])} | ${f(r.reach.walk3k[0])} @ ${pct(r.reach.walk3k[1])} | ${r.dims90.join(', ')} | ${pct(r.unretrieved)} | ${f(r.buildSeconds, 1)} |`);
    md.push('');
  }
  const text = md.join('\n');
  writeFileSync(`${out}.json`, JSON.stringify({ machine: `AMD EPYC, 2-core VM (${machine()})`, date: new Date().toISOString(), lengths, stepsPerHead, probes, hnsw: withHnsw, seeds: withSeeds, loads, layers: all }, null, 1));
  writeFileSync(`${out}.md`, text + '\n');
  process.stdout.write(text + '\n');
}

await main();
process.exit(0); // hnsw's build workers stay alive otherwise
