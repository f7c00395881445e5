// One conformance suite for every retrieval method (the exact twin is the
// reference): through the real server and real LMDB files,
//  - with a budget covering every token, attend equals exact attention;
//  - indexes built at seal are loaded, not rebuilt, after a restart, and
//    give the same answers bit for bit;
//  - with a small budget, the answer covers sinks + window + retrieved and
//    stays close to exact on data where attention is concentrated.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockSummaryBuilder } from '../../index/block-select.js';
import { SUMMARY_BLOCK } from '../../index/block-summary.js';
import { findMethod, methodNames } from '../../index/registry.js';
import { questBuilder } from '../../index/quest.js';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { f32Tensor, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`methods: seed ${seed}`);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const TOKENS = 1500;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
const queries = Array.from({ length: 4 }, () => randomQ(rng, model.qHeads, model.headDim, 2.5));

async function answers(sid: string) {
  const outs = [];
  for (const q of queries)
    for (let layer = 0; layer < model.layers; layer++)
      outs.push(await client.attend(sid, { layer, q: tensor('f32', [model.qHeads, model.headDim], q), return: ['out', 'selection'] }));
  return outs;
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  const indexed = [...methodNames].filter((m) => m !== 'exact');
  await client.createDocument('doc', model, { methods: indexed, queryStride: 2 });
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
    const q = new Float32Array(model.qHeads * TOKENS * model.headDim).map(() => rng.normal());
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v, q: f32Tensor([model.qHeads, TOKENS, model.headDim], q) });
  }
  expect((await client.sealDocument('doc')).methods).toEqual(indexed);
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe.each([...methodNames])('method %s', (method) => {
  it('with a budget covering every token equals exact attention', async () => {
    const ref = (await client.createSession({ model, documents: ['doc'], method: 'exact' })).id;
    const sid = (await client.createSession({ model, documents: ['doc'], method, budget: TOKENS, ef: TOKENS, sinks: 4, window: 16 })).id;
    const [want, got] = [await answers(ref), await answers(sid)];
    got.forEach((g, i) => {
      expect(g.selection!.map((s) => s.length)).toEqual([TOKENS, TOKENS]);
      expect(maxRelError(g.out, want[i].out, model.qHeads)).toBeLessThan(1e-5);
    });
  });

  it('after a restart, uses the index built at seal and answers the same', async () => {
    const params = { model, documents: ['doc'], method, budget: 64, ef: 128, sinks: 4, window: 16 };
    const before = await answers((await client.createSession(params)).id);
    await server.close();
    server = await startInProcess(tmp.dir);
    client = new KvrecallClient({ url: server.url });
    const after = await answers((await client.createSession(params)).id);
    expect(server.engine.documents.buildsAfterSeal).toBe(0);
    after.forEach((a, i) => {
      expect(Buffer.from(a.out.buffer)).toEqual(Buffer.from(before[i].out.buffer));
      expect(a.selection).toEqual(before[i].selection);
    });
  });

  it('with a small budget attends sinks, window and at most the budget, disjointly', async () => {
    const sid = (await client.createSession({ model, documents: ['doc'], method, budget: 50, ef: 100, sinks: 4, window: 16 })).id;
    const r = await client.attend(sid, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], queries[0]), return: ['selection'] });
    for (const ids of r.selection!) {
      const set = new Set(ids);
      expect(set.size).toBe(ids.length);
      for (const p of [0, 1, 2, 3, TOKENS - 16, TOKENS - 1]) expect(set.has(p)).toBe(true);
      // Block-selecting methods attend whole blocks: the budget rounds up, and
      // sinks and window widen to the blocks they touch.
      const B = SUMMARY_BLOCK, blocky = findMethod(method)?.builder === blockSummaryBuilder || findMethod(method)?.builder === questBuilder;
      const bound = blocky ? B + (TOKENS - Math.floor((TOKENS - 16) / B) * B) + Math.ceil(50 / B) * B : 4 + 16 + 50;
      expect(ids.length).toBeLessThanOrEqual(method === 'exact' ? TOKENS : bound);
    }
  });
});
