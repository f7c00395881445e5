// SessionCache.attend with a part whose rows a device store holds
// (index/method.ts DeviceRows: a key scanner's store with values, which
// attends retrieval-attention's selected rows where they live; the device's
// kernel is checked against float64 in test/native/ra-scan-gpu.test.ts on a
// GPU). Here the store is a stand-in answering float64 attention over the
// rows it is given, so that the test checks what the residency does with
// it: the part is handed to the store with the same segment's ranges (sinks,
// window) as one id list a head (every q row, the group and scale), the
// other parts (the own tokens) are attended as before, and the step is
// float64 attention over every part's rows; a store that no longer holds the
// rows (undefined) leaves them to the host, with the same answer.
import { describe, expect, it } from 'vitest';
import { SessionCache } from '../../engine/cache/residency.js';
import type { DeviceRows, SelectionPart } from '../../index/method.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`residency-device-rows: seed ${seed}`);
const m = { layers: 1, qHeads: 8, kvHeads: 4, headDim: 32, dtype: 'f16' as const, blockSize: 64 };
const { qHeads, kvHeads, headDim: d } = m;
const G = qHeads / kvHeads, DOC = 500, OWN = 7;

function segmentOf(c: KvChunk, n: number): KvSegment {
  const s = new KvSegment(kvHeads, d, 'f16');
  s.append(c.k.data, c.v.data, 'f16', n);
  return s;
}

/** A store holding the document's rows: float64 attention over the rows asked for, or undefined when `gone`. */
class StandInRows implements DeviceRows {
  calls: { ids: Int32Array[]; ranges: number[]; group: number; scale: number }[] = [];
  gone = false;
  constructor(private readonly doc: KvChunk) {}
  async attend(listed: readonly Int32Array[], q: Float32Array, group: number, scale: number, ranges?: Int32Array) {
    // The ranges' rows first, then each head's list, as the device's store gathers them.
    const steady = Array.from({ length: (ranges?.length ?? 0) / 2 }, (_, r) => Array.from({ length: ranges![2 * r + 1] - ranges![2 * r] }, (_, i) => ranges![2 * r] + i)).flat();
    const ids = listed.map((l) => Int32Array.from([...steady, ...l]));
    this.calls.push({ ids, ranges: Array.from(ranges ?? []), group, scale });
    if (this.gone) return undefined;
    const ref = referenceAttention(q, this.doc.kValues, this.doc.vValues, ids.length * group, d, scale, ids.map((x) => Array.from(x)));
    return { out: Float32Array.from(ref.out), lse: Float32Array.from(ref.lse) };
  }
}

describe('a part whose rows a device store holds', () => {
  it("is attended by the store and merged with the other parts: float64 attention over every part's rows, or the host's where the store no longer holds them", async () => {
    const rng = new Rng(seed);
    const docChunk = randomKv(rng, 'f16', kvHeads, DOC, d), ownChunk = randomKv(rng, 'f16', kvHeads, OWN, d);
    const doc = segmentOf(docChunk, DOC), own = segmentOf(ownChunk, OWN);
    const rows = new StandInRows(docChunk);
    // Per kv head: sinks and a window (ranges), the retrieved rows on the device (head 3 none), the own tokens.
    const picked = [[40, 41, 300, 17], [99], [250, 260, 270], []];
    const parts: SelectionPart[] = [
      { segment: doc, begin: 0, end: 4 },
      { segment: doc, begin: DOC - 16, end: DOC },
      { segment: doc, ids: picked.map((x) => Int32Array.from(x)), device: rows },
      { segment: own, begin: 0, end: OWN },
    ];
    const cache = new SessionCache(m, [own]);
    const kAll = concatValues([docChunk, ownChunk], 'kValues'), vAll = concatValues([docChunk, ownChunk], 'vValues');
    const every = Array.from({ length: kvHeads }, (_, h) => [
      ...[0, 1, 2, 3],
      ...Array.from({ length: 16 }, (_, i) => DOC - 16 + i),
      ...picked[h],
      ...Array.from({ length: OWN }, (_, i) => DOC + i),
    ]);
    for (const gone of [false, true]) {
      rows.gone = gone;
      const q = randomQ(rng, qHeads, d), scale = 1 / Math.sqrt(d);
      const out = new Float32Array(qHeads * d).fill(NaN), lse = new Float32Array(qHeads).fill(NaN);
      const r = await cache.attend(parts, { layer: 0, q, scale, out, lse });
      // Where the store attended, the step ran on the device; where it did not, every part on the host.
      expect(r.backend).toBe(gone ? 'cpu' : 'cuda');
      // The store is asked for the same segment's ranges (sinks, window) with the listed rows; the own tokens stay.
      const call = rows.calls.at(-1)!;
      const steady = [0, 1, 2, 3, ...Array.from({ length: 16 }, (_, i) => DOC - 16 + i)];
      expect(call.ids.map((x) => Array.from(x))).toEqual(picked.map((ids) => [...steady, ...ids]));
      // As [begin, end) pairs, the store expanding them: the residency makes no id arrays of them.
      expect(call.ranges).toEqual([0, 4, DOC - 16, DOC]);
      expect([call.group, call.scale]).toEqual([G, scale]);
      const ref = referenceAttention(q, kAll, vAll, qHeads, d, scale, every);
      expect(maxRelError(out, ref.out, qHeads)).toBeLessThan(1e-4);
      expect(maxRelErrorScalar(lse, ref.lse)).toBeLessThan(1e-4);
    }
    expect(rows.calls.length).toBe(2);

    // Two documents: the store takes only its own segment's ranges.
    const other = segmentOf(randomKv(rng, 'f16', kvHeads, 50, d), 50);
    await cache.attend([{ segment: other, begin: 0, end: 4 }, ...parts], { layer: 0, q: randomQ(rng, qHeads, d), scale: 0.2, out: new Float32Array(qHeads * d), lse: new Float32Array(qHeads) });
    expect(rows.calls.at(-1)!.ids[0].length).toBe(4 + 16 + picked[0].length);

    // Only the device's part: a head with no rows there is out 0, lse −∞ (the others float64's).
    rows.gone = false;
    const q = randomQ(rng, qHeads, d), out = new Float32Array(qHeads * d).fill(NaN), lse = new Float32Array(qHeads).fill(NaN);
    await cache.attend([parts[2]], { layer: 0, q, scale: 0.2, out, lse });
    const ref = referenceAttention(q, concatValues([docChunk], 'kValues'), concatValues([docChunk], 'vValues'), qHeads, d, 0.2, picked);
    for (let qh = 0; qh < qHeads; qh++) {
      if (qh >= 3 * G) {
        expect(lse[qh]).toBe(-Infinity);
        expect(out.subarray(qh * d, (qh + 1) * d).every((x) => x === 0)).toBe(true);
        continue;
      }
      expect(Math.abs(lse[qh] - ref.lse[qh])).toBeLessThan(1e-4 * Math.max(1, Math.abs(ref.lse[qh])));
    }
    expect(maxRelError(out.subarray(0, 3 * G * d), ref.out.subarray(0, 3 * G * d), 3 * G)).toBeLessThan(1e-4);
  });
});
