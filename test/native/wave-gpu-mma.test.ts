// The wave step's tensor-core paths on a device: ScoreClusters
// (KVRECALL_WAVE_MMA=1, native/cuda/wave_score_mma.cuh), the tiles'
// numerators (KVRECALL_WAVE_MMA_TILES=1, wave_tile_mma.cuh), the candidates'
// dots (KVRECALL_WAVE_MMA_RESCORE=1, wave_rescore_mma.cuh) and all three. Their
// sums are not the host's bit for bit, so each answer is checked against the host's estimate and
// float64 attention over the path's own selection (within bench/wave-gpu.ts's
// TOL), its ids against the host's search (overlap >= MIN_OVERLAP a head),
// with q far past f16's range and far below it; the plain path on the same
// store still equals the host bit for bit in its ids. Skips where no CUDA
// device answers (here and in CI); `node dist/bench/wave-gpu-mma.js --check`
// runs the same without vitest.
import { describe, expect, it } from 'vitest';
import { cudaAvailable } from '../../addon/cuda.js';
import { TOL } from '../../bench/wave-gpu.js';
import { checkMmaCase, MIN_OVERLAP, mmaCaseName, mmaCases, type PathName } from '../../bench/wave-gpu-mma.js';
import { freshSeed } from '../helpers/random.js';

const info = cudaAvailable();
const seed = freshSeed();

const paths: PathName[] = ['score', 'tiles', 'rescore', 'all'];

describe.skipIf(!info.ok).each(paths)('the wave step with the %s path on the tensor cores', (path) => {
  console.log(`wave-gpu-mma: seed ${seed}`);
  mmaCases(path).forEach((c, i) =>
    it(mmaCaseName(c), async () => {
      const r = await checkMmaCase(c, seed + i, path);
      expect(r.plain.idsDiffer, 'the default path: heads whose ids differ from the host\'s').toBe(0);
      expect(r.plain.outRel, 'the default path: out').toBeLessThanOrEqual(TOL.out);
      expect(r.mma.outRel, `${path}: out against its own selection`).toBeLessThanOrEqual(TOL.out);
      expect(r.mma.lseRel, `${path}: lse against its own selection`).toBeLessThanOrEqual(TOL.lse);
      expect(r.mma.estimatedEqual, `${path}: estimated`).toBe(true);
      expect(r.mma.idsOverlap, `${path}: ids against the host's search`).toBeGreaterThanOrEqual(MIN_OVERLAP);
      // The tiles alone change no score: their ids are the host's.
      if (path === 'tiles') expect(r.mma.idsDiffer, 'tiles: heads whose ids differ from the host\'s').toBe(0);
      expect(r.leanSame, `${path}: the engine's call from its graph answers as the full call`).toBe(true);
    }, 240_000),
  );
});
