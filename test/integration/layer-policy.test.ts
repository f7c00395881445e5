// A session's per-layer policy (`layers: [{budget?, estimate?}, ...]`) through
// the real server and real LMDB files, against float64 attention:
//  - a layer whose budget covers every token equals exact attention there,
//    while a layer with a small budget in the same session attends fewer;
//  - a layer may estimate while another does not;
//  - bad policies are refused with a clear message and create nothing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor, type LayerPolicy, type SessionSpec } from '../../clients/ts/client.js';
import { randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`layer-policy: seed ${seed}`);
const model = { layers: 3, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const TOKENS = 900;
const SINKS = 4, WINDOW = 8, SMALL = 24;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
const kv: KvChunk[] = Array.from({ length: model.layers }, () => randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim));
// Small queries: broad attention, where a small budget alone is far from exact.
const queries = Array.from({ length: 3 }, () => randomQ(rng, model.qHeads, model.headDim, 0.6));

interface Step {
  err: number;
  attended: number;
  estimated?: number;
  selected: number[];
}

/** One decode step per layer per query (no own tokens appended: the context stays the document). */
async function steps(spec: SessionSpec): Promise<Step[][]> {
  const { id } = await client.createSession(spec);
  try {
    const perLayer: Step[][] = [];
    for (let layer = 0; layer < model.layers; layer++) {
      const got: Step[] = [];
      for (const q of queries) {
        const r = await client.attend(id, { layer, q: tensor('f32', [model.qHeads, model.headDim], q), return: ['out', 'selection'] });
        const ref = referenceAttention(q, kv[layer].kValues, kv[layer].vValues, model.qHeads, model.headDim);
        got.push({ err: maxRelError(r.out, ref.out, model.qHeads), attended: r.stats.attended, estimated: r.stats.estimated, selected: r.selection!.map((s) => s.length) });
      }
      perLayer.push(got);
    }
    return perLayer;
  } finally {
    await client.deleteSession(id);
  }
}

const openSessions = async () => ((await client.health()) as unknown as { sessions: number }).sessions;

async function refused(spec: SessionSpec): Promise<KvrecallRequestError> {
  const before = await openSessions();
  const e = await client.createSession(spec).catch((err: unknown) => err);
  expect(e).toBeInstanceOf(KvrecallRequestError);
  expect(await openSessions()).toBe(before);
  return e as KvrecallRequestError;
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  for (const [id, methods] of [
    ['clustered', ['wave', 'hnsw']],
    ['plain', ['hnsw']],
  ] as const) {
    await client.createDocument(id, model, { methods: [...methods] });
    for (let layer = 0; layer < model.layers; layer++) await client.uploadDocumentKv(id, { layer, start: 0, k: kv[layer].k, v: kv[layer].v });
    await client.sealDocument(id);
  }
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe('per-layer session policy', () => {
  for (const method of ['hnsw', 'wave'])
    it(`${method}: a layer whose budget covers every token is exact; a layer with a smaller budget attends fewer`, async () => {
      const layers: LayerPolicy[] = [{ budget: TOKENS }, { budget: SMALL }, {}];
      const got = await steps({ model, documents: ['clustered'], method, budget: 2 * SMALL, sinks: SINKS, window: WINDOW, estimate: false, layers });
      for (const s of got[0]) {
        expect(s.selected).toEqual([TOKENS, TOKENS]);
        // f16 K/V read back exactly; float32 accumulation against float64.
        expect(s.err).toBeLessThan(1e-5);
      }
      // The small layer reads at most sinks, window and its own budget; the unnamed layer takes the session's.
      for (const s of got[1]) for (const n of s.selected) expect(n).toBeLessThanOrEqual(SINKS + WINDOW + SMALL);
      for (const s of got[2]) for (const n of s.selected) expect(n).toBeLessThanOrEqual(SINKS + WINDOW + 2 * SMALL);
      expect(Math.max(...got[1].map((s) => s.attended))).toBeLessThan(Math.min(...got[2].map((s) => s.attended)));
      // Broad attention: what a small budget leaves out shows in the error.
      for (const s of got[1]) expect(s.err).toBeGreaterThan(1e-3);
    });

  it('estimates in the layers that ask, and only there', async () => {
    const layers: LayerPolicy[] = [{ estimate: true }, { estimate: false }, { estimate: true, budget: 0 }];
    const got = await steps({ model, documents: ['clustered'], method: 'hnsw', budget: SMALL, sinks: SINKS, window: WINDOW, estimate: false, layers });
    const plain = await steps({ model, documents: ['clustered'], method: 'hnsw', budget: SMALL, sinks: SINKS, window: WINDOW, estimate: false });
    for (let i = 0; i < queries.length; i++) {
      expect(got[0][i].estimated! + got[0][i].attended).toBeCloseTo(TOKENS, 0);
      expect(got[1][i].estimated).toBeUndefined();
      expect(got[1][i].err).toBe(plain[1][i].err);
      expect(got[2][i].attended).toBe(SINKS + WINDOW);
      expect(got[2][i].estimated! + got[2][i].attended).toBeCloseTo(TOKENS, 0);
      // Same selection as without the estimate in layer 0; the estimate lowers its error (broad attention).
      expect(got[0][i].attended).toBe(plain[0][i].attended);
    }
    const mean = (xs: Step[]) => xs.reduce((a, s) => a + s.err, 0) / xs.length;
    expect(mean(got[0])).toBeLessThan(0.5 * mean(plain[0]));
  });

  it('describes the policy back', async () => {
    const layers = [{ budget: 0.5 }, { estimate: false }, {}];
    const { id } = await client.createSession({ model, documents: ['clustered'], method: 'wave', budget: 32, layers });
    const info = await client.getSession(id);
    expect(info.layers).toEqual([{ budget: 0.5, estimate: true }, { budget: 32, estimate: false }, { budget: 32, estimate: true }]);
    expect(info.budget).toBe(32);
    await client.deleteSession(id);
    const plain = await client.createSession({ model, documents: ['clustered'], method: 'wave' });
    expect((await client.getSession(plain.id)).layers).toBeUndefined();
    await client.deleteSession(plain.id);
  });

  it('refuses a bad policy with a clear message and creates nothing', async () => {
    const base = { model, documents: ['clustered'], method: 'hnsw' };
    const cases: [unknown, RegExp][] = [
      [[{}, {}], /list of 3 maps.*not 2 entries/],
      [{ budget: 8 }, /list of 3 maps.*not object/],
      [[{}, 5, {}], /layers\[1\] must be a map/],
      [[{}, { budget: Number.NaN }, {}], /layers\[1\]\.budget must be/],
      [[{}, {}, { budget: -1 }], /layers\[2\]\.budget must be/],
      [[{ budget: 1.5 }, {}, {}], /layers\[0\]\.budget must be/],
      [[{}, { estimate: 'yes' }, {}], /layers\[1\]\.estimate must be true or false/],
      [[{ sinks: 4 }, {}, {}], /layers\[0\] has "sinks"/],
    ];
    for (const [layers, message] of cases) {
      const e = await refused({ ...base, layers: layers as LayerPolicy[] });
      expect(e.status).toBe(422);
      expect(e.message).toMatch(message);
    }
    // A layer that estimates over a document without clusters: the same 409 as a session that does.
    const e = await refused({ model, documents: ['plain'], method: 'hnsw', layers: [{}, { estimate: true }, {}] });
    expect(e.status).toBe(409);
    expect(e.message).toMatch(/wave/);
  });
});
