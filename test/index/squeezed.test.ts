// Squeezed Attention (`squeezed`, `squeezed-2l`) beyond the conformance suite:
//  - a kept fraction of 100% returns every token, so attention equals exact;
//  - on clustered keys the kept clusters are the query's cluster and hold far
//    more attention than their share of the tokens;
//  - the calibrated thresholds keep about the target fraction on held-out queries;
//  - two levels score far fewer centroids than one at 64K tokens, with similar recall;
//  - corrupt artifacts are rejected;
//  - the SIMD scoring kernel matches float64 dot products.
import { beforeAll, describe, expect, it } from 'vitest';
import { bytesOf, convert } from '../../addon/kernels.js';
import type { HeadKeys } from '../../index/method.js';
import { DotKernel, paddedStride } from '../../index/simd-dot.js';
import { squeezedBuilder, type SqueezedHead } from '../../index/squeezed/index.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`squeezed: seed ${seed}`);

interface Data extends HeadKeys {
  /** Decoded keys (exact f16 values). */
  decoded: Float32Array;
  labels: Int32Array;
  centers: Float32Array;
  K: number;
}

/** Keys from K Gaussian clusters: 2·center + N(0, 1), stored f16. K = 0: plain N(0, 1). */
function makeKeys(rng: Rng, n: number, d: number, K: number): Data {
  const centers = new Float32Array(K * d).map(() => rng.normal());
  const labels = new Int32Array(n), raw = new Float32Array(n * d);
  for (let i = 0; i < n; i++) {
    const c = K ? rng.int(K) : 0;
    labels[i] = c;
    for (let j = 0; j < d; j++) raw[i * d + j] = (K ? 2 * centers[c * d + j] : 0) + rng.normal();
  }
  const keys = new Uint16Array(n * d), decoded = new Float32Array(n * d);
  convert(bytesOf(raw), 'f32', bytesOf(keys), 'f16', n * d);
  convert(bytesOf(keys), 'f16', bytesOf(decoded), 'f32', n * d);
  return { keys, tokens: n, headDim: d, dtype: 'f16', decoded, labels, centers, K };
}

/** A query group [G, d] aligned with cluster c: 1.5·center + N(0, 0.7²) per head. */
function alignedQuery(rng: Rng, data: Data, c: number, G: number): Float32Array {
  const d = data.headDim, q = new Float32Array(G * d);
  for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) q[g * d + j] = 1.5 * data.centers[c * d + j] + 0.7 * rng.normal();
  return q;
}

/** Prefill-like query rows [count, G, d] flattened, as PrefillQueries lays them out. */
function queryRows(rng: Rng, data: Data, count: number, G: number): Float32Array {
  const d = data.headDim, rows = new Float32Array(count * G * d);
  for (let i = 0; i < count; i++) rows.set(alignedQuery(rng, data, rng.int(data.K), G), i * G * d);
  return rows;
}

/** Attention recall: Σ p_i over ids, per query head, averaged over the group; float64 from the decoded keys. */
function attentionRecall(data: Data, q: Float32Array, G: number, ids: Int32Array): number {
  const { tokens: n, headDim: d, decoded: values } = data, scale = 1 / Math.sqrt(d), s = new Float64Array(n);
  let recall = 0;
  for (let g = 0; g < G; g++) {
    let m = -Infinity;
    for (let i = 0; i < n; i++) {
      let dot = 0;
      for (let j = 0; j < d; j++) dot += q[g * d + j] * values[i * d + j];
      s[i] = dot * scale;
      if (s[i] > m) m = s[i];
    }
    let z = 0, kept = 0;
    for (let i = 0; i < n; i++) z += Math.exp(s[i] - m);
    for (const id of ids) kept += Math.exp(s[id] - m);
    recall += kept / z / G;
  }
  return recall;
}

const build = async (levels: 1 | 2, data: Data, queries: Float32Array, queryCount: number) => {
  const b = squeezedBuilder({ levels });
  const bytes = await b.build({ ...data, queries, queryCount });
  return { bytes, head: b.load(bytes, data), info: b.lastBuild!, builder: b };
};

