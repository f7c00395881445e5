// Block-selecting methods, over each document's BlockSummary:
//
// `nosa` (NOSA): the selection is split into a query-agnostic part (the
// blocks with the highest stable importance, plus sinks and the recent
// window) and a query-aware part (top blocks by q · block mean), under a
// locality constraint: a step may bring in at most `maxNew` blocks that the
// previous step did not select, so the selected set, and what the GPU block
// pool must copy in, changes little from step to step. In the pool its
// query-agnostic blocks are a class above the rest (evicted last), the rest
// least recently used first.
//
// `topk-blocks`: plain top blocks by q · block mean with an LRU pool, the
// baseline NOSA is compared against.
//
// Each block carries its eviction class to the pool (engine/cache: the CUDA
// pool's classes + LRU, or their host model when there is no GPU). (An
// earlier policy kept high-importance blocks a class above recently used
// ones: on the H100 with a tight pool it hit 0.85 against LRU's 0.90, so it
// was dropped.)
import { BlockSummary, buildBlockSummary, loadBlockSummary } from './block-summary.js';
import type { HeadIndexBuilder, LayerContext, RetrievalMethod, SearchParams, Selection, SelectionPart } from './method.js';
import { inside, staticRanges, type Range } from './static-plus-retrieved.js';

interface Policy {
  /** Share of the block budget given to the query-agnostic top-importance blocks. */
  agnosticShare: number;
  /** New blocks a step may bring in, as a share of the block budget (Infinity: no constraint). */
  maxNewShare: number;
  /** Whether the query-agnostic blocks are an eviction class above the rest. */
  protectAgnostic: boolean;
}

interface HeadState {
  selected: Set<number>;
}

export const blockSummaryBuilder: HeadIndexBuilder = {
  build: buildBlockSummary,
  load: loadBlockSummary,
};

/**
 * The step's blocks: the agnostic ones, then by score, keeping what the
 * previous step selected and bringing in at most `maxNew` others. Only the
 * candidates can be chosen (the previous selection and the top `reach`
 * blocks by score, reach = budget + agnostic + maxNew: any block below them
 * would come after the budget or the quota is spent), so nothing beyond them
 * is sorted.
 */
function choose(summary: BlockSummary, top: Int32Array, scores: Float32Array, budget: number, prev: Set<number>, policy: Policy): number[] {
  const chosen = new Set<number>();
  for (const b of summary.byImportance.subarray(0, agnosticCount(budget, policy))) chosen.add(b);
  const maxNew = prev.size === 0 ? Infinity : maxNewCount(budget, policy);
  const candidates = new Set<number>(top);
  for (const b of prev) candidates.add(b);
  const byScore = [...candidates].sort((a, b) => scores[b] - scores[a] || a - b);
  let brought = 0;
  for (const b of byScore) {
    if (chosen.size >= budget) break;
    if (chosen.has(b)) continue;
    if (prev.has(b)) chosen.add(b);
    else if (brought < maxNew) {
      chosen.add(b);
      brought++;
    }
  }
  return [...chosen];
}

const agnosticCount = (budget: number, policy: Policy) => Math.floor(budget * policy.agnosticShare);
const maxNewCount = (budget: number, policy: Policy) => (policy.maxNewShare === Infinity ? Infinity : Math.max(1, Math.ceil(budget * policy.maxNewShare)));

/**
 * Sinks and window widened to whole blocks: a block method attends blocks,
 * so a block the static part touches is attended whole, and no selected
 * block is split between the two parts.
 */
function blockAligned(ranges: Range[], size: number, tokens: number): Range[] {
  const out: Range[] = [];
  for (const [a, b] of ranges) {
    const r: Range = [Math.floor(a / size) * size, Math.min(tokens, Math.ceil(b / size) * size)];
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push(r);
  }
  return out;
}

/** Pool eviction class of a selected block: query-agnostic ones outlive the rest. */
function priorityOf(block: number, agnostic: Set<number>, policy: Policy): number {
  return policy.protectAgnostic && agnostic.has(block) ? 1 : 0;
}

function blockSelect(name: string, policy: Policy): RetrievalMethod {
  return {
    name,
    builder: blockSummaryBuilder,
    async select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
      const G = ctx.qHeads / ctx.kvHeads, d = ctx.headDim;
      const docTokens = ctx.offsets[ctx.offsets.length - 1];
      const parts: SelectionPart[] = [];
      let scanned = 0;
      for (let s = 0; s < ctx.segments.length; s++) {
        const segment = ctx.segments[s];
        const heads = ctx.indexes[s] as BlockSummary[] | undefined;
        if (!heads || segment.tokens === 0) {
          for (const [begin, end] of staticRanges(ctx, s, p)) parts.push({ segment, begin, end });
          continue;
        }
        const size = heads[0].blockSize;
        const ranges = blockAligned(staticRanges(ctx, s, p), size, segment.tokens);
        for (const [begin, end] of ranges) parts.push({ segment, begin, end });
        const share = Math.ceil((p.budget * segment.tokens) / Math.max(1, docTokens));
        const budget = Math.min(heads[0].blocks, Math.ceil(share / size));
        const ids: Int32Array[] = [], priority: Uint8Array[] = [];
        const maxNew = maxNewCount(budget, policy);
        const reach = budget + agnosticCount(budget, policy) + (maxNew === Infinity ? 0 : maxNew);
        const scored = await BlockSummary.scoreHeads(heads, q.subarray(0, ctx.kvHeads * G * d), G, reach);
        for (let h = 0; h < ctx.kvHeads; h++) {
          const summary = heads[h];
          const { order, scores } = scored[h];
          scanned += summary.blocks / ctx.kvHeads;
          const key = `${name}:${s}:${h}`;
          const state = (ctx.memo.get(key) as HeadState | undefined) ?? { selected: new Set() };
          ctx.memo.set(key, state);
          const chosen = choose(summary, order, scores, budget, state.selected, policy).sort((a, b) => a - b);
          const agnostic = new Set(summary.byImportance.subarray(0, agnosticCount(budget, policy)));
          const cls = (b: number) => priorityOf(b, agnostic, policy);
          state.selected = new Set(chosen);
          // Blocks the static part already covers are attended there.
          const kept = chosen.filter((b) => !inside(ranges, b * size));
          ids.push(Int32Array.from(kept));
          priority.push(Uint8Array.from(kept, cls));
        }
        parts.push({ segment, blocks: { size, ids, priority } });
      }
      return { parts, scanned };
    },
  };
}

export const nosa = blockSelect('nosa', { agnosticShare: 0.25, maxNewShare: 0.125, protectAgnostic: true });
export const topkBlocks = blockSelect('topk-blocks', { agnosticShare: 0, maxNewShare: Infinity, protectAgnostic: false });
