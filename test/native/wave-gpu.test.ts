// The wave decode step on the GPU against the host path, in both of its
// rankings: 'spread' against the host's default path (ClusterIndex.searchHeads
// ranking by SPREAD standard deviations, then estimateClusters second order),
// 'radius' against the older one (searchHeads(..., 'radius'), first-order
// estimate). The selection equals the host's (the same ids, ties included:
// scores are summed in the host's order with its roundings), the estimate
// equals estimateClusters over the same exact rows within 1e-4 relative (f32
// tiles against float64); 'spread+attend' (the layer-step: the kept rows and
// sinks/window attended from the device's K/V and merged with the estimate)
// equals that estimate merged with float64 attention over the same rows,
// within the same tolerance. Skips where no CUDA device answers (here and in
// CI). The comparisons live in bench/wave-gpu.ts so that
// `node dist/bench/wave-gpu.js --check` runs them on a device machine without
// vitest. A store's CUDA graphs: a key captured when it comes back.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { WaveGpuStore } from '../../addon/wave-gpu.js';
import { caseName, TOL, waveCases } from '../../bench/wave-gpu.js';
import { checkWaveCase } from '../../bench/wave-gpu-check.js';
import { bytesOf, convert } from '../../addon/kernels.js';
import { stepDocument } from '../../engine/cache/device-wave.js';
import { buildClusters } from '../../index/wave/cluster-build.js';
import { decodeClusters } from '../../index/wave/cluster-codec.js';
import type { ClusterIndex as Clusters } from '../../index/wave/cluster-index.js';
import { candidateTokens, ClusterIndex, PROBE, SPREAD } from '../../index/wave/cluster-index.js';
import { freshSeed, Rng } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

describe('WaveGpuStore', () => {
  it('is refused without a device', () => {
    if (info.ok) return;
    const w = new Uint16Array(16);
    expect(() =>
      WaveGpuStore.create({
        kvHeads: 1, headDim: 8, dtype: 'f16', tokens: 1,
        heads: [{ centroids: w, valueMeans: w, keyAxes: new Int8Array(64), axisScales: new Float32Array(8), keyVars: new Uint8Array(64), varScales: new Float32Array(8), counts: Int32Array.of(1), tokenCluster: Int32Array.of(0), keys: w, values: w }],
      }),
    ).toThrow();
  });

  it('made off the event loop: rejects without a device, and for bad arguments before any copy', async () => {
    const w = new Uint16Array(16);
    const head = { centroids: w, valueMeans: w, keyAxes: new Int8Array(64), axisScales: new Float32Array(8), keyVars: new Uint8Array(64), varScales: new Float32Array(8), counts: Int32Array.of(1), tokenCluster: Int32Array.of(0), keys: w, values: w };
    await expect(WaveGpuStore.open({ kvHeads: 1, headDim: 8, dtype: 'f16', tokens: 1, heads: [{ ...head, tokenCluster: Int32Array.of(1) }] })).rejects.toThrow(/tokenCluster/);
    if (!info.ok) await expect(WaveGpuStore.open({ kvHeads: 1, headDim: 8, dtype: 'f16', tokens: 1, heads: [head] })).rejects.toThrow();
  });
});

/** A layer of random f16 rows and its clusters (the real builder's), as options for a store. */
async function layer(rng: Rng, kvHeads: number, tokens: number, d: number) {
  const words = () => {
    const f = Float32Array.from({ length: tokens * d }, () => rng.normal()), out = new Uint16Array(f.length);
    convert(bytesOf(f), 'f32', bytesOf(out), 'f16', f.length);
    return out;
  };
  const heads: Clusters[] = await Promise.all(Array.from({ length: kvHeads }, async () => {
    const keys = words(), values = words();
    const bytes = await buildClusters({ keys, values, tokens, headDim: d, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 },
      { clusterSize: 16, segmentTokens: 8192, iterations: 2, seed: 1 });
    return new ClusterIndex(decodeClusters(bytes), keys, values);
  }));
  return {
    kvHeads, headDim: d, dtype: 'f16' as const, tokens,
    heads: heads.map((h) => ({ centroids: h.arrays.centroids, valueMeans: h.arrays.valueMeans, keyAxes: h.arrays.keyAxes, axisScales: h.arrays.axisScales,
      keyVars: h.arrays.keyVars, varScales: h.arrays.varScales, varianceShare: h.arrays.varianceShare, counts: h.arrays.counts, tokenCluster: h.arrays.tokenCluster, keys: h.keys, values: h.values })),
  };
}

