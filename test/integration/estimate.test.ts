// The estimation zone through the real server and real LMDB files, against
// float64 attention over the whole context:
//  - clusters of one token, every cluster estimated: exact attention;
//  - zones that cover every token exactly: exact attention, nothing estimated;
//  - on broad attention, `estimate` lowers every method's error;
//  - estimate over a document without clusters is a 409.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`estimate: seed ${seed}`);
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const TOKENS = 1200;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
const kv: KvChunk = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
// Small queries: attention is broad, the case top-k alone cannot answer well.
const queries = Array.from({ length: 6 }, () => randomQ(rng, model.qHeads, model.headDim, 0.6));
const reference = queries.map((q) => referenceAttention(q, kv.kValues, kv.vValues, model.qHeads, model.headDim));

async function errors(spec: Parameters<KvrecallClient['createSession']>[0]) {
  const { id } = await client.createSession(spec);
  const out = [];
  for (let i = 0; i < queries.length; i++) {
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], queries[i]) });
    out.push({ err: maxRelError(r.out, reference[i].out, model.qHeads), stats: r.stats, lse: r.lse, i });
  }
  return out;
}
const mean = (xs: { err: number }[]) => xs.reduce((a, x) => a + x.err, 0) / xs.length;

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  for (const [id, opts] of [
    ['singles', { methods: ['wave'], clusterSize: 1 }],
    ['clustered', { methods: ['wave', 'topk-blocks', 'hnsw'] }],
    ['plain', { methods: ['topk-blocks'] }],
  ] as const) {
    await client.createDocument(id, model, opts);
    await client.uploadDocumentKv(id, { layer: 0, start: 0, k: kv.k, v: kv.v });
    await client.sealDocument(id);
  }
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe('estimation zone', () => {
  it('with clusters of one token, every one estimated, equals exact attention', async () => {
    const got = await errors({ model, documents: ['singles'], method: 'wave', budget: 0, sinks: 0, window: 0 });
    for (const g of got) {
      expect(g.stats.attended).toBe(0);
      expect(g.stats.estimated).toBe(TOKENS);
      expect(g.err).toBeLessThan(1e-5);
      for (let h = 0; h < model.qHeads; h++) expect(Math.abs(g.lse[h] - reference[g.i].lse[h])).toBeLessThan(1e-4);
    }
  });

  it('with zones covering every token exactly, estimates nothing and equals exact attention', async () => {
    const got = await errors({ model, documents: ['clustered'], method: 'wave', budget: TOKENS, sinks: 4, window: 8 });
    for (const g of got) {
      expect(g.stats.estimated).toBe(0);
      expect(g.err).toBeLessThan(1e-5);
    }
  });

  it('wave with the default budget estimates the rest and beats the same exact count without estimation', async () => {
    const on = await errors({ model, documents: ['clustered'], method: 'wave', budget: 0.05, sinks: 4, window: 8 });
    const off = await errors({ model, documents: ['clustered'], method: 'wave', budget: 0.05, sinks: 4, window: 8, estimate: false });
    expect(on[0].stats.attended).toBeLessThanOrEqual(Math.ceil(0.05 * TOKENS) + 12);
    expect(on[0].stats.estimated! + on[0].stats.attended).toBeCloseTo(TOKENS, 0);
    console.log(`wave at 5%: error ${mean(on).toFixed(4)} with estimation, ${mean(off).toFixed(4)} without`);
    expect(mean(on)).toBeLessThan(0.5 * mean(off));
  });

  for (const method of ['topk-blocks', 'hnsw'])
    it(`${method}: estimate (on by default over clustered documents) lowers the error at the same exact count`, async () => {
      const spec = { model, documents: ['clustered'], method, budget: 128, sinks: 4, window: 8 };
      // Over documents sealed with wave clusters, estimation is the default.
      const off = await errors({ ...spec, estimate: false }), on = await errors(spec);
      expect(on[0].stats.estimated).toBeGreaterThan(0);
      expect(off[0].stats.estimated).toBeUndefined();
      expect(on[0].stats.attended).toBe(off[0].stats.attended);
      console.log(`${method}: error ${mean(off).toFixed(4)} → ${mean(on).toFixed(4)} with estimation`);
      expect(mean(on)).toBeLessThan(0.5 * mean(off));
    });

  it('exact estimates nothing by default; asked to, it skips documents it attends whole', async () => {
    const byDefault = await errors({ model, documents: ['clustered'], method: 'exact' });
    const asked = await errors({ model, documents: ['clustered'], method: 'exact', estimate: true });
    for (const g of byDefault) {
      expect(g.stats.estimated).toBeUndefined();
      expect(g.err).toBeLessThan(1e-5);
    }
    for (const g of asked) {
      expect(g.stats.estimated).toBe(0);
      expect(g.err).toBeLessThan(1e-5);
    }
  });

  it('refuses estimate over a document without clusters (409) and a bad estimate flag (422)', async () => {
    const e1 = await client.createSession({ model, documents: ['plain'], method: 'topk-blocks', estimate: true }).catch((e) => e);
    expect(e1).toBeInstanceOf(KvrecallRequestError);
    expect((e1 as KvrecallRequestError).status).toBe(409);
    expect(String((e1 as Error).message)).toMatch(/wave/);
    const e2 = await client.createSession({ model, documents: ['clustered'], method: 'wave', estimate: 'yes' as unknown as boolean }).catch((e) => e);
    expect((e2 as KvrecallRequestError).status).toBe(422);
  });
});
