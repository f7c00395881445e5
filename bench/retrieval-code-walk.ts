// npm run bench:retrieval-code-walk [-- --tokens 262144,1048576 --steps 3 [--broad] [--bits 4]]
//
// A simulation (JS, over the retrieval-attention graph's CSR) of a walk that
// reads 4-bit (--bits) codes of the keys and scores exactly only the keys whose code
// looks good: the path issue #15's "≤ 3% scanned" would need, since a walk
// that scores every neighbour exactly finds ~1 key of the top 1% per 11
// scored (bench/results/retrieval-misses-vm.md). Not the native search.
//
// Codes: each channel quantized to 2^bits levels uniformly over its mean ± 3σ
// (64 bytes a key at d = 128 and 4 bits: 1/4 of f16). Approximate score: the walk's score (below)
// of the dequantized key. The cutoff τ is the
// q-quantile of the approximate scores of the strided sample (n/512 keys,
// scored exactly and counted). The walk starts as the session's does (entry
// points, steady zone free); each neighbour met is read as a code; if its
// approximate score ≥ τ − δ it is scored exactly and queued by that score,
// else it is queued by its approximate score (so the walk can still cross
// keys outside the top); the result is the best k of the exactly scored.
// It stops when `exact` keys are scored or `codes` codes read. Reported:
// recall of T (the exact top 1%), the shares of keys scored exactly and of
// codes read, and the bytes read in f16-key equivalents (exact + codes × bits / 16).
// Beside each setting (4 bits only), the native code walk (RaSearchOptions::codeWalk, the same
// q, δ and caps, on the same graph and steps, the steady zone as free start
// keys) and its CPU time a search (searchSync on this thread; process
// CPU time, so a busy machine's other work is not in it), as for the native
// beam walk's two rows.
// The walk ranks by each head's partition estimated from the steady keys
// and the sample, as the native walk does; the best k of the keys scored
// exactly are taken by the exact partitions (the native search refines its
// estimate after the walk to about that). One heap holds both kinds of
// score.
import { writeFileSync } from 'node:fs';
import { RaGraph } from '../addon/ra-graph.js';
import { machine } from './host.js';
import { strFlag } from './args.js';
import { compareWithOracle, exactAttention, meanProbs, topKIndices, widen } from './quality.js';
import { broadKnobs, defaultKnobs, generateWorkload } from '../workload/index.js';
import { readCsr, type Csr } from './ra-graph-csr.js';

const SINKS = 16, WINDOW = 256;
// The native search's recall of T on the same graphs (bench/results/retrieval-misses-*-vm.md), quoted in the table's text.
const DEFAULT_NATIVE = "0.25–0.27 (256K) / 0.24–0.27 (1M) at 3% scanned, 0.60–0.62 at 11% (256K) and 0.45–0.50 at 7% (1M) at the session's margin";
const BROAD_NATIVE = "0.52–0.54 (256K) / 0.34–0.36 (1M) at 3% scanned, 0.90–0.91 at 10.5% (256K) and 0.64–0.66 at 8.5% (1M) at the session's margin";
/** [quantile of the sample (× 1%), δ logits, exact cap, code cap] */
const SETTINGS: [number, number, number, number][] = [
  [1, 0.5, 0.03, 0.1],
  [1, 0.5, 0.03, 0.2],
  [1, 0.5, 0.03, 0.4],
  [3, 0, 0.03, 0.1],
  [3, 0, 0.03, 0.2],
  [3, 0, 0.03, 0.4],
  [3, 0, 0.02, 0.4],
];

/** Max-heap of (score, id). */
class Heap {
  private readonly s: number[] = [];
  private readonly id: number[] = [];
  get size(): number {
    return this.s.length;
  }
  push(score: number, id: number): void {
    const { s, id: ids } = this;
    s.push(score);
    ids.push(id);
    for (let i = s.length - 1; i > 0; ) {
      const p = (i - 1) >> 1;
      if (s[p] >= s[i]) break;
      [s[p], s[i]] = [s[i], s[p]];
      [ids[p], ids[i]] = [ids[i], ids[p]];
      i = p;
    }
  }
  pop(): [number, number] {
    const { s, id: ids } = this;
    const top: [number, number] = [s[0], ids[0]];
    const ls = s.pop()!, li = ids.pop()!;
    if (s.length > 0) {
      s[0] = ls;
      ids[0] = li;
      for (let i = 0; ; ) {
        let c = 2 * i + 1;
        if (c >= s.length) break;
        if (c + 1 < s.length && s[c + 1] > s[c]) c++;
        if (s[c] <= s[i]) break;
        [s[c], s[i]] = [s[i], s[c]];
        [ids[c], ids[i]] = [ids[i], ids[c]];
        i = c;
      }
    }
    return top;
  }
}

