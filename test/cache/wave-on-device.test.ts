// engine/wave-on-device.ts's plumbing, with a stand-in for the device's
// store (no GPU runs here; test/integration/gpu-wave.test.ts runs the real
// one through a server on a GPU): the device's answer for the document and
// the session's own tokens, attended inside the device call (the default,
// as the binding does) or by the host side by side and merged here, is
// attention over both (float64 reference); and when either half fails, the
// layer's store is released only after both have settled, so a failed host
// half never frees a store the device is still reading.
import { describe, expect, it } from 'vitest';
import { attend, bytesOf, convert } from '../../addon/kernels.js';
import type { WaveGpuStepResult, WaveGpuStore } from '../../addon/wave-gpu.js';
import type { ModelShape } from '../../core/model.js';
import type { Session } from '../../engine/session.js';
import { setOwnAttend, waveOnDevice, type OwnAttend } from '../../engine/wave-on-device.js';
import type { LayerContext, SearchParams } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`wave-on-device: seed ${seed}`);
const model: ModelShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16', blockSize: 64 };
const { qHeads, kvHeads, headDim: d } = model;
const DOC = 300, OWN = 5;
const params: SearchParams = { budget: 40, sinks: 4, window: 8, ef: 0, chunk: 0, span: 0 };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A segment of n rows of N(0, 1) per head, as f16 words, and the values the words hold. */
function segmentOf(rng: Rng, n: number): { seg: KvSegment; k: Float64Array[]; v: Float64Array[] } {
  const words = () => {
    const f = Float32Array.from({ length: n * d }, () => rng.normal()), w = new Uint16Array(f.length);
    convert(bytesOf(f), 'f32', bytesOf(w), 'f16', f.length);
    const back = new Float32Array(f.length);
    convert(bytesOf(w), 'f16', bytesOf(back), 'f32', f.length);
    return { w, x: Float64Array.from(back) };
  };
  const k = Array.from({ length: kvHeads }, words), v = Array.from({ length: kvHeads }, words);
  const seg = { tokens: n, k: k.map((h) => h.w), v: v.map((h) => h.w) } as unknown as KvSegment;
  return { seg, k: k.map((h) => h.x), v: v.map((h) => h.x) };
}

/**
 * The device's half as a stand-in computes it: attention over the
 * document's sinks, window and a few ids per head (native attend), no
 * estimate, and the own tokens when the call is given them (`own`: the
 * binding attends them within the call and merges them). `fail`: rejects
 * after `delay` ms instead.
 */
function standInStore(doc: KvSegment, ids: Int32Array[], opts: { delay: number; fail?: boolean; log: string[]; exact?: Int32Array[] }): WaveGpuStore {
  return {
    options: { kvHeads },
    async step(a: { q: Float32Array; scale: number; skip: [number, number][]; exact: Int32Array; ids?: boolean; own?: { k: Uint16Array[]; v: Uint16Array[]; tokens: number } }): Promise<WaveGpuStepResult> {
      opts.log.push(a.own ? 'device start with own' : 'device start');
      opts.exact?.push(a.exact);
      await sleep(opts.delay);
      if (opts.fail) {
        opts.log.push('device failed');
        throw new Error('device step failed');
      }
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
      const segments = [...a.skip.map(([begin, end]) => ({ k: doc.k, v: doc.v, tokens: doc.tokens, begin, end })), { k: doc.k, v: doc.v, tokens: doc.tokens, ids },
        ...(a.own ? [{ k: a.own.k, v: a.own.v, tokens: a.own.tokens, begin: 0, end: a.own.tokens }] : [])];
      await attend({ q: a.q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: a.scale, segments, out, lse });
      opts.log.push('device done');
      // As the device answers: the ids only when asked for, their counts always.
      return { ...(a.ids !== false && { ids }), kept: ids.map((x) => x.length), scanned: [0, 0], out, lse, estimated: [0, 0], ms: 0, stages: {}, host: {}, graphCaptures: 0, misses: 0, bytesIn: 0, workMs: 0 };
    },
  } as unknown as WaveGpuStore;
}

function sessionWith(store: WaveGpuStore, own: KvSegment, log: string[], hostFails = false): Session {
  return {
    model,
    method: { name: 'wave' },
    clustersFor: () => undefined,
    gpu: { waveLayer: () => ({ store, release: () => log.push('released') }) },
    cache: {
      async attend(parts: { segment: KvSegment; begin: number; end: number }[], a: { q: Float32Array; scale: number; out: Float32Array; lse: Float32Array }, beside = false) {
        log.push(beside ? 'host start beside' : 'host start');
        if (hostFails) {
          log.push('host failed');
          throw new Error('host attend failed');
        }
        const segments = parts.map((p) => ({ k: p.segment.k, v: p.segment.v, tokens: p.segment.tokens, begin: p.begin, end: p.end }));
        // As SessionCache.attend passes it on: a beside attend runs on libuv's pool (addon/kernels.ts).
        await attend({ q: a.q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: a.scale, segments, out: a.out, lse: a.lse }, beside);
        log.push('host done');
        return { backend: 'cpu' };
      },
    },
  } as unknown as Session;
}

