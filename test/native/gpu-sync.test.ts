// The GPU calls run on the event loop's thread (addon/device-calls.ts; the
// native work run now by common/binding_args.h's RunNowOrAsync) against the
// same calls on libuv's pool, alternating on one store / pool: the pool's
// attend bit for bit (its kernel has no atomics) and within 2e-4 of float64
// (bench/gpu.ts's TOL);
// the wave step and rest with the same ids, counts and estimates, and out/lse
// bit for bit or within 1e-6 relative, the store's own call-to-call spread
// (its cluster lists are built in atomic order: bench/wave-gpu.ts's
// leanSame, bench/wave-gpu-paged.ts's sameAnswer). A failure in the work (a
// paged step past its cache) rejects with the same error either way, and
// refused arguments throw the same error. deviceCallRuns() shows each call
// ran where it was sent. Skips where no CUDA device answers (here and in CI).
import { afterEach, describe, expect, it } from 'vitest';
import { cudaAvailable, GpuPool } from '../../addon/cuda.js';
import { deviceCallRuns, GPU_SYNC_US, setGpuSyncUs } from '../../addon/device-calls.js';
import { WaveGpuStore, waveCacheRowsBound, type WaveGpuRestArgs, type WaveGpuStepArgs } from '../../addon/wave-gpu.js';
import { sameAnswer } from '../../bench/wave-gpu-paged.js';
import { sameAnswer as sameRest } from '../../bench/wave-gpu-rest.js';
import { caseHeads } from '../../bench/wave-gpu-heads.js';
import { gpuRanking, queries, staticRows } from '../../bench/wave-gpu.js';
import { TOL } from '../../bench/gpu.js';
import { PROBE } from '../../index/wave/cluster-index.js';
import { Rng } from '../../workload/index.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';

const info = cudaAvailable();
const seed = freshSeed();
const bits = (a: Float32Array, b: Float32Array) => Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

/** Runs `f` on the pool (cap 0) or on the loop (a cap no call reaches), and checks it ran there. */
async function on<T>(where: 'pool' | 'loop', f: () => Promise<T>): Promise<T> {
  setGpuSyncUs(where === 'pool' ? 0 : 1e9);
  const before = deviceCallRuns();
  const r = await f();
  const after = deviceCallRuns();
  expect({ loop: after.loop - before.loop, pool: after.pool - before.pool }, `ran on the ${where}`).toEqual(where === 'pool' ? { loop: 0, pool: 1 } : { loop: 1, pool: 0 });
  return r;
}

/** The error `f` settles (rejects) or throws with, as a string. */
async function failure(f: () => Promise<unknown>): Promise<string> {
  try {
    await f();
  } catch (e) {
    return `${(e as Error).constructor.name}: ${(e as Error).message}`;
  }
  return 'no error';
}

