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
// resident on the GPU, every kv head scored and its top blocks found in one
// call, a block ranked by its best row); otherwise one native host pass over
// the same rows, its top reach·reps rows. Either way the candidates are the
// top `reach` blocks in the same order and the last step's blocks' rows,
// with scores bit for bit the same, and the choice among them
// is one native call for every head (addon/block-choose.ts): the rows
// deduped to blocks, the static part's blocks left out, the choice, and the
// chosen blocks' rows for the next step's scorer, in flat arrays. So a step
// does no per-block work in JS and allocates a few arrays, whatever the
// budget (issue #13: the host work around the device call was about 0.38 ms
// of a 0.51 ms select on the H100 host; bench/block-select-host.ts times it
// with the scorer replayed).
//
// Each block carries its eviction class to the pool (engine/cache: the CUDA
// pool's classes + LRU, or their host model when there is no GPU). (An
// earlier policy kept high-importance blocks a class above recently used
// ones: on the H100 with a tight pool it hit 0.85 against LRU's 0.90, so it
// was dropped.)
import { BlockChooser, type BlockStepChoice } from '../addon/block-choose.js';
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

/** A method's memo of one document segment of a session's layer. */
interface SegmentState {
  /** The last step's choice, every head (none before the first step). */
  last?: BlockStepChoice;
}

/**
 * The choosers of (document, layer)s, by their first head's summary: the
 * summaries are a document's, shared by every session over it, and a
 * chooser is collected with them.
 */
const choosers = new WeakMap<BlockSummary, { heads: readonly BlockSummary[]; chooser: BlockChooser }>();

function chooserOf(heads: readonly BlockSummary[]): BlockChooser {
  const known = choosers.get(heads[0]);
  if (known && known.heads.length === heads.length && known.heads.every((s, h) => s === heads[h])) return known.chooser;
  const chooser = new BlockChooser(heads[0].blocks, heads[0].reps, heads.length, heads.map((s) => ({ byImportance: s.byImportance, importanceRank: s.importanceRank })));
  choosers.set(heads[0], { heads: [...heads], chooser });
  return chooser;
}

const NO_ROWS = new Int32Array(0);

export const blockSummaryBuilder: HeadIndexBuilder = {
  build: buildBlockSummary,
  load: loadBlockSummary,
};

const agnosticCount = (budget: number, policy: Policy) => Math.floor(budget * policy.agnosticShare);
const maxNewCount = (budget: number, policy: Policy) => (policy.maxNewShare === Infinity ? Infinity : Math.max(1, Math.ceil(budget * policy.maxNewShare)));

function blockSelect(name: string, policy: Policy): RetrievalMethod {
  /** The memo keys of segment s, made once. */
  const keys: string[] = [];
  return {
    name,
    builder: blockSummaryBuilder,
    async select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
      // Each segment's last choice this step replaced, put back if the step fails (Selection.undo):
      // a failed or refused step must not steer the next step's choice (its maxNew is counted against it).
      const replaced: [SegmentState, BlockStepChoice | undefined][] = [];
      const undo = () => {
        for (const [state, last] of replaced) state.last = last;
        replaced.length = 0;
      };
      try {
        const selection = await choose(ctx, q, p, replaced);
        selection.undo = undo;
        return selection;
      } catch (e) {
        undo();
        throw e;
      }
    },
  };

  function choose(ctx: LayerContext, q: Float32Array, p: SearchParams, replaced: [SegmentState, BlockStepChoice | undefined][]): Promise<Selection> {
    const G = ctx.qHeads / ctx.kvHeads;
    return blockSelection<BlockSummary>(ctx, p, async (s, heads, budget, exclude) => {
      const maxNew = maxNewCount(budget, policy), agnostic = agnosticCount(budget, policy);
      // The blocks the sinks and window touch are never chosen: `exclude.length` more candidates make up for them.
      const reach = budget + agnostic + (maxNew === Infinity ? 0 : maxNew) + exclude.length;
      const key = (keys[s] ??= `${name}:${s}`);
      let state = ctx.memo.get(key) as SegmentState | undefined;
      if (!state) ctx.memo.set(key, (state = {}));
      const chooser = chooserOf(heads), last = state.last;
      // The candidates (top `reach` blocks' rows, and the last step's blocks' rows) and their scores: on the
      // device for GPU sessions, else on the host; then the choice for every head in one native call
      // (native/kernels/block_choose.cc): the agnostic blocks, then the candidates in score order (`top`, then
      // the previous blocks outside it by their scores), the previous step's kept and at most maxNew others;
      // the query-agnostic blocks a pool class above the rest.
      const choice = await BlockSummary.candidateRows(heads, q.subarray(0, ctx.qHeads * ctx.headDim), G, reach, last ? last.rowLists() : heads.map(() => NO_ROWS), ctx.blockScorer, (c) =>
        chooser.step({ reach, budget, maxNew, agnostic, agnosticClass: agnostic, protectAgnostic: policy.protectAgnostic, exclude, prev: last, ...c }),
      );
      replaced.push([state, last]);
      state.last = choice;
      let scanned = 0;
      for (const summary of heads) scanned += (summary.blocks * summary.reps) / ctx.kvHeads;
      return { ids: choice.ids(), priority: choice.classes(), scanned };
    });
  }
}

export const nosa = blockSelect('nosa', { agnosticShare: 0.25, maxNewShare: 0.125, protectAgnostic: true });
export const topkBlocks = blockSelect('topk-blocks', { agnosticShare: 0, maxNewShare: Infinity, protectAgnostic: false });
