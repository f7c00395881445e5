// A block method's device estimate (engine/rest-on-device.ts) is handed to
// the device before the step's pool attend starts, so that the two run on
// the device together: the attend's residency work and its call run on the
// event loop's thread to their end (addon/device-calls.ts), and a call
// queued after them ran after them (nosa + estimate 1.98 ms a step against
// nosa 1.00 on an H100). No device runs here: a real server over a GPU
// backend whose pool is PoolModel (the host model of the native pool) and
// whose wave store is a stand-in, both logging when they are called; the
// estimate's promise settles only once the attend has started (or after a
// timeout, logged, so that a step that waits for it first fails the test
// rather than hangs it). The device's answers are test/integration/gpu-rest.test.ts's.
import { describe, expect, it } from 'vitest';
import type { WaveGpuRestArgs, WaveGpuRestResult, WaveGpuStore } from '../../addon/wave-gpu.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { GpuBackend } from '../../engine/cache/gpu-pool.js';
import { PoolModel } from '../../engine/cache/simulated-pool.js';
import type { GpuAttendArgs, GpuPoolOptions, GpuRangeHold, GpuUpload } from '../../addon/cuda.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`rest-beside-attend: seed ${seed}`);
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
// Whole 64-token blocks for the sinks, the window and the document: every part goes to the pool, none to the host kernel.
const DOC = 1024;
const STEPS = 3;

/** PoolModel that logs the step's residency calls and its attend (the device calls the loop runs). */
class LoggedPool extends PoolModel {
  constructor(o: GpuPoolOptions, private readonly log: string[]) {
    super(o);
  }

  override uploadIndexed(client: number, blocks: Int32Array, k: Uint16Array, v: Uint16Array, o: { priority?: number; priorities?: Uint8Array; hold?: boolean } = {}): Int32Array {
    if (blocks.length > 0) this.log.push('resident');
    return super.uploadIndexed(client, blocks, k, v, o);
  }

  override uploadIndexedMany(uploads: GpuUpload[], o: { hold?: boolean } = {}): Int32Array[] {
    if (uploads.some((u) => u.blocks.length > 0)) this.log.push('resident');
    return super.uploadIndexedMany(uploads, o);
  }

  override holdRanges(clients: number[], first: number, count: number, k: Uint16Array[], v: Uint16Array[], priority = 0): GpuRangeHold[] {
    this.log.push('resident');
    return super.holdRanges(clients, first, count, k, v, priority);
  }

  override attend(a: GpuAttendArgs): Promise<void> {
    this.log.push('attend');
    attendStarted();
    return super.attend(a);
  }
}

let attendStarted = () => {};

/** A wave store whose rest logs its call and settles once the pool's attend has started (nothing estimated). */
function standInStore(log: string[]): WaveGpuStore {
  return {
    rest(a: WaveGpuRestArgs): Promise<WaveGpuRestResult> {
      log.push('rest');
      return new Promise((resolve) => {
        const settle = (why: string) => {
          clearTimeout(timer);
          attendStarted = () => {};
          log.push(why);
          const none = new Array<number>(model.kvHeads).fill(0);
          resolve({ out: new Float32Array(a.qHeads * model.headDim), lse: new Float32Array(a.qHeads).fill(-Infinity), estimated: none, scanned: none,
                    rows: none, ms: 0, stages: {}, host: {}, graphCaptures: 0, workMs: 0 });
        };
        const timer = setTimeout(() => settle('rest timed out'), 2000);
        attendStarted = () => settle('rest done');
      });
    },
    close: () => undefined,
    closeAsync: async () => undefined,
  } as unknown as WaveGpuStore;
}

describe('a block method\'s device estimate beside the pool\'s attend', () => {
  for (const method of ['nosa', 'topk-blocks'])
    it(`${method}: the estimate's call is made before the step's residency and attend, and settles after the attend started`, async () => {
      const log: string[] = [];
      let stores = 0;
      const gpu = GpuBackend.over(
        { ok: true, device: 'PoolModel (host)', memory: 1 << 30, built: false },
        { budgetBytes: 16 << 20, waveBudgetBytes: 1 << 30 },
        { pool: (o) => new LoggedPool(o, log), waveStore: async () => (stores++, standInStore(log)) },
      );
      const tmp = tempDataDir();
      const server = await startInProcess(tmp.dir, {}, { gpu });
      try {
        const rng = new Rng(seed);
        const client = new KvrecallClient({ url: server.url });
        await client.createDocument('doc', model, { methods: ['wave', 'nosa', 'topk-blocks'] });
        for (let layer = 0; layer < model.layers; layer++) {
          const c = randomKv(rng, 'f16', model.kvHeads, DOC, model.headDim);
          await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
        }
        await client.sealDocument('doc');
        const { id } = await client.createSession({ model, documents: ['doc'], method, budget: 256, sinks: 64, window: 128, estimate: true });
        for (let step = 0; step < STEPS; step++)
          for (let layer = 0; layer < model.layers; layer++) {
            log.length = 0;
            const q = randomQ(rng, model.qHeads, model.headDim);
            const r = await client.attend(id, { layer, q: tensor('f32', [model.qHeads, model.headDim], q) });
            expect(r.stats.backend).toBe('cuda');
            // The step's device calls in the order they were made: the estimate's first, its end after the attend's start.
            const firstResident = log.indexOf('resident');
            expect(firstResident).toBeGreaterThan(0);
            expect(log.slice(0, firstResident)).toEqual(['rest']);
            expect(log.filter((e) => e !== 'resident')).toEqual(['rest', 'attend', 'rest done']);
          }
        expect(stores).toBe(model.layers);
        const h = (await client.health()) as unknown as { gpu: { wave: { rests: number } } };
        expect(h.gpu.wave.rests).toBe(STEPS * model.layers);
      } finally {
        await server.close();
        tmp.cleanup();
      }
    }, 60_000);
});