describe.skipIf(!info.ok)('a wave store made and freed off the event loop', () => {
  it('answers as the one made on the calling thread (dense and paged), and is closed once freed', async () => {
    const rng = new Rng(seed ^ 0x5a);
    const kvHeads = 2, qHeads = 8, d = 64, N = 4096;
    const o = await layer(rng, kvHeads, N, d);
    const args = { q: Float32Array.from({ length: qHeads * d }, () => rng.normal()), qHeads, scale: 1 / Math.sqrt(d),
      searchK: 256 + 160, keep: 256, ranges: [[0, 32], [N - 128, N]] as [number, number][], estimate: true, ef: 0, ids: true };
    // Paged with a cache of every row: a step here reads more than half of them (a smaller cache overflowed on an H100).
    for (const cacheRows of [0, kvHeads * N]) {
      const opts = { ...o, ...(cacheRows > 0 && { cacheRows }) };
      const now = WaveGpuStore.create(opts);
      const later = await WaveGpuStore.open(opts);
      expect(later.bytes()).toEqual(now.bytes());
      const [a, b] = [await stepDocument(now, args), await stepDocument(later, args)];
      // The same arrays copied the same way, the same kernels: bit for bit.
      expect(b.ids!.map((x) => Array.from(x))).toEqual(a.ids!.map((x) => Array.from(x)));
      expect(b.kept).toEqual(a.kept);
      expect(b.estimated).toEqual(a.estimated);
      expect(Array.from(b.out)).toEqual(Array.from(a.out));
      expect(Array.from(b.lse)).toEqual(Array.from(a.lse));
      // A step in flight keeps the store: the free waits for it.
      const inFlight = stepDocument(later, args);
      await later.closeAsync();
      expect(Array.from((await inFlight).out)).toEqual(Array.from(a.out));
      await expect(stepDocument(later, args)).rejects.toThrow(/closed/);
      now.close();
    }
  }, 120_000);
});

// Member lists and token->cluster maps take 2 bytes a row where a build
// numbered the clusters segment by segment, 4 where not (ClusterMaps,
// native/cuda/wave_step_kernels.cuh). The same clusters under another
// numbering are the same selection and estimate: the two layouts answer
// alike (ids as sets; out and lse summed in another cluster order).
describe.skipIf(!info.ok)('a wave store\'s member lists and token maps', () => {
  it('are 16-bit for a build\'s clusters, 32-bit for clusters numbered otherwise, and answer the same (dense and paged)', async () => {
    const rng = new Rng(seed ^ 0x77);
    const kvHeads = 2, qHeads = 8, d = 64, N = 65536;
    const o = await layer(rng, kvHeads, N, d);
    // Each head's clusters relabelled by a random permutation: a cluster's
    // members then sit far from their tokens in the head's list.
    const shuffled = { ...o, heads: o.heads.map((h) => {
      const C = h.counts.length, perm = Int32Array.from({ length: C }, (_, i) => i);
      for (let i = C - 1; i > 0; i--) { const j = rng.int(i + 1); [perm[i], perm[j]] = [perm[j]!, perm[i]!]; }
      const rows = <T extends Uint16Array | Int8Array | Uint8Array | Float32Array | Int32Array>(a: T, w: number): T => {
        const out = a.slice() as T;
        for (let c = 0; c < C; c++) out.set(a.subarray(c * w, (c + 1) * w), perm[c]! * w);
        return out;
      };
      return { ...h, centroids: rows(h.centroids, d + 8), valueMeans: rows(h.valueMeans, d), keyAxes: rows(h.keyAxes, d), keyVars: rows(h.keyVars, d),
        axisScales: rows(h.axisScales, 1), varScales: rows(h.varScales, 1), counts: rows(h.counts, 1), tokenCluster: h.tokenCluster.map((c) => perm[c]!) };
    }) };
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    const ranges: [number, number][] = [[0, 16], [N - 64, N]];
    const exact = new Int32Array(80);
    for (let i = 0; i < 80; i++) exact[i] = i < 16 ? i : N - 64 + (i - 16);
    const searchK = 656 + 80, fill = (x: number) => new Array<number>(kvHeads).fill(x);
    const args = { q, qHeads, scale: 1 / Math.sqrt(d), budget: fill(searchK), probe: PROBE, target: fill(candidateTokens(searchK, 0, true)),
      ranking: { kind: 'spread' as const, spread: SPREAD }, exact, skip: ranges, keep: fill(656), estimate: true, attend: true,
      rest: 'rows' as const, ids: true, stages: false, graph: false };
    for (const cacheRows of [0, kvHeads * N]) {
      const [narrow, wide] = [o, shuffled].map((x) => WaveGpuStore.create({ ...x, ...(cacheRows > 0 && { cacheRows }) }));
      try {
        const rowMaps = 2 * kvHeads * N;  // two maps of kvHeads·N rows
        expect(narrow.bytes().maps, `cacheRows ${cacheRows}: 2 bytes a row and the tiles' bases`).toBeLessThan(2 * rowMaps + 4096);
        expect(narrow.bytes().maps).toBeGreaterThanOrEqual(2 * rowMaps);
        expect(wide.bytes().maps, `cacheRows ${cacheRows}: 4 bytes a row`).toBeGreaterThanOrEqual(4 * rowMaps);
        expect(wide.bytes().summaries - narrow.bytes().summaries).toBe(wide.bytes().maps - narrow.bytes().maps);
        const [a, b] = [await narrow.step(args), await wide.step(args)];
        const sets = (r: typeof a) => r.ids!.map((x) => Array.from(x).sort((u, v) => u - v));
        expect(sets(b)).toEqual(sets(a));
        expect(b.kept).toEqual(a.kept);
        expect(b.estimated).toEqual(a.estimated);
        for (let i = 0; i < a.out.length; i++) expect(Math.abs(b.out[i]! - a.out[i]!)).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(a.out[i]!)));
        for (let i = 0; i < a.lse.length; i++) expect(Math.abs(b.lse[i]! - a.lse[i]!)).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(a.lse[i]!)));
      } finally {
        narrow.close(), wide.close();
      }
    }
  }, 240_000);
});

