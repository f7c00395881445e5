// `retrieval-attention` (RetrievalAttention): an attention-aware graph over
// each kv head's keys (native/indexes/ra_graph_build.cc). The prefill queries' exact top
// keys tie keys together, and each key is linked to its nearest keys
// (centred cosine), so a greedy search driven by a decode query walks to
// the high-attention keys while scoring a fraction of them (at 1M keys, 1%
// asked: 5-7% scanned for 0.40-0.49 of the group's top 1%,
// bench/results/retrieval-graph-v4-vm.md). Without
// prefill queries (no `q` on the kv route) the keys stand in for queries:
// a key-to-key graph, measured in bench/retrieval.ts.
//
// Keys are ranked by the group's attention (addon/ra-graph.ts, aggregate
// 'attention'): a key's softmax probability summed over the GQA group's q
// heads, each head's log-partition estimated from a sample of the keys. The
// session attends one set per kv head, and the set that holds the most of
// the group's attention is the top of that sum; the max over the heads of
// q·k ranked a heavy hitter of one head above the spread-out mass of the
// others (at 1M keys on workload/ an exhaustive search by the max held 0.79
// of the group's top 1%, error 26.9% against 26.0%).
//
// A session's search over a document starts from the graph's entry points
// and from the ids it found there at its last step (SearchMemo: a decode
// query changes little from one step to the next; on workload/ at 1M,
// +0.08 of the group's top 1% for +0.5-0.9% scanned,
// bench/results/retrieval-graph-v4-vm.md's seeded rows), and from the
// session's steady zone (SearchMemo.steady: sinks and window). Those are
// attended in full, so their scores cost nothing extra: they are free start
// keys, not counted as scanned and outside the k searched for (the graph is
// asked for the budget alone). On kvrecall-code-13M, where a third to
// three quarters of layers 1-5's top 1% lies there, that lifts the top-1%
// recall at 2-3% scanned by up to +0.1 (bench/results/retrieval-seeds-vm.md);
// on workload/, whose top keys are not local, by ~+0.01.
//
// Search effort: the session's `ef` > 0 is a fixed beam width (raised to k);
// `ef` 0 (the default) stops on the quality bound instead: once the best
// unexpanded candidate scores `margin` logits below the k-th best found
// (softmax scale 1/√headDim), with a beam of 8 × the k the session asked
// (steady zone included) capping the work. Without a steady zone the margin
// is DEFAULT_MARGIN; with s steady keys outside the k searched for it is
// DEFAULT_MARGIN + STEADY_MARGIN · ln(1 + s/k): the bound used to compare
// with the (k + s)-th best, and if a key's probability falls as 1/rank that
// lies ln(1 + s/k) logits below the k-th. A constant margin restored the old
// default at 32K-256K but not at 16K (k = 163 < s = 272) short of doubling the
// generator's scanning; this one keeps recall and output error at least the
// old default's on kvrecall-code-13M (16K, 32K) and the generator (64K, 256K)
// for -2% to +8% scanned (bench/results/retrieval-margin-vm.md); at 1M
// (k = 10486) it is 0.519.
//
// A session may choose recall over speed (`codeWalk: true`): the code-gated
// walk (native/indexes/ra_graph_code_walk.h) reads each key it meets as a
// 4-bit code first and scores exactly only those whose code passes a cutoff,
// under two caps, codes read and keys scored exactly (walkOptions). It starts
// from the same keys (entry points, the last step's ids, the steady zone
// free); its codes are made from the keys on a graph's first code walk and
// held with the loaded index (64 MB a head at 1M keys, d = 128). Or
// (`codeScan: true`) every key's code is scored and the best scanShare of the
// keys by it exactly (native/indexes/ra_graph_code_scan.h): at 1M keys 0.98
// of the group's top 1% at ~2.4% scored exactly, where the walk's order
// needs its codes' cap (bench/results/ra-gpu-walk-feasibility-vm.md).
import { RaGraph } from '../addon/ra-graph.js';
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, KeyScanner, SearchMemo, SearchResult, WalkParams } from './method.js';
import { staticPlusRetrieved } from './static-plus-retrieved.js';

/** The quality-bound stop in logits when a session leaves `ef` at 0 (bench/results/retrieval-graph-v4-vm.md). */
export const DEFAULT_MARGIN = 0.5;
/** The margin's widening per ln(1 + steady/k) logits with a steady zone (bench/results/retrieval-margin-vm.md). */
export const STEADY_MARGIN = 0.75;

/**
 * Beam and margin (logits) for a search of k ids at the session's ef, ranked by the group's attention; `free` steady
 * keys start the search outside the k (the beam counts them, as the k the session asked does).
 */
