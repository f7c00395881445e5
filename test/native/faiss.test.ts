// The faiss-backed natives (IVF-Flat index, k-means) against float64
// references and the native exact top-k, at odd sizes.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { IvfIndex, kmeans } from '../../addon/faiss.js';
import { topk } from '../../addon/kernels.js';
import { bitsOf, valueOf, type Dt } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`native faiss tests: seed ${seed}`);

/** Keys N(offset_j, 1) per channel j (offset 0 unless given). */
function keysOf(rng: Rng, dt: Dt, n: number, d: number, offset?: number[]) {
  const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
  for (let i = 0; i < n * d; i++) {
    bits[i] = bitsOf(dt)((offset ? offset[i % d] : 0) + rng.normal());
    values[i] = valueOf(dt)(bits[i]);
  }
  return { bits, values };
}

/** Float64 score of every key: max over the group's rows of q·k. */
function exactScores(q: Float32Array, group: number, values: Float64Array, n: number, d: number): Float64Array {
  const s = new Float64Array(n).fill(-Infinity);
  for (let i = 0; i < n; i++)
    for (let g = 0; g < group; g++) {
      let dot = 0;
      for (let j = 0; j < d; j++) dot += q[g * d + j] * values[i * d + j];
      if (dot > s[i]) s[i] = dot;
    }
  return s;
}

/**
 * Checks that (ids, scores) is the top-k of `exact`: every score is its id's
 * exact score, scores descend, and the id set is the exact top-k except for
 * keys tied with the k-th within rounding.
 */
function expectTopK(ids: Int32Array, scores: Float32Array, count: number, exact: Float64Array, k: number) {
  const tol = (s: number) => 1e-4 * (1 + Math.abs(s));
  const order = Array.from(exact.keys()).sort((a, b) => exact[b] - exact[a] || a - b);
  expect(count).toBe(Math.min(k, exact.length));
  const kth = exact[order[count - 1]];
  const got = new Set<number>();
  for (let i = 0; i < count; i++) {
    expect(Math.abs(scores[i] - exact[ids[i]])).toBeLessThan(tol(scores[i]));
    if (i > 0) expect(scores[i]).toBeLessThanOrEqual(scores[i - 1]);
    expect(exact[ids[i]]).toBeGreaterThan(kth - tol(kth));
    got.add(ids[i]);
  }
  expect(got.size).toBe(count);
  for (const id of order.slice(0, count)) if (exact[id] > kth + tol(kth)) expect(got.has(id)).toBe(true);
}

/** The envelope hash of native/indexes/ivf_index.cc, to forge intact envelopes around bad payloads. */
function hash64(p: Uint8Array): bigint {
  const M = (1n << 64n) - 1n;
  const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
  let h = 0x9e3779b97f4a7c15n ^ BigInt(p.length);
  let i = 0;
  for (; i + 8 <= p.length; i += 8) {
    h = ((h ^ dv.getBigUint64(i, true)) * 0xff51afd7ed558ccdn) & M;
    h ^= h >> 32n;
  }
  for (; i < p.length; i++) h = ((h ^ BigInt(p[i])) * 0x100000001b3n) & M;
  h ^= h >> 33n;
  h = (h * 0xc4ceb9fe1a85ec53n) & M;
  return h ^ (h >> 33n);
}

function envelope(payload: Uint8Array, magic = 'KVRIVF02'): Uint8Array {
  const out = new Uint8Array(24 + payload.length);
  out.set(new TextEncoder().encode(magic));
  const dv = new DataView(out.buffer);
  dv.setBigUint64(8, BigInt(payload.length), true);
  dv.setBigUint64(16, hash64(payload), true);
  out.set(payload, 24);
  return out;
}

function search(index: IvfIndex, q: Float32Array, group: number, k: number, nprobe: number, scan?: 'native' | 'faiss') {
  const outIds = new Int32Array(k), outScores = new Float32Array(k);
  const r = index.search({ q, group, k, nprobe, outIds, outScores, scan });
  return { ...r, ids: outIds, scores: outScores };
}