describe.skipIf(!info.ok)('the wave step\'s CUDA graphs (native/cuda/step_graph.cuh)', () => {
  // KVRECALL_STEP_GRAPH_EAGER=1 (the A/B switch) captures every key at once: nothing to check here then.
  it.skipIf(process.env.KVRECALL_STEP_GRAPH_EAGER === '1')('capture a key when it comes back, not at its first step, then replay it, the same bits either way', async () => {
    const rng = new Rng(seed ^ 0x3c);
    const kvHeads = 2, qHeads = 8, d = 64, N = 4096;
    const store = WaveGpuStore.create(await layer(rng, kvHeads, N, d));
    try {
      const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      // The engine's call (graph on, no stage times); searchK moves the budget, and so the graph's key.
      const step = (searchK: number) => stepDocument(store, { q, qHeads, scale: 1 / Math.sqrt(d), searchK, keep: 256,
        ranges: [[0, 32], [N - 128, N]], estimate: true, ef: 0, ids: false });
      // The largest budget first: buffers only grow, and a key holds their pointers.
      const first = await step(928);
      expect(first.graphCaptures, 'a key\'s first step runs one by one').toBe(0);
      expect((await step(928)).graphCaptures, 'captured when it comes back').toBe(1);
      const replayed = await step(928);
      expect(replayed.graphCaptures, 'then replayed').toBe(1);
      expect(Array.from(replayed.out)).toEqual(Array.from(first.out));
      expect(Array.from(replayed.lse)).toEqual(Array.from(first.lse));
      // 416 is in another bucket than 928 (native/cuda/wave_sizes.cuh: 512 against 1024); 929 in 928's.
      expect((await step(416)).graphCaptures, 'another key: one by one').toBe(1);
      expect((await step(928)).graphCaptures, 'the first key still held').toBe(1);
      expect((await step(416)).graphCaptures, 'the other key back: captured').toBe(2);
      expect((await step(929)).graphCaptures, 'a budget in the first key\'s bucket: its graph').toBe(2);
    } finally {
      store.close();
    }
  }, 120_000);
});

