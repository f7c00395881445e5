// ivf at its default search effort uses the session's budget: it probes at
// least the lists that hold the budget on average (nlist/32 lists alone hold
// ~3% of the keys, so a larger budget went unused: at the session defaults
// on kvrecall-code-13M, 8% of the context attended where other methods read
// 26-28%, and a pass key lost). Through the real server and LMDB files.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`ivf-budget: seed ${seed}`);
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const TOKENS = 4000, BUDGET = 1000;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('doc', model, { methods: ['ivf'] });
  const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
  await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: c.k, v: c.v });
  await client.sealDocument('doc');
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe('ivf budget', () => {
  it('at the default effort, attends about the budget when it exceeds what nlist/32 lists hold', async () => {
    const { id } = await client.createSession({ model, documents: ['doc'], method: 'ivf', budget: BUDGET, sinks: 0, window: 0 });
    for (let i = 0; i < 4; i++) {
      const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)), return: ['selection'] });
      // nlist = 4·√4000 = 253 lists of ~16 keys: nlist/32 = 8 lists per row, at most 4 × 8 × 16 ≈ 500 keys per kv head.
      for (const sel of r.selection!) {
        expect(sel.length).toBeGreaterThanOrEqual(0.75 * BUDGET);
        expect(sel.length).toBeLessThanOrEqual(BUDGET);
      }
    }
  });
});