describe('native IvfIndex', () => {
  const [n, d, group, nlist, k] = [5003, 40, 4, 71, 57];

  for (const dt of ['f16', 'bf16'] as const)
    it(`with nprobe = nlist returns the exact top-k (${dt}, n=${n}, d=${d}, G=${group})`, async () => {
      const rng = new Rng(seed + (dt === 'f16' ? 1 : 2));
      // An offset per channel larger than the spread, as a model's keys have: the index holds the keys less
      // their mean, and its scores must still be q·k.
      const offset = Array.from({ length: d }, () => 3 * rng.normal());
      const { bits, values } = keysOf(rng, dt, n, d, offset);
      const index = await IvfIndex.build({ keys: bits, tokens: n, headDim: d, dtype: dt, nlist, seed: 7 });
      expect([index.tokens, index.headDim, index.nlist]).toEqual([n, d, nlist]);
      expect(index.memoryBytes).toBe(n * (d * 4 + 8) + (nlist + 1) * d * 4);
      for (let trial = 0; trial < 3; trial++) {
        const q = Float32Array.from({ length: group * d }, () => rng.normal() * (1 + trial));
        const exact = exactScores(q, group, values, n, d);
        const got = search(index, q, group, k, nlist);
        expect(got.scanned).toBe(group * n);
        expectTopK(got.ids, got.scores, got.count, exact, k);
        const viaFaiss = search(index, q, group, k, nlist, 'faiss');
        expect(viaFaiss.scanned).toBe(group * n);
        expectTopK(viaFaiss.ids, viaFaiss.scores, viaFaiss.count, exact, k);

        const outIds = new Int32Array(k), outScores = new Float32Array(k);
        const c = await topk({ q, group, headDim: d, keys: bits, tokens: n, dtype: dt, k, outIds, outScores });
        expectTopK(outIds, outScores, c, exact, k);
        // Same ids as the native exact scan, unless two keys tie within f32 rounding.
        const same = got.ids.filter((id, i) => id === outIds[i]).length;
        expect(same).toBeGreaterThanOrEqual(k - 2);
      }
      index.dispose();
      expect(index.memoryBytes).toBe(0);
      expect(() => index.save()).toThrow(/disposed/);
    });

  it("with aggregate 'attention' and nprobe = nlist returns the exact top-k of the group's summed probabilities", async () => {
    // Rows of unequal norms: the max over the rows of q·k follows the largest row, the group's attention does not.
    const rng = new Rng(seed + 11);
    const offset = Array.from({ length: d }, () => 2 * rng.normal());
    const { bits, values } = keysOf(rng, 'f16', n, d, offset);
    const index = await IvfIndex.build({ keys: bits, tokens: n, headDim: d, dtype: 'f16', nlist, seed: 3 });
    const scale = 1 / Math.sqrt(d);
    let differs = 0;
    for (let trial = 0; trial < 3; trial++) {
      const q = Float32Array.from({ length: group * d }, (_, i) => rng.normal() * [0.3, 0.6, 1.2, 2.4][Math.floor(i / d)]);
      // Float64: each row's logits over every key, its log-partition, and the key's summed probability.
      const mass = new Float64Array(n);
      for (let g = 0; g < group; g++) {
        const logit = new Float64Array(n);
        for (let i = 0; i < n; i++) {
          let dot = 0;
          for (let j = 0; j < d; j++) dot += q[g * d + j] * values[i * d + j];
          logit[i] = scale * dot;
        }
        const m = Math.max(...logit);
        const lse = m + Math.log(logit.reduce((acc, x) => acc + Math.exp(x - m), 0));
        for (let i = 0; i < n; i++) mass[i] += Math.exp(logit[i] - lse);
      }
      const exact = mass.map(Math.log);
      const got = search(index, q, group, k, nlist);
      const att = index.search({ q, group, k, nprobe: nlist, outIds: new Int32Array(k), outScores: new Float32Array(k), aggregate: 'attention' });
      expect(att.scanned).toBe(group * n); // every list probed: nothing sampled
      const ids = new Int32Array(k), scores = new Float32Array(k);
      const r = index.search({ q, group, k, nprobe: nlist, outIds: ids, outScores: scores, aggregate: 'attention', scale });
      expect(r.count).toBe(k);
      expectTopK(ids, scores, r.count, exact, k);
      differs += k - got.ids.filter((id) => new Set(ids).has(id)).length;
    }
    expect(differs).toBeGreaterThan(0); // the max ranking picks other keys: the test tells the two apart
    // With fewer probes the sampled rest of each row's lists is scored too, and the ranking stays near exact.
    const q = Float32Array.from({ length: group * d }, () => rng.normal());
    const few = search(index, q, group, k, 9);
    const att = index.search({ q, group, k, nprobe: 9, outIds: new Int32Array(k), outScores: new Float32Array(k), aggregate: 'attention' });
    expect(att.scanned).toBeGreaterThan(few.scanned);
    expect(att.scanned).toBeLessThan(few.scanned + group * Math.ceil(n / 32) + group * nlist);
    const qArgs = { q, group, k, nprobe: 9, outIds: new Int32Array(k), outScores: new Float32Array(k) };
    expect(() => index.search({ ...qArgs, aggregate: 'attention', scan: 'faiss' })).toThrow(RangeError);
    expect(() => index.search({ ...qArgs, aggregate: 'attention', scale: 0 })).toThrow(RangeError);
    expect(() => index.search({ ...qArgs, aggregate: 'attention', scale: NaN })).toThrow(RangeError);
    expect(() => index.search({ ...qArgs, aggregate: 'attention', scale: 1e-50 })).toThrow(RangeError); // 0 as a float
    expect(() => index.search({ ...qArgs, aggregate: 'attention', scale: 1e39 })).toThrow(RangeError); // inf as a float
    expect(() => index.search({ ...qArgs, scale: 0.5 })).toThrow(TypeError);
    expect(() => index.search({ ...qArgs, aggregate: 'sum' as 'max' })).toThrow(TypeError);
  });

  it('scores exactly what it probes, and scans less with fewer probes', async () => {
    const rng = new Rng(seed + 3);
    const { bits, values } = keysOf(rng, 'f16', n, d);
    const index = await IvfIndex.build({ keys: bits, tokens: n, headDim: d, dtype: 'f16', nlist, seed: 11 });
    const q = Float32Array.from({ length: group * d }, () => rng.normal());
    const exact = exactScores(q, group, values, n, d);
    let last = 0;
    for (const nprobe of [1, 4, 16, nlist]) {
      const got = search(index, q, group, k, nprobe);
      expect(got.scanned).toBeGreaterThan(last);
      expect(got.scanned).toBeLessThanOrEqual(group * n);
      last = got.scanned;
      expect(got.count).toBeGreaterThan(0);
      expect(got.count).toBeLessThanOrEqual(k);
      for (let i = 0; i < got.count; i++) {
        // A probed key's reported score is the max over the rows that probed
        // its list, so at most its exact score.
        expect(got.scores[i]).toBeLessThanOrEqual(exact[got.ids[i]] + 1e-4 * (1 + Math.abs(exact[got.ids[i]])));
        if (i > 0) expect(got.scores[i]).toBeLessThanOrEqual(got.scores[i - 1]);
      }
      expect(new Set(got.ids.subarray(0, got.count)).size).toBe(got.count);
    }
    // The native scan and faiss's own search probe the same lists and rank
    // the same keys (a centroid tie within f32 rounding could swap a list).
    let same = 0, cases = 0;
    for (let t = 0; t < 6; t++) {
      const qt = Float32Array.from({ length: group * d }, () => rng.normal());
      for (const nprobe of [1, 3, 17]) {
        const a = search(index, qt, group, k, nprobe), b = search(index, qt, group, k, nprobe, 'faiss');
        cases++;
        if (a.scanned === b.scanned && a.count === b.count && a.ids.every((id, i) => id === b.ids[i])) {
          same++;
          for (let i = 0; i < a.count; i++) expect(Math.abs(a.scores[i] - b.scores[i])).toBeLessThan(1e-4 * (1 + Math.abs(a.scores[i])));
        }
      }
    }
    expect(same).toBeGreaterThanOrEqual(cases - 2);
    // k beyond the keys: every key once.
    const small = await IvfIndex.build({ keys: bits.subarray(0, 30 * d), tokens: 30, headDim: d, dtype: 'f16', nlist: 3, seed: 1 });
    const all = search(small, q, group, 100, 3);
    expect(all.count).toBe(30);
    expect([...all.ids.subarray(0, 30)].sort((a, b) => a - b)).toEqual(Array.from({ length: 30 }, (_, i) => i));
  });

  it('is deterministic for a seed and round-trips through save/load', async () => {
    const rng = new Rng(seed + 4);
    const { bits } = keysOf(rng, 'bf16', n, d);
    const args = { keys: bits, tokens: n, headDim: d, dtype: 'bf16' as const, nlist, seed: 5 };
    const a = await IvfIndex.build(args), b = await IvfIndex.build(args);
    const bytes = a.save();
    expect(Buffer.from(b.save()).equals(Buffer.from(bytes))).toBe(true);
    const loaded = IvfIndex.load(bytes);
    expect([loaded.tokens, loaded.headDim, loaded.nlist]).toEqual([n, d, nlist]);
    expect(Buffer.from(loaded.save()).equals(Buffer.from(bytes))).toBe(true);
    for (const nprobe of [1, 3, 17, nlist]) {
      const q = Float32Array.from({ length: group * d }, () => rng.normal());
      const x = search(a, q, group, k, nprobe), y = search(loaded, q, group, k, nprobe);
      expect(y.count).toBe(x.count);
      expect(y.scanned).toBe(x.scanned);
      expect(y.ids).toEqual(x.ids);
      expect(y.scores).toEqual(x.scores);
    }
  });

  it('loads a version 1 index (uncentred, no mean) as one with a zero mean', async () => {
    // A v1 payload is faiss's bytes alone; a v2 one's without its trailing mean, under a v1 envelope, is such
    // an index over the centred keys: its scores are q·(k - mean), the ranking of each row unchanged.
    const rng = new Rng(seed + 10);
    const [m, dim] = [1201, 20];
    const offset = Array.from({ length: dim }, () => 2 * rng.normal());
    const { bits, values } = keysOf(rng, 'f16', m, dim, offset);
    const index = await IvfIndex.build({ keys: bits, tokens: m, headDim: dim, dtype: 'f16', nlist: 9, seed: 4 });
    const payload = index.save().subarray(24);
    const v1 = IvfIndex.load(envelope(payload.subarray(0, payload.length - 4 * dim), 'KVRIVF01'));
    expect([v1.tokens, v1.headDim, v1.nlist]).toEqual([m, dim, 9]);
    const mean = new Float64Array(dim);
    for (let i = 0; i < m * dim; i++) mean[i % dim] += values[i] / m;
    for (let t = 0; t < 3; t++) {
      const q = Float32Array.from({ length: dim }, () => rng.normal());
      const qMean = q.reduce((acc, x, j) => acc + x * mean[j], 0);
      const a = search(index, q, 1, 40, 9), b = search(v1, q, 1, 40, 9);
      expect(b.ids).toEqual(a.ids);
      for (let i = 0; i < 40; i++) expect(Math.abs(b.scores[i] + qMean - a.scores[i])).toBeLessThan(1e-4 * (1 + Math.abs(a.scores[i])));
    }
    // A v2 envelope without the mean's bytes is not an index.
    expect(() => IvfIndex.load(envelope(payload.subarray(0, payload.length - 4 * dim)))).toThrow(/corrupt IVF index/);
  });

  it('rejects corrupt bytes with an error', async () => {
    const rng = new Rng(seed + 5);
    const { bits } = keysOf(rng, 'f16', 1009, 24);
    const index = await IvfIndex.build({ keys: bits, tokens: 1009, headDim: 24, dtype: 'f16', nlist: 13, seed: 3 });
    const good = index.save();
    expect(() => IvfIndex.load(new Uint8Array(0))).toThrow(/corrupt IVF index/);
    expect(() => IvfIndex.load(Uint8Array.from({ length: 4096 }, () => rng.int(256)))).toThrow(/corrupt IVF index/);
    expect(() => IvfIndex.load(good.subarray(0, good.length - 1))).toThrow(/length/);
    for (let t = 0; t < 20; t++) {
      const bad = good.slice();
      bad[24 + rng.int(good.length - 24)] ^= 1 << rng.int(8);
      expect(() => IvfIndex.load(bad)).toThrow(/checksum/);
    }
    // Intact envelopes (the checksum passes) around bad payloads.
    const payload = good.subarray(24);
    const inside = /corrupt IVF index: (?!checksum|length|not a kvrecall)/;
    expect(IvfIndex.load(envelope(payload)).tokens).toBe(1009);
    expect(() => IvfIndex.load(envelope(payload.subarray(0, 200)))).toThrow(inside);
    const wrongType = payload.slice();
    wrongType.set(new TextEncoder().encode('XXXX'));
    expect(() => IvfIndex.load(envelope(wrongType))).toThrow(inside);
    expect(() => IvfIndex.load(envelope(Uint8Array.from({ length: 333 }, () => rng.int(256))))).toThrow(inside);
    expect(() => IvfIndex.load(new Float32Array(8) as unknown as Uint8Array)).toThrow(TypeError);
    // The original still loads.
    expect(IvfIndex.load(good).tokens).toBe(1009);
  });

  it('survives forged fields: every header byte flipped under a valid checksum', async () => {
    const rng = new Rng(seed + 9);
    const [m, dim] = [200, 8];
    const { bits } = keysOf(rng, 'f16', m, dim);
    const index = await IvfIndex.build({ keys: bits, tokens: m, headDim: dim, dtype: 'f16', nlist: 5, seed: 2 });
    const payload = index.save().subarray(24);
    const q = Float32Array.from({ length: 2 * dim }, () => rng.normal());
    const outIds = new Int32Array(m), outScores = new Float32Array(m);
    let rejected = 0;
    // Headers, quantizer and list table lie in the first ~300 bytes; ids at the end.
    const positions = [...Array(320).keys(), ...Array.from({ length: 40 }, (_, i) => payload.length - 1 - i)];
    for (const pos of positions)
      for (const flip of [0x80, 0x01, 0x40]) {
        const bad = payload.slice();
        bad[pos] ^= flip;
        try {
          const loaded = IvfIndex.load(envelope(bad));
          // What loads (a flipped key or centroid bit is undetectable) must
          // still be an index over the same m tokens, searchable with sane ids.
          expect(loaded.tokens).toBe(m);
          const r = loaded.search({ q, group: 2, k: m, nprobe: loaded.nlist, outIds, outScores });
          expect(r.count).toBeLessThanOrEqual(m);
          const ids = outIds.subarray(0, r.count);
          expect(new Set(ids).size).toBe(r.count);
          for (const id of ids) expect(id >= 0 && id < m).toBe(true);
        } catch (e) {
          expect((e as Error).message).toMatch(/corrupt IVF index/);
          rejected++;
        }
      }
    expect(rejected).toBeGreaterThan(100);
  });

  it('round-trips degenerate keys (all equal: most lists empty)', async () => {
    const [m, dim] = [300, 12];
    const bits = new Uint16Array(m * dim).fill(0x3c00);
    const index = await IvfIndex.build({ keys: bits, tokens: m, headDim: dim, dtype: 'f16', nlist: 8, seed: 1 });
    const loaded = IvfIndex.load(index.save());
    const q = new Float32Array(dim).fill(0.5);
    const a = search(index, q, 1, 10, 8), b = search(loaded, q, 1, 10, 8);
    expect(b).toEqual(a);
    expect(a.count).toBe(10);
    expect(a.scores[0]).toBe(6);
  });

  it('checks arguments before touching memory', async () => {
    const rng = new Rng(seed + 6);
    const { bits } = keysOf(rng, 'f16', 500, 16);
    const ok = { keys: bits, tokens: 500, headDim: 16, dtype: 'f16' as const, nlist: 8, seed: 1 };
    await expect(IvfIndex.build({ ...ok, tokens: 501 })).rejects.toThrow(RangeError);
    await expect(IvfIndex.build({ ...ok, nlist: 501 })).rejects.toThrow(RangeError);
    await expect(IvfIndex.build({ ...ok, keys: new Float32Array(8000) as unknown as Uint16Array })).rejects.toThrow(
      TypeError,
    );
    const index = await IvfIndex.build(ok);
    const q = new Float32Array(2 * 16);
    const a = { q, group: 2, k: 10, nprobe: 4, outIds: new Int32Array(10), outScores: new Float32Array(10) };
    expect(() => index.search({ ...a, q: new Float32Array(31) })).toThrow(RangeError);
    expect(() => index.search({ ...a, outIds: new Int32Array(9) })).toThrow(RangeError);
    expect(() => index.search({ ...a, outScores: new Float64Array(10) as unknown as Float32Array })).toThrow(TypeError);
    expect(() => index.search({ ...a, nprobe: 9 })).toThrow(RangeError);
    expect(() => index.search({ ...a, nprobe: 0 })).toThrow(RangeError);
    expect(() => index.search({ ...a, scan: 'fast' as 'native' })).toThrow(TypeError);
    expect(index.search({ ...a, k: 0 }).count).toBe(0);
    expect(index.search(a).count).toBe(10);
  });
});

