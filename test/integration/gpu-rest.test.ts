// nosa and topk-blocks on the GPU over a document with wave's clusters: a
// server with a wave budget estimates what the method leaves out on the
// device (engine/rest-on-device.ts, WaveGpuStore.rest) instead of on the
// host; it selects what a CPU-only server selects and answers as it does
// (out and lse within 1e-4 relative: the pool's f32 attention and the
// device's f32 estimate tiles against the host's), with the same estimated
// and scanned counts, and its health counts every layer-step's estimate as
// run on the device. Skipped without a CUDA device (here and in CI).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { cudaAvailable } from '../../addon/cuda.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`gpu-rest: seed ${seed}`);
const gpu = cudaAvailable();

type Health = { gpu: { wave?: { stores: number; refused: number; rests: number } } };

describe.skipIf(!gpu.ok)('the estimate of nosa and topk-blocks on the GPU (server)', () => {
  const model = { layers: 2, qHeads: 16, kvHeads: 4, headDim: 128, dtype: 'f16' as const };
  const { qHeads, kvHeads, headDim: d } = model;
  const DOC = 6000, STEPS = 4;
  const dirs = [tempDataDir(), tempDataDir()];
  let onGpu: RunningServer, onCpu: RunningServer;
  let rests = 0;

  beforeAll(async () => {
    onGpu = await startInProcess(dirs[0].dir, { gpuWaveBudget: 4 * 2 ** 30 });
    onCpu = await startInProcess(dirs[1].dir, { gpuBudget: 0 });
    const rng = new Rng(seed);
    const chunks: KvChunk[] = [];
    for (let l = 0; l < model.layers; l++) chunks.push(randomKv(rng, 'f16', kvHeads, DOC, d));
    for (const s of [onGpu, onCpu]) {
      const c = new KvrecallClient({ url: s.url });
      await c.createDocument('doc', model, { methods: ['wave', 'nosa', 'topk-blocks'] });
      for (let l = 0; l < model.layers; l++) await c.uploadDocumentKv('doc', { layer: l, start: 0, k: chunks[l].k, v: chunks[l].v });
      await c.sealDocument('doc');
    }
  }, 240_000);
  afterAll(async () => {
    for (const s of [onGpu, onCpu]) await s?.close();
    for (const t of dirs) t.cleanup();
  });

  for (const method of ['nosa', 'topk-blocks'])
    it(`${method}: the device estimates the rest as the CPU server's host does, step after step`, async () => {
      const rng = new Rng(seed + (method === 'nosa' ? 1 : 2));
      const params = { method, budget: 600, sinks: 16, window: 64 };
      const sessions = await Promise.all([onGpu, onCpu].map(async (s) => {
        const c = new KvrecallClient({ url: s.url });
        return { c, id: (await c.createSession({ model, documents: ['doc'], ...params })).id };
      }));
      for (let step = 0; step < STEPS; step++)
        for (let layer = 0; layer < model.layers; layer++) {
          const tok = randomKv(rng, 'f16', kvHeads, 1, d);
          // Queries near document keys: attention with a few heavy rows, as decoding sees.
          const q = randomQ(rng, qHeads, d, 2);
          const body = { layer, q: tensor('f32', [qHeads, d], q), k: { ...tok.k, shape: [kvHeads, d] }, v: { ...tok.v, shape: [kvHeads, d] }, return: ['out', 'selection'] as ('out' | 'selection')[] };
          const [g, c] = await Promise.all(sessions.map((s) => s.c.attend(s.id, body)));
          expect(g.stats.backend).toBe('cuda');
          expect(c.stats.backend).toBe('cpu');
          for (let h = 0; h < kvHeads; h++) expect(Array.from(g.selection![h]).sort((a, b) => a - b)).toEqual(Array.from(c.selection![h]).sort((a, b) => a - b));
          expect(g.stats.attended).toBe(c.stats.attended);
          expect(c.stats.estimated).toBeGreaterThan(0);
          expect(g.stats.estimated).toBe(c.stats.estimated);
          expect(g.stats.scanned).toBe(c.stats.scanned);
          expect(maxRelError(g.out, c.out, qHeads)).toBeLessThan(1e-4);
          expect(maxRelErrorScalar(g.lse, c.lse)).toBeLessThan(1e-4);
          rests++;
        }
      const h = (await sessions[0].c.health()) as unknown as Health;
      // Every step's estimate ran on the device: the layers' stores held, none refused.
      expect(h.gpu.wave?.rests).toBe(rests);
      expect(h.gpu.wave?.stores).toBe(model.layers);
      expect(h.gpu.wave?.refused).toBe(0);
    }, 240_000);
});
