// The host work of a block method's selection (nosa, topk-blocks) around
// the scorer (issue #13: block methods' selection ≤ 0.1 ms at 1M), on any
// machine: the scorer is replayed. Before each step the bench scores every
// summary row of every head with the host pass (topkHeads: the top rows and
// every row's score), and the method then selects with a scorer that hands
// that answer back as the device scorer would (the top rows asked, the
// scores of the extra rows gathered). The scorer's own time is taken out:
// what is left is the host work a GPU session's step does around its device
// call (states, candidates, the choice, the selection's parts), the same
// whichever scorer produced the candidates.
//
// Shape: 8 kv heads / 32 q heads, d=128, f16, 16,384 blocks of 64 tokens per
// kv head at 1M, `--reps` rows per block (4: what a seal builds; 1: the
// shape of bench/block-select-gpu.ts), a budget of 1% of the tokens, sinks
// 64 and window 256, one document and the session's own tokens.
//
// Two passes per method: `cold`, each step right after its host pass (which
// reads every summary row, 142 MiB at 4 rows per block: the select runs with
// caches emptied); `warm`, the steps again in a fresh context back to back,
// the scorer handing back what the cold pass got (nothing between steps but
// the query's update). A GPU session's step lies between the two. In the
// cold pass each step is also selected on the host path (no scorer) in a
// second context and must give the same blocks; the warm pass must give the
// cold pass's; the selections of every step are hashed (`fingerprint`), so
// two builds can be checked to answer alike.
//   node dist/bench/block-select-host.js [--tokens N] [--steps S] [--reps R] [--rows] [--json]
// --json prints one line of JSON (for an A/B driver) instead of the table.
// The replayed scorer answers as the device does: each block's rows ranked as
// one group, the first `reach` blocks; --rows: the reach·reps best rows
// instead (the device's answer before it grouped them), for an A/B.
import { topkHeads } from '../addon/kernels.js';
import type { HeadTopBlocks } from '../addon/block-scores.js';
import { DEFAULT_PARAMS } from '../engine/sessions.js';
import { nosa, topkBlocks } from '../index/block-select.js';
import { BlockSummary, summaryStride } from '../index/block-summary.js';
import type { BlockMeans, BlockScorer, LayerContext, RetrievalMethod, SearchParams, Selection } from '../index/method.js';
import { blockLayerContext, randomSummaryRows } from './block-layer-context.js';
import { Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { loadavg } from 'node:os';
import { numFlag } from './args.js';

const argv = process.argv;
const get = (name: string) => numFlag(name, argv);
const tokens = get('--tokens') ?? 1 << 20, steps = get('--steps') ?? 200, reps = get('--reps') ?? 4, warmup = 20;
const json = argv.includes('--json');
/** --rows: the scorer answers the k·reps best rows (the device before it ranked a block's rows as one group). */
const answerRows = argv.includes('--rows');
const kvHeads = 8, qHeads = 32, d = 128, G = qHeads / kvHeads, blockSize = 64, blocks = Math.ceil(tokens / blockSize);
const stride = summaryStride(d);
/** Rows of the precomputed top: more than any step asks (reach · reps). */
const TOP_ROWS = 2048;

/** The scorer's answer for one step, computed before it (the host pass over every row). */
interface Precomputed {
  top: { ids: Int32Array; scores: Float32Array }[];
  all: Float32Array[];
}

/** Every head's buffers for the host pass, made once: a step allocates nothing of size blocks, so no GC lands in the timed select. */
function answerBuffers(): Precomputed {
  return {
    top: Array.from({ length: kvHeads }, () => ({ ids: new Int32Array(TOP_ROWS), scores: new Float32Array(TOP_ROWS) })),
    all: Array.from({ length: kvHeads }, () => new Float32Array(blocks * reps)),
  };
}

async function precompute(heads: BlockSummary[], q: Float32Array, into: Precomputed): Promise<Precomputed> {
  const aug = BlockSummary.augment(heads, q, G), n = blocks * reps;
  await topkHeads({
    q: aug, group: G, headDim: stride, dtype: 'f16', k: TOP_ROWS,
    heads: heads.map((s, h) => ({ keys: s.rows, tokens: n, outIds: into.top[h].ids, outScores: into.top[h].scores, allScores: into.all[h] })),
  });
  return into;
}

/** Hands a precomputed answer back as a device scorer does, recording it; its own time is kept apart. */
class ReplayScorer implements BlockScorer {
  answer?: Precomputed;
  ms = 0;
  readonly recorded: { extra: Int32Array[]; answer: HeadTopBlocks[] }[] = [];
  async topBlocks(_heads: readonly BlockMeans[], _q: Float32Array, _group: number, k: number, extra: Int32Array[], reps = 1): Promise<HeadTopBlocks[] | undefined> {
    const t = performance.now(), a = this.answer!;
    const rows = answerRows || reps === 1 ? k * reps : 0;
    if (rows > TOP_ROWS || k * 4 > TOP_ROWS) throw new Error(`the replay holds ${TOP_ROWS} rows, ${k} × ${reps} asked`);
    const out = a.top.map((top, h) => {
      const e = extra[h], scores = new Float32Array(e.length), all = a.all[h];
      for (let i = 0; i < e.length; i++) scores[i] = all[e[i]];
      if (rows > 0) return { ids: top.ids.subarray(0, rows), scores: top.scores.subarray(0, rows), extraScores: scores };
      // The device's grouped answer: the first k distinct blocks of the rows, each as its first row.
      const ids = new Int32Array(k), best = new Float32Array(k), seen = new Set<number>();
      let n = 0;
      for (let i = 0; i < top.ids.length && n < k; i++) {
        const b = Math.floor(top.ids[i] / reps);
        if (seen.has(b)) continue;
        seen.add(b);
        ids[n] = b * reps;
        best[n++] = top.scores[i];
      }
      return { ids: ids.subarray(0, n), scores: best.subarray(0, n), extraScores: scores };
    });
    this.ms += performance.now() - t;
    this.recorded.push({ extra: extra.map((e) => e.slice()), answer: out.map((r) => ({ ids: r.ids.slice(), scores: r.scores.slice(), extraScores: r.extraScores })) });
    return out;
  }
}

/**
 * Hands back what a ReplayScorer recorded, in order, checking that the same
 * extra rows are asked; copied into fresh arrays, as the device wrapper
 * copies its outputs out (so they are in cache when the choice reads them).
 */
class RecordedScorer implements BlockScorer {
  at = 0;
  ms = 0;
  constructor(private readonly recorded: ReplayScorer['recorded']) {}
  async topBlocks(_heads: readonly BlockMeans[], _q: Float32Array, _group: number, _k: number, extra: Int32Array[]): Promise<HeadTopBlocks[] | undefined> {
    const t = performance.now(), r = this.recorded[this.at++];
    for (let h = 0; h < extra.length; h++) {
      const a = extra[h], b = r.extra[h];
      let same = a.length === b.length;
      for (let i = 0; same && i < a.length; i++) same = a[i] === b[i];
      if (!same) throw new Error(`step ${this.at - 1}: the warm pass asked other extra rows than the cold one`);
    }
    const answer = r.answer.map((a) => ({ ids: a.ids.slice(), scores: a.scores.slice(), extraScores: a.extraScores.slice() }));
    this.ms += performance.now() - t;
    return answer;
  }
}

function hashSelection(h: number, sel: Selection): number {
  const mix = (x: number) => (h = Math.imul(h ^ x, 16777619) >>> 0);
  for (const part of sel.parts) {
    if (part.blocks) {
      part.blocks.ids.forEach((ids, k) => {
        mix(ids.length);
        for (const b of ids) mix(b);
        const cls = part.blocks!.priority?.[k];
        if (cls) for (const c of cls) mix(c);
      });
    } else if (part.ids) {
      for (const ids of part.ids) for (const t of ids) mix(t);
    } else mix(part.begin! * 31 + part.end!);
  }
  return h;
}

const sameBlocks = (a: Selection, b: Selection) =>
  JSON.stringify(a.parts.map((x) => [x.begin, x.end, x.blocks?.ids.map((i) => Array.from(i)), x.blocks?.priority?.map((c) => Array.from(c))])) ===
  JSON.stringify(b.parts.map((x) => [x.begin, x.end, x.blocks?.ids.map((i) => Array.from(i)), x.blocks?.priority?.map((c) => Array.from(c))]));

async function runMethod(method: RetrievalMethod, heads: BlockSummary[], seed: number) {
  const rng = new Rng(seed);
  const params = { ...DEFAULT_PARAMS, budget: Math.floor(tokens * 0.01), sinks: 64, window: 256 } as SearchParams;
  const ctx = (memo: Map<string, unknown>, blockScorer?: BlockScorer): LayerContext =>
    blockLayerContext(heads, { tokens, qHeads, kvHeads, headDim: d }, memo, blockScorer);
  const scorer = new ReplayScorer();
  const replayCtx = ctx(new Map(), scorer), hostCtx = ctx(new Map());
  const q = Float32Array.from({ length: qHeads * d }, () => rng.normal()), buffers = answerBuffers();
  const cold: number[] = [], warm: number[] = [], hashes: number[] = [];
  let mismatches = 0, fingerprint = 2166136261;
  for (let s = 0; s < warmup + steps; s++) {
    for (let i = 0; i < q.length; i++) q[i] = 0.9 * q[i] + 0.1 * rng.normal();
    scorer.answer = await precompute(heads, q, buffers);
    scorer.ms = 0;
    const t = performance.now();
    const sel = await method.select(replayCtx, q, params);
    const ms = performance.now() - t;
    if (s >= warmup) cold.push(ms - scorer.ms);
    hashes.push(hashSelection(2166136261, sel));
    fingerprint = hashSelection(fingerprint, sel);
    if (!sameBlocks(sel, await method.select(hostCtx, q, params))) mismatches++;
  }
  // The warm pass: the same steps in a fresh context, back to back (q does not matter to a replayed scorer).
  const recorded = new RecordedScorer(scorer.recorded), warmCtx = ctx(new Map(), recorded);
  for (let s = 0; s < warmup + steps; s++) {
    recorded.ms = 0;
    const t = performance.now();
    const sel = await method.select(warmCtx, q, params);
    const ms = performance.now() - t;
    if (s >= warmup) warm.push(ms - recorded.ms);
    if (hashSelection(2166136261, sel) !== hashes[s]) mismatches++;
  }
  const stat = (xs: number[]) => ({ p50: quantile(xs, 0.5, 'nearest'), p90: quantile(xs, 0.9, 'nearest'), p99: quantile(xs, 0.99, 'nearest') });
  return { method: method.name, cold: stat(cold), warm: stat(warm), mismatches, fingerprint: fingerprint.toString(16) };
}

async function main(): Promise<void> {
  const rng = new Rng(13);
  const heads = Array.from({ length: kvHeads }, () => new BlockSummary(blocks, blockSize, tokens, d, 'f16', randomSummaryRows(rng, blocks, reps, d, blockSize), Float32Array.from({ length: blocks }, () => rng.next()), 0.3, reps));
  const load = loadavg()[0];
  const rows = [];
  for (const [i, m] of [nosa, topkBlocks].entries()) rows.push(await runMethod(m, heads, 100 + i));
  const result = { shape: { tokens, blocks, reps, kvHeads, qHeads, headDim: d }, answer: answerRows ? 'rows' : 'groups', steps, load: [load, loadavg()[0]], rows };
  if (json) {
    console.log(JSON.stringify(result));
  } else {
    const f = (x: number) => x.toFixed(3);
    console.log(`${tokens} tokens, ${blocks} blocks × ${reps} rows per kv head, ${steps} steps; load ${load.toFixed(2)} → ${loadavg()[0].toFixed(2)}`);
    console.log('| method | cold p50 | cold p90 | cold p99 | warm p50 | warm p90 | warm p99 | mismatches | fingerprint |');
    console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |');
    for (const r of rows) console.log(`| ${r.method} | ${f(r.cold.p50)} | ${f(r.cold.p90)} | ${f(r.cold.p99)} | ${f(r.warm.p50)} | ${f(r.warm.p90)} | ${f(r.warm.p99)} | ${r.mismatches} | ${r.fingerprint} |`);
  }
  if (rows.some((r) => r.mismatches > 0)) process.exitCode = 1;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