describe('native kmeans', () => {
  const [n, d, clusters, iterations] = [5003, 40, 37, 12];

  it('is deterministic for a seed and assigns every key to its nearest centroid', async () => {
    const rng = new Rng(seed + 7);
    // Clustered keys: a few centres plus noise.
    const centres = Array.from({ length: 9 }, () => Float64Array.from({ length: d }, () => 3 * rng.normal()));
    const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
    for (let i = 0; i < n; i++) {
      const c = centres[rng.int(centres.length)];
      for (let j = 0; j < d; j++) {
        bits[i * d + j] = bitsOf('f16')(c[j] + rng.normal());
        values[i * d + j] = valueOf('f16')(bits[i * d + j]);
      }
    }
    const args = { keys: bits, tokens: n, headDim: d, dtype: 'f16' as const, clusters, iterations, seed: 42 };
    const a = await kmeans(args), b = await kmeans(args), other = await kmeans({ ...args, seed: 43 });
    expect(a.centroids.length).toBe(clusters * d);
    expect(a.assign.length).toBe(n);
    expect(a.sizes.length).toBe(clusters);
    expect(b.centroids).toEqual(a.centroids);
    expect(b.assign).toEqual(a.assign);
    expect(b.sizes).toEqual(a.sizes);
    expect(other.centroids).not.toEqual(a.centroids);

    const counted = new Int32Array(clusters);
    for (let i = 0; i < n; i++) {
      const own = a.assign[i];
      expect(own).toBeGreaterThanOrEqual(0);
      expect(own).toBeLessThan(clusters);
      counted[own]++;
      let best = Infinity, norm = 0, ownDist = 0;
      for (let c = 0; c < clusters; c++) {
        let dist = 0;
        for (let j = 0; j < d; j++) {
          const diff = values[i * d + j] - a.centroids[c * d + j];
          dist += diff * diff;
        }
        best = Math.min(best, dist);
        if (c === own) ownDist = dist;
      }
      for (let j = 0; j < d; j++) norm += values[i * d + j] ** 2;
      expect(ownDist).toBeLessThanOrEqual(best + 1e-4 * (1 + norm));
    }
    expect(a.sizes).toEqual(counted);
    expect(a.sizes.reduce((s, x) => s + x, 0)).toBe(n);
  });

  it('handles bf16, one cluster and clusters = tokens', async () => {
    const rng = new Rng(seed + 8);
    const m = 97;
    const bits = Uint16Array.from({ length: m * 8 }, () => bitsOf('bf16')(rng.normal()));
    const one = await kmeans({ keys: bits, tokens: m, headDim: 8, dtype: 'bf16', clusters: 1, iterations: 3, seed: 1 });
    expect([...one.sizes]).toEqual([m]);
    for (let j = 0; j < 8; j++) {
      let mean = 0;
      for (let i = 0; i < m; i++) mean += valueOf('bf16')(bits[i * 8 + j]) / m;
      expect(Math.abs(one.centroids[j] - mean)).toBeLessThan(1e-5);
    }
    const every = await kmeans({ keys: bits, tokens: m, headDim: 8, dtype: 'bf16', clusters: m, iterations: 2, seed: 1 });
    expect(every.sizes.reduce((s, x) => s + x, 0)).toBe(m);
    await expect(
      kmeans({ keys: bits, tokens: m, headDim: 8, dtype: 'bf16', clusters: m + 1, iterations: 2, seed: 1 }),
    ).rejects.toThrow(RangeError);
    await expect(
      kmeans({ keys: bits, tokens: m + 1, headDim: 8, dtype: 'bf16', clusters: 2, iterations: 2, seed: 1 }),
    ).rejects.toThrow(RangeError);
  });
});

