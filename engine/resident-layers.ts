// Partial residency of documents read from a shared store (the Redis
// Cluster): a server keeps only some of a document's layers in host memory,
// whole layers, read on use within its host budget. A read that does not fit
// evicts the least recently used layers that no step is reading, of any
// document; a step pins the layers it reads for its whole duration, so a
// layer is never evicted under a step, and a step whose layer is not resident
// awaits its read (the store checks every block: a damaged or vanished block
// fails the step, it is never attended). With nothing left to evict, the read
// is refused with over_budget (503) and nothing changes.
import { conflict, KvrecallError } from '../core/errors.js';
import type { DocumentMeta } from '../storage/document-store.js';
import type { HostBudget } from '../storage/host-budget.js';
import { KvSegment } from '../storage/kv-segment.js';

/** Reads one layer of a document into a segment (the store's readLayer). */
export type LayerReader = (layer: number, into: KvSegment) => Promise<void>;

interface Entry {
  owner: ResidentLayers;
  layer: number;
  segment?: KvSegment;
  loading?: Promise<void>;
  /** Steps (and prefetches) reading the layer now. */
  pins: number;
}

export interface ResidencyStats {
  /** Host bytes of document layers resident now. */
  residentBytes: number;
  /** Layers resident now. */
  residentLayers: number;
  /** Layer reads from the store (first reads and re-reads of evicted layers). */
  reads: number;
  evictions: number;
}

/** The server's resident document layers in least-recently-used order, over every document. */
export class LayerCache {
  /** Resident entries, least recently used first (Map keeps insertion order). */
  private readonly lru = new Map<Entry, true>();
  reads = 0;
  evictions = 0;

  constructor(readonly budget: HostBudget) {}

  stats(): ResidencyStats {
    let residentBytes = 0;
    for (const e of this.lru.keys()) residentBytes += e.segment!.heldBytes;
    return { residentBytes, residentLayers: this.lru.size, reads: this.reads, evictions: this.evictions };
  }

  touch(e: Entry): void {
    if (!this.lru.delete(e)) return;
    this.lru.set(e, true);
  }

  add(e: Entry): void {
    this.lru.set(e, true);
  }

  /** Drops a resident entry's segment, returning its bytes to the budget. */
  evict(e: Entry): void {
    const segment = e.segment;
    if (!segment) return;
    this.lru.delete(e);
    segment.release();
    e.segment = undefined;
    e.owner.evicted(e.layer, segment);
    this.evictions++;
  }

  /**
   * A segment for one layer, reserved in the budget: when it does not fit,
   * unpinned layers are evicted, least recently used first, until it does.
   */
  allocate(make: () => KvSegment): KvSegment {
    for (;;) {
      try {
        return make();
      } catch (err) {
        if (!(err instanceof KvrecallError) || err.kind !== 'over_budget') throw err;
        const victim = [...this.lru.keys()].find((e) => e.pins === 0);
        if (!victim)
          throw new KvrecallError(
            'over_budget',
            `${err.message}; every resident document layer (${this.lru.size}) is being read by a step, so none can be evicted to make room: retry, or give the server a larger --memory-budget`,
          );
        this.evict(victim);
      }
    }
  }
}

/** One ready document's layers as this server holds them: `layers[l]` is the resident segment, or undefined. */
export class ResidentLayers {
  readonly layers: (KvSegment | undefined)[];
  private readonly entries: Entry[];
  private dropped?: string;
  /**
   * Called when a layer is evicted, with the segment it was: its indexes,
   * loaded against the segment, go too, and so do its device copies (a
   * layer read again is a new segment, so they could never be read again).
   */
  onEvict?: (layer: number, segment: KvSegment) => void;

  constructor(
    private readonly cache: LayerCache,
    readonly meta: DocumentMeta,
    private readonly read: LayerReader,
  ) {
    this.layers = new Array<KvSegment | undefined>(meta.model.layers).fill(undefined);
    this.entries = Array.from({ length: meta.model.layers }, (_, layer) => ({ owner: this, layer, pins: 0 }));
  }

  /** Host bytes of one layer. */
  get layerBytes(): number {
    const { kvHeads, headDim } = this.meta.model;
    return Math.max(1, this.meta.tokens) * headDim * 2 * 2 * kvHeads;
  }

  /**
   * Makes a layer resident (reading it if it is not) and keeps it so until
   * the returned release is called.
   */
  async pin(layer: number): Promise<() => void> {
    if (this.dropped) throw conflict(this.dropped);
    const e = this.entries[layer];
    if (!e) throw new RangeError(`document ${this.meta.id} has no layer ${layer}`);
    e.pins++;
    try {
      if (e.segment) this.cache.touch(e);
      else await (e.loading ??= this.load(e).finally(() => (e.loading = undefined)));
      if (this.dropped) throw conflict(this.dropped);
    } catch (err) {
      this.unpin(e);
      throw err;
    }
    let held = true;
    return () => {
      if (held) this.unpin(e);
      held = false;
    };
  }

  /**
   * Reads layers in order while they fit beside what is resident, evicting
   * nothing: a document that fits is whole after its attach (and a damaged
   * block is found there); a larger one reads the rest on use.
   */
  async prefetch(): Promise<void> {
    for (const e of this.entries) {
      if (e.segment) continue;
      if (this.cache.budget.used + this.layerBytes > this.cache.budget.limit) return;
      (await this.pin(e.layer))();
    }
  }

  /** The document was deleted or replaced: its layers go (those being read, once their steps end). */
  drop(why: string): void {
    this.dropped ??= why;
    for (const e of this.entries) if (e.pins === 0) this.cache.evict(e);
  }

  /** Called by the cache when it evicts one of this document's layers. */
  evicted(layer: number, segment: KvSegment): void {
    this.layers[layer] = undefined;
    this.onEvict?.(layer, segment);
  }

  private unpin(e: Entry): void {
    e.pins--;
    if (this.dropped && e.pins === 0) this.cache.evict(e);
  }

  private async load(e: Entry): Promise<void> {
    const { kvHeads, headDim, dtype } = this.meta.model;
    const seg = this.cache.allocate(() => new KvSegment(kvHeads, headDim, dtype, Math.max(1, this.meta.tokens), this.cache.budget, true));
    try {
      await this.read(e.layer, seg);
    } catch (err) {
      seg.release();
      throw err;
    }
    seg.setTokens(this.meta.tokens);
    e.segment = seg;
    this.layers[e.layer] = seg;
    this.cache.add(e);
    this.cache.reads++;
  }
}
