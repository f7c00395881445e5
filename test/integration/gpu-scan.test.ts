// Retrieval-attention's code scan on the GPU (engine/cache/device-key-scans.ts): a server with a scan budget
// searches a codeScan session's layer-steps on the device once the layer's store is made (the first step
// searches on the host while it is), attends the ids it selected on the device from the same store (which holds
// the layer's values too; the host attended them before the store was made), and selects what a CPU-only
// server selects, up to near-ties at the scan's cuts; with the estimate off it answers as float64 attention
// over the ids it selected; the same with the PQ first pass (scanKeep). Skipped without a CUDA
// device (here and in CI): the GPU visit runs it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { cudaAvailable } from '../../addon/cuda.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`gpu-scan: seed ${seed}`);
const gpu = cudaAvailable();

type Health = { gpu: { keyScan?: { steps: number; attends: number; opened: number; failures: number; bytes: number } } };

describe.skipIf(!gpu.ok)('retrieval-attention code scan on the GPU (server)', () => {
  const model = { layers: 2, qHeads: 16, kvHeads: 4, headDim: 128, dtype: 'f16' as const };
  const { qHeads, kvHeads, headDim: d } = model;
  const DOC = 20000;
  const dirs = [tempDataDir(), tempDataDir()];
  let onGpu: RunningServer, onCpu: RunningServer;
  const chunks: KvChunk[] = [];

  beforeAll(async () => {
    onGpu = await startInProcess(dirs[0].dir, { gpuScanBudget: 4 * 2 ** 30 });
    onCpu = await startInProcess(dirs[1].dir, { gpuBudget: 0 });
    const rng = new Rng(seed);
    for (let l = 0; l < model.layers; l++) chunks.push(randomKv(rng, 'f16', kvHeads, DOC, d));
    for (const s of [onGpu, onCpu]) {
      const c = new KvrecallClient({ url: s.url });
      await c.createDocument('doc', model, { methods: ['retrieval-attention'] });
      for (let l = 0; l < model.layers; l++) await c.uploadDocumentKv('doc', { layer: l, start: 0, k: chunks[l].k, v: chunks[l].v });
      await c.sealDocument('doc');
    }
  }, 240_000);
  afterAll(async () => {
    for (const s of [onGpu, onCpu]) await s?.close();
    for (const t of dirs) t.cleanup();
  });

  // One pass over every key's 4-bit code, then the PQ first pass (scanKeep: the stores made for the first sessions,
  // without PQ codes, have them added on each layer's first step, which the host searches with the steps until
  // they are; more steps, so that at least 3 a layer run on the device).
  for (const scanKeep of [undefined, 0.08])
    it(`selects the CPU server's ids up to near-ties and answers as float64 attention over them, step after step${scanKeep ? ` (scanKeep ${scanKeep})` : ''}`, async () => {
      const rng = new Rng(seed + 1 + (scanKeep ? 1 : 0));
      const params = { method: 'retrieval-attention', budget: 300, sinks: 16, window: 64, estimate: false, codeScan: true, ...(scanKeep !== undefined && { scanKeep }) };
      const before = ((await new KvrecallClient({ url: onGpu.url }).health()) as unknown as Health).gpu.keyScan;
      const sessions = await Promise.all([onGpu, onCpu].map(async (s) => {
        const c = new KvrecallClient({ url: s.url });
        return { c, id: (await c.createSession({ model, documents: ['doc'], ...params })).id };
      }));
      const own: KvChunk[][] = Array.from({ length: model.layers }, () => []);
      let differ = 0, total = 0;
      for (let step = 0; step < (scanKeep ? 10 : 5); step++) {
        for (let layer = 0; layer < model.layers; layer++) {
          const tok = randomKv(rng, 'f16', kvHeads, 1, d);
          own[layer].push(tok);
          const q = randomQ(rng, qHeads, d, 2);
          const body = { layer, q: tensor('f32', [qHeads, d], q), k: { ...tok.k, shape: [kvHeads, d] }, v: { ...tok.v, shape: [kvHeads, d] }, return: ['out', 'selection'] as ('out' | 'selection')[] };
          const [g, c] = await Promise.all(sessions.map((s) => s.c.attend(s.id, body)));
          // The CPU server attends every part on the host.
          expect(c.stats.backend).toBe('cpu');
          for (let h = 0; h < kvHeads; h++) {
            const mine = new Set(g.selection![h]), theirs = new Set(c.selection![h]);
            expect(mine.size).toBe(theirs.size);
            for (const id of theirs) differ += mine.has(id) ? 0 : 1;
            total += theirs.size;
          }
          const all = [chunks[layer], ...own[layer]];
          const rows = g.selection!.map((ids) => Array.from(ids));
          const ref = referenceAttention(q, concatValues(all, 'kValues'), concatValues(all, 'vValues'), qHeads, d, 1 / Math.sqrt(d), rows);
          expect(maxRelError(g.out, ref.out, qHeads)).toBeLessThan(1e-4);
          expect(maxRelErrorScalar(g.lse, ref.lse)).toBeLessThan(1e-4);
        }
        // The seeds are each session's own last ids, which near-ties may have made differ a little: the sets may drift
        // apart a few ids a step, no more.
      }
      expect(differ).toBeLessThanOrEqual(Math.max(4, 0.01 * total));
      const h = (await sessions[0].c.health()) as unknown as Health;
      // Each layer's first step searched on the host while its store was made; the rest on the device.
      const steps = h.gpu.keyScan!.steps - (before?.steps ?? 0);
      expect(h.gpu.keyScan?.opened).toBe(model.layers);
      expect(h.gpu.keyScan?.failures).toBe(0);
      expect(steps).toBeGreaterThanOrEqual(model.layers * 3);
      // Every step searched on the device attended its retrieved ids there too (the store holds the values).
      expect(h.gpu.keyScan!.attends - (before?.attends ?? 0)).toBe(steps);
      expect(h.gpu.keyScan?.bytes).toBeGreaterThan(model.layers * kvHeads * DOC * d * 4.5);
    }, 240_000);
});
