// engine/decode-step.ts's device path (a wave session whose document layer
// the GPU holds, engine/wave-on-device.ts) through decodeStep, with a
// stand-in for the device's store (no GPU runs here; test/integration/
// gpu-wave.test.ts runs the real one on a GPU): the answer is attention over
// the document's sinks, window and kept ids and the session's own tokens
// (float64 reference), the stats are the host path's keys in its order with
// the device's counts, the host stages come only with `timing`, the
// session's counts move, and a step whose lse overflows is refused with its
// token taken back.
import { describe, expect, it } from 'vitest';
import { attend, bytesOf, convert } from '../../addon/kernels.js';
import type { WaveGpuStepResult, WaveGpuStore } from '../../addon/wave-gpu.js';
import type { ModelShape } from '../../core/model.js';
import type { HeldWaveStore } from '../../engine/cache/device-wave.js';
import type { GpuBackend } from '../../engine/cache/gpu-pool.js';
import { decodeStep } from '../../engine/decode-step.js';
import type { LoadedDocument } from '../../engine/documents.js';
import { Session } from '../../engine/session.js';
import type { SearchParams } from '../../index/method.js';
import { findMethod } from '../../index/registry.js';
import type { ClusterIndex } from '../../index/wave/cluster-index.js';
import { UNLIMITED } from '../../storage/host-budget.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`decode-step-device: seed ${seed}`);
const model: ModelShape = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16', blockSize: 64 };
const { qHeads, kvHeads, headDim: d } = model;
const DOC = 200;
const params: SearchParams = { budget: 30, sinks: 4, window: 8, ef: 0, chunk: 0, span: 0 };
const IDS = [Int32Array.of(20, 90, 150), Int32Array.of(7, 120)];

/** n rows per kv head of N(0, 1) as f16 words, and the values the words hold. */
function rows(rng: Rng, n: number): { w: Uint16Array; x: Float64Array } {
  const f = Float32Array.from({ length: n * d }, () => rng.normal()), w = new Uint16Array(f.length), back = new Float32Array(f.length);
  convert(bytesOf(f), 'f32', bytesOf(w), 'f16', f.length);
  convert(bytesOf(w), 'f16', bytesOf(back), 'f32', f.length);
  return { w, x: Float64Array.from(back) };
}

/**
 * The store as the engine calls it: attention over the exact rows it is
 * given (sinks and window), the kept ids and the own tokens (native attend),
 * no estimate; made-up counts and times. `overflow`: lse NaN for head 0.
 */
function standInStore(doc: KvSegment, overflow: () => boolean): WaveGpuStore {
  return {
    options: { kvHeads },
    async step(a: { q: Float32Array; scale: number; exact: Int32Array; ids?: boolean; own?: { k: Uint16Array[]; v: Uint16Array[]; tokens: number } }): Promise<WaveGpuStepResult> {
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
      const exact = Array.from({ length: kvHeads }, () => a.exact);
      const segments = [{ k: doc.k, v: doc.v, tokens: doc.tokens, ids: exact }, { k: doc.k, v: doc.v, tokens: doc.tokens, ids: IDS },
        ...(a.own ? [{ k: a.own.k, v: a.own.v, tokens: a.own.tokens, begin: 0, end: a.own.tokens }] : [])];
      await attend({ q: a.q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: a.scale, segments, out, lse });
      if (overflow()) lse[0] = NaN;
      return { ...(a.ids !== false && { ids: IDS }), kept: IDS.map((x) => x.length), scanned: [40, 60], out, lse, estimated: [150, 170], ms: 0.25, stages: {},
        host: { wait: 0.1, overlap: 0.02 }, graphCaptures: 0, misses: 0, bytesIn: 0, workMs: 0.3 };
    },
  } as unknown as WaveGpuStore;
}

