// `retrieval-attention` (RetrievalAttention): an attention-aware graph over
// each kv head's keys (native/indexes/ra_graph_build.cc). The prefill queries' exact top
// keys tie keys together, so a greedy search driven by a decode query walks
// to the high-attention keys while scoring a few percent of them. Without
// prefill queries (no `q` on the kv route) the keys stand in for queries:
// a key-to-key graph, measured in bench/retrieval.ts.
//
// Search effort: the session's `ef` > 0 is a fixed beam width (raised to k);
// `ef` 0 (the default) stops on the quality bound instead: once the best
// unexpanded candidate scores DEFAULT_MARGIN logits below the k-th best
// found (at scale 1/√headDim), with a beam of 8k capping the work.
import { RaGraph } from '../addon/ra-graph.js';
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, SearchResult } from './method.js';
import { staticPlusRetrieved } from './static-plus-retrieved.js';

/** The quality-bound stop in logits when a session leaves `ef` at 0 (bench/results/retrieval-65536.md). */
export const DEFAULT_MARGIN = 0.5;

/** Beam and margin (score units) for a search of k ids at the session's ef. */
function effort(ef: number, k: number, headDim: number): { ef: number; margin?: number } {
  return ef > 0 ? { ef: Math.max(ef, k) } : { ef: 8 * k, margin: DEFAULT_MARGIN * Math.sqrt(headDim) };
}

class GraphHead implements HeadIndex {
  constructor(
    readonly graph: RaGraph,
    readonly keys: HeadKeys,
  ) {}

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = Math.min(k, this.keys.tokens);
    const ids = new Int32Array(n), scores = new Float32Array(n);
    const { count, scanned } = this.graph.searchSync({ ...this.keys, q, group, k: n, ...effort(ef, n, this.keys.headDim), outIds: ids, outScores: scores });
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
  // A step's kv heads searched in parallel (one native call), not one after another.
  async searchHeads(heads: HeadIndex[], q: Float32Array, group: number, k: number[], ef: number): Promise<SearchResult[]> {
    const d = (heads[0] as GraphHead).keys.headDim;
    const items = heads.map((head, h) => {
      const { graph, keys } = head as GraphHead;
      const n = Math.min(k[h], keys.tokens);
      return { ...keys, graph, q: q.subarray(h * group * d, (h + 1) * group * d), group, k: n, ...effort(ef, n, d), outIds: new Int32Array(n), outScores: new Float32Array(n) };
    });
    const res = await RaGraph.searchBatch(items);
    return res.map((r, h) => ({ ids: items[h].outIds.subarray(0, r.count), scanned: r.scanned }));
  },
};

export const retrievalAttention = staticPlusRetrieved('retrieval-attention', retrievalAttentionBuilder);
