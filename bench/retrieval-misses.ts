// npm run bench:retrieval-misses [-- --tokens 262144,1048576 --steps 3 [--broad] [--max-queries 8192] [--kbuild 64]]
//
// Why the retrieval-attention graph's search misses keys of the group's top
// 1% (issue #15). Per decode step, T = the exact top-k of the group's
// attention (k = 1% of tokens), for the session's search (margin 0.5 logits,
// beam 8k, the steady zone free) and for the walk capped at 3% scanned:
//
// - the real search's recall of T and scanned share;
// - a replica of its walk in JS over the graph's CSR (the same entry
//   points, strided sample and its best keys as seeds, free steady keys,
//   beam, margin and cap; ranked by the exact log of the group's mean
//   probability instead of the sample-estimated one), whose scored set the
//   native search does not expose. Its misses of T, as shares of T:
//   (c) scored but ranked out of the k returned: 0 by construction with the
//       exact ranking; the real search's ranking error shows as the gap
//       between its recall and the replica's;
//   (b) never scored, and retrieved by no build query (the key has no
//       projected edge: its list starts with its positional neighbours);
//   (a) never scored, though retrieved by a build query: not reached within
//       the budget; of (a)+(b), "1 hop" = an out-neighbour of a key the
//       walk scored but did not expand;
// - the share of T that is unretrieved, against the share of all keys;
// - the bound on better entry points: the replica seeded with 64 / 256 /
//   1024 keys of T itself (evenly spaced in T's order), at the same budget;
// - how static T is: the share of T within the top 1% / 3% / 10% of the
//   ranking by the group's q heads' means (the generator's own, rotated to
//   the step's position): what a ranking that knew the query's stable part
//   would find.
import { writeFileSync } from 'node:fs';
import { RA_GRAPH_DEFAULTS, RaGraph } from '../addon/ra-graph.js';
import { machine } from './host.js';
import { strFlag } from './args.js';
import { exactAttention, meanProbs, topKIndices, widen } from './quality.js';
import { broadKnobs, defaultKnobs, generateWorkload } from '../workload/index.js';
import { makePlan } from '../workload/plan.js';
import { readCsr, type Csr } from './ra-graph-csr.js';

interface Options {
  tokens: number[];
  steps: number;
  broad: boolean;
  maxQueries: number;
  kBuild: number;
}

function parseArgs(argv: string[]): Options {
  const get = (name: string) => strFlag(`--${name}`, argv);
  return {
    tokens: (get('tokens') ?? '262144').split(',').map(Number),
    steps: Number(get('steps') ?? 3),
    broad: argv.includes('--broad'),
    maxQueries: Number(get('max-queries') ?? RA_GRAPH_DEFAULTS.maxQueries),
    kBuild: Number(get('kbuild') ?? RA_GRAPH_DEFAULTS.kBuild),
  };
}

const SINKS = 16, WINDOW = 256, MARGIN = 0.5, CAP = 0.03, SEEDS = [64, 256, 1024];

/** A binary heap of ids ordered by score[id]: the best on top when `max`, else the worst. */
class IdHeap {
  readonly a: number[] = [];
  constructor(private readonly score: Float64Array, private readonly max: boolean) {}
  private before(x: number, y: number): boolean {
    return this.max ? this.score[x] > this.score[y] : this.score[x] < this.score[y];
  }
  get size(): number {
    return this.a.length;
  }
  top(): number {
    return this.a[0];
  }
  push(id: number): void {
    const a = this.a;
    a.push(id);
    for (let i = a.length - 1; i > 0; ) {
      const p = (i - 1) >> 1;
      if (!this.before(a[i], a[p])) break;
      [a[i], a[p]] = [a[p], a[i]];
      i = p;
    }
  }
  pop(): number {
    const a = this.a, t = a[0], last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      for (let i = 0; ; ) {
        let c = 2 * i + 1;
        if (c >= a.length) break;
        if (c + 1 < a.length && this.before(a[c + 1], a[c])) c++;
        if (!this.before(a[c], a[i])) break;
        [a[c], a[i]] = [a[i], a[c]];
        i = c;
      }
    }
    return t;
  }
}