describe(`decodeStep on the device path (seed ${seed})`, () => {
  it('answers attention over the document part and the own tokens, with the host path\'s stats; an overflow is refused and its token taken back', async () => {
    const rng = new Rng(seed);
    const dk = Array.from({ length: kvHeads }, () => rows(rng, DOC)), dv = Array.from({ length: kvHeads }, () => rows(rng, DOC));
    const docSeg = { tokens: DOC, k: dk.map((h) => h.w), v: dv.map((h) => h.w) } as unknown as KvSegment;
    let overflow = false, released = 0;
    const store = standInStore(docSeg, () => overflow);
    const held = { store, release: () => released++, countRest: () => {}, countOverCache: () => {}, cacheRows: 0, largestCluster: 8 } as HeldWaveStore;
    const gpu = { waveLayer: async () => held, release: () => {} } as unknown as GpuBackend;
    const doc = { meta: { id: 'doc', tokens: DOC }, layers: [docSeg, docSeg], indexes: new Map() } as unknown as LoadedDocument;
    const heads = Array.from({ length: kvHeads }, () => ({ arrays: { tokens: DOC } })) as unknown as ClusterIndex[];
    const session = new Session({ id: 's', model, documents: [doc], method: findMethod('wave')!, params, documentIndexes: [[heads, heads]], clusterIndexes: [[heads, heads]], budget: UNLIMITED, gpu });

    const ownK: Float64Array[][] = [], ownV: Float64Array[][] = [];
    const step = (position: number, timing: boolean) => {
      const k = Array.from({ length: kvHeads }, () => rows(rng, 1)), v = Array.from({ length: kvHeads }, () => rows(rng, 1));
      const bytes = (r: { w: Uint16Array }[]) => new Uint8Array(Uint16Array.from(r.flatMap((h) => [...h.w])).buffer);
      const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      const req = { layer: 1, q, scale: 0.25, position, k: { data: bytes(k), dtype: 'f16' as const, shape: [kvHeads, d] }, v: { data: bytes(v), dtype: 'f16' as const, shape: [kvHeads, d] },
        want: new Set<'out' | 'timing'>(timing ? ['out', 'timing'] : ['out']) };
      return { req, k, v };
    };

    for (let position = 0; position < 3; position++) {
      const { req, k, v } = step(position, position === 2);
      const r = await decodeStep(session, req);
      ownK.push(k.map((h) => h.x));
      ownV.push(v.map((h) => h.x));
      const own = position + 1, tokens = DOC + own;
      // The window's last rows are the own tokens' and the document's tail: [tokens - 8, DOC) of the document.
      const exact = [0, 1, 2, 3, ...Array.from({ length: DOC - (tokens - 8) }, (_, i) => tokens - 8 + i)];
      const kAll = (h: number) => Float64Array.from([...dk[h].x, ...ownK.flatMap((t) => [...t[h]])]), vAll = (h: number) => Float64Array.from([...dv[h].x, ...ownV.flatMap((t) => [...t[h]])]);
      const sel = Array.from({ length: kvHeads }, (_, h) => [...exact, ...IDS[h], ...Array.from({ length: own }, (_, i) => DOC + i)]);
      const ref = referenceAttention(req.q, Array.from({ length: kvHeads }, (_, h) => kAll(h)), Array.from({ length: kvHeads }, (_, h) => vAll(h)), qHeads, d, 0.25, sel);
      expect(maxRelError(r.out, ref.out, qHeads)).toBeLessThan(1e-4);
      // The host path's keys, in its order (the stream packs them as they come), with the device's counts.
      expect(Object.keys(r.stats)).toEqual(['tokens', 'attended', 'scanned', 'estimated', 'ms', 'selectMs', 'attendMs', 'backend', 'gpu']);
      expect(r.stats.tokens).toBe(tokens);
      expect(r.stats.attended).toBe(exact.length + (IDS[0].length + IDS[1].length) / 2 + own);
      expect(r.stats.scanned).toBe(50);
      expect(r.stats.estimated).toBe(160);
      expect(r.stats.backend).toBe('cuda');
      if (position < 2) expect(r.stats.gpu).toEqual({ residentMs: 0, kernelMs: 0.25 });
      else expect(r.stats.gpu).toEqual({ residentMs: 0, kernelMs: 0.25, host: { wait: 0.1, overlap: 0.02, own: 0.02, device: expect.any(Number) } });
      expect(session.stats.steps).toBe(own);
    }
    expect(session.stats.selected).toBeCloseTo([1, 2, 3].reduce((n, own) => n + 4 + (DOC - (DOC + own - 8)) + 2.5 + own, 0), 9);
    expect(released).toBe(3);

    // Head 0's lse NaN: refused (invalid, a 422), the token taken back, the store released; the retry at the same position is taken.
    overflow = true;
    const { req } = step(3, false);
    await expect(decodeStep(session, req)).rejects.toMatchObject({ kind: 'invalid', message: expect.stringMatching(/query head 0 overflow float32/) });
    expect(session.own[1].tokens).toBe(3);
    expect(session.stats.steps).toBe(3);
    expect(released).toBe(4);
    overflow = false;
    expect((await decodeStep(session, req)).stats.tokens).toBe(DOC + 4);
  });
});
