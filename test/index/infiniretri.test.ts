// InfiniRetri through the real server: the question's queries (sent with
// the session's own tokens) find a planted needle in a long document and
// the retained set keeps it with its phrase span.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { f16Bits } from '../helpers/half.js';
import { f32Tensor, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`infiniretri: seed ${seed}`);
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const d = model.headDim, TOKENS = 9001, NEEDLE = 5123;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
// A direction only the needle's key and the question share.
const dir = Float32Array.from({ length: d }, () => rng.normal());
const norm = Math.hypot(...dir);
dir.forEach((x, i) => (dir[i] = x / norm));

function plant(k: Tensor, head: number, pos: number): void {
  const words = new Uint16Array(k.data.buffer, k.data.byteOffset, k.data.byteLength / 2);
  for (let j = 0; j < d; j++) words[(head * TOKENS + pos) * d + j] = f16Bits(dir[j] * 12);
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('book', model);
  const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, d, 0.5);
  for (let h = 0; h < model.kvHeads; h++) plant(c.k, h, NEEDLE);
  await client.uploadDocumentKv('book', { layer: 0, start: 0, k: c.k, v: c.v });
  await client.sealDocument('book');
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe('infiniretri', () => {
  it('retains a planted needle and its span from the question queries', async () => {
    const { id } = await client.createSession({ model, documents: ['book'], method: 'infiniretri', budget: 100, chunk: 1000, span: 2, sinks: 4, window: 8 });
    // The question: 6 tokens whose queries point at the needle's direction.
    const n = 6;
    const own = randomKv(rng, 'f16', model.kvHeads, n, d, 0.5);
    const q = new Float32Array(model.qHeads * n * d);
    for (let r = 0; r < model.qHeads * n; r++) for (let j = 0; j < d; j++) q[r * d + j] = dir[j] * 3 + rng.normal() * 0.3;
    await client.uploadSessionKv(id, { layer: 0, start: 0, k: own.k, v: own.v, q: f32Tensor([model.qHeads, n, d], q) });
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], randomQ(rng, model.qHeads, d)), return: ['selection'] });
    for (const sel of r.selection!) {
      const set = new Set(sel);
      for (let t = NEEDLE - 2; t <= NEEDLE + 2; t++) expect(set.has(t)).toBe(true);
      expect(sel.length).toBeLessThanOrEqual(4 + 100 + 8 + n);
    }
  });

  it('without question queries, falls back to the decode query', async () => {
    const { id } = await client.createSession({ model, documents: ['book'], method: 'infiniretri', budget: 50, chunk: 2048, span: 1 });
    const q = new Float32Array(model.qHeads * d);
    for (let r = 0; r < model.qHeads; r++) for (let j = 0; j < d; j++) q[r * d + j] = dir[j] * 3;
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], q), return: ['selection'] });
    for (const sel of r.selection!) expect(new Set(sel).has(NEEDLE)).toBe(true);
  });

  it('without question queries, reads again as decode steps double: a needle asked at step 4 is kept from then on', async () => {
    const { id } = await client.createSession({ model, documents: ['book'], method: 'infiniretri', budget: 50, chunk: 2048, span: 1, sinks: 0, window: 0 });
    // Steps 1-3 ask for nothing in the needle's direction (its logit is 0, the median); step 4 asks for it.
    const away = () => {
      const q = randomQ(rng, model.qHeads, d);
      for (let r = 0; r < model.qHeads; r++) {
        let dot = 0;
        for (let j = 0; j < d; j++) dot += q[r * d + j] * dir[j];
        for (let j = 0; j < d; j++) q[r * d + j] -= dot * dir[j];
      }
      return q;
    };
    const toward = Float32Array.from({ length: model.qHeads * d }, (_, i) => dir[i % d] * 3);
    const kept = [];
    for (const q of [away(), away(), away(), toward, away()]) {
      const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], q), return: ['selection'] });
      kept.push(r.selection!.map((sel) => new Set(sel).has(NEEDLE)));
    }
    expect(kept[2]).toEqual([false, false]);
    expect(kept[3]).toEqual([true, true]);
    // Step 5 reads nothing new (8 is the next read): the evidence of step 4 stays.
    expect(kept[4]).toEqual([true, true]);
  });
});
