// A session body refused for its own fields (estimate not a boolean, a bad
// per-layer policy) or for one of its documents (another model, missing, not
// ready) reads nothing: after a restart a document is read into
// host memory at its first attach, whole, and a refused body must not do
// that (nor hold the budget it takes). The same body made good attaches it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError } from '../../clients/ts/client.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('doc', model);
  const c = randomKv(new Rng(seed), 'f16', model.kvHeads, 3000, model.headDim);
  for (let layer = 0; layer < model.layers; layer++) await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  await client.sealDocument('doc');
  // A restart: the document is on disk, not in memory.
  await server.close();
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe(`a session body refused for its own fields (seed ${seed})`, () => {
  it('refused for one of its documents (another model, one missing, one not ready), reads none into memory', async () => {
    const used = () => server.engine.budget.used;
    await client.createDocument('half', model);
    const before = used();
    const bad: [Record<string, unknown>, number][] = [
      [{ model: { ...model, headDim: 64 }, documents: ['doc'] }, 409],
      [{ model, documents: ['doc', 'missing'] }, 404],
      [{ model, documents: ['doc', 'half'] }, 409],
    ];
    for (const [fields, status] of bad) {
      const e = await client.createSession({ model, method: 'exact', ...fields } as Parameters<typeof client.createSession>[0]).then(() => undefined, (err: unknown) => err);
      expect(e).toBeInstanceOf(KvrecallRequestError);
      expect((e as KvrecallRequestError).status).toBe(status);
      expect(used()).toBe(before);
    }
    await client.deleteDocument('half');
  });

  it('reads no document into memory', async () => {
    const used = () => server.engine.budget.used;
    const before = used();
    const bad: Record<string, unknown>[] = [
      { estimate: 'yes' },
      { layers: [{ budget: 10 }] }, // one entry for two layers
      { layers: [{ budget: 0.5 }, { budget: -1 }] },
      { layers: [{ estimate: 1 }, {}] },
      { layers: [{}, { window: 5 }] },
    ];
    for (const fields of bad) {
      const e = await client.createSession({ model, documents: ['doc'], method: 'exact', ...fields }).then(() => undefined, (err: unknown) => err);
      expect(e).toBeInstanceOf(KvrecallRequestError);
      expect((e as KvrecallRequestError).status).toBe(422);
      expect(used()).toBe(before);
    }
    // Made good, the same body attaches the document: read now, its 2 layers x 3000 tokens of K and V held.
    await client.createSession({ model, documents: ['doc'], method: 'exact', layers: [{ budget: 0.5 }, {}] });
    expect(used() - before).toBeGreaterThanOrEqual(model.layers * 3000 * model.kvHeads * model.headDim * 2 * 2);
  });
});