describe.skipIf(!info.ok)('GPU calls on the loop thread and on the pool', () => {
  console.log(`gpu-sync: seed ${seed}`);
  afterEach(() => setGpuSyncUs(GPU_SYNC_US));

  it("the pool's attend: the same bits either way, within 2e-4 of float64; refused arguments throw the same", async () => {
    const rng = new Rng(seed);
    const qHeads = 8, kvHeads = 2, d = 128, bs = 64, blocks = 40, n = blocks * bs, valid = n - 13;
    const pool = GpuPool.create({ budgetBytes: 4 * kvHeads * blocks * bs * d * 2 * 2, blockSize: bs, headDim: d, dtype: 'f16' });
    try {
      const k: Uint16Array[] = [], v: Uint16Array[] = [], kf: Float64Array[] = [], vf: Float64Array[] = [];
      for (let h = 0; h < kvHeads; h++) {
        k.push(Uint16Array.from({ length: n * d }, () => bitsOf('f16')(rng.normal())));
        v.push(Uint16Array.from({ length: n * d }, () => bitsOf('f16')(rng.normal())));
        kf.push(Float64Array.from(k[h].subarray(0, valid * d), valueOf('f16')));
        vf.push(Float64Array.from(v[h].subarray(0, valid * d), valueOf('f16')));
      }
      const ids = Int32Array.from({ length: blocks }, (_, i) => i);
      const tables = k.map((_, h) => pool.uploadIndexed(h, ids, k[h], v[h]));
      for (let step = 0; step < 4; step++) {
        const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
        const args = () => ({ q, qHeads, kvHeads, scale: 1 / Math.sqrt(d), tables, validTokens: [valid, valid], out: new Float32Array(qHeads * d), lse: new Float32Array(qHeads) });
        const pooled = args(), looped = args();
        await on('pool', () => pool.attend(pooled));
        await on('loop', () => pool.attend(looped));
        expect(bits(looped.out, pooled.out) && bits(looped.lse, pooled.lse), `step ${step}: the same bits`).toBe(true);
        const ref = referenceAttention(q, kf, vf, qHeads, d, 1 / Math.sqrt(d));
        expect(maxRelError(pooled.out, ref.out, qHeads)).toBeLessThanOrEqual(TOL.out);
        expect(maxRelErrorScalar(pooled.lse, ref.lse)).toBeLessThanOrEqual(TOL.lse);
      }
      // A refused argument throws, before either way is taken (the loop's: the timer has a time by now).
      const bad = { q: new Float32Array(qHeads * d), qHeads, kvHeads: 3, scale: 1, tables, validTokens: [valid, valid], out: new Float32Array(qHeads * d), lse: new Float32Array(qHeads) };
      const errors: string[] = [];
      for (const cap of [0, 1e9]) {
        setGpuSyncUs(cap);
        errors.push(await failure(async () => pool.attend(bad)));
      }
      expect(errors[0]).toMatch(/RangeError: .*kvHeads/);
      expect(errors[1]).toBe(errors[0]);
    } finally {
      pool.close();
    }
  }, 120_000);

  it('the wave step and rest: the same ids and counts, out/lse within the store\'s own spread; a step past a paged cache rejects the same', async () => {
    // 32771 tokens: the cache bound below (the candidates, plus a cluster for each of the 80 sinks/window rows) stays
    // under every row for a largest cluster of up to ~790 rows; at 12345 k-means' largest cluster passed 140 for some
    // seeds (an H100 run in session 26: the bound was every row).
    const c = { dt: 'f16' as const, kvHeads: 2, G: 4, d: 128, tokens: 32771, clusterSize: 8 };
    const rng = new Rng(seed + 1);
    const { keysF, gpuHeads } = await caseHeads(c, rng, seed + 1);
    const { kvHeads: H, G, d, tokens: N } = c;
    const store = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: c.dt, tokens: N, heads: gpuHeads });
    // A paged store whose cache holds any step of these arguments (waveCacheRowsBound), far fewer than every row.
    const largestCluster = Math.max(...gpuHeads.map((g) => Math.max(...g.counts)));
    const cacheRows = waveCacheRowsBound({ kvHeads: H, tokens: N, target: PROBE * 251, largestCluster, exactRows: 80 });
    expect(cacheRows).toBeLessThan(H * N);
    const paged = WaveGpuStore.create({ kvHeads: H, headDim: d, dtype: c.dt, tokens: N, heads: gpuHeads, cacheRows });
    try {
      const exact = staticRows(N, 16, 64);
      const stepArgs = (q: Float32Array): WaveGpuStepArgs => ({
        q, qHeads: H * G, scale: 1 / Math.sqrt(d), budget: [250, 251], probe: PROBE, ranking: gpuRanking('spread'), exact, attend: true, rest: 'rows',
        skip: [[0, 16], [N - 64, N]], keep: [170, 171], stages: false,
      });
      const restArgs = (q: Float32Array): WaveGpuRestArgs => ({
        q, qHeads: H * G, scale: 1 / Math.sqrt(d), ranges: [Int32Array.of(0, 16, N - 64, N), Int32Array.of(0, 16)],
        blocks: { size: 64, ids: [Int32Array.of(3, 9, 10, 150), Int32Array.of(7)] }, ids: [Int32Array.of(5000, 5001), new Int32Array(0)], stages: false,
      });
      let bitwise = 0;
      for (let s = 0; s < 6; s++) {
        const q = queries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G);
        const a = await on('pool', () => store.step(stepArgs(q)));
        const b = await on('loop', () => store.step(stepArgs(q)));
        const same = sameAnswer(b, a);
        expect(same.same, `step ${s}: ${same.why ?? ''}`).toBe(true);
        expect(b.lse.every(Number.isFinite), `step ${s}: lse finite`).toBe(true);
        if (same.bitwise) bitwise++;
        const ra = await on('pool', () => store.rest(restArgs(q)));
        const rb = await on('loop', () => store.rest(restArgs(q)));
        expect(sameRest(rb, ra) && rb.scanned.every((x, h) => x === ra.scanned[h]) && rb.rows.every((x, h) => x === ra.rows[h]), `rest ${s}`).toBe(true);
      }
      console.log(`gpu-sync: ${bitwise} of 6 wave steps bit for bit`);
      // A failure in the work: every row of every head, past the cache.
      const q = queries(rng, (h, t) => keysF[h].subarray(t * d, (t + 1) * d), H, N, d, G);
      const over = { ...stepArgs(q), budget: [N, N], target: [N, N], keep: undefined, skip: undefined };
      const errors: string[] = [];
      for (const where of ['pool', 'loop'] as const) {
        // The same cache before each (an overflow empties it; the message counts the rows missing from it): one step from empty.
        await on('pool', () => paged.step(stepArgs(q)));
        setGpuSyncUs(where === 'pool' ? 0 : 1e9);
        const before = deviceCallRuns();
        errors.push(await failure(() => paged.step(over)));
        const after = deviceCallRuns();
        expect(where === 'pool' ? after.pool - before.pool : after.loop - before.loop, `the overflow ran on the ${where}`).toBe(1);
      }
      expect(errors[0]).toMatch(/exceed the paged store's cache/);
      expect(errors[1]).toBe(errors[0]);
      // Refused arguments, either way.
      const refused: string[] = [];
      for (const cap of [0, 1e9]) {
        setGpuSyncUs(cap);
        refused.push(await failure(() => store.step({ ...stepArgs(q), qHeads: H * G + 1 })));
      }
      expect(refused[0]).toMatch(/RangeError: qHeads must be a multiple of kvHeads/);
      expect(refused[1]).toBe(refused[0]);
    } finally {
      store.close();
      paged.close();
    }
  }, 240_000);
});