const nativeLabel = (q: number, delta: number, exactCap: number, codeCap: number) => `native code walk ${q} ${delta} ${exactCap} ${codeCap}`;

function codeWalk(g: Csr, exact: Float64Array, approx: Float64Array, tau: number, delta: number, exactCap: number, codeCap: number, steady: Int32Array, inSample: Uint8Array, sampleCount: number): { scored: Uint8Array; exact: number; codes: number } {
  const { n, off, nbr, entries } = g;
  const seen = new Uint8Array(n), scored = new Uint8Array(n), cand = new Heap();
  let exactN = sampleCount, codes = 0;
  for (const id of steady) (seen[id] = 1), cand.push(exact[id], id);
  for (const e of entries) if (!seen[e]) (seen[e] = 1), (scored[e] = 1), (exactN += inSample[e] ? 0 : 1), cand.push(exact[e], e);
  while (cand.size > 0 && exactN < exactCap * n && codes < codeCap * n) {
    const c = cand.pop()[1];
    for (let i = off[c]; i < off[c + 1]; i++) {
      const v = nbr[i];
      if (seen[v]) continue;
      seen[v] = 1;
      // A sample key was scored exactly before the walk.
      if (inSample[v]) {
        cand.push(exact[v], v);
        continue;
      }
      codes++;
      if (approx[v] >= tau - delta) (scored[v] = 1), exactN++, cand.push(exact[v], v);
      else cand.push(approx[v], v);
    }
  }
  return { scored, exact: exactN / n, codes: codes / n };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const get = (name: string) => strFlag(`--${name}`, argv);
  const broad = argv.includes('--broad'), steps = Number(get('steps') ?? 3), G = 4, d = 128, BITS = Number(get('bits') ?? 4);
  for (const tokens of (get('tokens') ?? '262144').split(',').map(Number)) {
    const wl = generateWorkload({ seed: 7, tokens, kvHeads: 1, qHeads: G, headDim: d, steps, needles: steps, knobs: (broad ? broadKnobs : defaultKnobs)(tokens, {}) });
    const graph = await RaGraph.build({ keys: wl.keys[0], tokens, headDim: d, dtype: 'f16', queries: wl.prefillQ[0] });
    const csr = readCsr(graph.save());
    const n = tokens, K = widen(wl.keys[0], 'f16'), V = widen(wl.values[0], 'f16');
    const mu = new Float64Array(d), sd = new Float64Array(d);
    for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) mu[j] += K[t * d + j] / n;
    for (let t = 0; t < n; t++) for (let j = 0; j < d; j++) sd[j] += (K[t * d + j] - mu[j]) ** 2 / n;
    const L = 2 ** BITS, Kq = new Float32Array(n * d);
    for (let j = 0; j < d; j++) sd[j] = Math.sqrt(sd[j]);
    for (let t = 0; t < n; t++)
      for (let j = 0; j < d; j++) {
        const step = (6 * sd[j]) / L, lo = mu[j] - 3 * sd[j];
        const c = Math.max(0, Math.min(L - 1, Math.floor((K[t * d + j] - lo) / step)));
        Kq[t * d + j] = lo + (c + 0.5) * step;
      }
    const want = Math.round(n * 0.01);
    const steady = Int32Array.from({ length: SINKS + WINDOW }, (_, i) => (i < SINKS ? i : n - WINDOW + (i - SINKS)));
    const stride = Math.floor(n / Math.floor(n / 512));
    const sample: number[] = [];
    for (let id = stride >> 1; id < n; id += stride) sample.push(id);
    const inSample = new Uint8Array(n);
    for (const id of sample) inSample[id] = 1;
    const rows: { step: number; q: number; delta: number; exactCap: number; codeCap: number; recall: number; exact: number; codes: number; bytes: number; error: number; oracleError: number }[] = [];
    const isSteady = new Uint8Array(n);
    for (const id of steady) isSteady[id] = 1;
    const corr: number[] = [];
    const native: { label: string; recall: number; scanned: number; codes?: number; cpuMs?: number; error: number; oracleError: number }[] = [];
    for (let s = 0; s < steps; s++) {
      const q = wl.decodeQ[s].subarray(0, G * d);
      const ex = exactAttention(q, G, K, V, { headDim: d });
      const mp = meanProbs(ex);
      const exq = exactAttention(q, G, Kq, Kq, { headDim: d, outputs: false });
      // The walk ranks as the native one does: each head's partition estimated before the walk from the steady
      // keys (exact) and the strided sample standing for the rest.
      const c0 = Array.from({ length: G }, (_, h) => {
        const sc = ex.scores[h];
        let m = -Infinity;
        for (const id of [...steady, ...sample]) m = Math.max(m, sc[id] * ex.scale);
        let z = 0;
        for (const id of steady) z += Math.exp(sc[id] * ex.scale - m);
        let zs = 0;
        for (const id of sample) zs += Math.exp(sc[id] * ex.scale - m);
        return m + Math.log(z + (zs * (n - steady.length)) / sample.length);
      });
      const walkScore = (e: typeof ex) => {
        const out = new Float64Array(n);
        for (let t = 0; t < n; t++) {
          let best = -Infinity;
          for (let h = 0; h < G; h++) best = Math.max(best, e.scores[h][t] * e.scale - c0[h]);
          let z = 0;
          for (let h = 0; h < G; h++) z += Math.exp(e.scores[h][t] * e.scale - c0[h] - best);
          out[t] = best + Math.log(z);
        }
        return out;
      };
      const exact = walkScore(ex), approx = walkScore(exq);
      let sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
      for (let t = 0; t < n; t++) (sx += exact[t]), (sy += approx[t]), (sxx += exact[t] ** 2), (syy += approx[t] ** 2), (sxy += exact[t] * approx[t]);
      corr.push((sxy / n - (sx / n) * (sy / n)) / Math.sqrt((sxx / n - (sx / n) ** 2) * (syy / n - (sy / n) ** 2)));
      const T = topKIndices(mp, want);
      const sampleApprox = sample.map((id) => approx[id]).sort((a, b) => b - a);
      for (const [qf, delta, exactCap, codeCap] of SETTINGS) {
        const tau = sampleApprox[Math.floor(0.01 * qf * sample.length)];
        const w = codeWalk(csr, exact, approx, tau, delta, exactCap, codeCap, steady, inSample, sample.length);
        for (const id of sample) w.scored[id] = 1;
        const ids: number[] = [];
        for (let t = 0; t < n; t++) if (w.scored[t] && !isSteady[t]) ids.push(t);
        ids.sort((a, b) => mp[b] - mp[a] || a - b);
        // What a session attends: the steady zone and the best `want` of the rest (bench/retrieval.ts's selection).
        const S = Int32Array.from([...steady, ...ids.slice(0, want)]);
        const got = new Set(S);
        const recall = T.filter((t) => got.has(t)).length / want;
        const cmp = compareWithOracle(ex, S, want);
        rows.push({ step: s, q: qf, delta, exactCap, codeCap, recall, exact: w.exact, codes: w.codes, bytes: w.exact + (w.codes * BITS) / 16, error: cmp.method.outputError, oracleError: cmp.oracle.outputError });
      }
      // The native code walk at each setting (4-bit codes: what it reads), its cutoff fixed (codeAdapt 0) as the
      // simulation's is.
      if (BITS === 4)
        for (const [qf, delta, exactCap, codeCap] of SETTINGS) {
          const outIds = new Int32Array(want), outScores = new Float32Array(want);
          const a = { keys: wl.keys[0], tokens, headDim: d, dtype: 'f16' as const, q, group: G, k: want, ef: want, outIds, outScores, aggregate: 'attention' as const, freeSeeds: steady, codeWalk: true, codeQuantile: qf, codeDelta: delta, codeAdapt: 0, maxScanned: Math.round(exactCap * n), maxCodes: Math.round(codeCap * n) };
          if (s === 0 && native.length === 0) graph.searchSync(a); // the graph makes its codes on its first code walk: not timed
          const u = process.cpuUsage();
          const r = graph.searchSync(a);
          const du = process.cpuUsage(u);
          const S = Int32Array.from([...steady, ...outIds.subarray(0, r.count)]);
          const got = new Set(S);
          const cmp = compareWithOracle(ex, S, want);
          native.push({ label: nativeLabel(qf, delta, exactCap, codeCap), recall: T.filter((t) => got.has(t)).length / want, scanned: r.scanned / n, codes: (r.codesRead ?? 0) / n, cpuMs: (du.user + du.system) / 1000, error: cmp.method.outputError, oracleError: cmp.oracle.outputError });
        }
      // The native search on the same graph and step, as the session searches (margin 0.5) and capped at 3%.
      for (const [label, margin, cap] of [['native, margin 0.5', 0.5, 0], ['native, ≤ 3% scanned', 3, 0.03]] as const) {
        const outIds = new Int32Array(want), outScores = new Float32Array(want);
        const u = process.cpuUsage();
        const r = graph.searchSync({ keys: wl.keys[0], tokens, headDim: d, dtype: 'f16', q, group: G, k: want, ef: 8 * want, outIds, outScores, margin, aggregate: 'attention', maxScanned: cap ? Math.round(cap * n) : undefined, freeSeeds: steady });
        const du = process.cpuUsage(u);
        const S = Int32Array.from([...steady, ...outIds.subarray(0, r.count)]);
        const got = new Set(S);
        const cmp = compareWithOracle(ex, S, want);
        native.push({ label, recall: T.filter((t) => got.has(t)).length / want, scanned: r.scanned / n, cpuMs: (du.user + du.system) / 1000, error: cmp.method.outputError, oracleError: cmp.oracle.outputError });
      }
      process.stderr.write(`[bench:retrieval-code-walk] ${tokens} step ${s} done\n`);
    }
    const f = (x: number) => x.toFixed(3);
    const pct = (x: number) => `${(100 * x).toFixed(2)}%`;
    const range = (xs: number[], fmt: (x: number) => string) => `${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}`;
    const name = `retrieval-code-walk${broad ? '-broad' : ''}-${tokens}${BITS !== 4 ? `-${BITS}bit` : ''}-vm`;
    const md = [
      `### A walk over ${BITS}-bit key codes with exact scores for the keys that pass (simulation): ${tokens.toLocaleString('en-US')} tokens${broad ? ' (broad configuration)' : ''}`,
      '',
      `${machine()}; \`npm run bench:retrieval-code-walk -- --tokens ${tokens} --steps ${steps}${broad ? ' --broad' : ''}${BITS !== 4 ? ` --bits ${BITS}` : ''}\` (bench/retrieval-code-walk.ts: what it simulates and simplifies); seed 7, 1 kv head, GQA group 4, d=128, f16; the graph at its defaults; T = the exact top ${want.toLocaleString('en-US')} (1%) of the group's attention; ${steps} steps. The walk's score of a key's ${BITS}-bit code correlates ${range(corr, f)} with that of the key (over all keys). τ = the sample's (q × 1%)-quantile of the approximate score; a key met is scored exactly if its code scores ≥ τ − δ. Bytes = exact + codes × ${BITS}/16, in f16 keys. For comparison, the native search on the same graph: ${broad ? BROAD_NATIVE : DEFAULT_NATIVE} (bench/results/retrieval-misses-vm.md).`,
      '',
      `| q | δ | exact cap | code cap | recall of T | scored exactly | codes read | bytes (f16 keys) | output error (mean) | oracle error |${BITS === 4 ? ' CPU ms a search (native) |' : ''}`,
      `| ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: |${BITS === 4 ? ' ---: |' : ''}`,
      ...SETTINGS.map(([qf, delta, exactCap, codeCap]) => {
        const rs = rows.filter((r) => r.q === qf && r.delta === delta && r.exactCap === exactCap && r.codeCap === codeCap);
        const sim = `| ${qf} | ${delta} | ${pct(exactCap)} | ${pct(codeCap)} | ${range(rs.map((r) => r.recall), f)} | ${range(rs.map((r) => r.exact), pct)} | ${range(rs.map((r) => r.codes), pct)} | ${range(rs.map((r) => r.bytes), pct)} | ${pct(rs.reduce((a, r) => a + r.error, 0) / rs.length)} | ${pct(rs.reduce((a, r) => a + r.oracleError, 0) / rs.length)} |${BITS === 4 ? ' — |' : ''}`;
        const nr = native.filter((r) => r.label === nativeLabel(qf, delta, exactCap, codeCap));
        if (nr.length === 0) return sim;
        const bytes = nr.map((r) => r.scanned + (r.codes! * BITS) / 16);
        return [sim, `| native code walk | | | | ${range(nr.map((r) => r.recall), f)} | ${range(nr.map((r) => r.scanned), pct)} | ${range(nr.map((r) => r.codes!), pct)} | ${range(bytes, pct)} | ${pct(nr.reduce((a, r) => a + r.error, 0) / nr.length)} | ${pct(nr.reduce((a, r) => a + r.oracleError, 0) / nr.length)} | ${range(nr.map((r) => r.cpuMs!), (x) => x.toFixed(1))} |`].join('\n');
      }),
      ...['native, margin 0.5', 'native, ≤ 3% scanned'].map((label) => {
        const rs = native.filter((r) => r.label === label);
        return `| ${label} | | | | ${range(rs.map((r) => r.recall), f)} | ${range(rs.map((r) => r.scanned), pct)} | — | ${range(rs.map((r) => r.scanned), pct)} | ${pct(rs.reduce((a, r) => a + r.error, 0) / rs.length)} | ${pct(rs.reduce((a, r) => a + r.oracleError, 0) / rs.length)} |${BITS === 4 ? ` ${range(rs.map((r) => r.cpuMs!), (x) => x.toFixed(1))} |` : ''}`;
      }),
      '',
    ].join('\n');
    writeFileSync(`bench/results/${name}.md`, md);
    writeFileSync(`bench/results/${name}.json`, JSON.stringify({ machine: machine(), date: new Date().toISOString(), tokens, broad, bits: BITS, steps, corr, rows, native }, null, 2));
    graph.dispose();
    process.stdout.write(md);
  }
}

await main();
