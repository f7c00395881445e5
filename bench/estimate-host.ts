// The host estimate of what a block method leaves out (engine/estimate.ts
// estimateRest → native estimateClusters), at the shape of the decode-full
// run on the H100 host: llama3.2-1b (32 q / 8 kv heads, d=64, f16), a 1M-token
// document clustered by 8 in segments of 8192 tokens (131072 clusters a
// head), and a nosa-like exact set per kv head: 16 sinks, a 256-token window
// and blocks of 64 rows at random up to 1% of the document. The call is made
// as estimateRest makes it ('rows' order: second order, member lists).
//
// The clusters are synthetic, not k-means: a segment's rows go to its
// clusters by a random permutation (every cluster 8 rows), keys = the
// cluster's centre + noise. A block of 64 rows then touches ~60 clusters,
// as many partly attended clusters as such a block can make: the partial
// work here is an upper bound on a real document's (whose clusters follow
// the keys, and contiguous rows more often share a cluster).
//
// Every head's arrays are its own (copies of one generated head): the memory
// read per step is a real step's. --dump FILE writes every step's out and lse
// (f32) for a comparison of two builds.
//   node dist/bench/estimate-host.js [--tokens N] [--steps S] [--json] [--dump FILE]
import { writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { estimateClusters, type ClusterHeadArgs } from '../addon/estimate.js';
import { clusterSummary } from '../addon/cluster-summary.js';
import { convert, nativeThreads } from '../addon/kernels.js';
import { encodeMoments } from '../index/wave/moment-code.js';
import { Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { numFlag } from './args.js';

const argv = process.argv;
const get = (name: string) => numFlag(name, argv);
const dumpAt = argv.indexOf('--dump') >= 0 ? argv[argv.indexOf('--dump') + 1] : undefined;
const tokens = get('--tokens') ?? 1 << 20, steps = get('--steps') ?? 20, warmup = 3;
const json = argv.includes('--json');
const kvHeads = 8, qHeads = 32, d = 64, stride = d + 8, clusterSize = 8, segment = 8192, blockSize = 64, sinks = 16, window = 256;
const budget = Math.round(tokens * 0.01);
const clusters = tokens / clusterSize;
if (!Number.isInteger(clusters) || tokens % segment !== 0) throw new Error(`--tokens must be a multiple of ${segment}`);

const f16 = (f: Float32Array) => {
  const w = new Uint16Array(f.length);
  convert(new Uint8Array(f.buffer), 'f32', new Uint8Array(w.buffer), 'f16', f.length);
  return w;
};

/** One head: keys, values, the clusters and their summaries as a ClusterIndex holds them. */
async function makeHead(rng: Rng): Promise<Omit<ClusterHeadArgs, 'exact'>> {
  const per = segment / clusterSize;
  const tokenCluster = new Int32Array(tokens);
  for (let s0 = 0, c0 = 0; s0 < tokens; s0 += segment, c0 += per) {
    const perm = Int32Array.from({ length: segment }, (_, i) => i);
    for (let i = segment - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [perm[i], perm[j]] = [perm[j], perm[i]];
    }
    for (let i = 0; i < segment; i++) tokenCluster[s0 + perm[i]] = c0 + Math.floor(i / clusterSize);
  }
  const centre = Float32Array.from({ length: clusters * d }, () => rng.normal() * 0.8);
  const kf = new Float32Array(tokens * d), vf = new Float32Array(tokens * d);
  for (let t = 0; t < tokens; t++) {
    const c = tokenCluster[t];
    for (let j = 0; j < d; j++) kf[t * d + j] = centre[c * d + j] + rng.normal() * 0.5;
    for (let j = 0; j < d; j++) vf[t * d + j] = rng.normal();
  }
  const keys = f16(kf), values = f16(vf);
  const centroids = new Float32Array(clusters * stride), valueMeans = new Float32Array(clusters * d), keyVars = new Float32Array(clusters * d), keyAxes = new Float32Array(clusters * d);
  await clusterSummary({ keys, values, dtype: 'f16', tokens, headDim: d, stride, cluster: tokenCluster, clusters, axisIterations: 2, centroids, valueMeans, keyVars, keyAxes });
  const counts = new Int32Array(clusters).fill(clusterSize);
  const offsets = new Int32Array(clusters + 1);
  for (let c = 0; c < clusters; c++) offsets[c + 1] = offsets[c] + counts[c];
  const members = new Int32Array(tokens), at = offsets.slice(0, clusters);
  tokenCluster.forEach((c, t) => (members[at[c]++] = t));
  const moments = encodeMoments(keyAxes, keyVars, clusters, d);
  return {
    centroids: f16(centroids), valueMeans: f16(valueMeans), counts, tokenCluster, values, clusters, tokens,
    keyVars: moments.keyVars, varScales: moments.varScales, keys, varianceShare: 0.5, offsets, members,
  };
}

const copyHead = (h: Omit<ClusterHeadArgs, 'exact'>): Omit<ClusterHeadArgs, 'exact'> => ({
  ...h, centroids: h.centroids.slice(), valueMeans: h.valueMeans.slice(), counts: h.counts.slice(), tokenCluster: h.tokenCluster.slice(), values: h.values.slice(),
  keyVars: h.keyVars!.slice(), varScales: h.varScales!.slice(), keys: h.keys!.slice(), offsets: h.offsets!.slice(), members: h.members!.slice(),
});

/** A nosa-like exact set: sinks, window, whole random blocks (in the chooser's order, not sorted) up to the budget. */
function exactRows(rng: Rng): Int32Array {
  const blocks = Math.ceil(tokens / blockSize), picked = new Set<number>();
  while (picked.size * blockSize < budget) {
    const b = rng.int(blocks);
    if (b * blockSize >= sinks && (b + 1) * blockSize <= tokens - window) picked.add(b);
  }
  const rows: number[] = [];
  for (let t = 0; t < sinks; t++) rows.push(t);
  for (const b of picked) for (let t = b * blockSize; t < (b + 1) * blockSize; t++) rows.push(t);
  for (let t = tokens - window; t < tokens; t++) rows.push(t);
  return Int32Array.from(rows);
}

const rng = new Rng(20261206);
const t0 = performance.now();
const base = await makeHead(rng);
const heads = [base, ...Array.from({ length: kvHeads - 1 }, () => copyHead(base))];
const buildS = (performance.now() - t0) / 1000;
const load0 = loadavg()[0];

const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(kvHeads), scanned = new Float32Array(kvHeads);
const dump: Float32Array[] = [];
const ms: number[] = [];
for (let s = 0; s < warmup + steps; s++) {
  const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
  const exact = heads.map(() => exactRows(rng));
  const t = performance.now();
  await estimateClusters({
    q, qHeads, kvHeads, headDim: d, centroidStride: stride, dtype: 'f16', scale: 1 / Math.sqrt(d),
    segments: [heads.map((h, i) => ({ ...h, exact: exact[i] }))], out, lse, estimated, scanned,
  });
  if (s >= warmup) ms.push(performance.now() - t);
  if (dumpAt) dump.push(out.slice(), lse.slice());
}
if (dumpAt) {
  const all = new Float32Array(dump.reduce((n, a) => n + a.length, 0));
  let at = 0;
  for (const a of dump) all.set(a, at), (at += a.length);
  writeFileSync(dumpAt, new Uint8Array(all.buffer));
}
const load1 = loadavg()[0];
const r = {
  tokens, kvHeads, qHeads, d, clusters, budget, steps, threads: nativeThreads, buildS: +buildS.toFixed(1),
  p50: quantile(ms, 0.5, 'nearest'), min: Math.min(...ms), max: Math.max(...ms), estimated: estimated[0], scanned: scanned[0], load: [load0, load1],
};
if (json) console.log(JSON.stringify(r));
else console.log(`estimateClusters at ${tokens} tokens, ${kvHeads} kv heads, ${clusters} clusters a head, ${r.threads} threads: p50 ${r.p50.toFixed(2)} ms (min ${r.min.toFixed(2)}, max ${r.max.toFixed(2)}) over ${steps} steps; estimated ${r.estimated}, scanned ${r.scanned} per head; load ${load0.toFixed(2)} -> ${load1.toFixed(2)}; build ${r.buildS} s`);
