// `ivf`: off-the-shelf IVF-Flat over one kv head's keys by inner product
// (faiss from Debian's libfaiss-dev, linked into the addon), a baseline.
// nlist = 4·√tokens; the search's `ef` is the number of lists probed per
// query row (0: nlist/32, about 3% of the keys, or the lists that hold the
// budget on average when that is more).
import { IvfIndex } from '../addon/faiss.js';
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, SearchResult } from './method.js';
import { staticPlusRetrieved } from './static-plus-retrieved.js';

const SEED = 1234;

class IvfHead implements HeadIndex {
  constructor(
    private readonly index: IvfIndex,
    private readonly tokens: number,
  ) {}

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = Math.min(k, this.tokens);
    const ids = new Int32Array(n), scores = new Float32Array(n);
    // A budget beyond what nlist/32 lists hold would go unused: at the session defaults (2048 tokens of an 8K
    // document) ivf attended 8% where every other method attended 26-28%, and lost a pass key they found
    // (bench/results/model-vm-defaults.md). Probe at least the lists that hold k keys on average.
    const fill = Math.ceil(n / Math.max(1, this.tokens / this.index.nlist));
    const nprobe = Math.min(this.index.nlist, ef > 0 ? ef : Math.max(Math.ceil(this.index.nlist / 32), fill));
    const { count, scanned } = this.index.search({ q, group, k: n, nprobe, outIds: ids, outScores: scores });
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
