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

describe.skipIf(!info.ok)('GPU pool release', () => {
  it("releaseRange drops every block of the clients in [first, last) (a deleted document's segment), pinned ones too, and no other", () => {
    const blockSize = 64, d = 64, seg = 2 ** 20; // GpuBackend: segment s's clients are [s * 2^20, (s + 1) * 2^20)
    const pool = GpuPool.create({ budgetBytes: 16 * blockSize * d * 2 * 2, blockSize, headDim: d, dtype: 'f16' });
    try {
      const k = new Uint16Array(8 * blockSize * d), v = new Uint16Array(k.length);
      const b = Int32Array.of(0, 1, 2);
      pool.uploadIndexed(seg, b, k, v);
      pool.uploadIndexed(seg + 1025, b, k, v, { hold: true }); // layer 1, head 1, held by a step
      pool.uploadIndexed(2 * seg, b, k, v); // the next segment
      pool.uploadIndexed(seg - 1, b, k, v); // the last client of the one before
      expect(pool.stats()).toMatchObject({ used: 12, pinned: 3 });
      expect(pool.releaseRange(seg, 2 * seg)).toBe(6);
      expect(pool.stats()).toMatchObject({ used: 6, pinned: 0 });
      for (const c of [seg, seg + 1025]) expect([...pool.lookup(c, b)]).toEqual([-1, -1, -1]);
      for (const c of [2 * seg, seg - 1]) expect(pool.lookup(c, b).every((s) => s >= 0)).toBe(true);
      // The freed slots are taken before anything is evicted; an empty range frees nothing.
      pool.uploadIndexed(3 * seg, Int32Array.of(0, 1, 2, 3, 4, 5), k, v);
      expect(pool.stats()).toMatchObject({ used: 12, evictions: 0 });
      expect(pool.releaseRange(5 * seg, 6 * seg)).toBe(0);
    } finally {
      pool.close();
    }
  });
});
