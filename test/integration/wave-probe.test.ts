// wave's candidate count follows the layer's estimate through the real server
// (engine/decode-step.ts sets SearchParams.estimate, index/static-plus-retrieved.ts
// hands it to ClusterIndex.searchHeads): where a layer estimates, the ids are
// those of a session that asks for PROBE_ESTIMATED × k candidates through its
// ef; where a layer of the same session does not, those of PROBE × k. The
// device step computes the same count (candidateTokens), and
// test/integration/gpu-wave.test.ts holds its ids to the host's; this holds
// the host to the policy, which that test cannot see.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor, type SessionSpec } from '../../clients/ts/client.js';
import { PROBE, PROBE_ESTIMATED } from '../../index/wave/cluster-index.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`wave-probe: seed ${seed}`);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const TOKENS = 3000, BUDGET = 60, SINKS = 4, WINDOW = 16;
// The ids searched for per kv head with no own tokens: the budget plus the sinks and window it drops (staticPlusRetrieved).
const K = BUDGET + SINKS + WINDOW;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
const rng = new Rng(seed);
const queries = Array.from({ length: 3 }, () => randomQ(rng, model.qHeads, model.headDim));

/** Per layer, per query, per kv head: the selected positions, sorted. */
async function selections(spec: Partial<SessionSpec>): Promise<number[][][][]> {
  const { id } = await client.createSession({ model, documents: ['doc'], method: 'wave', budget: BUDGET, sinks: SINKS, window: WINDOW, ...spec });
  try {
    const perLayer: number[][][][] = [];
    for (let layer = 0; layer < model.layers; layer++) {
      const perQuery: number[][][] = [];
      for (const q of queries) {
        const r = await client.attend(id, { layer, q: tensor('f32', [model.qHeads, model.headDim], q), return: ['out', 'selection'] });
        perQuery.push(r.selection!.map((ids) => Array.from(ids).sort((a, b) => a - b)));
      }
      perLayer.push(perQuery);
    }
    return perLayer;
  } finally {
    await client.deleteSession(id);
  }
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('doc', model, { methods: ['wave'] });
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
}, 120_000);
afterAll(async () => {
  await server?.close();
  tmp.cleanup();
});

describe("wave's candidates by the layer's estimate", () => {
  it('a layer that estimates rescores PROBE_ESTIMATED × k, one that does not PROBE × k, in the same session', async () => {
    const policy = await selections({ estimate: true, layers: [{ estimate: true }, { estimate: false }] });
    const narrow = await selections({ estimate: false, ef: PROBE_ESTIMATED * K });
    const wide = await selections({ estimate: false, ef: PROBE * K });
    // The two counts pick different ids on these keys, so the equalities below tell them apart.
    for (let layer = 0; layer < model.layers; layer++) expect(narrow[layer]).not.toEqual(wide[layer]);
    expect(policy[0]).toEqual(narrow[0]);
    expect(policy[1]).toEqual(wide[1]);
  }, 120_000);
});
