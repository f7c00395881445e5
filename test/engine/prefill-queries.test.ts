// A session's question rows (PrefillQueries) are read every step (infiniretri
// reads their count, and reads them again for each document and head when
// due): chunks are joined once, then each read hands out that array without
// copying; an array handed out keeps its rows after later adds, and the rows
// are the query heads of each kv head's group, token by token, as sent.
import { describe, expect, it } from 'vitest';
import { PrefillQueries } from '../../engine/document-indexes.js';
import { parseModel } from '../../core/model.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
const model = parseModel({ layers: 2, qHeads: 6, kvHeads: 2, headDim: 5, dtype: 'f16' });
const G = model.qHeads / model.kvHeads, d = model.headDim;

describe(`question rows (seed ${seed})`, () => {
  it('are joined once and read without a copy after; an array read earlier keeps its rows', () => {
    const rng = new Rng(seed);
    const qs = new PrefillQueries(model, 1);
    // Per kv head, the expected rows: token by token, the group's heads in order.
    const expected: number[][] = [[], []];
    const add = (n: number) => {
      const q = Float32Array.from({ length: model.qHeads * n * d }, () => rng.normal()); // [qHeads, n, d]
      for (let h = 0; h < model.kvHeads; h++)
        for (let t = 0; t < n; t++) for (let g = 0; g < G; g++) expected[h].push(...q.subarray(((h * G + g) * n + t) * d, ((h * G + g) * n + t + 1) * d));
      qs.add(1, expected[0].length / (G * d) - n, q, n);
    };
    expect(qs.rows(1, 0).queryCount).toBe(0);
    add(3);
    add(2);
    const first = qs.rows(1, 1);
    expect(first.queryCount).toBe(5 * G);
    expect(Array.from(first.queries)).toEqual(Array.from(Float32Array.from(expected[1])));
    expect(qs.rows(1, 1).queries).toBe(first.queries); // the second read copies nothing
    const kept = Float32Array.from(first.queries);
    add(4);
    const later = qs.rows(1, 1);
    expect(later.queryCount).toBe(9 * G);
    expect(Array.from(later.queries)).toEqual(Array.from(Float32Array.from(expected[1])));
    expect(first.queries).toEqual(kept);
    expect(qs.rows(1, 1).queries).toBe(later.queries);
    expect(Array.from(qs.rows(1, 0).queries)).toEqual(Array.from(Float32Array.from(expected[0])));
    expect(qs.rows(0, 0).queryCount).toBe(0);
  });
});
