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
// step's blocks' rows, with scores bit for bit the same), and the choice
// among them is one native call for every head (addon/block-choose.ts),
// O(candidates) per step.
//
// Each block carries its eviction class to the pool (engine/cache: the CUDA
// pool's classes + LRU, or their host model when there is no GPU). (An
// earlier policy kept high-importance blocks a class above recently used
// ones: on the H100 with a tight pool it hit 0.85 against LRU's 0.90, so it
// was dropped.)
import { chooseBlocks } from '../addon/block-choose.js';
import { BlockSummary, buildBlockSummary, loadBlockSummary } from './block-summary.js';
import type { HeadIndexBuilder, LayerContext, RetrievalMethod, SearchParams, Selection } from './method.js';
import { blockSelection, without } from './static-plus-retrieved.js';

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

const agnosticCount = (budget: number, policy: Policy) => Math.floor(budget * policy.agnosticShare);
const maxNewCount = (budget: number, policy: Policy) => (policy.maxNewShare === Infinity ? Infinity : Math.max(1, Math.ceil(budget * policy.maxNewShare)));

function blockSelect(name: string, policy: Policy): RetrievalMethod {
  return {
    name,
    builder: blockSummaryBuilder,
    async select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
      const G = ctx.qHeads / ctx.kvHeads, d = ctx.headDim;
      // Each head's last selection this step replaced, put back if the step fails (Selection.undo):
      // a failed or refused step must not steer the next step's choice (its maxNew is counted against it).
      const replaced: [HeadState, Int32Array][] = [];
      const undo = () => {
        for (const [state, selected] of replaced) state.selected = selected;
        replaced.length = 0;
      };
      try {
        return { ...(await choose(ctx, q, p, G, d, replaced)), undo };
      } catch (e) {
        undo();
        throw e;
      }
    },
  };

  function choose(ctx: LayerContext, q: Float32Array, p: SearchParams, G: number, d: number, replaced: [HeadState, Int32Array][]): Promise<Selection> {
    return blockSelection<BlockSummary>(ctx, p, async (s, heads, budget, exclude) => {
      const maxNew = maxNewCount(budget, policy);
      // The blocks the sinks and window touch are never chosen: `exclude.length` more candidates make up for them.
      const reach = budget + agnosticCount(budget, policy) + (maxNew === Infinity ? 0 : maxNew) + exclude.length;
      const states = heads.map((_, h) => {
        const key = `${name}:${s}:${h}`;
        const state = (ctx.memo.get(key) as HeadState | undefined) ?? { selected: new Int32Array(0) };
        ctx.memo.set(key, state);
        return state;
      });
      // The candidates (top `reach` and last step's blocks) and their scores:
      // on the device for GPU sessions, else on the host.
      const prev = states.map((st) => without(st.selected, exclude));
      const scored = await BlockSummary.topHeads(heads, q.subarray(0, ctx.kvHeads * G * d), G, reach, prev, ctx.blockScorer);
      // The choice for every head in one native call (native/kernels/block_choose.cc): the agnostic blocks,
      // then the candidates in score order (`top`, then the previous blocks outside it by their scores), the
      // previous step's kept and at most maxNew others; the query-agnostic blocks a pool class above the rest.
      const agnostic = agnosticCount(budget, policy);
      const { ids, priority } = chooseBlocks(heads.map((summary, h) => ({
        top: without(scored[h].order, exclude), prev: prev[h], prevScores: scored[h].extraScores,
        agnostic: without(summary.byImportance.subarray(0, agnostic + exclude.length), exclude).subarray(0, agnostic),
        importanceRank: summary.importanceRank, flags: summary.flags,
      })), { blocks: heads[0].blocks, budget, maxNew, agnosticClass: agnostic, protectAgnostic: policy.protectAgnostic });
      ids.forEach((chosen, h) => {
        replaced.push([states[h], states[h].selected]);
        states[h].selected = chosen;
      });
      const scanned = heads.reduce((n, summary) => n + (summary.blocks * summary.reps) / ctx.kvHeads, 0);
      return { ids, priority, scanned };
    });
  }
}

export const nosa = blockSelect('nosa', { agnosticShare: 0.25, maxNewShare: 0.125, protectAgnostic: true });
export const topkBlocks = blockSelect('topk-blocks', { agnosticShare: 0, maxNewShare: Infinity, protectAgnostic: false });
