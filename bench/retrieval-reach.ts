// npm run bench:retrieval-reach [-- --tokens 65536,262144 --steps 4 --probes 100 [--broad]]
//
// Where the retrieval-attention graph loses the group's top-1% (issue #15):
// whether a search could find it at a small scanned share on this graph, or
// on any graph whose edges join a key to the keys most like it. Per decode
// step, with T = the exact top-k of the group's attention (k = 1% of tokens):
//
// - neighbour precision: of the out-edges of the keys in T, the share that
//   lead into T, by position in the neighbour list (projected edges first,
//   then the positional ones, then the key-key ones), and the same for the
//   exact 24 nearest keys by centred cosine of `probes` keys of T (the best
//   key-key neighbours a graph can have; `bench/results/retrieval-reach-vm.md`
//   tried other metrics). A walk finds new keys of T only among the
//   neighbours it scores, so at precision p it scores at least ~1/p keys
//   for each key of T it finds beyond its starting points;
// - T keys with no in-edge from another key of T (reachable only through
//   keys outside T);
// - the oracle walk: from the entry points, expand exactly the reachable
//   keys among the top B by the group's attention (every neighbour of an
//   expanded key is scored): the recall of T and the scanned share a search
//   that knew the answer would reach on this graph, for B = 1k .. 5k.
//
// The graph's CSR is read from its saved blob (native/indexes/ra_graph_codec.cc's layout).
//
// With `--clusters 16,64` it also measures the wave index's clusters of those
// sizes as the search's path or its seeds (bench/ra-cluster-seeds.ts), into
// retrieval-reach-clusters-*.md; `--no-reach` leaves the measurements above out.
import { writeFileSync } from 'node:fs';
import { RaGraph } from '../addon/ra-graph.js';
import { exactAttention, meanProbs, topKIndices, widen } from './quality.js';
import { machine } from './host.js';
import { strFlag } from './args.js';
import { broadKnobs, defaultKnobs, generateWorkload } from '../workload/index.js';
import { oracleWalk, readCsr, type Csr } from './ra-graph-csr.js';
import { buildForClusters, clusterTable, measureClusterStep, SINKS, WINDOW, type ClusterStep } from './ra-cluster-seeds.js';

interface Options {
  tokens: number[];
  steps: number;
  probes: number;
  broad: boolean;
  clusters: number[];
  reach: boolean;
}

function parseArgs(argv: string[]): Options {
  const get = (name: string) => strFlag(`--${name}`, argv);
  return {
    tokens: (get('tokens') ?? '65536').split(',').map(Number),
    steps: Number(get('steps') ?? 4),
    probes: Number(get('probes') ?? 100),
    broad: argv.includes('--broad'),
    clusters: (get('clusters') ?? '').split(',').filter(Boolean).map(Number),
    reach: !argv.includes('--no-reach'),
  };
}

const SLOTS = 26; // 16 projected + 2 positional + 8 key-key at the defaults
const NN = 24;
const REACH = [1, 1.5, 2, 3, 5];

interface StepResult {
  precision: number;
  precisionBySlot: number[];
  exactKnnPrecision: number;
  noInEdge: number;
  reach: { b: number; recall: number; scanned: number }[];
}