// The engine's steps while a session's own tokens are fewer than its window:
// the document's window rows shrink by one a step, and the budget (keep +
// the rows the ranges cover) and the candidates with them. The launches are
// sized from buckets of those counts (native/cuda/wave_sizes.cuh), so the
// graph's key holds: one capture (at the key's second sighting), two where a
// count crosses a bucket's edge; with the counts in the key every step was a
// new key, run one by one, and none was captured. Each step's answer is the
// same step's launched one by one (graph: false), bit for bit.
describe.skipIf(!info.ok)('wave steps with a shrinking window', () => {
  it('replay one graph, and answer as the steps launched one by one', async () => {
    const rng = new Rng(seed ^ 0x3c);
    const kvHeads = 2, qHeads = 8, d = 64, N = 4096, sinks = 4, window = 200, keep = 256, steps = 20;
    const store = WaveGpuStore.create(await layer(rng, kvHeads, N, d));
    try {
      let captures = 0;
      for (let own = 0; own < steps; own++) {
        // The document's share of the window: window - own rows before the session's own tokens.
        const ranges: [number, number][] = [[0, sinks], [N - (window - own), N]];
        const exact = new Int32Array(sinks + window - own);
        let at = 0;
        for (const [lo, hi] of ranges) for (let t = lo; t < hi; t++) exact[at++] = t;
        const searchK = keep + exact.length, fill = (x: number) => new Array<number>(kvHeads).fill(x);
        // stepDocument's call (estimate on: PROBE_ESTIMATED candidates a kept id), graph on or off.
        const args = (graph: boolean) => ({
          q: Float32Array.from({ length: qHeads * d }, () => rng.normal()), qHeads, scale: 1 / Math.sqrt(d),
          budget: fill(searchK), probe: PROBE, target: fill(candidateTokens(searchK, 0, true)), ranking: { kind: 'spread' as const, spread: SPREAD },
          exact, skip: ranges, keep: fill(keep), estimate: true, attend: true, rest: 'rows' as const, ids: true, stages: false, graph,
        });
        const on = args(true), off = { ...args(false), q: on.q };
        const [a, b] = [await store.step(on), await store.step(off)];
        const step = `own ${own}: `;
        expect(step + JSON.stringify(a.ids!.map((x) => Array.from(x)))).toBe(step + JSON.stringify(b.ids!.map((x) => Array.from(x))));
        expect(a.kept, step + 'kept').toEqual(b.kept);
        expect(a.kept.every((k) => k === keep), step + 'keep ids a head').toBe(true);
        expect(a.scanned, step + 'scanned').toEqual(b.scanned);
        expect(a.estimated, step + 'estimated').toEqual(b.estimated);
        expect(Array.from(a.out), step + 'out').toEqual(Array.from(b.out));
        expect(Array.from(a.lse), step + 'lse').toEqual(Array.from(b.lse));
        captures = a.graphCaptures;
      }
      console.log(`wave-gpu: ${captures} graph captures over ${steps} steps of a shrinking window`);
      expect(captures, 'graphs captured over the shrinking window').toBeGreaterThanOrEqual(1);
      expect(captures, 'graphs captured over the shrinking window').toBeLessThanOrEqual(2);
    } finally {
      store.close();
    }
  }, 120_000);
});

describe.skipIf(!info.ok)('wave step on the GPU', () => {
  console.log(`wave-gpu: seed ${seed}`);
  waveCases().forEach((c, i) =>
    it(caseName(c), async () => {
      const both = await checkWaveCase(c, seed + i);
      for (const [ranking, r] of Object.entries(both)) {
        const at = `${ranking}: `;
        expect(at + (r.firstDiff ?? '')).toBe(at);
        expect(r.idsDiffer, at + 'heads whose ids differ').toBe(0);
        expect(r.scannedEqual, at + 'scanned').toBe(true);
        expect(r.outRel, at + 'out').toBeLessThanOrEqual(TOL.out);
        expect(r.lseRel, at + 'lse').toBeLessThanOrEqual(TOL.lse);
        expect(r.estimatedEqual, at + 'estimated').toBe(true);
        if (r.leanSame !== undefined) expect(r.leanSame, at + 'the engine\'s call (ids and stage times off) answers the same: ' + (r.leanFailed ?? '')).toBe(true);
        if (r.pathsSame !== undefined) expect(r.pathsSame, at + 'from a graph, replayed, and launched one by one: the same answer').toBe(true);
      }
    }, 240_000),
  );

  it('refuses a token cluster out of range, counts that are not the histogram, and short key moments', () => {
    const d = 8, w = new Uint16Array(4 * (d + 8) * 2);
    const head = { centroids: w, valueMeans: w, keyAxes: new Int8Array(64), axisScales: new Float32Array(8), keyVars: new Uint8Array(64), varScales: new Float32Array(8), counts: Int32Array.of(2, 2), tokenCluster: Int32Array.of(0, 1, 1, 2), keys: w, values: w };
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [head] })).toThrow(/tokenCluster/);
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [{ ...head, tokenCluster: Int32Array.of(0, 1, 1, 1) }] })).toThrow(/counts/);
    const ok = { ...head, tokenCluster: Int32Array.of(0, 0, 1, 1) };
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [{ ...ok, keyVars: new Uint8Array(2 * d - 1) }] })).toThrow(/keyVars/);
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [{ ...ok, axisScales: new Float32Array(1) }] })).toThrow(/axisScales/);
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [{ ...ok, keyAxes: new Uint16Array(2 * d) as unknown as Int8Array }] })).toThrow(/Int8Array/);
  });
});
