// The paged wave store (K and V in pinned host memory, a device row cache;
// native/cuda/wave_cache.cuh) against the dense one on the same heads, over
// 24 steps of drifting queries with every head's target moved at the middle
// step and the cache sized to the rows one step can read (so it evicts, on
// every case with distinct keys and fewer slots than rows): the
// same ids and counts and the same out/lse (within 1e-6 relative, the dense
// store's own call-to-call spread) on every step, and the host's answer
// (float64, bench/wave-gpu.ts's compare) on the first and last; a step
// repeated unchanged copies nothing; a step whose rows exceed the cache
// rejects with the overflow error and the next step answers as the dense
// store. Half the steps run graphed, half launched one by one. Each case
// runs on the plain path (the host's ids bit for bit) and on the default
// one, every tensor-core path on (the host's estimate and float64 attention
// over the step's own ids within TOL). The comparisons live in
// bench/wave-gpu-paged.ts (`--check` runs them without vitest). Skips where
// no CUDA device answers.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { WaveGpuStore } from '../../addon/wave-gpu.js';
import { checkPagedCase } from '../../bench/wave-gpu-paged.js';
import { caseName, waveCases } from '../../bench/wave-gpu.js';
import type { PathName } from '../../bench/wave-paths.js';
import { freshSeed } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

describe.skipIf(!info.ok)('paged wave store on the GPU', () => {
  console.log(`wave-gpu-paged: seed ${seed}`);
  const paths: PathName[] = ['plain', 'all'];
  paths.forEach((path, j) => waveCases().forEach((c, i) =>
    it(`${caseName(c)}, ${path} path`, async () => {
      const r = await checkPagedCase(c, seed + i + 1000 * j, 24, path);
      expect(r.firstDiff ?? '').toBe('');
      expect(r.same, 'steps answered as the dense store').toBe(r.steps);
      expect(r.hostOk, 'the host\'s answer, first and last step').toBe(true);
      if (r.mustEvict) expect(r.misses, 'rows copied in: more than the cache holds (it evicted)').toBeGreaterThan(r.cacheRows);
      expect(r.repeatBytesIn[0], 'the step before the repeat').toBeGreaterThanOrEqual(0);
      expect(r.repeatBytesIn[1], 'a step repeated unchanged copies nothing').toBe(0);
      expect(r.overflowRejected, 'a step past the cache rejects').toBe(true);
      expect(r.afterOverflowSame, 'the step after the overflow').toBe(true);
    }, 240_000),
  ));

  it('reports the cache on its own line, no K/V, and refuses rest', async () => {
    const d = 8, N = 4, w = new Uint16Array(N * (d + 8));
    const head = { centroids: w, valueMeans: w, keyAxes: new Int8Array(64), axisScales: new Float32Array(8), keyVars: new Uint8Array(64), varScales: new Float32Array(8), counts: Int32Array.of(2, 2), tokenCluster: Int32Array.of(0, 0, 1, 1), keys: w, values: w };
    const dense = WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: N, heads: [head] });
    const paged = WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: N, heads: [head], cacheRows: 3 });
    try {
      expect(dense.bytes().kv).toBeGreaterThan(0);
      expect(dense.bytes().cache).toBe(0);
      expect(paged.paged).toBe(true);
      expect(paged.bytes().kv).toBe(0);
      expect(paged.bytes().cacheRows).toBe(3);
      // 4 slots' K and V (3 and the dump), 4 rows' slots, 3 owners, stamps and misses.
      expect(paged.bytes().cache).toBeGreaterThanOrEqual(4 * d * 4 + N * 4 + 3 * 12);
      await expect(paged.rest({ q: new Float32Array(d), qHeads: 1, scale: 1, ranges: [Int32Array.of(0, 1)] })).rejects.toThrow(/paged/);
    } finally {
      dense.close();
      paged.close();
    }
  });
});
