// nosa's locality constraint and pool, against plain top-k blocks with LRU,
// through the real server over drifting decode queries; and a lone outlier
// key (a needle) among ordinary ones is found by both block methods from the
// summaries built at seal, their radius share calibrated from the prefill
// queries sent with the keys (issue #16: block radii).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { SUMMARY_BLOCK } from '../../index/block-summary.js';
import { RECENT_SHARE } from '../../index/static-plus-retrieved.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { bitsOf } from '../helpers/half.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`block-select: seed ${seed}`);
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const d = model.headDim, TOKENS = 64 * 200 + 17, BUDGET = 64 * 16, STEPS = 25;
/** Blocks of the budget a block method picks; the rest extends the window back. */
const PICKED = BUDGET / SUMMARY_BLOCK - Math.floor((BUDGET / SUMMARY_BLOCK) * RECENT_SHARE);
const CLEAR_OF_RECENT = Math.floor((TOKENS - (BUDGET - PICKED * SUMMARY_BLOCK)) / SUMMARY_BLOCK) * SUMMARY_BLOCK;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('doc', model, { methods: ['nosa', 'topk-blocks'] });
  const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, d);
  await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: c.k, v: c.v });
  await client.sealDocument('doc');
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

/** Runs drifting queries (AR(1)) and returns per step the block sets per head and the pool stats. */
async function run(method: string) {
  const { id } = await client.createSession({ model, documents: ['doc'], method, budget: BUDGET, sinks: 0, window: 0 });
  const drift = new Rng(seed + 1);
  const q = Float32Array.from({ length: model.qHeads * d }, () => drift.normal() * 2);
  const steps: { blocks: Set<number>[]; hits: number; bytesIn: number; selected: number }[] = [];
  for (let s = 0; s < STEPS; s++) {
    for (let i = 0; i < q.length; i++) q[i] = 0.9 * q[i] + Math.sqrt(1 - 0.81) * drift.normal() * 2;
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], q), return: ['selection'] });
    // The picked blocks: the document's rows before its recent ones (the window extended back by the share's
    // rest, index/static-plus-retrieved.ts), in blocks clear of them.
    const blocks = r.selection!.map((ids) => new Set([...ids].filter((t) => t < CLEAR_OF_RECENT).map((t) => Math.floor(t / SUMMARY_BLOCK))));
    steps.push({ blocks, ...r.stats.blocks! });
  }
  return steps;
}

describe('block selection', () => {
  it('nosa brings in at most its quota of new blocks per step and copies less than top-k with LRU', async () => {
    const nosa = await run('nosa');
    const plain = await run('topk-blocks');
    const budgetBlocks = PICKED;
    const quota = Math.ceil(budgetBlocks * 0.125);
    for (let s = 1; s < STEPS; s++)
      for (let h = 0; h < model.kvHeads; h++) {
        const fresh = [...nosa[s].blocks[h]].filter((b) => !nosa[s - 1].blocks[h].has(b)).length;
        expect(fresh).toBeLessThanOrEqual(quota);
        expect(nosa[s].blocks[h].size).toBe(budgetBlocks);
      }
    const sum = (xs: { bytesIn: number }[]) => xs.reduce((a, x) => a + x.bytesIn, 0);
    const hitRate = (xs: { hits: number; selected: number }[]) => xs.reduce((a, x) => a + x.hits, 0) / xs.reduce((a, x) => a + x.selected, 0);
    console.log(`nosa: ${sum(nosa)} bytes in, hit rate ${hitRate(nosa).toFixed(3)}; top-k blocks + LRU: ${sum(plain)} bytes in, hit rate ${hitRate(plain).toFixed(3)}`);
    expect(sum(nosa)).toBeLessThan(sum(plain));
    expect(hitRate(nosa)).toBeGreaterThan(hitRate(plain));
    // The first step fills the pool: every selected block is copied in once.
    expect(nosa[0].hits).toBe(0);
    expect(nosa[0].bytesIn).toBe(nosa[0].selected * SUMMARY_BLOCK * d * 2 * 2);
  });
});

describe('a needle in one block', () => {
  // Keys N(0, 1) in 32 dimensions (a block's radius about 6-8, the best block
  // mean about 0.4 along any direction); in each kv head one key is A·u, u a
  // unit direction: the best key for a query along u by far, while its block's
  // mean is hardly above the others'. Ranked by q·mean alone the block is lost
  // among 200; by q·mean + α·‖q‖·radius, α ≥ 0.25, it comes first. The
  // prefill queries (one token in 4) seek u too, so calibration keeps a share.
  const A = 20, STRIDE = 4;
  const needles = [64 * 37 + 5, 64 * 90 + 60];

  it.each(['topk-blocks', 'nosa'])('%s selects the needle\'s block with a budget of 2 blocks', async (method) => {
    const c = randomKv(new Rng(seed + 7), 'f16', model.kvHeads, TOKENS, d);
    const k = new Uint16Array(c.k.data.buffer, c.k.data.byteOffset, model.kvHeads * TOKENS * d);
    const u = Float32Array.from({ length: d }, (_, j) => (j % 3 === 0 ? 1 : -0.5));
    const norm = Math.hypot(...u);
    const bits = bitsOf('f16');
    for (let h = 0; h < model.kvHeads; h++) for (let j = 0; j < d; j++) k[(h * TOKENS + needles[h]) * d + j] = bits((A * u[j]) / norm);
    const doc = `needle-${method}`;
    await client.createDocument(doc, model, { methods: [method], queryStride: STRIDE });
    const kept = Math.ceil(TOKENS / STRIDE), qr = new Rng(seed + 8);
    const prefill = new Float32Array(model.qHeads * kept * d);
    for (let i = 0; i < model.qHeads * kept; i++) for (let j = 0; j < d; j++) prefill[i * d + j] = (4 * u[j]) / norm + 0.1 * qr.normal();
    await client.uploadDocumentKv(doc, { layer: 0, start: 0, k: c.k, v: c.v, q: tensor('f32', [model.qHeads, kept, d], prefill), queryStride: STRIDE });
    await client.sealDocument(doc);
    const { id } = await client.createSession({ model, documents: [doc], method, budget: 2 * SUMMARY_BLOCK, sinks: 0, window: 0 });
    const G = model.qHeads / model.kvHeads;
    const q = new Float32Array(model.qHeads * d);
    for (let r = 0; r < model.qHeads; r++) for (let j = 0; j < d; j++) q[r * d + j] = ((r % G === 0 ? 3 : 1) * u[j]) / norm;
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], q), return: ['selection'] });
    for (let h = 0; h < model.kvHeads; h++) expect([...r.selection![h]]).toContain(needles[h]);
  });
});
