// engine/rest-on-device.ts's plumbing, with a stand-in for the device's store
// (no GPU runs here; test/native/wave-gpu-rest.test.ts checks the real call
// against the host's estimate, and test/integration/gpu-rest.test.ts a GPU
// server's nosa and topk-blocks sessions against a CPU server's): the rows a
// selection hands the device (ranges, blocks, ids per kv head, never listed
// row by row) are the rows the host's estimate takes, so a store that
// estimates exactly those rows on the host answers as estimateRest does, to
// the bit; the store is released after the call (also a failed one) and the
// call counted; the host path stays where the device cannot take the step.
import { describe, expect, it } from 'vitest';
import { estimateClusters } from '../../addon/estimate.js';
import type { WaveGpuRestArgs, WaveGpuRestResult, WaveGpuStore } from '../../addon/wave-gpu.js';
import { expandRows } from '../../bench/wave-gpu-rest.js';
import { estimateRest } from '../../engine/estimate.js';
import { restRows, startRestOnDevice } from '../../engine/rest-on-device.js';
import type { Session } from '../../engine/session.js';
import { concatRows, rowsOf } from '../../engine/cache/selection-parts.js';
import type { LayerContext, Selection, SelectionPart } from '../../index/method.js';
import { buildClusters } from '../../index/wave/cluster-build.js';
import { centroidStride, decodeClusters } from '../../index/wave/cluster-codec.js';
import { ClusterIndex } from '../../index/wave/cluster-index.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { bytesOf, convert } from '../../addon/kernels.js';

/** The estimate, started and awaited (undefined where the host estimates). */
async function restOnDevice(...a: Parameters<typeof startRestOnDevice>) {
  const started = await startRestOnDevice(...a);
  return started && (await started.estimate);
}

const seed = freshSeed();
console.log(`rest-on-device: seed ${seed}`);
const qHeads = 6, kvHeads = 3, d = 16, G = qHeads / kvHeads, DOC = 2000, B = 32;

const f16 = (f: Float32Array) => {
  const w = new Uint16Array(f.length);
  convert(bytesOf(f), 'f32', bytesOf(w), 'f16', f.length);
  return w;
};

async function documentOf(rng: Rng) {
  const k: Uint16Array[] = [], v: Uint16Array[] = [], heads: ClusterIndex[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const keys = f16(Float32Array.from({ length: DOC * d }, () => rng.normal())), values = f16(Float32Array.from({ length: DOC * d }, () => rng.normal()));
    const bytes = await buildClusters({ keys, values, tokens: DOC, headDim: d, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 }, { clusterSize: 8, segmentTokens: 8192, iterations: 3, seed: seed + h });
    heads.push(new ClusterIndex(decodeClusters(bytes), keys, values));
    k.push(keys);
    v.push(values);
  }
  const doc = { tokens: DOC, k, v } as unknown as KvSegment;
  const own = { tokens: 3, k: [], v: [] } as unknown as KvSegment;
  const ctx = { layer: 0, segments: [doc, own], offsets: [0, DOC], indexes: [undefined, undefined], tokens: DOC + 3, qHeads, kvHeads, headDim: d, memo: new Map() } as unknown as LayerContext;
  return { doc, own, heads, ctx };
}

/** A store that estimates the rows it is given on the host (estimateClusters over them), as the device must. */
function standInStore(heads: ClusterIndex[], log: string[], fail = false): WaveGpuStore {
  return {
    async rest(a: WaveGpuRestArgs): Promise<WaveGpuRestResult> {
      log.push('rest');
      if (fail) throw new Error('device rest failed');
      const rows = heads.map((_, h) => expandRows(a, h, DOC));
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(kvHeads), scanned = new Float32Array(kvHeads);
      await estimateClusters({ q: a.q, qHeads, kvHeads, headDim: d, centroidStride: centroidStride(d), dtype: 'f16', scale: a.scale,
        segments: [heads.map((x, h) => x.estimateArgs(rows[h], a.order))], out, lse, estimated, scanned });
      return { out, lse, estimated: [...estimated], scanned: [...scanned], rows: rows.map((r) => r.length), ms: 0, stages: {}, host: {}, graphCaptures: 0, workMs: 0 };
    },
  } as unknown as WaveGpuStore;
}

