// addon/wave-gpu.ts's half of the step's marshalling, with a stand-in for
// the native store (runs without a GPU; test/native/wave-gpu.test.ts runs the
// real binding on one): what the wrapper packs into `plan` is the step's
// per-head budget, target, cluster cap and keep, in the binding's order, and
// what it reads back from `out`, `lse` and `meta` (the binding's kStepMeta
// slots) is the answer it returns, the kept ids sliced per head by `width`.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { STEP_META, WaveGpuStore, type WaveGpuStepArgs } from '../../addon/wave-gpu.js';

const H = 3, qHeads = 6, d = 8, TOKENS = 1000;
const clusters = [100, 120, 90];

interface Seen { plan: Float64Array; out: Float32Array; lse: Float32Array; meta: Float64Array; sync: boolean; ids?: boolean }

/** A store whose native half records its arguments and answers as the binding does: into the caller's arrays. */
function storeWith(answer: (a: Seen) => { ids?: Int32Array; stages: Record<string, number> } | undefined, seen: Seen[]): WaveGpuStore {
  const native = {
    step(a: Seen) {
      seen.push(a);
      return Promise.resolve(answer(a));
    },
  };
  const Store = WaveGpuStore as unknown as new (n: unknown, o: unknown, c: number[]) => WaveGpuStore;
  return new Store(native, { kvHeads: H, headDim: d, dtype: 'f16', tokens: TOKENS, cacheRows: 0 }, clusters);
}

const slot = (k: (typeof STEP_META)[number]) => 3 * H + STEP_META.indexOf(k);

function args(extra: Partial<WaveGpuStepArgs> = {}): WaveGpuStepArgs {
  return { q: new Float32Array(qHeads * d).fill(0.5), qHeads, scale: 0.3, budget: [10, 20, 30], probe: 4, ranking: { kind: 'spread', spread: 2 }, ...extra };
}

describe('WaveGpuStore.step marshalling (stand-in native store)', () => {
  it('reads meta in the binding\'s slot order (native/bindings/wave_gpu_binding.cc kStepMeta)', () => {
    const src = readFileSync(new URL('../../native/bindings/wave_gpu_binding.cc', import.meta.url), 'utf8');
    const list = /kStepMeta\[\] = \{([^}]*)\}/.exec(src);
    expect(list, 'kStepMeta found').not.toBeNull();
    expect(Array.from(list![1].matchAll(/"([^"]+)"/g), (m) => m[1])).toEqual([...STEP_META]);
  });

  it('packs budget, target and the cluster cap (and keep when given) into plan, kvHeads each', async () => {
    const seen: Seen[] = [];
    const store = storeWith(() => undefined, seen);
    await store.step(args());
    await store.step(args({ target: [7, 8, 9], keep: [1, 2, 3] }));
    const [a, b] = seen;
    expect(a.plan.length).toBe(3 * H);
    expect(Array.from(a.plan.subarray(0, H))).toEqual([10, 20, 30]);
    expect(Array.from(a.plan.subarray(H, 2 * H)), 'target: probe × budget').toEqual([40, 80, 120]);
    // The cap: searchHeads' want, enough clusters for the widest target at the average cluster size, twice over, + 8.
    const want = Math.max(...[40, 80, 120].map((t, h) => Math.min(clusters[h], Math.ceil((2 * t * clusters[h]) / TOKENS) + 8)));
    expect(Array.from(a.plan.subarray(2 * H))).toEqual([want, want, want]);
    expect(b.plan.length, 'keep makes it 4 per head').toBe(4 * H);
    expect(Array.from(b.plan.subarray(H, 2 * H))).toEqual([7, 8, 9]);
    expect(Array.from(b.plan.subarray(3 * H))).toEqual([1, 2, 3]);
    expect(a.out.length).toBe(qHeads * d);
    expect(a.lse.length).toBe(qHeads);
    expect(a.meta.length).toBe(3 * H + STEP_META.length);
  });

  it('returns what the native half wrote: out, lse, the per-head counts, the times, the ids cut by width', async () => {
    const seen: Seen[] = [];
    const width = 5;
    const store = storeWith((a) => {
      a.out.forEach((_, i) => (a.out[i] = i / 7));
      a.lse.forEach((_, i) => (a.lse[i] = -i));
      for (let h = 0; h < H; h++) {
        a.meta[h] = h + 2; // kept
        a.meta[H + h] = 100 * (h + 1); // candidates
        a.meta[2 * H + h] = 1000 - h; // estimated
      }
      a.meta[slot('width')] = width;
      a.meta[slot('ms')] = 0.25;
      a.meta[slot('graphCaptures')] = 3;
      a.meta[slot('workMs')] = 0.4;
      STEP_META.forEach((k, i) => { if (['parse', 'queue', 'prep', 'launch', 'overlap', 'wait', 'copy', 'back', 'convert'].includes(k)) a.meta[3 * H + i] = i / 100; });
      return { ids: Int32Array.from({ length: H * width }, (_, i) => i), stages: { score: 0.1 } };
    }, seen);
    const r = await store.step(args({ ids: true }));
    const a = seen[0];
    expect(r.out, 'the caller\'s array itself').toBe(a.out);
    expect(r.lse).toBe(a.lse);
    expect(r.out[7]).toBeCloseTo(1, 6);
    expect(r.lse[2]).toBe(-2);
    expect(r.kept).toEqual([2, 3, 4]);
    expect(r.scanned, 'clusters + candidates').toEqual([200, 320, 390]);
    expect(r.estimated).toEqual([1000, 999, 998]);
    expect(r.ms).toBe(0.25);
    expect(r.graphCaptures).toBe(3);
    expect(r.workMs).toBe(0.4);
    expect(r.misses).toBe(0);
    expect(r.bytesIn).toBe(0);
    expect(Object.keys(r.host).sort()).toEqual(['back', 'convert', 'copy', 'launch', 'overlap', 'parse', 'prep', 'queue', 'wait']);
    expect(r.host.wait).toBe(STEP_META.indexOf('wait') / 100);
    expect(r.stages).toEqual({ score: 0.1 });
    expect(r.ids!.map((x) => Array.from(x)), 'head h: its first kept[h] of width').toEqual([[0, 1], [5, 6, 7], [10, 11, 12, 13]]);
  });

  it('gives fresh answer arrays every step (a caller may keep an answer across steps)', async () => {
    const seen: Seen[] = [];
    const store = storeWith((a) => (a.out.fill(seen.length), undefined), seen);
    const first = await store.step(args({ ids: false }));
    const second = await store.step(args({ ids: false }));
    expect(first.out).not.toBe(second.out);
    expect(first.out[0]).toBe(1);
    expect(second.out[0]).toBe(2);
    expect(first.ids).toBeUndefined();
    expect(first.stages).toEqual({});
  });
});