interface Walk {
  /** The best `want` keys scored, steady keys left out. */
  ids: Int32Array;
  scored: Uint8Array;
  expanded: Uint8Array;
  /** Keys scored (sample included, free steady keys not) / tokens. */
  scanned: number;
}

/**
 * native/indexes/ra_graph_attention.cc's walk (ra_graph_beam.h BeamSearch) in
 * JS, ranked by `score` (exact): strided sample of n/512 keys (its best
 * n/512/64, at most 16, as seeds), the steady keys free, entries, extra seeds.
 */
function replicaWalk(g: Csr, score: Float64Array, want: number, ef: number, margin: number, cap: number, steady: Int32Array, extra: readonly number[] = []): Walk {
  const { n, off, nbr, entries } = g;
  const seen = new Uint8Array(n), scored = new Uint8Array(n), expanded = new Uint8Array(n), free = new Uint8Array(n);
  const m0 = Math.min(n, 4096, Math.max(64, Math.floor(n / 512)));
  const stride = Math.max(1, Math.floor(n / m0));
  const sample: number[] = [];
  for (let id = stride >> 1; id < n; id += stride) sample.push(id);
  for (const id of sample) scored[id] = 1;
  const sampleSeeds = [...sample].sort((a, b) => score[b] - score[a] || a - b).slice(0, Math.min(16, Math.floor(sample.length / 64)));
  const cand = new IdHeap(score, true), top = new IdHeap(score, false), kbest = new IdHeap(score, false);
  let walked = 0;
  const consider = (id: number) => {
    walked++;
    scored[id] = 1;
    if (kbest.size < want) kbest.push(id);
    else if (score[id] > score[kbest.top()]) (kbest.pop(), kbest.push(id));
    if (top.size < ef) top.push(id);
    else if (score[id] > score[top.top()]) (top.pop(), top.push(id));
    else return;
    cand.push(id);
  };
  for (const id of steady) if (!seen[id]) (seen[id] = 1, (free[id] = 1), cand.push(id));
  for (const list of [Array.from(entries), sampleSeeds, extra]) for (const id of list) if (!seen[id]) (seen[id] = 1, consider(id));
  const capScan = cap > 0 ? Math.max(1, Math.round(cap * n) - sample.length) : 0;
  while (cand.size > 0) {
    const c = cand.pop();
    if (top.size >= ef && score[top.top()] > score[c]) break;
    if (kbest.size >= want && score[c] < score[kbest.top()] - margin) break;
    if (capScan && walked >= capScan) break;
    expanded[c] = 1;
    for (let i = off[c]; i < off[c + 1]; i++) {
      const v = nbr[i];
      if (!seen[v]) (seen[v] = 1, consider(v));
    }
  }
  let reused = 0;
  for (const id of sample) reused += seen[id] && !free[id] ? 1 : 0;
  const all: number[] = [];
  for (let id = 0; id < n; id++) if (scored[id] && !free[id]) all.push(id);
  all.sort((a, b) => score[b] - score[a] || a - b);
  return { ids: Int32Array.from(all.slice(0, want)), scored, expanded, scanned: (sample.length + walked - reused) / n };
}

interface EffortResult {
  label: string;
  realRecall: number;
  realScanned: number;
  replicaRecall: number;
  replicaScanned: number;
  /** Shares of T the replica missed: (c) scored and ranked out, (b) unretrieved and not scored, (a) retrieved and not scored, and of (a)+(b) one hop from a scored key. */
  c: number;
  b: number;
  a: number;
  oneHop: number;
  seeded: { seeds: number; recall: number; scanned: number }[];
}

