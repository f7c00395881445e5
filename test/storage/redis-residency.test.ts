// A document larger than a server's host budget, on a real Redis Cluster
// (6 nodes started here): the server attaches it with the layers that fit and
// reads the others on use, evicting the least recently used; every step
// answers exactly (float64 reference) while its resident bytes stay under the
// budget, evicted layers are read again, and an indexed method's answers
// equal those of the server that holds the whole document (its indexes are
// loaded again with their layer). A paused cluster stalls only the requests
// that wait for it. Then the cluster dies: the store's failures
// answer 503 `unavailable` (not over_budget), resident layers still answer,
// and health answers at once.
//
// Needs redis-server and redis-cli, and the compiled tree (the store's worker
// runs from dist/); skipped without Redis except in CI, as redis-store.test.ts.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvrecallClient, KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import type { RunningServer } from '../../api/server.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';
import { DEFAULT_BLOCK_SIZE } from '../../core/model.js';
import { BLOCK_HEADER, blockKey, metaKey } from '../../storage/redis-format.js';
import { redisInstalled, redisRequired, startRedisCluster, type RedisCluster } from '../helpers/redis-cluster.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const available = redisInstalled();
const skip = !available && !redisRequired();
if (skip) console.warn('redis-residency: SKIPPED: redis-server and redis-cli are not installed (apt-get install redis-server)');

const seed = freshSeed();
console.log(`redis-residency: seed ${seed}`);

const model = { layers: 4, qHeads: 8, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
const TOKENS = 8192;
const LAYER_BYTES = TOKENS * model.kvHeads * model.headDim * 2 * 2;
/** A session's own tokens: 256 rows reserved per layer. */
const SESSION_BYTES = model.layers * 256 * model.kvHeads * model.headDim * 2 * 2;
/** Two of the document's four layers and two sessions fit; a third layer does not. */
const BUDGET = 2 * LAYER_BYTES + 3 * SESSION_BYTES;

async function failure(p: Promise<unknown>): Promise<KvrecallRequestError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(KvrecallRequestError);
  return e as KvrecallRequestError;
}