function contextOf(doc: KvSegment, own: KvSegment): LayerContext {
  return { layer: 0, segments: [doc, own], offsets: [0, DOC], indexes: [[{}, {}] as never, undefined], tokens: DOC + OWN, qHeads, kvHeads, headDim: d, memo: new Map() } as unknown as LayerContext;
}

describe('wave on the device: the host half beside it', () => {
  for (const wantIds of [true, false])
  for (const mode of ['native', 'beside'] as const)
  it(`merges the document (device) and the own tokens (${mode}) into attention over both (ids ${wantIds ? 'read back' : 'left on the device'})`, async () => {
    const rng = new Rng(seed);
    const doc = segmentOf(rng, DOC), own = segmentOf(rng, OWN);
    const ids = [Int32Array.of(30, 77, 150), Int32Array.of(12, 200)];
    const log: string[] = [], exact: Int32Array[] = [];
    const store = standInStore(doc.seg, ids, { delay: 30, log, exact });
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    setOwnAttend(mode);
    const r = await waveOnDevice(sessionWith(store, own.seg, log), contextOf(doc.seg, own.seg), params, q, 1 / Math.sqrt(d), wantIds).finally(() => setOwnAttend('native'));
    expect(r).toBeDefined();
    const out = r!.out;
    // Native: the own tokens went into the device call; beside: the host half started before the device's finished. The store was released last.
    if (mode === 'native') expect(log.slice(0, 2)).toEqual(['device start with own', 'device done']);
    else expect(log.indexOf('host start beside')).toBeLessThan(log.indexOf('device done'));
    expect(log[log.length - 1]).toBe('released');
    // Float64 over the rows the selection names: the document's sinks, window and ids, then the own tokens.
    // (sinks [0, 4) and the window's last 3 document rows; the own tokens are the window's rest.)
    const docRows = (h: number) => [...[0, 1, 2, 3], ...Array.from({ length: 3 }, (_, i) => DOC - 3 + i), ...Array.from(ids[h])];
    // The device attends those sinks and window rows as its exact rows, listed once each, ascending.
    expect(exact).toEqual([Int32Array.of(0, 1, 2, 3, DOC - 3, DOC - 2, DOC - 1)]);
    const kAll = (h: number) => Float64Array.from([...doc.k[h], ...own.k[h]]), vAll = (h: number) => Float64Array.from([...doc.v[h], ...own.v[h]]);
    const sel = Array.from({ length: kvHeads }, (_, h) => [...docRows(h), ...Array.from({ length: OWN }, (_, i) => DOC + i)]);
    const ref = referenceAttention(q, Array.from({ length: kvHeads }, (_, h) => kAll(h)), Array.from({ length: kvHeads }, (_, h) => vAll(h)), qHeads, d, 1 / Math.sqrt(d), sel);
    expect(maxRelError(out, ref.out, qHeads)).toBeLessThan(1e-4);
    // Parts: sinks, window, (the kept ids,) the own tokens; attended counts the kept ids either way.
    expect(r!.selection.parts.length).toBe(wantIds ? 4 : 3);
    expect(r!.selection.parts.some((p) => p.ids)).toBe(wantIds);
    expect(r!.attended).toBe(sel.reduce((n, rows) => n + rows.length, 0) / kvHeads);
  });

  it('attends the own tokens inside the device call by default, beside it or after it when switched; the same answer', async () => {
    const rng = new Rng(seed + 5);
    const doc = segmentOf(rng, DOC), own = segmentOf(rng, OWN);
    const ids = [Int32Array.of(30, 77), Int32Array.of(12)];
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    const run = async (mode?: OwnAttend) => {
      if (mode !== undefined) setOwnAttend(mode);
      const log: string[] = [];
      try {
        const r = await waveOnDevice(sessionWith(standInStore(doc.seg, ids, { delay: 5, log }), own.seg, log), contextOf(doc.seg, own.seg), params, q, 0.25, false);
        return { log, out: r!.out, lse: r!.lse };
      } finally {
        setOwnAttend('native');
      }
    };
    const [after, at, byDefault] = [await run('after'), await run('beside'), await run()];
    expect(at.log.slice(0, 2)).toEqual(['host start beside', 'device start']);
    expect(after.log.slice(0, 2)).toEqual(['device start', 'host start']);
    expect(byDefault.log).toEqual(['device start with own', 'device done', 'released']);
    expect(Buffer.from(at.out.buffer).equals(Buffer.from(after.out.buffer))).toBe(true);
    expect(Buffer.from(at.lse.buffer).equals(Buffer.from(after.lse.buffer))).toBe(true);
    // Within the call the parts are combined in another order: the same attention to f32 rounding.
    expect(maxRelError(byDefault.out, at.out, qHeads)).toBeLessThan(1e-6);
    for (let h = 0; h < qHeads; h++) expect(Math.abs(byDefault.lse[h] - at.lse[h])).toBeLessThan(1e-5);
  });

  it('leaves a GQA group too large for the device call to the host path, holding no store', async () => {
    const rng = new Rng(seed + 3);
    const doc = segmentOf(rng, DOC), own = segmentOf(rng, OWN);
    const log: string[] = [];
    const session = sessionWith(standInStore(doc.seg, [Int32Array.of(5), Int32Array.of(6)], { delay: 0, log }), own.seg, log);
    const gpu = session.gpu as unknown as { waveLayer: (...a: unknown[]) => unknown };
    const waveLayer = gpu.waveLayer;
    gpu.waveLayer = (...a: unknown[]) => (log.push('held'), waveLayer(...a));
    // group · (headDim + 8) past the 12288 floats the device step holds in shared memory (its binding refuses it).
    const group = Math.floor(12288 / (d + 8)) + 1, wide = { ...contextOf(doc.seg, own.seg), qHeads: kvHeads * group } as LayerContext;
    const n = kvHeads * group;
    expect(await waveOnDevice(session, wide, params, new Float32Array(n * d), 0.25, false)).toBeUndefined();
    expect(log).toEqual([]);
  });

  it('leaves a step a paged store\'s cache could not hold to the host path, counted, the store released', async () => {
    const rng = new Rng(seed + 4);
    const doc = segmentOf(rng, DOC), own = segmentOf(rng, OWN);
    const log: string[] = [];
    const session = sessionWith(standInStore(doc.seg, [Int32Array.of(5), Int32Array.of(6)], { delay: 0, log }), own.seg, log);
    const gpu = session.gpu as unknown as { waveLayer: (...a: unknown[]) => unknown };
    // One cluster of every document row: any step reads them all, past a cache of DOC rows for two heads.
    const head = { arrays: { tokenCluster: new Int32Array(DOC), counts: Int32Array.of(DOC) } };
    const ctx = { ...contextOf(doc.seg, own.seg), indexes: [[head, head] as never, undefined] } as LayerContext;
    const run = async (cacheRows: number) => {
      gpu.waveLayer = () => ({ store: standInStore(doc.seg, [Int32Array.of(5), Int32Array.of(6)], { delay: 0, log }), release: () => log.push('released'),
        countOverCache: () => log.push('over cache'), cacheRows, largestCluster: DOC });
      return waveOnDevice(session, ctx, params, Float32Array.from({ length: qHeads * d }, () => rng.normal()), 0.25, false);
    };
    expect(await run(2 * DOC - 1)).toBeUndefined();
    expect(log).toEqual(['over cache', 'released']);
    log.length = 0;
    expect(await run(2 * DOC)).toBeDefined();
    expect(log).toContain('device done');
    expect(log).not.toContain('over cache');
  });

  it('waits for the own tokens\' attend started beside before releasing the store when the device call throws at once', async () => {
    const rng = new Rng(seed + 6);
    const doc = segmentOf(rng, DOC), own = segmentOf(rng, OWN);
    const log: string[] = [];
    // A refusal the binding throws on the calling thread (refused arguments), not a rejection.
    const step = (): never => {
      log.push('device refused');
      throw new Error('device refused at once');
    };
    const store = { options: { kvHeads }, step } as unknown as WaveGpuStore;
    const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
    setOwnAttend('beside');
    try {
      await expect(waveOnDevice(sessionWith(store, own.seg, log), contextOf(doc.seg, own.seg), params, q, 0.25, false)).rejects.toThrow(/device refused at once/);
    } finally {
      setOwnAttend('native');
    }
    expect(log).toEqual(['host start beside', 'device refused', 'host done', 'released']);
  });

  for (const failing of ['device', 'host'] as const)
    it(`releases the store only after both halves settle when the ${failing} half fails`, async () => {
      const rng = new Rng(seed + (failing === 'device' ? 1 : 2));
      const doc = segmentOf(rng, DOC), own = segmentOf(rng, OWN);
      const log: string[] = [];
      // The host half fails at once while the device still works (or the device fails after the host is done).
      const store = standInStore(doc.seg, [Int32Array.of(5), Int32Array.of(6)], { delay: 40, fail: failing === 'device', log });
      const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      // The own tokens on the host (beside): the path with two halves.
      setOwnAttend('beside');
      await expect(waveOnDevice(sessionWith(store, own.seg, log, failing === 'host'), contextOf(doc.seg, own.seg), params, q, 0.25, true).finally(() => setOwnAttend('native'))).rejects.toThrow(failing === 'device' ? /device step failed/ : /host attend failed/);
      expect(log[log.length - 1]).toBe('released');
      expect(log).toContain(failing === 'device' ? 'device failed' : 'device done');
    });
});
