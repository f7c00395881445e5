// Partial residency's bookkeeping on its own (engine/resident-layers.ts),
// with a reader that fills each layer with a known pattern and counts its
// reads: eviction in least-recently-used order of the layers no step holds,
// a read refused (over_budget, nothing changed) when every resident layer is
// held, one read for concurrent pins of one layer, a failed read leaving the
// budget as it was. The Redis Cluster version is redis-residency.test.ts.
import { describe, expect, it } from 'vitest';
import { LayerCache, ResidentLayers } from '../../engine/resident-layers.js';
import type { DocumentMeta } from '../../storage/document-store.js';
import { HostBudget } from '../../storage/host-budget.js';
import type { KvSegment } from '../../storage/kv-segment.js';

const model = { layers: 4, qHeads: 4, kvHeads: 2, headDim: 8, dtype: 'f16' as const, blockSize: 128 };
const meta: DocumentMeta = { id: 'doc', model, status: 'ready', tokens: 100, methods: [], createdAt: 'now' };
const LAYER = 100 * 8 * 2 * 2 * 2;

function setup(layersThatFit: number) {
  const budget = new HostBudget(layersThatFit * LAYER + LAYER / 2);
  const cache = new LayerCache(budget);
  const reads: number[] = [];
  let fail: Error | undefined;
  let gate: Promise<void> = Promise.resolve();
  const doc = new ResidentLayers(cache, meta, async (layer: number, into: KvSegment) => {
    reads.push(layer);
    await gate;
    if (fail) throw fail;
    for (let h = 0; h < model.kvHeads; h++) into.k[h].fill(1000 + layer * 10 + h);
  });
  const evicted: number[] = [];
  doc.onEvict = (l) => evicted.push(l);
  const resident = () => doc.layers.map((s, l) => (s ? l : -1)).filter((l) => l >= 0);
  return { budget, cache, doc, reads, evicted, resident, failWith: (e?: Error) => (fail = e), hold: (p: Promise<void>) => (gate = p) };
}

describe('resident document layers', () => {
  it('prefetch reads what fits; a miss evicts the least recently used unheld layer; contents are the layer read', async () => {
    const t = setup(2);
    await t.doc.prefetch();
    expect(t.resident()).toEqual([0, 1]);
    // Touch 1, then 0: layer 1 is now the least recently used (FIFO would evict 0).
    (await t.doc.pin(1))();
    (await t.doc.pin(0))();
    const release = await t.doc.pin(2);
    expect(t.resident()).toEqual([0, 2]);
    expect(t.evicted).toEqual([1]);
    expect(t.doc.layers[2]!.k[1][0]).toBe(1021);
    expect(t.doc.layers[2]!.tokens).toBe(100);
    release();
    // Layer 1 again: read again, evicting 0 (used before 2).
    (await t.doc.pin(1))();
    expect(t.resident()).toEqual([1, 2]);
    expect(t.reads).toEqual([0, 1, 2, 1]);
    expect(t.cache.stats()).toMatchObject({ residentLayers: 2, residentBytes: 2 * LAYER, reads: 4, evictions: 2 });
    expect(t.budget.used).toBe(2 * LAYER);
  });

  it('a layer held by a step is never evicted: with every resident layer held, the read is refused (over_budget) and nothing changes', async () => {
    const t = setup(2);
    const a = await t.doc.pin(0);
    const b = await t.doc.pin(1);
    await expect(t.doc.pin(2)).rejects.toMatchObject({ kind: 'over_budget', message: /being read by a step/ });
    expect(t.resident()).toEqual([0, 1]);
    expect(t.budget.used).toBe(2 * LAYER);
    a();
    a(); // a release twice releases once
    const c = await t.doc.pin(2);
    expect(t.resident()).toEqual([1, 2]);
    b();
    c();
  });

  it('concurrent steps on a layer not resident share one read; a failed read returns its bytes and the next step reads again', async () => {
    const t = setup(2);
    let open!: () => void;
    t.hold(new Promise<void>((r) => (open = r)));
    const pins = [t.doc.pin(3), t.doc.pin(3), t.doc.pin(3)];
    await new Promise((r) => setTimeout(r, 10));
    expect(t.budget.used).toBe(LAYER); // reserved while it reads, once
    open();
    for (const release of await Promise.all(pins)) release();
    expect(t.reads).toEqual([3]);
    t.failWith(new Error('block 7 fails its checksum'));
    await expect(t.doc.pin(0)).rejects.toThrow(/checksum/);
    expect(t.budget.used).toBe(LAYER);
    expect(t.resident()).toEqual([3]);
    t.failWith(undefined);
    (await t.doc.pin(0))();
    expect(t.resident()).toEqual([0, 3]);
  });

  it('a dropped document (deleted or replaced) frees its layers once no step holds them, and refuses new steps', async () => {
    const t = setup(3);
    await t.doc.prefetch();
    const held = await t.doc.pin(1);
    t.doc.drop('document doc was deleted');
    expect(t.resident()).toEqual([1]);
    await expect(t.doc.pin(0)).rejects.toMatchObject({ kind: 'conflict', message: 'document doc was deleted' });
    held();
    expect(t.resident()).toEqual([]);
    expect(t.budget.used).toBe(0);
  });
});
