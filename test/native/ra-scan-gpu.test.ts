// Retrieval-attention's device code scan (addon/ra-scan.ts, native/cuda/ra_scan*.{cu,cuh}). With a GPU
// (skipped here and in CI): for every kv head of a layer-step at once it answers what the host's code scan
// (RaGraph search with codeScan, tested against float64 in ra-graph-code-scan.test.ts) answers for each head
// alone — the same ids up to near-ties at the cuts, the same scores and scanned counts within float rounding —
// over f16 and bf16, d 32..128, groups of 1, 4 and 8, with seeds, free keys (repeated ones too) and a cap
// the +∞ keys fill; with every key a candidate its answer is the exact top-k of the group's mean probability
// (float64); with scanKeep (the PQ first pass) it answers as the host's two-pass scan, reading as many 4-bit codes;
// listed rows are attended as float64 attention over them; on the event loop's thread and on libuv's pool it answers the same; bad arguments are refused
// before anything runs. Without a GPU, making a store fails clearly.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { deviceCallRuns, gpuSyncUs, setGpuSyncUs } from '../../addon/device-calls.js';
import type { KvDtype } from '../../addon/kernels.js';
import { RaGraph } from '../../addon/ra-graph.js';
import { RaScanStore, raScanSupported } from '../../addon/ra-scan.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { groupMeanProb, maxRelError, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`ra-scan-gpu: seed ${seed}`);
const gpu = cudaAvailable().ok;

/** Keys with per-channel offsets and spreads (some channels quiet, some loud), as storage words and values. */
function keysOf(rng: Rng, dt: KvDtype, n: number, d: number) {
  const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
  const mean = Array.from({ length: d }, (_, j) => (j % 7 === 0 ? 4 : 0.3) * rng.normal());
  const sd = Array.from({ length: d }, (_, j) => (j % 11 === 1 ? 0.05 : 0.3 + 1.5 * rng.next()));
  for (let i = 0; i < n * d; i++) {
    bits[i] = bitsOf(dt)(mean[i % d] + sd[i % d] * rng.normal());
    values[i] = valueOf(dt)(bits[i]);
  }
  return { bits, values };
}
const rows = (rng: Rng, count: number, d: number) => Float32Array.from({ length: count * d }, () => 0.7 * rng.normal());

interface Layer {
  graphs: RaGraph[];
  keys: Uint16Array[];
  values: Float64Array[];
}
/** `outliers` keys a head with one channel moved 24 out (13 or more spreads: past the PQ codes' 5). */
async function layerOf(rng: Rng, dt: KvDtype, n: number, d: number, heads: number, outliers = 0): Promise<Layer> {
  const graphs: RaGraph[] = [], keys: Uint16Array[] = [], values: Float64Array[] = [];
  for (let h = 0; h < heads; h++) {
    const kv = keysOf(rng, dt, n, d);
    for (let i = 0; i < outliers; i++) {
      const at = rng.int(n) * d + rng.int(d);
      kv.bits[at] = bitsOf(dt)(kv.values[at] + (i % 2 ? -24 : 24));
      kv.values[at] = valueOf(dt)(kv.bits[at]);
    }
    keys.push(kv.bits);
    values.push(kv.values);
    graphs.push(await RaGraph.build({ keys: kv.bits, tokens: n, headDim: d, dtype: dt, queries: rows(rng, 256, d), degree: 8, kBuild: 16 }));
  }
  return { graphs, keys, values };
}

