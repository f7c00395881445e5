// The pool's range tables on a device (bench/gpu-range.ts's checks; skips
// where no CUDA device answers, here and in CI): an attend over held ranges
// answers bit for bit as the per-block path and as float64, with a block
// list between ranges too; a range partly evicted by another client's
// uploads is made resident again (only its lost blocks) and answers right;
// a held range keeps every slot while other clients upload past the pool;
// a step's kv heads uploaded in one call answer as uploads a head (bit for bit).
// The same sequences on the host model: test/cache/pool-ranges.test.ts.
import { describe, expect, it } from 'vitest';
import { checkRangeTables } from '../../bench/gpu-range.js';
import { TOL } from '../../bench/gpu.js';
import { cudaAvailable } from '../../addon/cuda.js';

const info = cudaAvailable();
const seed = Date.now() % 1_000_000;

describe.skipIf(!info.ok)('GPU pool range tables', () => {
  for (const dt of ['f16', 'bf16'] as const)
    it(`${dt}: the range path answers as the per-block path and float64, through eviction and while held`, async () => {
      const results = await checkRangeTables(dt, seed);
      expect(results.map((r) => r.name)).toHaveLength(6);
      for (const r of results) {
        expect(r.fastVsSlow, r.name).toBe(0);
        expect(r.fastVsRef.out, r.name).toBeLessThanOrEqual(TOL.out);
        expect(r.pool, r.name).toBe(true);
        expect(r.ok, r.name).toBe(true);
      }
    }, 120_000);
});