describe.skipIf(skip)('a document larger than the host budget, read from a Redis Cluster on use', () => {
  let cluster: RedisCluster;
  const dirs = [tempDataDir(), tempDataDir()];
  let full: RunningServer, small: RunningServer;
  let a: KvrecallClient, b: KvrecallClient;
  const context: KvChunk[][] = [];
  const rng = new Rng(seed);

  const reference = (layer: number, q: Float32Array) =>
    referenceAttention(q, concatValues(context[layer], 'kValues'), concatValues(context[layer], 'vValues'), model.qHeads, model.headDim);
  const q = () => randomQ(rng, model.qHeads, model.headDim);
  const resident = async () => (await small.engine.documents.acquire('big')).layers.map((s, l) => (s ? l : -1)).filter((l) => l >= 0);

  beforeAll(async () => {
    if (!available) throw new Error('redis-server and redis-cli are not installed, and CI must run the Redis store tests');
    cluster = await startRedisCluster({ nodeTimeoutMs: 2000 });
    full = await startInProcess(dirs[0].dir, { store: cluster.url });
    // A short failover wait: the last test kills the cluster.
    small = await startInProcess(dirs[1].dir, { store: `${cluster.url}?failover=1500`, memoryBudget: BUDGET });
    [a, b] = [full, small].map((s) => new KvrecallClient({ url: s.url }));
    await a.createDocument('big', model, { methods: ['nosa'] });
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, TOKENS, model.headDim);
      await a.uploadDocumentKv('big', { layer, start: 0, k: c.k, v: c.v });
      context.push([c]);
    }
    await a.sealDocument('big');
  }, 120_000);

  afterAll(async () => {
    for (const s of [full, small]) await s?.close();
    await cluster?.stop();
    for (const d of dirs) d.cleanup();
  }, 60_000);

  it('attends every layer exactly within its budget: the layers that fit at attach, the others read on use, least recently used evicted, evicted layers read again', async () => {
    const s = await b.createSession({ model, documents: ['big'], method: 'exact' });
    expect(s.documentTokens).toBe(TOKENS);
    expect(await resident()).toEqual([0, 1]);
    const budget = small.engine.budget;
    const check = async (layer: number) => {
      const x = q();
      const got = await b.attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], x) });
      const ref = reference(layer, x);
      expect(maxRelError(got.out, ref.out, model.qHeads)).toBeLessThan(1e-4);
      expect(maxRelErrorScalar(got.lse, ref.lse)).toBeLessThan(1e-4);
      const stats = small.engine.documents.residency.stats();
      expect(stats.residentBytes).toBeLessThanOrEqual(2 * LAYER_BYTES);
      expect(budget.used).toBeLessThanOrEqual(BUDGET);
    };
    // Layer 1, then 0: layer 1 is the least recently used when layer 2 needs room.
    await check(1);
    await check(0);
    await check(2);
    expect(await resident()).toEqual([0, 2]);
    const before = small.engine.documents.residency.stats();
    for (let round = 0; round < 2; round++) for (let layer = 0; layer < model.layers; layer++) await check(layer);
    const after = small.engine.documents.residency.stats();
    // With 0 and 2 resident (2 used last), only the first step (layer 0) finds its layer: the 7 others read it, each evicting one.
    expect(after.reads - before.reads).toBe(7);
    expect(after.evictions - before.evictions).toBe(after.reads - before.reads);
    expect(after.residentLayers).toBe(2);
    const health = (await b.health()) as unknown as { resident: { residentBytes: number; reads: number }; memory: { used: number; budget: number } };
    expect(health.resident.residentBytes).toBe(2 * LAYER_BYTES);
    expect(health.memory.budget).toBe(BUDGET);
  });

  it('an indexed method answers as on the server holding the whole document: its indexes are loaded again with each layer read', async () => {
    const sa = await a.createSession({ model, documents: ['big'], method: 'nosa', budget: 1024 });
    const sb = await b.createSession({ model, documents: ['big'], method: 'nosa', budget: 1024 });
    const reads = small.engine.documents.residency.stats().reads;
    for (const layer of [3, 2, 1, 0, 3]) {
      const x = tensor('f32', [model.qHeads, model.headDim], q());
      const want = await a.attend(sa.id, { layer, q: x });
      const got = await b.attend(sb.id, { layer, q: x });
      expect(Buffer.from(got.out.buffer).equals(Buffer.from(want.out.buffer))).toBe(true);
      expect(got.stats.attended).toBe(want.stats.attended);
    }
    expect(small.engine.documents.residency.stats().reads - reads).toBeGreaterThanOrEqual(3);
    await b.deleteSession(sb.id);
  });

  it('a master SIGKILLed while a step reads its layer: the step answers exactly or fails with a clear 503, never a wrong answer; once the replica took over, every layer answers', async () => {
    const s = await b.createSession({ model, documents: ['big'], method: 'exact' });
    const held = await resident();
    const layer = [0, 1, 2, 3].find((l) => !held.includes(l))!;
    const x = q();
    const victim = cluster.topology().masters[0];
    const step = b.attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], x) }).catch((e: unknown) => e);
    cluster.nodes.find((n) => n.port === victim)!.proc.kill('SIGKILL');
    const got = await step;
    if (got instanceof KvrecallRequestError) {
      expect(got).toMatchObject({ status: 503, code: 'unavailable' });
      expect(got.message).toMatch(/Redis Cluster.*try again/);
    } else expect(maxRelError((got as { out: Float32Array }).out, reference(layer, x).out, model.qHeads)).toBeLessThan(1e-4);
    console.log(`redis-residency: a step reading layer ${layer} while master ${victim} died ${got instanceof Error ? `failed: ${got.message}` : 'answered exactly'}`);
    await cluster.waitHealthy(30000, 0);
    for (let l = 0; l < model.layers; l++) {
      const y = q();
      const again = await b.attend(s.id, { layer: l, q: tensor('f32', [model.qHeads, model.headDim], y) });
      expect(maxRelError(again.out, reference(l, y).out, model.qHeads)).toBeLessThan(1e-4);
    }
  }, 60_000);

  it('a damaged block of a layer read on use fails that step (409 naming the block), is never attended, and keeps nothing', async () => {
    const s = await b.createSession({ model, documents: ['big'], method: 'exact' });
    const held = await resident();
    const layer = [0, 1, 2, 3].find((l) => !held.includes(l))!;
    const anyMaster = cluster.topology().masters[0];
    const gen = cluster.cli(anyMaster, '-c', 'HGET', metaKey('big'), 'gen').trim();
    const key = blockKey('big', gen, layer, 1, 3);
    cluster.cli(anyMaster, '-c', 'SETRANGE', key, String(BLOCK_HEADER + model.headDim * 2 * DEFAULT_BLOCK_SIZE + 40), 'CORRUPT!');
    const other = () => small.engine.budget.used - small.engine.documents.residency.stats().residentBytes;
    const before = other();
    const x = tensor('f32', [model.qHeads, model.headDim], q());
    const e = await failure(b.attend(s.id, { layer, q: x }));
    expect(e).toMatchObject({ status: 409, code: 'conflict' });
    expect(e.message).toMatch(new RegExp(`block 3 of layer ${layer}, kv head 1 fails its V checksum .*not attended`));
    expect(other()).toBe(before);
    expect((await resident()).includes(layer)).toBe(false);
    // Asked again, it is read again and refused again (the damage is in the store).
    await expect(b.attend(s.id, { layer, q: x })).rejects.toMatchObject({ status: 409 });
  });

  it('a slow store stalls only the requests that wait for it: with every node paused, a metadata read waits while health and resident steps answer', async () => {
    const s = await b.createSession({ model, documents: ['big'], method: 'exact' });
    const layer = (await resident())[0];
    const x = q();
    for (const n of cluster.nodes) n.proc.kill('SIGSTOP');
    let settled = false;
    const pending = b.getDocument('big').finally(() => (settled = true));
    try {
      await new Promise((r) => setTimeout(r, 100));
      const t0 = performance.now();
      expect((await fetch(`${small.url}/v1/health`)).status).toBe(200);
      const got = await b.attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], x) });
      expect(performance.now() - t0).toBeLessThan(500);
      expect(maxRelError(got.out, reference(layer, x).out, model.qHeads)).toBeLessThan(1e-4);
      expect(settled).toBe(false);
    } finally {
      for (const n of cluster.nodes) n.proc.kill('SIGCONT');
    }
    expect(await pending).toMatchObject({ status: 'ready', tokens: TOKENS });
  });

  it('the cluster unreachable: 503 unavailable for what needs it, resident layers still answer, health at once; nothing leaks', async () => {
    const s = await b.createSession({ model, documents: ['big'], method: 'exact' });
    const x = q();
    const here = await resident();
    const away = [0, 1, 2, 3].find((l) => !here.includes(l))!;
    // Memory not held by resident layers (the sessions'): a failed read may have evicted a layer, but keeps nothing.
    const other = () => small.engine.budget.used - small.engine.documents.residency.stats().residentBytes;
    const used = other();
    await cluster.stop();

    const t0 = performance.now();
    expect((await fetch(`${small.url}/v1/health`)).status).toBe(200);
    expect(performance.now() - t0).toBeLessThan(1000);

    // A resident layer needs nothing from the store.
    const got = await b.attend(s.id, { layer: here[0], q: tensor('f32', [model.qHeads, model.headDim], x) });
    expect(maxRelError(got.out, reference(here[0], x).out, model.qHeads)).toBeLessThan(1e-4);

    const kinds = await Promise.all([
      failure(b.attend(s.id, { layer: away, q: tensor('f32', [model.qHeads, model.headDim], x) })),
      failure(b.getDocument('big')),
      failure(b.listDocuments()),
      failure(b.createSession({ model, documents: ['big'] })),
      failure(b.createDocument('fresh', model)),
    ]);
    for (const e of kinds) {
      expect(e).toMatchObject({ status: 503, code: 'unavailable' });
      expect(e.message).toMatch(/Redis Cluster/);
    }
    // The failed read returned its bytes; health still answers.
    expect(other()).toBe(used);
    expect((await fetch(`${small.url}/v1/health`)).status).toBe(200);
    expect((await fetch(`${small.url}/metrics`)).status).toBe(200);
  }, 120_000);
});
