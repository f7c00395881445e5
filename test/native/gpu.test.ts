// The CUDA decode path against the CPU attend and a float64 reference; skips
// where no CUDA device answers (here and in CI). The comparisons live in
// bench/gpu.ts so that `node dist/bench/gpu.js --check` runs them on a device
// machine without vitest.
import { describe, expect, it } from 'vitest';
import { checkCase, checkCases, checkEviction, TOL } from '../../bench/gpu.js';
import { cudaAvailable, GpuPool } from '../../addon/cuda.js';

const info = cudaAvailable();
const seed = Date.now() % 1_000_000;

describe('cudaAvailable', () => {
  it('answers without throwing', () => {
    expect(typeof info.ok).toBe('boolean');
    // A name when there is a device; otherwise why not, under error (never in device).
    if (info.ok) expect(info.device).toEqual(expect.any(String));
    else {
      expect(info.error).toEqual(expect.any(String));
      expect(info).not.toHaveProperty('device');
      expect(() => GpuPool.create({ budgetBytes: 1 << 20, blockSize: 16, headDim: 64, dtype: 'f16' })).toThrow();
    }
  });
});

describe.skipIf(!info.ok)('GPU decode attention', () => {
  let i = 0;
  for (const c of checkCases())
    it(`${c.dt} d=${c.d} G=${c.G} bs=${c.blockSize} blocks=${c.blocks}${c.splitCpu ? ' + CPU part' : ''}`, async () => {
      const r = await checkCase(c, seed + i++);
      expect(r.gpuVsRef.out).toBeLessThanOrEqual(TOL.out);
      expect(r.gpuVsCpu.out).toBeLessThanOrEqual(TOL.out);
      expect(r.ok).toBe(true);
    }, 120_000);

  for (const dt of ['f16', 'bf16'] as const)
    it(`${dt}: a pool smaller than its blocks evicts without a wrong answer`, async () => {
      const r = await checkEviction(dt, seed + 1000);
      expect(r.evictions).toBeGreaterThan(0);
      expect(r.ok).toBe(true);
    }, 120_000);
});