function measureStep(g: Csr, centred: Float32Array, d: number, mp: Float64Array, k: number, probes: number): StepResult {
  const { n, off, nbr } = g;
  const order = topKIndices(mp, Math.min(n, REACH[REACH.length - 1] * k));
  const rank = new Int32Array(n).fill(2 ** 30);
  order.forEach((t, i) => (rank[t] = i));
  const hit = new Float64Array(SLOTS), tot = new Float64Array(SLOTS);
  let inT = 0, all = 0;
  const inDegree = new Int32Array(n);
  for (let r = 0; r < k; r++) {
    const u = order[r];
    for (let i = off[u], slot = 0; i < off[u + 1]; i++, slot++) {
      const v = nbr[i], y = rank[v] < k ? 1 : 0;
      inT += y;
      all++;
      inDegree[v]++;
      if (slot < SLOTS) (hit[slot] += y), tot[slot]++;
    }
  }
  let noIn = 0;
  for (let r = 0; r < k; r++) noIn += inDegree[order[r]] === 0 ? 1 : 0;
  // The exact nearest keys by centred cosine of evenly spaced keys of T.
  const cos = new Float64Array(n);
  let knnHit = 0, knnAll = 0;
  for (let p = 0; p < probes; p++) {
    const u = order[Math.floor(((p + 0.5) * k) / probes)];
    for (let v = 0; v < n; v++) {
      let s = 0;
      for (let j = 0; j < d; j++) s += centred[u * d + j] * centred[v * d + j];
      cos[v] = s;
    }
    cos[u] = -Infinity;
    for (const v of topKIndices(cos, NN)) (knnHit += rank[v] < k ? 1 : 0), knnAll++;
  }
  const reach = REACH.map((b) => ({ b, ...oracleWalk(g, rank, k, b * k) }));
  return {
    precision: inT / all,
    precisionBySlot: Array.from(hit, (h, i) => h / Math.max(1, tot[i])),
    exactKnnPrecision: knnHit / knnAll,
    noInEdge: noIn / k,
    reach,
  };
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const G = 4, d = 128;
  for (const tokens of o.tokens) {
    const wl = generateWorkload({ seed: 7, tokens, kvHeads: 1, qHeads: G, headDim: d, steps: o.steps, needles: o.steps, knobs: (o.broad ? broadKnobs : defaultKnobs)(tokens, {}) });
    const k = Math.round(tokens * 0.01);
    const t0 = performance.now();
    const graph = await RaGraph.build({ keys: wl.keys[0], tokens, headDim: d, dtype: 'f16', queries: wl.prefillQ[0] });
    const buildSeconds = (performance.now() - t0) / 1000;
    const csr = readCsr(graph.save());
    const edgesPerKey = graph.edges / tokens;
    if (o.clusters.length > 0) await clusterSection(o, tokens, wl, graph, buildSeconds);
    graph.dispose();
    if (!o.reach) continue;
    const K = widen(wl.keys[0], 'f16');
    const mu = new Float64Array(d);
    for (let t = 0; t < tokens; t++) for (let j = 0; j < d; j++) mu[j] += K[t * d + j] / tokens;
    const centred = new Float32Array(tokens * d);
    for (let t = 0; t < tokens; t++) {
      let s = 0;
      for (let j = 0; j < d; j++) s += (centred[t * d + j] = K[t * d + j] - mu[j]) ** 2;
      const r = s > 0 ? 1 / Math.sqrt(s) : 0;
      for (let j = 0; j < d; j++) centred[t * d + j] *= r;
    }
    const steps: StepResult[] = [];
    for (let s = 0; s < o.steps; s++) {
      const ex = exactAttention(wl.decodeQ[s].subarray(0, G * d), G, wl.keys[0], wl.values[0], { headDim: d, outputs: false });
      steps.push(measureStep(csr, centred, d, meanProbs(ex), k, o.probes));
      process.stderr.write(`[bench:retrieval-reach] ${tokens} step ${s}: ${JSON.stringify(steps[s])}\n`);
    }
    const f = (x: number, p = 3) => x.toFixed(p);
    const range = (xs: number[], fmt: (x: number) => string) => `${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}`;
    const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
    const name = `retrieval-reach${o.broad ? '-broad' : ''}-${tokens}-vm`;
    const md = [
      `### Where the graph loses the group's top 1%: ${tokens.toLocaleString('en-US')} tokens${o.broad ? ' (broad configuration)' : ''}`,
      '',
      `${machine()}; \`npm run bench:retrieval-reach -- --tokens ${tokens} --steps ${o.steps} --probes ${o.probes}${o.broad ? ' --broad' : ''}\` (bench/retrieval-reach.ts); seed 7, 1 kv head, GQA group 4, d=128, f16; graph at its defaults (build ${f(buildSeconds, 1)} s, ${f(edgesPerKey, 1)} edges per key, ${csr.entries.length} entry points); T = the exact top ${k.toLocaleString('en-US')} (1%) of the group's attention, per step (${o.steps} steps).`,
      '',
      '| step | P(neighbour in T \\| key in T): graph | exact 24-NN by centred cosine | T keys with no in-edge from T | oracle walk: recall @ scanned, expanding the top 1k / 1.5k / 2k / 3k / 5k |',
      '| ---: | ---: | ---: | ---: | --- |',
      ...steps.map((r, s) => `| ${s} | ${f(r.precision)} | ${f(r.exactKnnPrecision)} | ${f(r.noInEdge)} | ${r.reach.map((x) => `${f(x.recall)} @ ${pct(x.scanned)}`).join(' / ')} |`),
      '',
      `Graph precision by position in the neighbour list (mean over steps; 0–15 projected, 16–17 positional, 18–25 key-key at the defaults, shorter lists shift left): ${Array.from({ length: SLOTS }, (_, i) => f(steps.reduce((a, r) => a + r.precisionBySlot[i], 0) / steps.length, 2)).join(' ')}.`,
      `Ranges over steps: graph precision ${range(steps.map((r) => r.precision), f)}, exact 24-NN ${range(steps.map((r) => r.exactKnnPrecision), f)}; oracle walk at 2k ${range(steps.map((r) => r.reach[2].recall), f)} recall for ${range(steps.map((r) => r.reach[2].scanned), pct)} scanned, at 3k ${range(steps.map((r) => r.reach[3].recall), f)} for ${range(steps.map((r) => r.reach[3].scanned), pct)}.`,
      '',
    ].join('\n');
    writeFileSync(`bench/results/${name}.md`, md);
    writeFileSync(`bench/results/${name}.json`, JSON.stringify({ machine: machine(), date: new Date().toISOString(), options: o, tokens, k, buildSeconds, edgesPerKey, entryPoints: csr.entries.length, steps }, null, 2));
    process.stdout.write(md);
  }
}

