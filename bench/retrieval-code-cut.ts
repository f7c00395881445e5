// npm run bench:retrieval-code-cut [-- --tokens 65536,262144 --heads 2 --steps 6 [--broad] [--cuts default,1:0.5,1:1:2] [--seed 7]]
//
// The code walk's cutoff swept as a session searches (issue #15): a key met
// is scored exactly if its code's walk score is >= τ − δ + κ·(the share of
// the exact cap used − the share of the codes' cap read), τ the strided
// sample's (q × 1%)-quantile of it (native/indexes/ra_graph_code_walk.h). A
// looser cut scores more keys exactly per code read, so at 64K-256K the
// exact cap (3%) stops the walk before it has read enough codes; a stricter
// one reads more codes for each key scored. Everything else is the
// session's (index/retrieval-attention.ts walkOptions: codes ≤ codeShare,
// exact ≤ 3% or 3k), as bench/retrieval.ts runs it: the same workload
// (seed 7), the graph at its defaults (positional 1), the steady zone free,
// each step seeded by the previous step's ids (step 0 cold), k = the budget
// (1%). Reported per (q, δ): the group's top-k recall (bench/retrieval.ts's
// "top-k recall (group)"), keys scored exactly and codes read as shares of
// the tokens (means), the output error (mean, estimate off), and the CPU
// time a search (process CPU, median; the graph's codes are
// made on a first, untimed walk).
import { writeFileSync } from 'node:fs';
import { RaGraph } from '../addon/ra-graph.js';
import { walkOptions, DEFAULT_CODE_ADAPT, DEFAULT_CODE_DELTA, DEFAULT_CODE_QUANTILE, DEFAULT_CODE_SHARE } from '../index/retrieval-attention.js';
import { machine } from './host.js';
import { strFlag } from './args.js';
import { compareWithOracle, exactAttention, meanProbs, topKIndices } from './quality.js';
import { broadKnobs, defaultKnobs, generateWorkload } from '../workload/index.js';
import { mean, median } from './stats.js';