describe('squeezed', () => {
  const rng = new Rng(seed);

  it('the SIMD kernel scores like float64 dot products (any d, any group)', () => {
    for (const [n, d, G] of [[1, 4, 1], [7, 30, 2], [33, 128, 3], [64, 64, 4], [50, 36, 7], [9, 128, 9]]) {
      const s = paddedStride(d), q = (n + 1) * s, out = q + 12 * s;
      const k = new DotKernel(out + 4 * (n + 2));
      const rows = Float64Array.from({ length: n * d }, () => rng.normal());
      const qs = Float64Array.from({ length: G * d }, () => rng.normal());
      for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) k.f32[i * s + j] = rows[i * d + j];
      for (let g = 0; g < G; g++) for (let j = 0; j < d; j++) k.f32[q + g * s + j] = qs[g * d + j];
      const dot = (i: number, g: number) => {
        let t = 0;
        for (let j = 0; j < d; j++) t += Math.fround(rows[i * d + j]) * Math.fround(qs[g * d + j]);
        return t;
      };
      k.maxDots(0, n, s, q, G, out);
      for (let i = 0; i < n; i++) {
        const want = Math.max(...Array.from({ length: G }, (_, g) => dot(i, g)));
        expect(Math.abs(k.f32[out + i] - want)).toBeLessThan(1e-4 * Math.sqrt(d));
      }
      k.dots4(0, n, s, q, out);
      for (let i = 0; i < n; i++) for (let g = 0; g < Math.min(G, 4); g++) expect(Math.abs(k.f32[out + 4 * i + g] - dot(i, g))).toBeLessThan(1e-4 * Math.sqrt(d));
    }
  });

  it.each([1, 2] as const)('levels %i: a kept fraction of 100%% returns every token, so attention is exact', async (levels) => {
    const n = 3000, d = 64, data = makeKeys(rng, n, d, 0);
    const rows = Float32Array.from({ length: 64 * 4 * d }, () => rng.normal());
    const { head } = await build(levels, data, rows, 64 * 4);
    const values = [Float64Array.from(data.decoded)];
    for (const G of [1, 3, 4, 7]) {
      const q = Float32Array.from({ length: G * d }, () => 2 * rng.normal());
      const r = head.search(q, G, n, n);
      expect(r.ids.length).toBe(n);
      expect(Array.from(r.ids).sort((a, b) => a - b)).toEqual(Array.from({ length: n }, (_, i) => i));
      expect(head.lastSearch.fraction).toBe(1);
      // Attention over the returned ids is attention over every token.
      const ids = Array.from(r.ids);
      const exact = referenceAttention(q, values, values, G, d);
      const got = referenceAttention(q, values, values, G, d, 1 / Math.sqrt(d), [ids]);
      for (let i = 0; i < exact.out.length; i++) expect(Math.abs(got.out[i] - exact.out[i])).toBeLessThan(1e-12);
      // Above half the tokens the table's 100% row keeps every cluster, by mass, cut at k.
      const k = Math.floor(0.7 * n);
      const part = head.search(q, G, k, k).ids;
      expect(new Set(part).size).toBe(k);
    }
  });

  describe('on 8 Gaussian clusters (16K tokens, d = 128, G = 4)', () => {
    const n = 16384, d = 128, G = 4;
    let data: Data;
    const heads: Partial<Record<1 | 2, SqueezedHead>> = {};
    beforeAll(async () => {
      data = makeKeys(rng, n, d, 8);
      const rows = queryRows(rng, data, 512, G);
      for (const levels of [1, 2] as const) heads[levels] = (await build(levels, data, rows, 512 * G)).head;
    });

    it.each([1, 2] as const)('levels %i: the kept clusters are the aligned cluster, recall at 5% far above 5%', (levels) => {
      const head = heads[levels]!, k = Math.round(0.05 * n);
      let recall = 0;
      for (let c = 0; c < 8; c++) {
        const q = alignedQuery(rng, data, c, G);
        const ids = head.search(q, G, k, k).ids;
        expect(ids.length).toBeGreaterThan(0);
        expect(data.labels[ids[0]]).toBe(c);
        const aligned = Array.from(ids).filter((id) => data.labels[id] === c).length;
        expect(aligned / ids.length).toBeGreaterThan(0.95);
        recall += attentionRecall(data, q, G, ids) / 8;
      }
      console.log(`levels ${levels}: attention recall at 5% kept: ${recall.toFixed(3)}`);
      expect(recall).toBeGreaterThan(0.25);
    });

    it.each([1, 2] as const)('levels %i: calibration keeps about the target fraction on held-out queries', (levels) => {
      const head = heads[levels]!;
      const held = Array.from({ length: 48 }, () => alignedQuery(rng, data, rng.int(8), G));
      for (const target of [0.01, 0.03, 0.05, 0.1, 0.2]) {
        let kept = 0;
        for (const q of held) {
          head.search(q, G, Math.round(target * n), 0);
          expect(head.lastSearch.fraction).toBeCloseTo(target, 6);
          kept += head.lastSearch.tokensKept / n / held.length;
        }
        console.log(`levels ${levels}: target ${target}: kept ${kept.toFixed(4)}`);
        expect(kept).toBeGreaterThan(0.5 * target);
        expect(kept).toBeLessThan(1.5 * target);
      }
    });

    it('without prefill queries, calibrates on keys as pseudo-queries', async () => {
      const { head, info } = await build(1, data, new Float32Array(0), 0);
      expect(info.calibration).toBe('keys');
      expect(head.calibration).toBe('keys');
      const q = alignedQuery(rng, data, 3, G), k = Math.round(0.03 * n);
      const ids = head.search(q, G, k, k).ids;
      expect(ids.length).toBeGreaterThan(0);
      expect(ids.length).toBeLessThanOrEqual(k);
      console.log(`pseudo-query calibration: kept ${(head.lastSearch.tokensKept / n).toFixed(4)} for a 3% target on an aligned query`);
    });
  });

  it('two levels score far fewer centroids than one at 64K tokens, with similar recall', async () => {
    const n = 65536, d = 128, G = 4, data = makeKeys(rng, n, d, 8);
    const rows = queryRows(rng, data, 256, G);
    const one = await build(1, data, rows, 256 * G), two = await build(2, data, rows, 256 * G);
    for (const b of [one, two]) console.log(`levels ${b.head.levels}: build ${b.info.ms.toFixed(0)} ms (k-means ${b.info.kmeansMs.toFixed(0)} ms, calibration ${b.info.calibrationMs.toFixed(0)} ms), ${b.info.clusters} clusters, ${b.info.coarse} coarse, ${b.bytes.length} bytes`);
    const queries = Array.from({ length: 8 }, (_, i) => alignedQuery(rng, data, i, G));
    for (const target of [0.01, 0.03, 0.1]) {
      const k = Math.round(target * n), stats = [one.head, two.head].map((head) => {
        let centroids = 0, recall = 0;
        for (const q of queries) {
          const ids = head.search(q, G, k, k).ids;
          centroids += head.lastSearch.centroids / queries.length;
          recall += attentionRecall(data, q, G, ids) / queries.length;
        }
        const t0 = performance.now();
        for (let r = 0; r < 50; r++) head.search(queries[r % queries.length], G, k, k);
        return { centroids, recall, ms: (performance.now() - t0) / 50 };
      });
      const [a, b] = stats;
      console.log(
        `${target * 100}% kept: one level ${a.centroids.toFixed(0)} centroids, recall ${a.recall.toFixed(3)}, ${a.ms.toFixed(3)} ms; ` +
          `two levels ${b.centroids.toFixed(0)} centroids, recall ${b.recall.toFixed(3)}, ${b.ms.toFixed(3)} ms`,
      );
      if (target <= 0.03) expect(b.centroids).toBeLessThan(a.centroids / 4);
      expect(b.recall).toBeGreaterThan(a.recall - 0.05);
    }
  }, 180_000);

  it('rejects corrupt artifacts', async () => {
    const n = 2000, d = 32, data = makeKeys(rng, n, d, 4);
    const { bytes, builder } = await build(1, data, new Float32Array(0), 0);
    const two = squeezedBuilder({ levels: 2 });
    expect(() => builder.load(bytes, data)).not.toThrow();
    const flip = (at: number) => {
      const b = bytes.slice();
      b[at] ^= 0x40;
      return b;
    };
    const bad: [string, Uint8Array, HeadKeys][] = [
      ['empty', new Uint8Array(0), data],
      ['truncated', bytes.subarray(0, bytes.length - 4), data],
      ['extended', Uint8Array.from([...bytes, 0, 0, 0, 0]), data],
      ['magic', flip(0), data],
      ['version', flip(4), data],
      ['cluster count', flip(16), data],
      ['a flipped bit in the body', flip(bytes.length - 100), data],
      ['a flipped bit in the tables', flip(56 + 300), data],
      ['other keys', bytes, { ...data, tokens: n - 1, keys: data.keys.subarray(0, (n - 1) * d) }],
    ];
    for (const [what, b, keys] of bad) expect(() => builder.load(b, keys), what).toThrow(/squeezed: corrupt index artifact/);
    expect(() => two.load(bytes, data)).toThrow(/1-level index/);
    // Misaligned but intact bytes load.
    const shifted = new Uint8Array(bytes.length + 1);
    shifted.set(bytes, 1);
    expect(() => builder.load(shifted.subarray(1), data)).not.toThrow();
  });
});
