// The estimation zone merged with the exact parts is the whole attention,
// each token's mass counted once: on a document whose clusters each hold
// copies of one key (24 distinct keys per kv head, 1061 tokens; checked
// below, as no k-means run mixed two keys in one cluster in 1100 heads), the
// estimate of a cluster is exact but for the f16 rounding of its mean value
// (no key variance, and a partly attended cluster's rest weighs by its own
// logits). So whatever a method selects, with sinks and window overlapping
// its picks and the session's own tokens, the answer with `estimate` is
// float64 dense attention within 1e-3 (measured ≤ 4.1e-4 over 60 seeds, every
// method). A zone boundary that dropped or doubled 8 of the tokens moved the
// answer by 0.065 or more here.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { methodNames } from '../../index/registry.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { asStep, concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import type { ClusterIndex } from '../../index/wave/cluster-index.js';

const seed = freshSeed();
const d = 32, TOKENS = 1024 + 37, DISTINCT = 24;
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: d, dtype: 'f16' as const };
const methods = [...methodNames].filter((m) => m !== 'exact');
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;
let doc: KvChunk;

/** Per kv head, TOKENS keys each a copy of one of DISTINCT random keys, and random values; as f16 bits and decoded. */
function copiedKeys(rng: Rng): KvChunk {
  const toBits = bitsOf('f16'), toValue = valueOf('f16'), H = model.kvHeads;
  const kBits = new Uint16Array(H * TOKENS * d), vBits = new Uint16Array(H * TOKENS * d);
  const kValues = Array.from({ length: H }, () => new Float64Array(TOKENS * d)), vValues = Array.from({ length: H }, () => new Float64Array(TOKENS * d));
  for (let h = 0; h < H; h++) {
    const keys = Array.from({ length: DISTINCT }, () => Float64Array.from({ length: d }, () => toValue(toBits(rng.normal() * 1.5))));
    for (let t = 0; t < TOKENS; t++) {
      const key = keys[Math.floor(rng.next() * DISTINCT)];
      for (let j = 0; j < d; j++) {
        const at = (h * TOKENS + t) * d + j, v = toValue(toBits(rng.normal()));
        kBits[at] = toBits(key[j]);
        kValues[h][t * d + j] = key[j];
        vBits[at] = toBits(v);
        vValues[h][t * d + j] = v;
      }
    }
  }
  return { k: tensor('f16', [H, TOKENS, d], kBits), v: tensor('f16', [H, TOKENS, d], vBits), kValues, vValues };
}

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  doc = copiedKeys(new Rng(seed));
  await client.createDocument('copies', model, { methods, clusterSize: 8 });
  await client.uploadDocumentKv('copies', { layer: 0, start: 0, k: doc.k, v: doc.v });
  await client.sealDocument('copies');
  // The premise: every cluster holds copies of one key.
  const documents = server.engine.documents;
  const heads = (await documents.indexes(await documents.acquire('copies'), 'wave'))[0] as ClusterIndex[];
  heads.forEach((index, h) => {
    const keys = doc.kValues[h];
    for (let c = 0; c < index.clusters; c++) {
      const rows = index.members.subarray(index.offsets[c], index.offsets[c + 1]);
      for (const r of rows) for (let j = 0; j < d; j++) expect(keys[r * d + j]).toBe(keys[rows[0] * d + j]);
    }
  });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe(`the estimate merged with the exact parts (seed ${seed})`, () => {
  it.each(methods)('%s: equals dense attention where the clusters are exact', async (method) => {
    const rng = new Rng(seed + 1);
    // Budget, sinks, window: small, none at all, the static part overlapping the picks, a fraction.
    for (const [budget, sinks, window] of [[20, 4, 16], [0, 0, 0], [100, 30, 70], [0.05, 16, 64]]) {
      const sid = (await client.createSession({ model, documents: ['copies'], method, budget, sinks, window, estimate: true })).id;
      const chunks = [doc];
      for (let step = 0; step < 3; step++) {
        const own = randomKv(rng, 'f16', model.kvHeads, 1, d);
        chunks.push(own);
        const q = randomQ(rng, model.qHeads, d, 1);
        const r = await client.attend(sid, { layer: 0, q: tensor('f32', [model.qHeads, d], q), ...asStep(own) });
        expect(r.stats.attended + r.stats.estimated!).toBeCloseTo(TOKENS + step + 1, 9);
        const ref = referenceAttention(q, concatValues(chunks, 'kValues'), concatValues(chunks, 'vValues'), model.qHeads, d);
        expect(maxRelError(r.out, ref.out, model.qHeads)).toBeLessThan(1e-3);
      }
    }
  });
});