function sessionWith(store: WaveGpuStore | undefined, log: string[], method = 'nosa'): Session {
  return {
    model: { layers: 1, qHeads, kvHeads, headDim: d, dtype: 'f16', blockSize: B },
    method: { name: method },
    gpu: { waveLayer: () => store && { store, release: () => log.push('released'), countRest: () => log.push('counted') } },
  } as unknown as Session;
}

/** A block method's selection: sinks and window ranges, blocks per head (some past the end, a partial last one, one head none), ids, the own tokens. */
function selectionOf(rng: Rng, doc: KvSegment, own: KvSegment): Selection {
  const nb = Math.ceil(DOC / B);
  const blocks = Array.from({ length: kvHeads }, (_, h) => (h === 2 ? new Int32Array(0) : Int32Array.from(new Set([...Array.from({ length: 6 }, () => rng.int(nb)), nb - 1, nb + 2])).sort()));
  const ids = Array.from({ length: kvHeads }, () => Int32Array.from({ length: 5 }, () => rng.int(DOC)));
  const parts: SelectionPart[] = [
    { segment: doc, begin: 0, end: 8 },
    { segment: doc, blocks: { size: B, ids: blocks } },
    { segment: doc, ids },
    { segment: doc, begin: DOC - 40, end: DOC },
    { segment: own, begin: 0, end: 3 },
  ];
  return { parts, scanned: 0 };
}

