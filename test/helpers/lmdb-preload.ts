// A document preloaded into an LmdbStore as the server's uploads do it, from
// random K/V bytes per (layer, head) that the store's blocks are checked
// against bit for bit (the storage tests' shared fixture).
import { expect } from 'vitest';
import type { BlockWrite, DocumentMeta } from '../../storage/document-store.js';
import { HostBudget } from '../../storage/host-budget.js';
import type { LmdbStore } from '../../storage/lmdb-store.js';
import type { Rng } from './random.js';

type Model = DocumentMeta['model'] & { blockSize: number };
export type KvSource = { k: Uint8Array; v: Uint8Array }[][];

export function lmdbPreload(model: Model, tokens: number, batch: number) {
  const row = model.headDim * 2, B = model.blockSize, full = Math.floor(tokens / B);
  const meta = (id: string, status: DocumentMeta['status'], n = 0): DocumentMeta =>
    ({ id, model, status, tokens: n, methods: [], queryStride: 4, createdAt: '2026-12-05T00:00:00Z' });

  /** Random K and V bytes per (layer, head). */
  const source = (rng: Rng): KvSource => {
    const bytes = () => Uint8Array.from({ length: tokens * row }, () => rng.int(256));
    return Array.from({ length: model.layers }, () => Array.from({ length: model.kvHeads }, () => ({ k: bytes(), v: bytes() })));
  };

  /** Blocks [from, to) of every (layer, head); the last one short where tokens end. */
  const blocksOf = (src: KvSource, from: number, to: number): BlockWrite[] => {
    const out: BlockWrite[] = [];
    for (let layer = 0; layer < model.layers; layer++)
      for (let block = from; block < to; block++)
        for (let head = 0; head < model.kvHeads; head++) {
          const a = block * B * row, b = Math.min(tokens, (block + 1) * B) * row;
          out.push({ layer, head, block, k: src[layer][head].k.subarray(a, b), v: src[layer][head].v.subarray(a, b) });
        }
    return out;
  };

  /** Every full block in batches, each issued once the one before committed; with `seal`, the tail block and the ready metadata. */
  const preload = async (store: LmdbStore, id: string, src: KvSource, seal = true): Promise<void> => {
    await store.create(meta(id, 'loading'));
    for (let b = 0; b < full; b += batch) await store.writeBlocks(id, blocksOf(src, b, Math.min(full, b + batch)));
    if (seal) await store.seal({ ...meta(id, 'ready', tokens), sealedAt: '2026-12-05T00:00:01Z' }, blocksOf(src, full, full + 1), []);
  };

  /** The stored document's rows equal the source's, every (layer, head). */
  const expectSame = (store: LmdbStore, id: string, src: KvSource): void => {
    const segments = store.load(store.get(id)!, new HostBudget(1 << 30));
    for (let layer = 0; layer < model.layers; layer++)
      for (let head = 0; head < model.kvHeads; head++) {
        const { k, v } = segments[layer].rows(head, 0, tokens);
        expect(Buffer.from(k).equals(Buffer.from(src[layer][head].k)), `layer ${layer} head ${head} K`).toBe(true);
        expect(Buffer.from(v).equals(Buffer.from(src[layer][head].v)), `layer ${layer} head ${head} V`).toBe(true);
      }
  };

  return { meta, source, blocksOf, preload, expectSame };
}
