// The paged wave store's cap on the rows a step pages (pageCapBytes,
// native/cuda/wave_page_cap.cuh), on bench/wave-gpu.ts's small cases over 16
// drifting steps with every head's target moved at the middle step, on the
// plain path and the default one (bench/wave-gpu-page-cap.ts's checkCapCase,
// which `--check` runs without vitest): (1) with the cap off the paged store
// answers as the dense store every step, and so does the capped one before
// its cap applies; (2) capped (8 rows a kv head from step 2), no step from
// step 2 on copies more than the cap, and where the cap-off store copies more
// than it the cap binds on some step, and a head that leaves candidates
// unrescored has paged its whole share; (3) every capped answer equals float64
// attention over exactly the rows the step attended (its ids and the
// sinks/window rows) merged with the host's estimate of the rest (partly
// attended clusters the step names in momentClusters by their moments, the
// others by their rows) within TOL, the estimate's token counts exactly; (4)
// a capped step whose candidates are all cached copies nothing, rescores
// every candidate and answers as the dense store. Skips where no CUDA device
// answers.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { WaveGpuStore } from '../../addon/wave-gpu.js';
import { checkCapCase } from '../../bench/wave-gpu-page-cap.js';
import { caseName, waveCases } from '../../bench/wave-gpu.js';
import type { PathName } from '../../bench/wave-paths.js';
import { freshSeed } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

describe.skipIf(!info.ok)('paged wave store with a cap on the rows a step pages', () => {
  console.log(`wave-gpu-page-cap: seed ${seed}`);
  const paths: PathName[] = ['plain', 'all'];
  paths.forEach((path, j) => waveCases().forEach((c, i) =>
    it(`${caseName(c)}, ${path} path`, async () => {
      const r = await checkCapCase(c, seed + i + 1000 * j, 16, path);
      expect(r.firstDiff ?? '').toBe('');
      expect(r.offSame, 'cap off: every step as the dense store').toBe(r.steps);
      expect(r.earlySame, 'capped, before the cap applies: as the dense store').toBe(r.capFrom);
      expect(r.overCap, `steps from ${r.capFrom} on that copied more than ${r.capBytes} bytes (most: ${r.maxBytesCapped})`).toBe(0);
      expect(r.underUsed, 'steps where a head left candidates unrescored without paging its share of the cap').toBe(0);
      if (r.offOverCap > 0) expect(r.capBound, 'steps where the cap left candidates unrescored').toBeGreaterThan(0);
      expect(r.refOk, 'capped steps as the host answers over their own rows').toBe(r.steps);
      expect(r.cached.bytesIn, 'all cached: nothing copied').toBe(0);
      expect(r.cached.allRescored, 'all cached: every candidate rescored').toBe(true);
      expect(r.cached.why ?? '', 'all cached: as the dense store').toBe('');
      expect(r.cached.same).toBe(true);
    }, 240_000),
  ));

  it('refuses a cap without the paged store, or below a row a kv head', () => {
    const d = 8, N = 4, w = new Uint16Array(N * (d + 8));
    const head = { centroids: w, valueMeans: w, keyAxes: new Int8Array(64), axisScales: new Float32Array(8), keyVars: new Uint8Array(64), varScales: new Float32Array(8), counts: Int32Array.of(2, 2), tokenCluster: Int32Array.of(0, 0, 1, 1), keys: w, values: w };
    const store = WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: N, heads: [head], cacheRows: 3, pageCapBytes: d * 4 });
    try {
      expect(store.options.pageCapBytes).toBe(d * 4);
    } finally {
      store.close();
    }
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: N, heads: [head], cacheRows: 3, pageCapBytes: d * 4 - 1 })).toThrow(/pageCapBytes/);
    expect(() => WaveGpuStore.create({ kvHeads: 1, headDim: d, dtype: 'f16', tokens: N, heads: [head], pageCapBytes: 1 << 20 })).toThrow(/pageCapBytes/);
  });
});