type Workload = ReturnType<typeof generateWorkload>;

async function clusterSection(o: Options, tokens: number, wl: Workload, graph: RaGraph, graphSeconds: number): Promise<void> {
  const G = 4, d = 128, k = Math.round(tokens * 0.01);
  const built = await buildForClusters({ keys: wl.keys[0], values: wl.values[0], tokens, headDim: d, graph, sizes: o.clusters });
  const steps: ClusterStep[] = [];
  for (let s = 0; s < o.steps; s++) {
    const q = wl.decodeQ[s].subarray(0, G * d);
    const mp = meanProbs(exactAttention(q, G, wl.keys[0], wl.values[0], { headDim: d, outputs: false }));
    steps.push(await measureClusterStep(built, q, G, mp, topKIndices(mp, k)));
    process.stderr.write(`[bench:retrieval-reach] clusters ${tokens} step ${s}: ${JSON.stringify(steps[s])}\n`);
  }
  const name = `retrieval-reach-clusters${o.broad ? '-broad' : ''}-${tokens}-vm`;
  const md = [
    `### Cluster ranking as the search or its seeds: ${tokens.toLocaleString('en-US')} tokens${o.broad ? ' (broad configuration)' : ''}`,
    '',
    `${machine()}; \`npm run bench:retrieval-reach -- --tokens ${tokens} --steps ${o.steps} --clusters ${o.clusters.join(',')}${o.reach ? '' : ' --no-reach'}${o.broad ? ' --broad' : ''}\`` +
      ` (bench/retrieval-reach.ts, bench/ra-cluster-seeds.ts); seed 7, 1 kv head, GQA group 4, d=128, f16; graph at its defaults (build ${graphSeconds.toFixed(1)} s);` +
      ` T = the exact top ${k.toLocaleString('en-US')} (1%) of the group's mean probability per step (${o.steps} steps); sinks ${SINKS} + window ${WINDOW} free and counted in the selection.` +
      ' Scanned = keys scored (graph: its sample included) + centroids scored (one each) + cluster members scored, over the tokens. Ranking alone rescored by the exact group probability (an upper bound on a path with estimated partitions).',
    '',
    ...clusterTable(built, steps),
    '',
  ].join('\n');
  writeFileSync(`bench/results/${name}.md`, md);
  writeFileSync(`bench/results/${name}.json`, JSON.stringify({ machine: machine(), date: new Date().toISOString(), options: o, tokens, k, graphSeconds, clusterBuildSeconds: built.heads.map((h) => [h.clusterSize, h.buildSeconds]), steps }, null, 2));
  process.stdout.write(md);
}

await main();
