// Cluster ranking as retrieval-attention's search path, or its seeds (issue
// #15, the top-1% recall target at <= 3% scanned): bench/retrieval-reach.ts
// runs this with `--clusters 16,64,...` on the same workload and graph.
//
// The clusters are the wave index's (index/wave/cluster-build.ts: k-means
// inside 8K-token segments, outliers alone), ranked by wave's optimistic
// score (native rankClusterHeads, SPREAD standard deviations). Accounting:
// every centroid scored counts as one key scanned, every member or graph
// key scored as one; sinks + window are free (attended in full anyway) and
// counted in the selection, as bench/ra-search.ts counts them.
//
// Per decode step, T = the exact top k (1%) of the group's mean probability:
//   (a) the graph's own search (freeSeeds = sinks + window, k = the budget):
//       capped at 3% scanned, the session default (effort(0)), ef = k;
//   (b) cluster ranking alone: the best clusters until their members number
//       M = 1, 2, 4, 8, 16 × k (and exactly what 3% leaves after the
//       centroids, where it leaves any), those members rescored by the exact group
//       probability (an upper bound on a rescoring whose partitions are
//       estimated) and the best k kept; scanned = clusters + M. And the
//       oracle bound for these clusters: taking clusters in order of their
//       share of T (a ranking that knew the answer), what it scans to hold
//       0.5 / 0.7 / 0.8 / 0.9 of T. No cluster score can do better; the
//       same with the centroids free (what a perfect coarser ranking above
//       the clusters would leave to scan); and why: the share of the
//       variance of q·k over the keys that lies between clusters (the rest
//       is each key's own offset from its centroid, which no summary ranks);
//   (c) the graph walk seeded with the members of the best clusters
//       (S = 0.25, 0.5, 1 × k of them, scored by the walk, counted),
//       capped so that clusters + walk <= 3%, and at the session default.
import type { Csr } from './ra-graph-csr.js';
import { RaGraph } from '../addon/ra-graph.js';
import { rankClusterHeads } from '../addon/cluster-rank.js';
import { buildClusters } from '../index/wave/cluster-build.js';
import { ClusterIndex, SPREAD } from '../index/wave/cluster-index.js';
import { effort } from '../index/retrieval-attention.js';
import { topKIndices, widen } from './quality.js';

export const SINKS = 16, WINDOW = 256;
const MEMBERS = [1, 2, 4, 8, 16];
const SEEDS = [0.25, 0.5, 1];
const ORACLE = [0.5, 0.7, 0.8, 0.9];
const CAP = 0.03;

export interface Point {
  name: string;
  recall: number;
  scanned: number;
}

export interface ClusterStep {
  graph: Point[];
  /** Per cluster size: ranking alone, the oracle bound, the seeded walk. */
  sizes: { clusterSize: number; clusters: number; ranking: Point[]; oracle: Point[]; oracleMembers: Point[]; seeded: Point[]; betweenShare: number }[];
}

export interface ClusterSetup {
  keys: Uint16Array;
  values: Uint16Array;
  tokens: number;
  headDim: number;
  graph: RaGraph;
  sizes: number[];
}

export interface Built {
  setup: ClusterSetup;
  heads: { clusterSize: number; index: ClusterIndex; buildSeconds: number }[];
  free: Int32Array;
  /** The keys in f32, for the variance shares. */
  wide: Float32Array;
}

export async function buildForClusters(setup: ClusterSetup): Promise<Built> {
  const { keys, values, tokens, headDim } = setup;
  const heads = [];
  for (const clusterSize of setup.sizes) {
    const t0 = performance.now();
    const blob = await buildClusters({ keys, values, tokens, headDim, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 }, { clusterSize, segmentTokens: 8192, iterations: 8, seed: 1 });
    heads.push({ clusterSize, index: ClusterIndex.load(blob, { keys, values, tokens, headDim, dtype: 'f16' }), buildSeconds: (performance.now() - t0) / 1000 });
  }
  const free = new Int32Array(SINKS + WINDOW);
  for (let i = 0; i < SINKS; i++) free[i] = i;
  for (let i = 0; i < WINDOW; i++) free[SINKS + i] = tokens - WINDOW + i;
  return { setup, heads, free, wide: widen(keys, 'f16') };
}

/** Recall of T (inT flags, k of them) by the free keys plus `ids`. */
function recallOf(inT: Uint8Array, k: number, free: Int32Array, ids: ArrayLike<number>): number {
  let hit = 0;
  for (const t of free) hit += inT[t];
  for (let i = 0; i < ids.length; i++) hit += inT[ids[i]];
  return hit / k;
}