describe('the estimate of a selection on the device: plumbing', () => {
  it('hands the device the rows the host estimates, per head, and answers as estimateRest', async () => {
    const rng = new Rng(seed);
    const { doc, own, heads, ctx } = await documentOf(rng);
    for (let trial = 0; trial < 3; trial++) {
      const selection = selectionOf(rng, doc, own);
      const rows = restRows(selection, doc, kvHeads)!;
      for (let h = 0; h < kvHeads; h++) {
        const host = Array.from(concatRows(selection.parts.filter((p) => p.segment === doc).map((p) => rowsOf(p, h)))).sort((a, b) => a - b);
        expect(Array.from(expandRows(rows, h, DOC)).sort((a, b) => a - b)).toEqual(host);
      }
      const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      const log: string[] = [];
      const got = await restOnDevice(sessionWith(standInStore(heads, log), log), ctx, selection, [heads], q, 0.25);
      expect(log).toEqual(['rest', 'counted', 'released']);
      const want = await estimateRest(ctx, selection, [heads], q, 0.25);
      expect(got!.out).toEqual(want.out);
      expect(got!.lse).toEqual(want.lse);
      expect(got!.estimated).toEqual(want.estimated);
      expect(got!.scanned).toEqual(want.scanned);
    }
  });

  it('stays on the host where the device cannot take the step, and releases the store after a failed call', async () => {
    const rng = new Rng(seed + 1);
    const { doc, own, heads, ctx } = await documentOf(rng);
    const selection = selectionOf(rng, doc, own), q = new Float32Array(qHeads * d);
    const log: string[] = [];
    expect(await restOnDevice(sessionWith(standInStore(heads, log), log, 'wave'), ctx, selection, [heads], q, 1)).toBeUndefined();
    expect(await restOnDevice(sessionWith(undefined, log), ctx, selection, [heads], q, 1)).toBeUndefined();
    expect(await restOnDevice({ ...sessionWith(standInStore(heads, log), log), gpu: undefined } as unknown as Session, ctx, selection, [heads], q, 1)).toBeUndefined();
    // The document attended whole: nothing to estimate, the host path's early answer.
    const whole = { parts: [{ segment: doc, begin: 0, end: DOC }], scanned: 0 };
    expect(await restOnDevice(sessionWith(standInStore(heads, log), log), ctx, whole, [heads], q, 1)).toBeUndefined();
    // Two documents: estimateRest estimates both, one device store holds one.
    const two = { ...ctx, segments: [doc, doc, own] } as LayerContext;
    expect(await restOnDevice(sessionWith(standInStore(heads, log), log), two, selection, [heads, heads], q, 1)).toBeUndefined();
    // Past REST_MAX_ROWS rows a head (counted, not listed) the host estimates.
    const big = { parts: [{ segment: doc, blocks: { size: 1 << 19, ids: [Int32Array.of(0), Int32Array.of(0, 1, 2), Int32Array.of(0)] } }], scanned: 0 };
    expect(restRows(big, doc, kvHeads)).toBeUndefined();
    expect(restRows({ parts: [{ segment: doc, blocks: { size: 1 << 19, ids: [Int32Array.of(0, 1), Int32Array.of(0, 1), Int32Array.of(0)] } }], scanned: 0 }, doc, kvHeads)).toBeDefined();
    // Paged stores (--gpu-wave-cache) refuse rest: the host estimates, holding no store.
    const paged = sessionWith(standInStore(heads, log), log);
    (paged.gpu as unknown as { options: { waveCacheShare: number } }).options = { waveCacheShare: 0.1 };
    expect(await restOnDevice(paged, ctx, selection, [heads], q, 1)).toBeUndefined();
    expect(log).toEqual([]);
    await expect(restOnDevice(sessionWith(standInStore(heads, log, true), log), ctx, selection, [heads], q, 1)).rejects.toThrow(/device rest failed/);
    expect(log).toEqual(['rest', 'released']);
  });

  it('has made the call, and still holds the store, when it resolves; releases the store once the call ends', async () => {
    const rng = new Rng(seed + 3);
    const { doc, own, heads, ctx } = await documentOf(rng);
    const selection = selectionOf(rng, doc, own), q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    const log: string[] = [];
    // A store whose call ends when told: a caller that starts its next GPU work once this resolves has the two in flight together.
    let end!: () => void;
    const ended = new Promise<void>((r) => (end = r));
    const inner = standInStore(heads, log);
    const store = { rest: async (a: WaveGpuRestArgs) => {
      const r = inner.rest(a);
      await ended;
      return r;
    } } as unknown as WaveGpuStore;
    const started = await startRestOnDevice(sessionWith(store, log), ctx, selection, [heads], q, 0.25);
    expect(started).toBeDefined();
    expect(log).toEqual(['rest']);
    await new Promise<void>((r) => setImmediate(r));
    expect(log).toEqual(['rest']);
    end();
    const got = await started!.estimate;
    expect(log).toEqual(['rest', 'counted', 'released']);
    const want = await estimateRest(ctx, selection, [heads], q, 0.25);
    expect(got.out).toEqual(want.out);
    expect(got.lse).toEqual(want.lse);
  });

  it('leaves a GQA group too large for the device call to the host, holding no store', async () => {
    const rng = new Rng(seed + 2);
    const { doc, own, heads, ctx } = await documentOf(rng);
    const selection = selectionOf(rng, doc, own);
    const log: string[] = [];
    // A store that answers any group (nothing estimated): what is checked is whether the call is made.
    const store = {
      async rest(a: WaveGpuRestArgs): Promise<WaveGpuRestResult> {
        log.push('rest');
        const none = new Array<number>(kvHeads).fill(0);
        return { out: new Float32Array(a.qHeads * d), lse: new Float32Array(a.qHeads).fill(-Infinity), estimated: none, scanned: none, rows: none, ms: 0, stages: {}, host: {}, graphCaptures: 0, workMs: 0 };
      },
    } as unknown as WaveGpuStore;
    const session = sessionWith(store, log);
    const gpu = session.gpu as unknown as { waveLayer: (...a: unknown[]) => unknown };
    const waveLayer = gpu.waveLayer;
    gpu.waveLayer = (...a: unknown[]) => (log.push('held'), waveLayer(...a));
    // group · (headDim + 8) past the 12288 floats the device call holds in shared memory (its binding refuses it):
    // a step that handed it over would fail, every step, where the host estimates it.
    const group = Math.floor(12288 / (d + 8)) + 1, wide = { ...ctx, qHeads: kvHeads * group } as LayerContext;
    expect(await restOnDevice(session, wide, selection, [heads], new Float32Array(kvHeads * group * d), 1)).toBeUndefined();
    expect(log).toEqual([]);
    // The largest group that fits is handed over.
    const fits = { ...ctx, qHeads: kvHeads * (group - 1) } as LayerContext;
    expect(await restOnDevice(session, fits, selection, [heads], new Float32Array(kvHeads * (group - 1) * d), 1)).toBeDefined();
    expect(log).toEqual(['held', 'rest', 'counted', 'released']);
  });
});
