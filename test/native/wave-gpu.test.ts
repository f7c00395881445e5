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
// vitest.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { WaveGpuStore } from '../../addon/wave-gpu.js';
import { caseName, checkWaveCase, TOL, waveCases } from '../../bench/wave-gpu.js';
import { freshSeed } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

describe('WaveGpuStore', () => {
  it('is refused without a device', () => {
    if (info.ok) return;
    const w = new Uint16Array(16);
    expect(() =>
      WaveGpuStore.create({
        kvHeads: 1, headDim: 8, dtype: 'f16', tokens: 1,
        heads: [{ centroids: w, valueMeans: w, keyAxes: w, keyVars: w, counts: Int32Array.of(1), tokenCluster: Int32Array.of(0), keys: w, values: w }],
      }),
    ).toThrow();
  });
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
        if (r.leanSame !== undefined) expect(r.leanSame, at + 'the engine\'s call (ids and stage times off) answers the same').toBe(true);
      }
    }, 240_000),
  );

  it('refuses a token cluster out of range, counts that are not the histogram, and short key moments', () => {
    const d = 8, w = new Uint16Array(4 * (d + 8) * 2);
    const head = { centroids: w, valueMeans: w, keyAxes: w, keyVars: w, counts: Int32Array.of(2, 2), tokenCluster: Int32Array.of(0, 1, 1, 2), keys: w, values: w };
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [head] })).toThrow(/tokenCluster/);
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [{ ...head, tokenCluster: Int32Array.of(0, 1, 1, 1) }] })).toThrow(/counts/);
    const ok = { ...head, tokenCluster: Int32Array.of(0, 0, 1, 1) };
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: 4, heads: [{ ...ok, keyVars: new Uint16Array(2 * d - 1) }] })).toThrow(/keyVars/);
  });
});