/** The best `want` of the candidates by the exact group probability, the free keys left out. */
function rescore(mp: Float64Array, cand: Int32Array, want: number, isFree: Uint8Array): Int32Array {
  const s = new Float64Array(cand.length);
  for (let i = 0; i < cand.length; i++) s[i] = isFree[cand[i]] ? -Infinity : mp[cand[i]];
  return topKIndices(s, Math.min(want, cand.length)).map((i) => cand[i]);
}

/** Mean over the group's rows of the share of Var(q·k) over the keys (sinks left out) between clusters. */
function betweenShare(wide: Float32Array, n: number, d: number, q: Float32Array, group: number, ix: ClusterIndex): number {
  const tc = ix.arrays.tokenCluster, l = new Float64Array(n), cm = new Float64Array(ix.clusters);
  let share = 0;
  for (let h = 0; h < group; h++) {
    cm.fill(0);
    let mean = 0;
    for (let t = SINKS; t < n; t++) {
      let x = 0;
      for (let j = 0; j < d; j++) x += q[h * d + j] * wide[t * d + j];
      l[t] = x;
      mean += x / (n - SINKS);
    }
    // Sinks' clusters hold other keys too: their means over the cluster's non-sink rows.
    const rows = new Int32Array(ix.clusters);
    for (let t = SINKS; t < n; t++) (cm[tc[t]] += l[t]), rows[tc[t]]++;
    for (let c = 0; c < ix.clusters; c++) cm[c] = rows[c] > 0 ? cm[c] / rows[c] : 0;
    let all = 0, between = 0;
    for (let t = SINKS; t < n; t++) (all += (l[t] - mean) ** 2), (between += (cm[tc[t]] - mean) ** 2);
    share += between / all / group;
  }
  return share;
}

/** Members of the ranked clusters, best first, until `m` of them (the last cluster whole). */
function membersOf(ix: ClusterIndex, ranked: Int32Array, m: number): Int32Array {
  const out: number[] = [];
  for (let i = 0; i < ranked.length && out.length < m; i++) {
    const c = ranked[i];
    for (let j = ix.offsets[c]; j < ix.offsets[c + 1]; j++) out.push(ix.members[j]);
  }
  return Int32Array.from(out);
}