describe.skipIf(!gpu)('device code scan', () => {
  const shapes = [
    ['f16', 20000, 64, 4, 2],
    ['bf16', 30011, 128, 8, 2],
    ['f16', 9000, 32, 1, 3],
    ['f16', 70001, 128, 4, 8],
  ] as const;
  for (const [dt, n, d, G, H] of shapes)
    it(`answers each head as the host's code scan does (${dt}, n=${n}, d=${d}, G=${G}, ${H} heads)`, async () => {
      expect(raScanSupported(d, G)).toBe(true);
      const rng = new Rng(seed + n + d);
      const layer = await layerOf(rng, dt, n, d, H);
      const store = await RaScanStore.open(layer.graphs, layer.keys, n, d, dt, 8);
      let differ = 0, total = 0;
      for (const [k, cap] of [[Math.ceil(0.01 * n), Math.ceil(0.03 * n)], [200, Math.ceil(0.1 * n)], [50, 100]] as const) {
        const q = rows(rng, H * G, d);
        // Sinks and a window, a few repeated (each counts once), and per head some of the last step's ids.
        const freeList = Int32Array.from([0, 1, 2, 3, 1, ...Array.from({ length: 64 }, (_, i) => n - 64 + i), n - 1]);
        const free = Array.from({ length: H }, () => freeList);
        const seeds = Array.from({ length: H }, () => Int32Array.from({ length: 40 }, () => rng.int(n)));
        const dev = await store.search({ q, group: G, k, maxScanned: cap, seeds, free });
        for (let h = 0; h < H; h++) {
          const outIds = new Int32Array(k), outScores = new Float32Array(k);
          const host = layer.graphs[h].searchSync({
            keys: layer.keys[h], tokens: n, headDim: d, dtype: dt, q: q.subarray(h * G * d, (h + 1) * G * d), group: G, k, ef: 0,
            outIds, outScores, aggregate: 'attention', codeScan: true, maxScanned: cap, seeds: seeds[h], freeSeeds: freeList,
          });
          const got = dev[h];
          expect(got.ids.length).toBe(host.count);
          const hostScore = new Map<number, number>();
          for (let i = 0; i < host.count; i++) hostScore.set(outIds[i], outScores[i]);
          const kth = outScores[host.count - 1];
          expect(new Set(got.ids).size).toBe(got.ids.length);
          for (let i = 0; i < got.ids.length; i++) {
            const id = got.ids[i];
            expect(freeList.includes(id)).toBe(false);
            const s = hostScore.get(id);
            // Scores agree to float rounding of the sums (the exact dots sum in another order; the partitions
            // refined from candidate sets that may differ by near-ties at the first cut).
            if (s !== undefined) expect(Math.abs(got.scores[i] - s)).toBeLessThan(2e-3);
            else {
              differ++;
              expect(got.scores[i]).toBeLessThan(kth + 2e-3);  // only at the boundary
            }
          }
          total += got.ids.length;
          expect(Math.abs(got.scanned - host.scanned)).toBeLessThanOrEqual(Math.max(2, 0.002 * cap));
        }
      }
      // Near-ties moved a handful of ids across the cuts at most.
      expect(differ).toBeLessThanOrEqual(Math.max(3, 0.005 * total));
      // A cap the sample and the +∞ keys (entry points, seeds) more than fill: no key is chosen by its code.
      const q = rows(rng, H * G, d);
      const seeds = Array.from({ length: H }, () => Int32Array.from({ length: 30 }, () => rng.int(n)));
      const few = await store.search({ q, group: G, k: 10, maxScanned: 1, seeds });
      for (let h = 0; h < H; h++) {
        const outIds = new Int32Array(10), outScores = new Float32Array(10);
        const host = layer.graphs[h].searchSync({
          keys: layer.keys[h], tokens: n, headDim: d, dtype: dt, q: q.subarray(h * G * d, (h + 1) * G * d), group: G, k: 10, ef: 0,
          outIds, outScores, aggregate: 'attention', codeScan: true, maxScanned: 1, seeds: seeds[h],
        });
        expect(few[h].scanned).toBe(host.scanned);
        expect([...few[h].ids].sort((a, b) => a - b)).toEqual([...outIds.subarray(0, host.count)].sort((a, b) => a - b));
      }
      expect(store.bytes()).toBeGreaterThan(n * d * 2.5 * H);
      store.close();
      for (const g of layer.graphs) g.dispose();
    }, 120_000);

  // The PQ first pass (scanKeep): rows of 8, 16 and 32 bytes (d 64, 128, 256: words in registers) and of 5 (d 40, a
  // byte at a time); one quad of heads and four (G 16); outliers planted, which the PQ codes lose and the first pass
  // keeps for the 4-bit one; shares that keep a few percent, more than the cap, and every key.
  for (const [dt, n, d, G, H] of [['f16', 30011, 128, 4, 2], ['bf16', 20000, 64, 8, 2], ['f16', 9000, 40, 1, 2], ['f16', 6000, 256, 16, 2]] as const)
    it(`with scanKeep answers each head as the host's two-pass scan does (${dt}, n=${n}, d=${d}, G=${G}, ${H} heads)`, async () => {
      const rng = new Rng(seed + 3 * n + d);
      const layer = await layerOf(rng, dt, n, d, H, 12);
      // Opened with the PQ codes (the first two shapes) or without them, then added (the others).
      const withPq = d >= 64;
      const store = await RaScanStore.open(layer.graphs, layer.keys, n, d, dt, 16, undefined, withPq);
      expect(store.hasPq).toBe(withPq);
      if (!withPq) {
        await expect(store.search({ q: rows(rng, H * G, d), group: G, k: 5, maxScanned: 50, scanKeep: 0.1 })).rejects.toThrow(/PQ codes/);
        const before = store.bytes();
        await store.addPq();
        expect(store.hasPq).toBe(true);
        expect(store.bytes()).toBeGreaterThanOrEqual(before + H * n * (d / 8));
      }
      let differ = 0, total = 0, keptDiffer = 0;
      for (const scanKeep of [0.04, 0.2, 1]) {
        const k = Math.ceil(0.01 * n), cap = Math.ceil(0.03 * n);
        const q = rows(rng, H * G, d);
        const freeList = Int32Array.from([0, 1, 2, 3, ...Array.from({ length: 32 }, (_, i) => n - 32 + i)]);
        const seeds = Array.from({ length: H }, () => Int32Array.from({ length: 40 }, () => rng.int(n)));
        const dev = await store.search({ q, group: G, k, maxScanned: cap, seeds, free: Array.from({ length: H }, () => freeList), scanKeep });
        for (let h = 0; h < H; h++) {
          const outIds = new Int32Array(k), outScores = new Float32Array(k);
          const host = layer.graphs[h].searchSync({
            keys: layer.keys[h], tokens: n, headDim: d, dtype: dt, q: q.subarray(h * G * d, (h + 1) * G * d), group: G, k, ef: 0,
            outIds, outScores, aggregate: 'attention', codeScan: true, maxScanned: cap, seeds: seeds[h], freeSeeds: freeList, scanKeep,
          });
          const got = dev[h];
          expect(got.ids.length).toBe(host.count);
          expect(host.codesKept).toBeGreaterThan(0);
          // The 4-bit codes read: the same count, but for a near-tie at the first cut moving an outlier in or out.
          expect(Math.abs(got.codesKept! - host.codesKept!)).toBeLessThanOrEqual(1);
          keptDiffer += got.codesKept === host.codesKept ? 0 : 1;
          const hostScore = new Map<number, number>();
          for (let i = 0; i < host.count; i++) hostScore.set(outIds[i], outScores[i]);
          const kth = outScores[host.count - 1];
          expect(new Set(got.ids).size).toBe(got.ids.length);
          for (let i = 0; i < got.ids.length; i++) {
            const s = hostScore.get(got.ids[i]);
            if (s !== undefined) expect(Math.abs(got.scores[i] - s)).toBeLessThan(2e-3);
            else {
              differ++;
              expect(got.scores[i]).toBeLessThan(kth + 2e-3);
            }
          }
          total += got.ids.length;
          expect(Math.abs(got.scanned - host.scanned)).toBeLessThanOrEqual(Math.max(2, 0.002 * cap));
        }
      }
      expect(differ).toBeLessThanOrEqual(Math.max(3, 0.005 * total));
      expect(keptDiffer).toBeLessThanOrEqual(1);
      // A share out of (0, 1] is refused before anything runs, and the store still searches.
      for (const scanKeep of [0, 1.5, Number.NaN])
        await expect(store.search({ q: rows(rng, H * G, d), group: G, k: 5, maxScanned: 50, scanKeep })).rejects.toThrow(/scanKeep/);
      expect((await store.search({ q: rows(rng, H * G, d), group: G, k: 5, maxScanned: 50, scanKeep: 0.1 }))[0].ids.length).toBe(5);
      store.close();
      for (const g of layer.graphs) g.dispose();
    }, 120_000);

  for (const [dt, n, d, G] of [['f16', 12000, 64, 4], ['bf16', 8000, 128, 2]] as const)
    it(`with every key a candidate answers the exact top-k of the group's mean probability (${dt}, d=${d}, G=${G})`, async () => {
      const rng = new Rng(seed + 7 * n);
      const layer = await layerOf(rng, dt, n, d, 2);
      const store = await RaScanStore.open(layer.graphs, layer.keys, n, d, dt, G);
      const k = 64;
      const q = rows(rng, 2 * G, d);
      const res = await store.search({ q, group: G, k, maxScanned: 2 * n });
      for (let h = 0; h < 2; h++) {
        const { meanProb } = groupMeanProb(q.subarray(h * G * d, (h + 1) * G * d), G, layer.values[h], n, d, 1 / Math.sqrt(d));
        const order = Array.from({ length: n }, (_, t) => t).sort((a, b) => meanProb[b] - meanProb[a] || a - b);
        const kth = meanProb[order[k - 1]];
        expect(res[h].scanned).toBe(n);
        expect(res[h].ids.length).toBe(k);
        for (let i = 0; i < k; i++) {
          const id = res[h].ids[i];
          // In the exact top k, or tied with its k-th to float rounding.
          expect(meanProb[id]).toBeGreaterThanOrEqual(kth * (1 - 1e-5));
          expect(Math.abs(res[h].scores[i] - Math.log(meanProb[id]))).toBeLessThan(1e-3);
        }
      }
      store.close();
      for (const g of layer.graphs) g.dispose();
    }, 60_000);

  for (const [dt, n, d, G, H] of [['f16', 5000, 64, 4, 3], ['bf16', 4001, 128, 8, 2], ['f16', 3000, 256, 16, 2], ['f16', 2500, 40, 1, 2]] as const)
    it(`attends listed rows as float64 attention over them (${dt}, d=${d}, G=${G}, ${H} heads)`, async () => {
      const rng = new Rng(seed + 11 + d);
      const layer = await layerOf(rng, dt, n, d, H);
      const vals = Array.from({ length: H }, () => keysOf(rng, dt, n, d));
      const store = await RaScanStore.open(layer.graphs, layer.keys, n, d, dt, 16, vals.map((v) => v.bits));
      expect(store.hasValues).toBe(true);
      // Lists longer than a CTA's tile and shorter, a repeated row (attended twice), and an empty list (-inf, zeros).
      const lists = Array.from({ length: H }, (_, h) => (h === H - 1 ? [] : Array.from({ length: h === 0 ? 1500 : 37 }, () => rng.int(n))));
      lists[0][5] = lists[0][6];
      const q = rows(rng, H * G, d);
      for (const scale of [1 / Math.sqrt(d), 0.4]) {
        const r = await store.attend({ q, group: G, scale, ids: lists.map((l) => Int32Array.from(l)) });
        const ref = referenceAttention(q, layer.values, vals.map((v) => v.values), H * G, d, scale, lists);
        for (let row = 0; row < H * G; row++) {
          if (lists[Math.floor(row / G)].length === 0) {
            expect(r.lse[row]).toBe(-Infinity);
            expect(r.out.subarray(row * d, (row + 1) * d).every((x) => x === 0)).toBe(true);
            continue;
          }
          expect(Math.abs(r.lse[row] - ref.lse[row])).toBeLessThan(1e-4 * Math.max(1, Math.abs(ref.lse[row])));
          expect(maxRelError(r.out.subarray(row * d, (row + 1) * d), ref.out.subarray(row * d, (row + 1) * d), 1)).toBeLessThan(1e-4);
        }
      }
      // Ranges every head attends besides its list (sinks and a window, as the residency passes them): their rows
      // first, then the list's; the head with an empty list attends the ranges alone.
      const ranges = Int32Array.of(0, 3, n - 5, n);
      const steady = [0, 1, 2, n - 5, n - 4, n - 3, n - 2, n - 1];
      const withRanges = await store.attend({ q, group: G, scale: 0.3, ids: lists.map((l) => Int32Array.from(l)), ranges });
      const refRanges = referenceAttention(q, layer.values, vals.map((v) => v.values), H * G, d, 0.3, lists.map((l) => [...steady, ...l]));
      for (let row = 0; row < H * G; row++) {
        expect(Math.abs(withRanges.lse[row] - refRanges.lse[row])).toBeLessThan(1e-4 * Math.max(1, Math.abs(refRanges.lse[row])));
        expect(maxRelError(withRanges.out.subarray(row * d, (row + 1) * d), refRanges.out.subarray(row * d, (row + 1) * d), 1)).toBeLessThan(1e-4);
      }
      // Bad ids and ranges are refused and the store still attends; a store opened without values attends nothing.
      await expect(store.attend({ q, group: G, scale: 0.1, ids: lists.map(() => Int32Array.of(n)) })).rejects.toThrow(/ids/);
      for (const bad of [Int32Array.of(0, n + 1), Int32Array.of(5, 2), Int32Array.of(-1, 3), Int32Array.of(0, 3, 7)])
        await expect(store.attend({ q, group: G, scale: 0.1, ids: lists.map(() => Int32Array.of(0)), ranges: bad })).rejects.toThrow(/ranges/);
      expect((await store.attend({ q, group: G, scale: 0.1, ids: lists.map(() => Int32Array.of(0)) })).lse.every(Number.isFinite)).toBe(true);
      store.close();
      const bare = await RaScanStore.open(layer.graphs, layer.keys, n, d, dt, 16);
      expect(bare.hasValues).toBe(false);
      await expect(bare.attend({ q, group: G, scale: 0.1, ids: lists.map(() => Int32Array.of(0)) })).rejects.toThrow(/values/);
      bare.close();
      for (const g of layer.graphs) g.dispose();
    }, 60_000);

  it("answers the same on the event loop's thread as on libuv's pool", async () => {
    const rng = new Rng(seed + 5);
    const n = 20000, d = 64, G = 4, H = 2;
    const layer = await layerOf(rng, 'f16', n, d, H);
    const store = await RaScanStore.open(layer.graphs, layer.keys, n, d, 'f16', G);
    const q = rows(rng, H * G, d);
    const seeds = Array.from({ length: H }, () => Int32Array.from({ length: 40 }, () => rng.int(n)));
    const args = { q, group: G, k: 200, maxScanned: 600, seeds, free: Array.from({ length: H }, () => Int32Array.of(0, 1, n - 1)) };
    const cap = gpuSyncUs();
    try {
      setGpuSyncUs(0);
      const before = deviceCallRuns();
      const pooled = await store.search(args);
      expect(deviceCallRuns().pool).toBe(before.pool + 1);
      setGpuSyncUs(1e6);
      await store.search(args);  // the first search on the loop needs the last one's time: it has one now
      const mid = deviceCallRuns();
      const onLoop = await store.search(args);
      expect(deviceCallRuns().loop).toBe(mid.loop + 1);
      // The same call either way: the same set and scores (within float rounding, should a sum's order differ).
      const byId = (r: { ids: Int32Array; scores: Float32Array }) => new Map(Array.from(r.ids, (id, i) => [id, r.scores[i]]));
      for (let h = 0; h < H; h++) {
        const a = byId(onLoop[h]), b = byId(pooled[h]);
        expect([...a.keys()].sort((x, y) => x - y)).toEqual([...b.keys()].sort((x, y) => x - y));
        for (const [id, x] of a) expect(x).toBeCloseTo(b.get(id) ?? NaN, 5);
        expect(onLoop[h].scanned).toBe(pooled[h].scanned);
      }
      // The ids alone (a session's call): the same sets, no scores.
      const idsOnly = await store.searchIds(args);
      for (let h = 0; h < H; h++) {
        expect([...idsOnly[h].ids].sort((x, y) => x - y)).toEqual([...onLoop[h].ids].sort((x, y) => x - y));
        expect('scores' in idsOnly[h]).toBe(false);
      }
      // A refusal on the loop's path rejects as the pool's does, and the store still serves.
      await expect(store.search({ ...args, seeds: [Int32Array.of(n), Int32Array.of(1)] })).rejects.toThrow(/seeds/);
      expect((await store.search(args))[0].ids.length).toBe(200);
    } finally {
      setGpuSyncUs(cap);
      store.close();
      for (const g of layer.graphs) g.dispose();
    }
  });

  it('refuses bad arguments before anything runs', async () => {
    const rng = new Rng(seed + 3);
    const n = 3000, d = 32, G = 4;
    const layer = await layerOf(rng, 'f16', n, d, 2);
    const store = await RaScanStore.open(layer.graphs, layer.keys, n, d, 'f16', G);
    const q = rows(rng, 2 * G, d);
    await expect(store.search({ q: q.subarray(1), group: G, k: 5, maxScanned: 100 })).rejects.toThrow(/q must hold/);
    const nan = q.slice();
    nan[3] = NaN;
    await expect(store.search({ q: nan, group: G, k: 5, maxScanned: 100 })).rejects.toThrow(/finite/);
    // The bad id named where it lies (the lists are copied a head a task: the second head's is the one).
    await expect(store.search({ q, group: G, k: 5, maxScanned: 100, seeds: [Int32Array.of(1), Int32Array.of(2, n)] })).rejects.toThrow(
      /seeds\[1\]\[1\] = 3000 is outside/,
    );
    await expect(store.search({ q, group: G + 1, k: 5, maxScanned: 100 })).rejects.toThrow(/group/);
    await expect(RaScanStore.open(layer.graphs, layer.keys, n + 1, d, 'f16', G)).rejects.toThrow(/shape/);
    // Still serving after the refusals.
    const ok = await store.search({ q, group: G, k: 5, maxScanned: 100 });
    expect(ok.map((r) => r.ids.length)).toEqual([5, 5]);
    store.close();
    await expect(store.search({ q, group: G, k: 5, maxScanned: 100 })).rejects.toThrow(/closed/);
    for (const g of layer.graphs) g.dispose();
  });
});

describe.skipIf(gpu)('device code scan without a device', () => {
  it('fails to make a store with a clear error', async () => {
    const rng = new Rng(seed);
    const layer = await layerOf(rng, 'f16', 500, 16, 1);
    await expect(RaScanStore.open(layer.graphs, layer.keys, 500, 16, 'f16', 4)).rejects.toThrow(/CUDA|without CUDA|device/i);
    layer.graphs[0].dispose();
  });
});