interface StepResult {
  unretrievedInT: number;
  staticShare: number[];
  efforts: EffortResult[];
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const G = 4, d = 128;
  for (const tokens of o.tokens) {
    const spec = { seed: 7, tokens, kvHeads: 1, qHeads: G, headDim: d, steps: o.steps, needles: o.steps, knobs: (o.broad ? broadKnobs : defaultKnobs)(tokens, {}) };
    const wl = generateWorkload(spec);
    const plan = makePlan({ ...spec, knobs: wl.knobs });
    const want = Math.round(tokens * 0.01);
    const t0 = performance.now();
    const graph = await RaGraph.build({ keys: wl.keys[0], tokens, headDim: d, dtype: 'f16', queries: wl.prefillQ[0], maxQueries: o.maxQueries, kBuild: o.kBuild });
    const buildSeconds = (performance.now() - t0) / 1000;
    const stats = graph.buildStats;
    const csr = readCsr(graph.save());
    const { n, off, nbr } = csr;
    // A key no build query retrieved has no projected edge: its list starts with its positional neighbours.
    const unretrieved = new Uint8Array(n);
    let unretrievedCount = 0;
    for (let u = 0; u < n; u++) {
      const a = nbr[off[u]], b = nbr[off[u] + 1];
      const positional = u === 0 ? a === 1 : u === n - 1 ? a === n - 2 : a === u - 1 && b === u + 1;
      if (positional) (unretrieved[u] = 1), unretrievedCount++;
    }
    const steady = Int32Array.from({ length: SINKS + WINDOW }, (_, i) => (i < SINKS ? i : tokens - WINDOW + (i - SINKS)));
    const K = widen(wl.keys[0], 'f16');
    const steps: StepResult[] = [];
    for (let s = 0; s < o.steps; s++) {
      const q = wl.decodeQ[s].subarray(0, G * d);
      const ex = exactAttention(q, G, K, K, { headDim: d, outputs: false });
      const mp = meanProbs(ex);
      const score = Float64Array.from(mp, Math.log);
      const T = topKIndices(mp, want);
      const inT = new Uint8Array(n);
      for (const t of T) inT[t] = 1;
      let unretrievedInT = 0;
      for (const t of T) unretrievedInT += unretrieved[t];
      // The group's q-head means at the step's position: the part of the query that no step changes.
      const qm = new Float32Array(G * d), r = new Float64Array(d);
      for (let g = 0; g < G; g++) (plan.rope.rotate(plan.qMeans[g], r, tokens + s), qm.set(r, g * d));
      const sm = meanProbs(exactAttention(qm, G, K, K, { headDim: d, outputs: false }));
      const order = topKIndices(sm, Math.round(0.1 * n)), srank = new Int32Array(n).fill(n);
      order.forEach((t, i) => (srank[t] = i));
      const staticShare = [0.01, 0.03, 0.1].map((f) => T.filter((t) => srank[t] < f * n).length / want);
      const efforts: EffortResult[] = [];
      for (const [label, margin, cap] of [[`margin ${MARGIN}`, MARGIN, 0], [`≤ ${CAP * 100}% scanned`, 3, CAP]] as const) {
        const outIds = new Int32Array(want), outScores = new Float32Array(want);
        const res = graph.searchSync({ keys: wl.keys[0], tokens, headDim: d, dtype: 'f16', q, group: G, k: want, ef: 8 * want, outIds, outScores, margin, aggregate: 'attention', maxScanned: cap ? Math.round(cap * n) : undefined, freeSeeds: steady });
        const hitOf = (ids: Int32Array) => {
          const got = new Uint8Array(n);
          for (const id of ids) got[id] = 1;
          for (const id of steady) got[id] = 1;
          return got;
        };
        const realGot = hitOf(outIds.subarray(0, res.count));
        const w = replicaWalk(csr, score, want, 8 * want, margin, cap, steady);
        const got = hitOf(w.ids);
        // Out-neighbours of keys scored but not expanded.
        const nearScored = new Uint8Array(n);
        for (let u = 0; u < n; u++) if (w.scored[u] && !w.expanded[u]) for (let i = off[u]; i < off[u + 1]; i++) nearScored[nbr[i]] = 1;
        let realHit = 0, hit = 0, c = 0, b = 0, a = 0, oneHop = 0;
        for (const t of T) {
          realHit += realGot[t];
          hit += got[t];
          if (got[t]) continue;
          if (w.scored[t]) c++;
          else {
            if (unretrieved[t]) b++;
            else a++;
            oneHop += nearScored[t];
          }
        }
        const seeded = SEEDS.map((ns) => {
          const extra = Array.from({ length: ns }, (_, i) => T[Math.floor(((i + 0.5) * want) / ns)]);
          const ws = replicaWalk(csr, score, want, 8 * want, margin, cap, steady, extra);
          const g2 = hitOf(ws.ids);
          let h2 = 0;
          for (const t of T) h2 += g2[t];
          return { seeds: ns, recall: h2 / want, scanned: ws.scanned };
        });
        efforts.push({ label, realRecall: realHit / want, realScanned: res.scanned / n, replicaRecall: hit / want, replicaScanned: w.scanned, c: c / want, b: b / want, a: a / want, oneHop: oneHop / want, seeded });
      }
      steps.push({ unretrievedInT: unretrievedInT / want, staticShare, efforts });
      process.stderr.write(`[bench:retrieval-misses] ${tokens} step ${s}: ${JSON.stringify(steps[s])}\n`);
    }
    graph.dispose();
    const f = (x: number) => x.toFixed(3);
    const pct = (x: number) => `${(100 * x).toFixed(2)}%`;
    const name = `retrieval-misses${o.broad ? '-broad' : ''}-${tokens}${o.maxQueries !== RA_GRAPH_DEFAULTS.maxQueries ? `-mq${o.maxQueries}` : ''}${o.kBuild !== RA_GRAPH_DEFAULTS.kBuild ? `-kb${o.kBuild}` : ''}-vm`;
    const md = [
      `### Why the graph's search misses the group's top 1%: ${tokens.toLocaleString('en-US')} tokens${o.broad ? ' (broad configuration)' : ''}`,
      '',
      `${machine()}; \`npm run bench:retrieval-misses -- --tokens ${tokens} --steps ${o.steps}${o.broad ? ' --broad' : ''} --max-queries ${o.maxQueries} --kbuild ${o.kBuild}\` (bench/retrieval-misses.ts); seed 7, 1 kv head, GQA group 4, d=128, f16; graph at its defaults but build queries ≤ ${o.maxQueries}, kBuild ${o.kBuild} (build ${buildSeconds.toFixed(1)} s; ${stats?.unretrieved ?? '?'} keys in no build query's list, ${unretrievedCount} (${pct(unretrievedCount / n)}) with no projected edge by the CSR's layout). T = the exact top ${want.toLocaleString('en-US')} (1%) of the group's attention; the steady zone (${SINKS} sinks + ${WINDOW} window) free as the session searches, beam 8k. Misses are the replica walk's (exact ranking), as shares of T: (c) scored, ranked out; (b) not scored, retrieved by no build query; (a) not scored, retrieved; 1 hop = of (a)+(b), an out-neighbour of a key scored but not expanded. Seeded = the replica given 64 / 256 / 1024 keys of T as extra seeds (a bound on better entry points). Static = the share of T in the top 1% / 3% / 10% of the ranking by the group's q-head means at the step's position (the generator's).`,
      '',
      '| step | search | real: recall @ scanned | replica: recall @ scanned | (c) | (b) | (a) | 1 hop | seeded 64 / 256 / 1024: recall | T unretrieved | static 1% / 3% / 10% |',
      '| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |',
      ...steps.flatMap((st, s) =>
        st.efforts.map(
          (e) =>
            `| ${s} | ${e.label} | ${f(e.realRecall)} @ ${pct(e.realScanned)} | ${f(e.replicaRecall)} @ ${pct(e.replicaScanned)} | ${f(e.c)} | ${f(e.b)} | ${f(e.a)} | ${f(e.oneHop)} | ${e.seeded.map((x) => f(x.recall)).join(' / ')} | ${f(st.unretrievedInT)} (all keys ${f(unretrievedCount / n)}) | ${st.staticShare.map(f).join(' / ')} |`,
        ),
      ),
      '',
    ].join('\n');
    writeFileSync(`bench/results/${name}.md`, md);
    writeFileSync(`bench/results/${name}.json`, JSON.stringify({ machine: machine(), date: new Date().toISOString(), options: o, tokens, want, buildSeconds, buildStats: stats, unretrievedByLayout: unretrievedCount, steps }, null, 2));
    process.stdout.write(md);
  }
}

await main();