export async function measureClusterStep(b: Built, q: Float32Array, group: number, mp: Float64Array, T: Int32Array): Promise<ClusterStep> {
  const { keys, tokens: n, headDim: d, graph } = b.setup;
  const k = T.length;
  const inT = new Uint8Array(n);
  for (const t of T) inT[t] = 1;
  const isFree = new Uint8Array(n);
  for (const t of b.free) isFree[t] = 1;
  // k = the budget; the free keys come on top of it, as a session's steady zone does.
  const search = (e: { ef: number; margin?: number }, maxScanned = 0, seeds?: Int32Array) => {
    const ids = new Int32Array(k), scores = new Float32Array(k);
    const r = graph.searchSync({ keys, tokens: n, headDim: d, dtype: 'f16', q, group, k, ...e, aggregate: 'attention', maxScanned, outIds: ids, outScores: scores, freeSeeds: b.free, ...(seeds && { seeds }) });
    return { ids: ids.subarray(0, r.count), scanned: r.scanned };
  };
  const graphPoints: Point[] = [];
  for (const [name, e, cap] of [
    ['capped at 3%', { ef: 8 * (k + b.free.length), margin: 3 }, Math.round(CAP * n)],
    ['session default', effort(0, k, b.free.length), 0],
    ['ef = k', effort(k, k), 0],
  ] as const) {
    const r = search(e, cap);
    graphPoints.push({ name, recall: recallOf(inT, k, b.free, r.ids), scanned: r.scanned / n });
  }
  const sizes: ClusterStep['sizes'] = [];
  for (const { clusterSize, index: ix } of b.heads) {
    const C = ix.clusters;
    const ranked = new Int32Array(C), scores = new Float32Array(C);
    await rankClusterHeads({
      q, group, headDim: d, centroidStride: ix.stride, dtype: 'f16', k: C, spread: SPREAD,
      heads: [{ centroids: ix.arrays.centroids, axes: ix.arrays.keyAxes, axisScales: ix.arrays.axisScales, vars: ix.arrays.keyVars, varScales: ix.arrays.varScales, clusters: C, outIds: ranked, outScores: scores }],
    });
    const atCap = Math.round(CAP * n) - C;
    const ranking: Point[] = [...(atCap > 0 ? [{ name: '3% scanned', m: atCap }] : []), ...MEMBERS.map((x) => ({ name: `${x}k members`, m: x * k }))].map(({ name, m }) => {
      // The cap's point stops at its count exactly (the last cluster cut), the others take whole clusters.
      const cand = name === '3% scanned' ? membersOf(ix, ranked, m).subarray(0, m) : membersOf(ix, ranked, m);
      return { name, recall: recallOf(inT, k, b.free, rescore(mp, cand, k, isFree)), scanned: (C + cand.length) / n };
    });
    // The oracle: clusters by their share of T, free keys counted as found.
    const inC = new Int32Array(C);
    for (let t = 0; t < n; t++) if (inT[t] && !isFree[t]) inC[ix.arrays.tokenCluster[t]]++;
    const order = Array.from({ length: C }, (_, c) => c).sort((x, y) => inC[y] / ix.arrays.counts[y] - inC[x] / ix.arrays.counts[x]);
    let got = recallOf(inT, k, b.free, []) * k, m = 0, i = 0;
    const members: number[] = [];
    const oracle: Point[] = ORACLE.map((r) => {
      for (; got < r * k && i < C; i++) (got += inC[order[i]]), (m += ix.arrays.counts[order[i]]);
      members.push(m);
      return { name: `${r} of T`, recall: got / k, scanned: (C + m) / n };
    });
    const oracleMembers = oracle.map((p, j) => ({ ...p, scanned: members[j] / n }));
    const seeded: Point[] = [];
    for (const s of SEEDS) {
      const seeds = membersOf(ix, ranked, Math.round(s * k));
      const left = Math.round(CAP * n) - C;
      if (left > seeds.length) {
        const r = search({ ef: 8 * (k + b.free.length), margin: 3 }, left, seeds);
        seeded.push({ name: `${s}k seeds, capped at 3%`, recall: recallOf(inT, k, b.free, r.ids), scanned: (C + r.scanned) / n });
      }
      const r = search(effort(0, k, b.free.length), 0, seeds);
      seeded.push({ name: `${s}k seeds, session default`, recall: recallOf(inT, k, b.free, r.ids), scanned: (C + r.scanned) / n });
    }
    sizes.push({ clusterSize, clusters: C, ranking, oracle, oracleMembers, seeded, betweenShare: betweenShare(b.wide, n, d, q, group, ix) });
  }
  return { graph: graphPoints, sizes };
}

/** The md rows: each point's mean recall @ mean scanned over the steps. */
export function clusterTable(b: Built, steps: ClusterStep[]): string[] {
  const mean = (xs: number[]) => xs.reduce((a, x) => a + x, 0) / xs.length;
  const cell = (pts: Point[][]) => pts[0].map((p, j) => `${p.name}: ${mean(pts.map((s) => s[j].recall)).toFixed(3)} @ ${(100 * mean(pts.map((s) => s[j].scanned))).toFixed(2)}%`).join('; ');
  const rows = ['| method | cluster size (clusters, % of keys; build) | recall of T @ scanned (mean over steps) |', '| --- | --- | --- |'];
  rows.push(`| (a) graph search | — | ${cell(steps.map((s) => s.graph))} |`);
  b.heads.forEach((h, i) => {
    const C = h.index.clusters, n = b.setup.tokens;
    const label = `${h.clusterSize} (${C.toLocaleString('en-US')}, ${((100 * C) / n).toFixed(2)}%; ${h.buildSeconds.toFixed(1)} s)`;
    rows.push(`| (b) cluster ranking, members rescored | ${label} | ${cell(steps.map((s) => s.sizes[i].ranking))} |`);
    rows.push(`| (b) oracle bound: clusters by their share of T | ${label} | ${cell(steps.map((s) => s.sizes[i].oracle))} |`);
    rows.push(`| (b) oracle bound, centroids free (members alone) | ${label} | ${cell(steps.map((s) => s.sizes[i].oracleMembers))} |`);
    rows.push(`| share of Var(q·k) between clusters | ${label} | ${mean(steps.map((s) => s.sizes[i].betweenShare)).toFixed(3)} |`);
    rows.push(`| (c) graph walk seeded by the best clusters | ${label} | ${cell(steps.map((s) => s.sizes[i].seeded))} |`);
  });
  return rows;
}
