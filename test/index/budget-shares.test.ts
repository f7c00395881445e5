// A session's budget over several documents: each document's share is in
// proportion to its tokens and the shares sum to the budget, so every method
// attends no more than the budget beyond sinks, window and the session's own
// tokens (a share rounded up per document attended up to one more token per
// document: 7 for a budget of 5 over three documents), and the methods that
// keep the top k exactly the budget where the documents hold that many.
import { beforeAll, describe, expect, it } from 'vitest';
import { methodNames } from '../../index/registry.js';
import { budgetShares } from '../../index/static-plus-retrieved.js';
import type { LayerContext } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { tensor, type KvrecallClient } from '../../clients/ts/client.js';
import { blockSummaryBuilder } from '../../index/block-select.js';
import { findMethod } from '../../index/registry.js';
import { questBuilder } from '../../index/quest.js';
import { f32Tensor, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();

/** The segments and offsets of a context of documents of these sizes, then `own` tokens. */
function contextOf(sizes: number[], own = 0): LayerContext {
  const segments = [...sizes, own].map((tokens) => ({ tokens }) as KvSegment);
  const offsets = [...sizes, own].map((_, i) => sizes.slice(0, i).reduce((a, b) => a + b, 0));
  return { segments, offsets, tokens: offsets[offsets.length - 1] + own } as LayerContext;
}

describe(`budget shares (seed ${seed})`, () => {
  it('sum to the budget, each within one token of its proportion, the own tokens none', () => {
    expect(budgetShares(contextOf([1000, 37, 130], 4), 5)).toEqual([4, 0, 1, 0]);
    expect(budgetShares(contextOf([10, 10, 10]), 2)).toEqual([1, 1, 0, 0]); // ties to the earlier document
    expect(budgetShares(contextOf([], 9), 5)).toEqual([0]);
    const rng = new Rng(seed);
    for (let trial = 0; trial < 2000; trial++) {
      const sizes = Array.from({ length: 1 + Math.floor(rng.next() * 6) }, () => 1 + Math.floor(rng.next() * 5000));
      const total = sizes.reduce((a, b) => a + b, 0);
      const budget = Math.floor(rng.next() * 2 * total);
      const shares = budgetShares(contextOf(sizes, 3), budget);
      expect(shares.reduce((a, b) => a + b, 0)).toBe(budget);
      expect(shares[sizes.length]).toBe(0);
      sizes.forEach((n, s) => expect(Math.abs(shares[s] - (budget * n) / total)).toBeLessThan(1));
    }
  });
});

describe(`every method over three documents (seed ${seed})`, () => {
  const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
  const sizes: Record<string, number> = { first: 700, second: 37, third: 130 };
  const total = Object.values(sizes).reduce((a, b) => a + b, 0);
  const live = useServer();
  let client: KvrecallClient;
  beforeAll(async () => {
    client = live.client();
    const rng = new Rng(seed);
    for (const [id, n] of Object.entries(sizes)) {
      await client.createDocument(id, model, { methods: [...methodNames].filter((m) => m !== 'exact'), queryStride: 1 });
      const c = randomKv(rng, 'f16', model.kvHeads, n, model.headDim);
      const q = new Float32Array(model.qHeads * n * model.headDim).map(() => rng.normal());
      await client.uploadDocumentKv(id, { layer: 0, start: 0, k: c.k, v: c.v, q: f32Tensor([model.qHeads, n, model.headDim], q) });
      await client.sealDocument(id);
    }
  });

  it.each([...methodNames].filter((m) => m !== 'exact'))('%s attends at most the budget beyond the static part', async (method) => {
    const rng = new Rng(seed + 1);
    const q = tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
    // Block methods spend whole blocks; squeezed keeps only the clusters past its mass threshold: at most the budget.
    const upTo = [blockSummaryBuilder, questBuilder].includes(findMethod(method)!.builder!) || method.startsWith('squeezed');
    for (const budget of [5, 10, 100, 0.01]) {
      const tokens = budget < 1 ? Math.ceil(budget * total) : budget;
      const sid = (await client.createSession({ model, documents: Object.keys(sizes), method, budget, sinks: 0, window: 0, estimate: false })).id;
      const r = await client.attend(sid, { layer: 0, q, return: ['selection'] });
      for (const ids of r.selection!) {
        expect(new Set(ids).size).toBe(ids.length);
        if (upTo) expect(ids.length).toBeLessThanOrEqual(tokens);
        else expect(ids.length).toBe(tokens);
      }
    }
  });
});