const SINKS = 16, WINDOW = 256, G = 4, d = 128;

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const get = (name: string) => strFlag(`--${name}`, argv);
  const seed = Number(get('seed') ?? 7), broad = argv.includes('--broad'), heads = Number(get('heads') ?? 2), steps = Number(get('steps') ?? 6);
  const codeShare = Number(get('code-share') ?? DEFAULT_CODE_SHARE);
  // q:δ[:κ] (κ absent: 0, the fixed cutoff); 'default' (undefined): the session's own cutoff, as walkOptions passes it.
  const cuts: ([number, number, number] | undefined)[] = (get('cuts') ?? 'default,1:0.5,1:1,1:0.25,1.5:0.25,2:0,1:0.75:2,1:1.25:2,1:1:4').split(',').map((c) => (c === 'default' ? undefined : (([q, delta, adapt]) => [q, delta, adapt ?? 0] as [number, number, number])(c.split(':').map(Number))));
  const tag = get('tag') ?? '';
  for (const tokens of (get('tokens') ?? '65536').split(',').map(Number)) {
    const wl = generateWorkload({ seed, tokens, kvHeads: heads, qHeads: heads * G, headDim: d, steps, needles: heads * steps, knobs: (broad ? broadKnobs : defaultKnobs)(tokens, {}) });
    const want = Math.round(tokens * 0.01);
    const steady = Int32Array.from({ length: SINKS + WINDOW }, (_, i) => (i < SINKS ? i : tokens - WINDOW + (i - SINKS)));
    const isSteady = (t: number) => t < SINKS || t >= tokens - WINDOW;
    const graphs: RaGraph[] = [], exact = [] as ReturnType<typeof exactAttention>[][], T: Set<number>[][] = [];
    for (let h = 0; h < heads; h++) {
      graphs.push(await RaGraph.build({ keys: wl.keys[h], tokens, headDim: d, dtype: wl.dtype, queries: wl.prefillQ[h], positional: 1 }));
      exact.push([]);
      T.push([]);
      for (let s = 0; s < steps; s++) {
        const ex = exactAttention(wl.decodeQ[s].subarray(h * G * d, (h + 1) * G * d), G, wl.keys[h], wl.values[h], { headDim: d, dtype: wl.dtype });
        exact[h].push(ex);
        T[h].push(new Set(topKIndices(meanProbs(ex), want)));
      }
      process.stderr.write(`[bench:retrieval-code-cut] ${tokens}: head ${h} built\n`);
    }
    const rows: { q: number; delta: number; adapt: number; session: boolean; recall: number; recallMin: number; exact: number; codes: number; error: number; oracleError: number; cpuMs: number; ms: number }[] = [];
    for (const cut of cuts) {
      const rec: number[] = [], ex: number[] = [], codes: number[] = [], err: number[] = [], oerr: number[] = [], cpu: number[] = [], wall: number[] = [];
      for (let h = 0; h < heads; h++)
        for (let s = 0, prev: Int32Array | undefined; s < steps; s++) {
          const q = wl.decodeQ[s].subarray(h * G * d, (h + 1) * G * d);
          const outIds = new Int32Array(want), outScores = new Float32Array(want);
          const a = { keys: wl.keys[h], tokens, headDim: d, dtype: wl.dtype, q, group: G, k: want, outIds, outScores, freeSeeds: steady, ...(prev && { seeds: prev }), ...walkOptions(0, want, steady.length, tokens, { codeWalk: true, codeShare }), ...(cut && { codeQuantile: cut[0], codeDelta: cut[1], codeAdapt: cut[2] }) };
          // The graph's codes are made, and the walk's scratch grown, by a first pass over the steps: not timed.
          if (rows.length === 0) graphs[h].searchSync(a);
          const u = process.cpuUsage(), t0 = performance.now();
          const r = graphs[h].searchSync(a);
          wall.push(performance.now() - t0);
          const du = process.cpuUsage(u);
          cpu.push((du.user + du.system) / 1000);
          const ids = outIds.subarray(0, r.count);
          prev = Int32Array.from(ids);
          const S: number[] = [...steady];
          for (const id of ids) if (S.length < steady.length + want && !isSteady(id)) S.push(id);
          const inS = new Set(S);
          let hit = 0;
          for (const t of T[h][s]) hit += inS.has(t) ? 1 : 0;
          rec.push(hit / want);
          ex.push(r.scanned / tokens);
          codes.push((r.codesRead ?? 0) / tokens);
          const cmp = compareWithOracle(exact[h][s], Int32Array.from(S), want);
          err.push(cmp.method.outputError);
          oerr.push(cmp.oracle.outputError);
        }
      rows.push({ q: cut?.[0] ?? DEFAULT_CODE_QUANTILE, delta: cut?.[1] ?? DEFAULT_CODE_DELTA, adapt: cut?.[2] ?? DEFAULT_CODE_ADAPT, session: !cut, recall: mean(rec), recallMin: Math.min(...rec), exact: mean(ex), codes: mean(codes), error: mean(err), oracleError: mean(oerr), cpuMs: median(cpu), ms: median(wall) });
      const r = rows[rows.length - 1];
      process.stderr.write(`[bench:retrieval-code-cut] ${tokens}${broad ? ' broad' : ''} q ${r.q} δ ${r.delta} κ ${r.adapt}${r.session ? ' (session default)' : ''}: recall ${r.recall.toFixed(3)} (min ${r.recallMin.toFixed(3)}), exact ${(100 * r.exact).toFixed(2)}%, codes ${(100 * r.codes).toFixed(1)}%, error ${(100 * r.error).toFixed(2)}%, ${r.cpuMs.toFixed(2)} ms CPU, ${r.ms.toFixed(2)} ms\n`);
    }
    graphs.forEach((g) => g.dispose());
    const pct = (x: number) => `${(100 * x).toFixed(2)}%`;
    const name = `retrieval-code-cut${broad ? '-broad' : ''}-${tokens}${seed !== 7 ? `-seed${seed}` : ''}${tag}-vm`;
    const md = [
      `### The code walk's cutoff as a session searches: ${tokens.toLocaleString('en-US')} tokens${broad ? ' (broad configuration)' : ''}`,
      '',
      `${machine()}; \`npm run bench:retrieval-code-cut -- --tokens ${tokens} --heads ${heads} --steps ${steps}${broad ? ' --broad' : ''}${get('cuts') ? ` --cuts ${get('cuts')}` : ''}${seed !== 7 ? ` --seed ${seed}` : ''}\` (bench/retrieval-code-cut.ts); seed ${seed}, ${heads} kv head(s) × ${steps} steps, GQA group 4, d=128, f16, the graph at its defaults; budget 1% (${want.toLocaleString('en-US')} keys); the session's code walk (walkOptions: codes ≤ ${pct(codeShare)}, exact ≤ 3% or 3k), steady zone free, seeded by the previous step's ids; a key met is scored exactly if its code's walk score ≥ τ − δ + κ·(the share of the exact cap used − the share of the codes' cap read), τ the strided sample's (q × 1%)-quantile of it (κ 0: a fixed cutoff; session default: what walkOptions passes). Recall = the group's top-1% recall (mean; min over heads × steps); scored exactly and codes read as shares of the tokens (means); CPU = process CPU a search (median), ms = its wall time (median).`,
      '',
      '| q | δ | κ | top-1% recall (group) | min | scored exactly | codes read | output error | oracle error | CPU ms a search | ms a search |',
      '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
      ...rows.map((r) => `| ${r.q}${r.session ? ' (session default)' : ''} | ${r.delta} | ${r.adapt} | ${r.recall.toFixed(3)} | ${r.recallMin.toFixed(3)} | ${pct(r.exact)} | ${pct(r.codes)} | ${pct(r.error)} | ${pct(r.oracleError)} | ${r.cpuMs.toFixed(2)} | ${r.ms.toFixed(2)} |`),
      '',
    ].join('\n');
    writeFileSync(`bench/results/${name}.md`, md);
    writeFileSync(`bench/results/${name}.json`, JSON.stringify({ machine: machine(), seed, tokens, broad, heads, steps, codeShare, rows }, null, 2));
    process.stdout.write(md + '\n');
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
