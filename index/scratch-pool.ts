// Host scoring outputs borrowed per call and given back, one pool per kind
// of output for every index of that kind (block-summary.ts's rows, quest.ts's
// blocks, wave/cluster-index.ts's ranked clusters and candidate rows). A document's indexes are shared by every session over it, and two
// sessions' steps score them at once (one native call writing while the
// other's awaits), so a call never writes arrays another may be reading. One
// pool for all indexes holds what the calls in flight at once need (a batch
// of 32 steps over 8 kv heads of a 1M-token document: 256 of 768 KiB), where
// a set per index held 768 KiB for every (layer, kv head) of every document,
// and a free list per index would keep a batch's worth for every layer.

export class ScratchPool<S> {
  private readonly free: S[] = [];

  /** make(n): a set for n entries; length(s): how many a set holds. */
  constructor(
    private readonly make: (n: number) => S,
    private readonly length: (s: S) => number,
  ) {}

  /** A set for n entries: the last given back, where it holds them, else a new one. */
  take(n: number): S {
    const s = this.free.pop();
    return s !== undefined && this.length(s) >= n ? s : this.make(n);
  }

  give(sets: readonly S[]): void {
    this.free.push(...sets);
  }
}
