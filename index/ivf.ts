// `ivf`: off-the-shelf IVF-Flat over one kv head's keys by inner product
// (faiss from Debian's libfaiss-dev, linked into the addon), a baseline.
// nlist = 4·√tokens; the search's `ef` is the number of lists probed per
// query row (0: the lists that hold REACH times the budget on average, at
// least nlist/32). Keys are ranked by the group's attention (the GQA rows'
// softmax probabilities summed, addon/faiss.ts), as retrieval-attention
// ranks them: by the max over the rows of q·k the pass-key layer of
// kvrecall-code-13M held 0.86 of the attention at 16K bytes, the exact
// top-k by mean probability 0.94.
import { IvfIndex } from '../addon/faiss.js';
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, SearchResult } from './method.js';
import { staticPlusRetrieved } from './static-plus-retrieved.js';

const SEED = 1234;
// A row's top k is chosen among the keys of the lists it probes. Lists that
// hold only k keys on average (the previous default) miss the keys whose list
// centroid is not among the row's best: on kvrecall-code-13M at 16K bytes
// (2.4% budget) ivf scanned 6.6% of the keys and its pass-key layer erred
// 0.053 where hnsw (27.6% scanned) erred 0.037. 8x the budget is the reach
// wave's retrieval zone uses before it rescores members exactly.
const REACH = 8;

class IvfHead implements HeadIndex {
  constructor(
    private readonly index: IvfIndex,
    private readonly tokens: number,
  ) {}

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = Math.min(k, this.tokens);
    const ids = new Int32Array(n), scores = new Float32Array(n);
    // Probing only nlist/32 lists left a larger budget unused (at the session defaults, 2048 tokens of an 8K
    // document, ivf attended 8% where every other method attended 26-28%, and lost a pass key they found:
    // bench/results/model-vm-defaults.md); probing only the lists that hold k keys picks the k among too few.
    const fill = Math.ceil((REACH * n) / Math.max(1, this.tokens / this.index.nlist));
    const nprobe = Math.min(this.index.nlist, ef > 0 ? ef : Math.max(Math.ceil(this.index.nlist / 32), fill));
    const { count, scanned } = this.index.search({ q, group, k: n, nprobe, outIds: ids, outScores: scores, aggregate: 'attention' });
    return { ids: ids.subarray(0, count), scanned: scanned / group };
  }
}

export const ivfBuilder: HeadIndexBuilder = {
  async build(input: BuildInput): Promise<Uint8Array> {
    const nlist = Math.max(1, Math.min(input.tokens, Math.round(4 * Math.sqrt(input.tokens))));
    const index = await IvfIndex.build({ ...input, nlist, seed: SEED });
    try {
      return index.save();
    } finally {
      index.dispose();
    }
  },
  load(bytes: Uint8Array, keys: HeadKeys): HeadIndex {
    return new IvfHead(IvfIndex.load(bytes), keys.tokens);
  },
};

export const ivf = staticPlusRetrieved('ivf', ivfBuilder);