describe('native faiss and worker threads', () => {
  it('survives workers that load the addon, use OpenMP and BLAS threads, and exit first', () => {
    // A worker's exit dlcloses the addons it loaded (when no other thread
    // holds them); OpenMP/OpenBLAS threads left running inside an unmapped
    // library crash the process. The addon is linked -z nodelete.
    const addon = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'build', 'Release', 'kvrecall.node');
    const script = `
      const { Worker } = require('node:worker_threads');
      const body = \`
        const a = require(\${JSON.stringify(process.env.ADDON)});
        const keys = new Uint16Array(3000 * 16).map(() => 0x3c00 ^ Math.floor(Math.random() * 0x3ff));
        (async () => {
          const x = await a.IvfIndex.build({ keys, tokens: 3000, headDim: 16, dtype: 0, nlist: 20, seed: 1 });
          a.IvfIndex.load(x.save());
          await a.kmeans({ keys, tokens: 3000, headDim: 16, dtype: 0, clusters: 30, iterations: 5, seed: 1 });
        })();\`;
      (async () => {
        for (let round = 0; round < 3; round++)
          await Promise.all([0, 1].map(() => new Promise((ok, fail) => {
            const w = new Worker(body, { eval: true });
            w.on('error', fail);
            w.on('exit', ok);
          })));
        await new Promise((r) => setTimeout(r, 200));
        console.log('done');
      })();`;
    for (let run = 0; run < 3; run++) {
      const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, ADDON: addon }, encoding: 'utf8' });
      expect({ status: r.status, signal: r.signal, out: r.stdout.trim() }).toEqual({ status: 0, signal: null, out: 'done' });
    }
  });
});
