// WaveGpuStore.rest (the estimate of what another method's selection leaves
// out, on the device: engine/rest-on-device.ts) against the host's
// estimateClusters over the same rows, per kv head given as ranges, blocks
// and ids (rows listed twice, overlapping and empty ranges, unsorted and
// repeated blocks, blocks past the end, heads with nothing selected, a head
// whose selection is the whole segment), in the three estimate orders: out
// and lse within 1e-4 relative (f32 tiles merged in float64 against float64),
// estimated and scanned token counts exactly; the graph-replayed call equal
// to the staged one, no new capture for a fresh query of the same shape or a
// steady block selection (other blocks, the same counts), and a wave step on
// the same store between rest calls changes nothing. Skips
// where no CUDA device answers (here and in CI); the comparisons live in
// bench/wave-gpu-rest.ts (`node dist/bench/wave-gpu-rest.js --check`).
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { WaveGpuStore } from '../../addon/wave-gpu.js';
import { checkRestCase, restCaseName, restCases } from '../../bench/wave-gpu-rest.js';
import { TOL } from '../../bench/wave-gpu.js';
import { freshSeed } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

describe.skipIf(!info.ok)('wave rest on the GPU', () => {
  console.log(`wave-gpu-rest: seed ${seed}`);
  restCases().forEach((c, i) =>
    it(restCaseName(c), async () => {
      for (const r of await checkRestCase(c, seed + i)) {
        const at = `${r.name}: `;
        expect(r.outRel, at + 'out').toBeLessThanOrEqual(TOL.out);
        expect(r.lseRel, at + 'lse').toBeLessThanOrEqual(TOL.lse);
        expect(r.estimatedEqual, at + 'estimated').toBe(true);
        expect(r.scannedEqual, at + 'scanned').toBe(true);
        expect(r.rowsEqual, at + 'rows given').toBe(true);
        expect(r.graphSame, at + 'graph replay (fresh query, steady blocks), a wave step between').toBe(true);
      }
    }, 240_000),
  );

  it('refuses rows outside the segment and ranges with lo > hi', async () => {
    const d = 8, N = 4, w = new Uint16Array(N * (d + 8) * 2);
    const head = { centroids: w, valueMeans: w, keyAxes: new Int8Array(64), axisScales: new Float32Array(8), keyVars: new Uint8Array(64), varScales: new Float32Array(8), counts: Int32Array.of(2, 2), tokenCluster: Int32Array.of(0, 0, 1, 1), keys: w, values: w };
    const store = WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: N, heads: [head] });
    try {
      const q = new Float32Array(d);
      await expect(store.rest({ q, qHeads: 1, scale: 1, ranges: [Int32Array.of(0, N + 1)] })).rejects.toThrow(/range/);
      await expect(store.rest({ q, qHeads: 1, scale: 1, ranges: [Int32Array.of(3, 2)] })).rejects.toThrow(/range/);
      await expect(store.rest({ q, qHeads: 1, scale: 1, ranges: [new Int32Array(0)], ids: [Int32Array.of(N)] })).rejects.toThrow(/outside/);
      await expect(store.rest({ q, qHeads: 1, scale: 1, ranges: [new Int32Array(0)], blocks: { size: 2, ids: [Int32Array.of(-1)] } })).rejects.toThrow(/negative/);
      const ok = await store.rest({ q, qHeads: 1, scale: 1, ranges: [Int32Array.of(0, 1)], blocks: { size: 2, ids: [Int32Array.of(1, 7)] } });
      expect(ok.rows).toEqual([3]);
      expect(ok.estimated).toEqual([1]);
    } finally {
      store.close();
    }
  });
});
