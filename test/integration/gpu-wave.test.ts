// `wave` on the GPU (engine/cache/device-wave.ts, engine/wave-on-device.ts):
// a server with a wave budget holds a document's layers on the device and
// answers each step in one native call; it selects the ids a CPU-only
// server selects and answers as it does (the estimate on and off), and with
// the estimate off as float64 attention over those ids. A second GPU server
// with paged stores (--gpu-wave-cache: K and V on the host, a share of the
// rows cached on the device) answers the same, the session's own tokens
// attended beside the device call or after it. Skipped without a
// CUDA device (here and in CI): bench/gpu-visit.sh runs it on the GPU host.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { cudaAvailable } from '../../addon/cuda.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { setOwnAttend } from '../../engine/wave-on-device.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { setPath } from '../../bench/wave-paths.js';

const seed = freshSeed();
console.log(`gpu-wave: seed ${seed}`);
const gpu = cudaAvailable();

type Health = { gpu: { wave?: { stores: number; refused: number; cacheShare: number; overCache: number } } };

describe.skipIf(!gpu.ok)('wave on the GPU (server)', () => {
  const model = { layers: 2, qHeads: 16, kvHeads: 4, headDim: 128, dtype: 'f16' as const };
  const { qHeads, kvHeads, headDim: d } = model;
  const DOC = 6000;
  const dirs = [tempDataDir(), tempDataDir(), tempDataDir()];
  let onGpu: RunningServer, onCpu: RunningServer, onPaged: RunningServer;
  const chunks: KvChunk[] = [];

  // The device's ids are compared with the CPU server's bit for bit: the
  // plain path's (bench/wave-paths.ts; the tensor-core paths, on by default,
  // are checked in test/native/wave-gpu-mma.test.ts).
  let restorePath = () => {};
  beforeAll(async () => {
    restorePath = setPath('plain');
    onGpu = await startInProcess(dirs[0].dir, { gpuWaveBudget: 4 * 2 ** 30 });
    onCpu = await startInProcess(dirs[1].dir, { gpuBudget: 0 });
    // 75% of a layer's rows: above what a step of the sessions below reads (per head: under the 2080-row target at
    // probe 8 + the largest cluster + the sinks/window rows' clusters, at clusters of 8: the document's clusterSize
    // below; at 16 those clusters hold twice the rows and the estimate-off steps ran on the host), so every step runs
    // on the device.
    onPaged = await startInProcess(dirs[2].dir, { gpuWaveBudget: 4 * 2 ** 30, gpuWaveCache: 0.75 });
    const rng = new Rng(seed);
    for (let l = 0; l < model.layers; l++) chunks.push(randomKv(rng, 'f16', kvHeads, DOC, d));
    for (const s of [onGpu, onCpu, onPaged]) {
      const c = new KvrecallClient({ url: s.url });
      await c.createDocument('doc', model, { methods: ['wave'], clusterSize: 8 });
      for (let l = 0; l < model.layers; l++) await c.uploadDocumentKv('doc', { layer: l, start: 0, k: chunks[l].k, v: chunks[l].v });
      await c.sealDocument('doc');
    }
  }, 240_000);
  afterAll(async () => {
    restorePath();
    setOwnAttend('native');
    for (const s of [onGpu, onCpu, onPaged]) await s?.close();
    for (const t of dirs) t.cleanup();
  });

  for (const estimate of [true, false])
    it(`estimate ${estimate ? 'on' : 'off'}: the device selects the CPU server's ids and answers as it does, step after step`, async () => {
      const rng = new Rng(seed + (estimate ? 1 : 2));
      const params = { method: 'wave', budget: 180, sinks: 16, window: 64, estimate };
      const sessions = await Promise.all([onGpu, onCpu, onPaged].map(async (s) => {
        const c = new KvrecallClient({ url: s.url });
        return { c, id: (await c.createSession({ model, documents: ['doc'], ...params })).id };
      }));
      const own: KvChunk[][] = Array.from({ length: model.layers }, () => []);
      for (let step = 0; step < 4; step++)
        for (let layer = 0; layer < model.layers; layer++) {
          // The own tokens attended inside the device call, beside it (on libuv's pool) or after it, by turns.
          setOwnAttend((['native', 'beside', 'after'] as const)[(step + layer) % 3]);
          const tok = randomKv(rng, 'f16', kvHeads, 1, d);
          own[layer].push(tok);
          // Queries near document keys: attention with a few heavy rows, as decoding sees.
          const q = randomQ(rng, qHeads, d, 2);
          // Odd steps without the selection: the device keeps the ids (only their counts come back), the answer is the same.
          // Odd steps ask for the host stages too (return 'timing': stats.gpu.host).
          const ret: ('out' | 'selection' | 'timing')[] = step % 2 === 0 ? ['out', 'selection'] : ['out', 'timing'];
          const body = { layer, q: tensor('f32', [qHeads, d], q), k: { ...tok.k, shape: [kvHeads, d] }, v: { ...tok.v, shape: [kvHeads, d] }, return: ret };
          const [g, c, p] = await Promise.all(sessions.map((s) => s.c.attend(s.id, body)));
          // The paged store runs the dense store's kernels on the same rows: the same ids and counts, the same answer
          // (1e-6: the estimate's touched clusters are listed in atomic order, so tiles may round differently).
          expect(p.stats.backend).toBe('cuda');
          if (g.selection) for (let h = 0; h < kvHeads; h++) expect(Array.from(p.selection![h]).sort((a, b) => a - b)).toEqual(Array.from(g.selection[h]).sort((a, b) => a - b));
          expect(p.stats.attended).toBe(g.stats.attended);
          expect(p.stats.estimated).toBe(g.stats.estimated);
          expect(maxRelError(p.out, g.out, qHeads)).toBeLessThan(1e-6);
          expect(maxRelErrorScalar(p.lse, g.lse)).toBeLessThan(1e-6);
          expect(g.stats.backend).toBe('cuda');
          expect(c.stats.backend).toBe('cpu');
          const host = (g.stats as { gpu?: { host?: Record<string, number> } }).gpu?.host;
          if (step % 2 === 0) expect(host).toBeUndefined();
          else {
            // The native call's stages lie within the store's promise, which settles within the select time.
            for (const k of ['prep', 'launch', 'overlap', 'wait', 'copy', 'convert', 'own', 'device']) expect(host?.[k]).toBeGreaterThanOrEqual(0);
            expect(host!.device).toBeGreaterThanOrEqual(host!.prep + host!.launch + host!.overlap + host!.wait + host!.copy - 1e-3);
            expect(host!.device).toBeLessThanOrEqual(g.stats.selectMs + 1e-3);
          }
          expect(g.selection === undefined).toBe(step % 2 === 1);
          if (g.selection) for (let h = 0; h < kvHeads; h++) expect(Array.from(g.selection[h]).sort((a, b) => a - b)).toEqual(Array.from(c.selection![h]).sort((a, b) => a - b));
          expect(g.stats.attended).toBe(c.stats.attended);
          if (estimate) expect(g.stats.estimated).toBe(c.stats.estimated);
          // f32 tiles on the device against the host's native estimate: 1e-4 relative.
          expect(maxRelError(g.out, c.out, qHeads)).toBeLessThan(1e-4);
          expect(maxRelErrorScalar(g.lse, c.lse)).toBeLessThan(1e-4);
          if (!estimate && g.selection) {
            const all = [chunks[layer], ...own[layer]];
            const rows = g.selection!.map((ids) => Array.from(ids));
            const ref = referenceAttention(q, concatValues(all, 'kValues'), concatValues(all, 'vValues'), qHeads, d, 1 / Math.sqrt(d), rows);
            expect(maxRelError(g.out, ref.out, qHeads)).toBeLessThan(1e-4);
            expect(maxRelErrorScalar(g.lse, ref.lse)).toBeLessThan(1e-4);
          }
        }
      const h = (await sessions[0].c.health()) as unknown as Health;
      expect(h.gpu.wave?.stores).toBe(model.layers);
      expect(h.gpu.wave?.refused).toBe(0);
      const hp = (await sessions[2].c.health()) as unknown as Health;
      expect(hp.gpu.wave).toMatchObject({ stores: model.layers, refused: 0, cacheShare: 0.75, overCache: 0 });
    }, 240_000);
});
