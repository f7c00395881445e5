// ScoreClusters on the tensor cores (KVRECALL_WAVE_MMA=1,
// native/cuda/wave_score_mma.cuh) on a device: its scores are not the host's
// bit for bit, so its answer is checked against the host's estimate and
// float64 attention over the path's own selection (within bench/wave-gpu.ts's
// TOL), its ids against the host's search (overlap >= MIN_OVERLAP a head),
// with q far past f16's range and far below it; the default path on the same
// store still equals the host bit for bit in its ids. Skips where no CUDA
// device answers (here and in CI); `node dist/bench/wave-gpu-mma.js --check`
// runs the same without vitest.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { TOL } from '../../bench/wave-gpu.js';
import { checkMmaCase, MIN_OVERLAP, mmaCaseName, mmaCases } from '../../bench/wave-gpu-mma.js';
import { freshSeed } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

describe.skipIf(!info.ok)('the wave step with ScoreClusters on the tensor cores', () => {
  console.log(`wave-gpu-mma: seed ${seed}`);
  mmaCases().forEach((c, i) =>
    it(mmaCaseName(c), async () => {
      const r = await checkMmaCase(c, seed + i);
      expect(r.plain.idsDiffer, 'the default path: heads whose ids differ from the host\'s').toBe(0);
      expect(r.plain.outRel, 'the default path: out').toBeLessThanOrEqual(TOL.out);
      expect(r.mma.outRel, 'mma: out against its own selection').toBeLessThanOrEqual(TOL.out);
      expect(r.mma.lseRel, 'mma: lse against its own selection').toBeLessThanOrEqual(TOL.lse);
      expect(r.mma.estimatedEqual, 'mma: estimated').toBe(true);
      expect(r.mma.idsOverlap, 'mma: ids against the host\'s search').toBeGreaterThanOrEqual(MIN_OVERLAP);
      expect(r.leanSame, 'mma: the engine\'s call from its graph answers as the full call').toBe(true);
    }, 240_000),
  );
});
