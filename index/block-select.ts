// Block-selecting methods, over each document's BlockSummary:
//
// `nosa` (NOSA): the selection is split into a query-agnostic part (the
// blocks with the highest stable importance, plus sinks and the recent
// window) and a query-aware part (top blocks by their best representative's
// score, q·c + α·‖q‖·r + √d·ln n over a few k-means sub-centroids per block,
// α the head's radius share calibrated at seal; block-summary.ts),
// under a locality constraint: a step may bring in at most `maxNew` blocks
// that the previous step did not select, so the selected set, and what the
// GPU block pool must copy in, changes little from step to step. In the pool its
// query-agnostic blocks are a class above the rest (evicted last), the rest
// least recently used first.
//
// `topk-blocks`: plain top blocks by the same score with an LRU pool, the
// baseline NOSA is compared against.
//
// Scoring: a GPU session's layer context offers a device scorer
// (engine/cache/device-block-scores.ts: the summary rows [c, r, ln n]
// resident on the GPU, every kv head scored and its top rows found in one
// call); otherwise one native host pass over the same rows. Either way
// only the candidates come back (the top `reach` blocks' rows and last
// step's blocks' rows, with scores bit for bit the same), and the logic
// below is O(candidates × reps) per step.
//
// Each block carries its eviction class to the pool (engine/cache: the CUDA
// pool's classes + LRU, or their host model when there is no GPU). (An
// earlier policy kept high-importance blocks a class above recently used
// ones: on the H100 with a tight pool it hit 0.85 against LRU's 0.90, so it
// was dropped.)
import { BlockSummary, buildBlockSummary, loadBlockSummary } from './block-summary.js';
import type { HeadIndexBuilder, LayerContext, RetrievalMethod, SearchParams, Selection } from './method.js';
import { blockSelection } from './static-plus-retrieved.js';

interface Policy {
  /** Share of the block budget given to the query-agnostic top-importance blocks. */
  agnosticShare: number;
  /** New blocks a step may bring in, as a share of the block budget (Infinity: no constraint). */
  maxNewShare: number;
  /** Whether the query-agnostic blocks are an eviction class above the rest. */
  protectAgnostic: boolean;
}

interface HeadState {
  /** The blocks the last step selected, ascending. */
  selected: Int32Array;
}

export const blockSummaryBuilder: HeadIndexBuilder = {
  build: buildBlockSummary,
  load: loadBlockSummary,
};

const PREV = 1, TOP = 2, CHOSEN = 4;

/**
 * The step's blocks: the agnostic ones, then by score, keeping what the
 * previous step selected and bringing in at most `maxNew` others. Only the
 * candidates can be chosen (the previous selection and the top `reach`
 * blocks by score, reach = budget + agnostic + maxNew: any block below them
 * would come after the budget or the quota is spent). `top` is already in
 * score order (higher score, then lower id) and every block outside it ranks
 * below it, so the order of all candidates is `top`, then the previous
 * blocks outside it sorted by their scores (prevScores, aligned with prev):
 * nothing else is scored or sorted, and the work is O(candidates) (the
 * summary's flag scratch marks them and is cleared again).
 */
function choose(summary: BlockSummary, top: Int32Array, prev: Int32Array, prevScores: Float32Array, budget: number, policy: Policy): Int32Array {
  const f = summary.flags;
  const agnostic = summary.byImportance.subarray(0, agnosticCount(budget, policy));
  const out = new Int32Array(Math.max(budget, agnostic.length));
  let n = 0;
  for (let i = 0; i < agnostic.length; i++) {
    f[agnostic[i]] |= CHOSEN;
    out[n++] = agnostic[i];
  }
  for (let i = 0; i < prev.length; i++) f[prev[i]] |= PREV;
  for (let i = 0; i < top.length; i++) f[top[i]] |= TOP;
  const below: number[] = [];
  for (let i = 0; i < prev.length; i++) if (!(f[prev[i]] & TOP)) below.push(i);
  below.sort((i, j) => prevScores[j] - prevScores[i] || prev[i] - prev[j]);
  const maxNew = prev.length === 0 ? Infinity : maxNewCount(budget, policy);
  let brought = 0;
  for (let i = 0; i < top.length + below.length && n < budget; i++) {
    const b = i < top.length ? top[i] : prev[below[i - top.length]];
    if (f[b] & CHOSEN) continue;
    if (f[b] & PREV || brought < maxNew) {
      if (!(f[b] & PREV)) brought++;
      f[b] |= CHOSEN;
      out[n++] = b;
    }
  }
  for (let i = 0; i < agnostic.length; i++) f[agnostic[i]] = 0;
  for (let i = 0; i < prev.length; i++) f[prev[i]] = 0;
  for (let i = 0; i < top.length; i++) f[top[i]] = 0;
  for (let i = 0; i < n; i++) f[out[i]] = 0;
  return out.subarray(0, n);
}

const agnosticCount = (budget: number, policy: Policy) => Math.floor(budget * policy.agnosticShare);
const maxNewCount = (budget: number, policy: Policy) => (policy.maxNewShare === Infinity ? Infinity : Math.max(1, Math.ceil(budget * policy.maxNewShare)));

function blockSelect(name: string, policy: Policy): RetrievalMethod {
  return {
    name,
    builder: blockSummaryBuilder,
    select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
      const G = ctx.qHeads / ctx.kvHeads, d = ctx.headDim;
      return blockSelection<BlockSummary>(ctx, p, async (s, heads, budget) => {
        const maxNew = maxNewCount(budget, policy);
        const reach = budget + agnosticCount(budget, policy) + (maxNew === Infinity ? 0 : maxNew);
        const states = heads.map((_, h) => {
          const key = `${name}:${s}:${h}`;
          const state = (ctx.memo.get(key) as HeadState | undefined) ?? { selected: new Int32Array(0) };
          ctx.memo.set(key, state);
          return state;
        });
        // The candidates (top `reach` and last step's blocks) and their scores:
        // on the device for GPU sessions, else on the host.
        const prev = states.map((st) => st.selected);
        const scored = await BlockSummary.topHeads(heads, q.subarray(0, ctx.kvHeads * G * d), G, reach, prev, ctx.blockScorer);
        const agnostic = agnosticCount(budget, policy);
        const ids: Int32Array[] = [], priority: Uint8Array[] = [];
        let scanned = 0;
        for (let h = 0; h < ctx.kvHeads; h++) {
          const summary = heads[h];
          scanned += (summary.blocks * summary.reps) / ctx.kvHeads;
          const chosen = choose(summary, scored[h].order, prev[h], scored[h].extraScores, budget, policy).sort();
          states[h].selected = chosen;
          // The query-agnostic blocks are a pool class above the rest.
          const rank = summary.importanceRank, cls = new Uint8Array(chosen.length);
          if (policy.protectAgnostic) for (let i = 0; i < chosen.length; i++) cls[i] = rank[chosen[i]] < agnostic ? 1 : 0;
          ids.push(chosen);
          priority.push(cls);
        }
        return { ids, priority, scanned };
      });
    },
  };
}

export const nosa = blockSelect('nosa', { agnosticShare: 0.25, maxNewShare: 0.125, protectAgnostic: true });
export const topkBlocks = blockSelect('topk-blocks', { agnosticShare: 0, maxNewShare: Infinity, protectAgnostic: false });