export function effort(ef: number, k: number, free = 0): { ef: number; margin?: number; aggregate: 'attention' } {
  if (ef > 0) return { ef: Math.max(ef, k), aggregate: 'attention' };
  const margin = DEFAULT_MARGIN + (free > 0 && k > 0 ? STEADY_MARGIN * Math.log1p(free / k) : 0);
  return { ef: 8 * (k + free), margin, aggregate: 'attention' };
}

export const RETRIEVAL_ATTENTION = 'retrieval-attention';

/**
 * The code walk's defaults (a session's codeWalk: true; DESIGN.md's methods
 * table). At 1M keys, budget 1%, the walk capped at 40% of the keys read as
 * codes and 3% scored exactly recalled 0.93-0.94 of the group's top 1%, the
 * codes' cap stopping it at 2.2-2.4% scored exactly, where 20% of codes
 * recalled 0.79 and 10% 0.58-0.61 (bench/results/retrieval-code-walk-1048576-vm.md);
 * 40% costs ~62 ms of CPU a group-search on the 2-core VM against 8.6 for the
 * beam capped at 3% (bench/results/ra-search-1048576-vm-codes.md).
 */
export const DEFAULT_CODE_SHARE = 0.4;
/**
 * The code walk's cutoff: a key met is scored exactly if its code's walk
 * score is >= τ − δ + κ·(the share of the exact cap used − the share of the
 * codes' cap read), τ the strided sample's (q × 1%)-quantile of it: loose
 * at first, tightening while exact scoring runs ahead of the codes read,
 * loosening while it lags. A fixed cutoff (κ 0) could not hold the target:
 * the first (q 1, δ 0.5, set at 1M where the codes' cap stops the walk) let
 * the exact cap stop it first at 64K-256K, at 0.88 of the group's top 1%
 * (default configuration); a stricter one (q 1.5, δ 0.25) met 0.91 there on
 * the bench's seed but let the codes' cap stop the broad configuration at
 * 64K first on another seed, at 0.78, where that one wants δ 0.75 and the
 * default one δ <= 0.25. q 1, δ 1, κ 2 recalls 0.93-0.99 in both
 * configurations at 64K and 256K on two seeds and 0.954 / 0.975 at 1M, output
 * error the fixed cutoffs' or lower (bench/results/retrieval-code-cut-*-vm.md);
 * κ 4 lost 4 points of error at 256K on the second seed.
 */
export const DEFAULT_CODE_QUANTILE = 1;
export const DEFAULT_CODE_DELTA = 1;
export const DEFAULT_CODE_ADAPT = 2;
/** The exact cap without a session's scanShare: 3% of the document's tokens, or SCAN_PER_K × the k searched where more. */
export const DEFAULT_SCAN_SHARE = 0.03;
/**
 * 3% is 3k at the measured budget of 1%; a budget that is a larger share
 * would otherwise ask for more keys than the walk may score (it returns at
 * most the keys it scored exactly), where the walk needed ~2.3k of them.
 */
export const SCAN_PER_K = 3;

/**
 * The native search options for a search of k ids over a graph of `tokens` keys, `free` steady keys outside the k:
 * effort()'s beam and margin, capped at the session's scanShare where given; or, with the session's codeWalk, the
 * code-gated walk (addon/ra-graph.ts codeWalk: no beam, no margin) capped at codeShare of the keys read as codes
 * and scanShare (default DEFAULT_SCAN_SHARE, at least SCAN_PER_K·k) scored exactly, at the cutoff
 * DEFAULT_CODE_QUANTILE / DEFAULT_CODE_DELTA / DEFAULT_CODE_ADAPT (passed explicitly, so a session's walk does not move with the
 * native defaults); codeWidth stays at the native default (16). With the session's codeScan, the code scan
 * (addon/ra-graph.ts codeScan: no beam, no margin, every code read) at the code walk's exact cap, with the session's
 * scanKeep (a first pass on PQ codes) where given.
 */
export function walkOptions(ef: number, k: number, free: number, tokens: number, walk: WalkParams = {}) {
  const maxScanned = walk.scanShare !== undefined ? Math.max(1, Math.ceil(walk.scanShare * tokens)) : undefined;
  const exactCap = maxScanned ?? Math.max(Math.ceil(DEFAULT_SCAN_SHARE * tokens), SCAN_PER_K * k);
  if (walk.codeScan) return { ef: k, aggregate: 'attention' as const, codeScan: true, maxScanned: exactCap, ...(walk.scanKeep !== undefined && { scanKeep: walk.scanKeep }) };
  if (!walk.codeWalk) return { ...effort(ef, k, free), ...(maxScanned !== undefined && { maxScanned }) };
  return {
    ef: k,
    aggregate: 'attention' as const,
    codeWalk: true,
    maxScanned: exactCap,
    maxCodes: Math.max(1, Math.ceil((walk.codeShare ?? DEFAULT_CODE_SHARE) * tokens)),
    codeQuantile: DEFAULT_CODE_QUANTILE,
    codeDelta: DEFAULT_CODE_DELTA,
    codeAdapt: DEFAULT_CODE_ADAPT,
  };
}

class GraphHead implements HeadIndex {
  constructor(
    readonly graph: RaGraph,
    readonly keys: HeadKeys,
  ) {}

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = Math.min(k, this.keys.tokens);
    const ids = new Int32Array(n), scores = new Float32Array(n);
    const { count, scanned } = this.graph.searchSync({ ...this.keys, q, group, k: n, ...effort(ef, n), outIds: ids, outScores: scores });
    return { ids: ids.subarray(0, count), scanned };
  }
}

export const retrievalAttentionBuilder: HeadIndexBuilder = {
  async build(input: BuildInput): Promise<Uint8Array> {
    const graph = await RaGraph.build({ ...input, queries: input.queryCount > 0 ? input.queries : undefined });
    try {
      return graph.save();
    } finally {
      graph.dispose();
    }
  },
  load(bytes: Uint8Array, keys: HeadKeys): HeadIndex {
    return new GraphHead(RaGraph.load(bytes), keys);
  },
  // A step's kv heads searched in parallel (one native call), not one after
  // another, each also from the ids its head found at the session's last step
  // and from the steady zone (memo.steady: attended in full, so free start
  // keys outside the k searched for).
  async searchHeads(heads: HeadIndex[], q: Float32Array, group: number, k: number[], ef: number, memo?: SearchMemo, _estimate?: boolean, walk?: WalkParams, scanner?: KeyScanner): Promise<SearchResult[]> {
    const d = (heads[0] as GraphHead).keys.headDim;
    const steady = memo?.steady && memo.steady.length > 0 ? memo.steady : undefined;
    // The code scan on the device where the session has a scanner and it can
    // take these heads now (every head asks the same k there), else below;
    // with scanKeep below 1 both make the PQ first pass (scanKeep 1 keeps
    // every key for the 4-bit codes: the one pass, which the device reads so).
    if (walk?.codeScan && scanner && k.every((x) => x === k[0])) {
      const keep = walk.scanKeep !== undefined && walk.scanKeep < 1 ? walk.scanKeep : undefined;
      const { keys } = heads[0] as GraphHead;
      const free = steady?.length ?? 0;
      const n = Math.max(0, Math.min(k[0] - free, keys.tokens - free));
      const { maxScanned } = walkOptions(ef, n, free, keys.tokens, walk);
      const found = n > 0 && maxScanned !== undefined
        ? await scanner.scan(heads.map((head) => ({ ...(head as GraphHead).keys, graph: (head as GraphHead).graph })), q, group, n, maxScanned, heads.map((_, h) => memo?.last?.[h]), steady, keep)
        : undefined;
      if (found) {
        if (memo) memo.last = found.map((r) => r.ids);
        // The scan's free keys (the steady zone) are never in its answer.
        for (const r of found) r.outsideSteady = true;
        return found;
      }
    }
    const items = heads.map((head, h) => {
      const { graph, keys } = head as GraphHead;
      const free = steady?.length ?? 0;
      const n = Math.max(0, Math.min(k[h] - free, keys.tokens - free));
      const seeds = memo?.last?.[h];
      return { ...keys, graph, q: q.subarray(h * group * d, (h + 1) * group * d), group, k: n, ...walkOptions(ef, n, free, keys.tokens, walk), outIds: new Int32Array(n), outScores: new Float32Array(n), ...(seeds && { seeds }), ...(steady && { freeSeeds: steady }) };
    });
    const res = await RaGraph.searchBatch(items);
    const ids = res.map((r, h) => items[h].outIds.subarray(0, r.count));
    if (memo) memo.last = ids;
    // freeSeeds (the steady zone) are never in a search's answer.
    return ids.map((found, h) => ({ ids: found, scanned: res[h].scanned, outsideSteady: true, ...(res[h].codesRead !== undefined && { codes: res[h].codesRead }) }));
  },
};

export const retrievalAttention = staticPlusRetrieved(RETRIEVAL_ATTENTION, retrievalAttentionBuilder);
