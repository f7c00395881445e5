// Documents on a real Redis Cluster (6 nodes: 3 masters, 3 replicas, started
// here on loopback ports) shared by several real kvrecall servers: one
// preloads, another attends, equal to float64 exact attention; a preload
// killed midway is incomplete on every server; a damaged block is refused,
// not attended; DELETE removes a document cluster-wide, and a conditional
// DELETE never one made again through another server, and a DELETE racing a
// PUT of the id never leaves the live document out of the listing; a seal whose last
// replica acknowledgement fails leaves it ready on every server, and the
// seal asked again confirms it; a master killed
// during an attach is replaced by its replica and the attach either completes
// with every block checked or fails with a clear 503 — never a wrong answer.
//
// Needs redis-server and redis-cli (Debian's redis-server; .ci/run installs
// it) and the compiled tree (the store's worker and the child servers run
// from dist/: `npm test` builds it first). Without Redis these tests are
// skipped, with a message, except in CI (CI or KVRECALL_CI set), where they fail.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomFillSync } from 'node:crypto';
import { KvrecallClient, KvrecallRequestError, tensor, type DocumentInfo } from '../../clients/ts/client.js';
import type { RunningServer } from '../../api/server.js';
import type { Tensor } from '../../core/tensor.js';
import { BLOCK_HEADER, blockKey, keySlot, metaKey } from '../../storage/redis-format.js';
import { DEFAULT_BLOCK_SIZE } from '../../core/model.js';
import type { DocumentMeta } from '../../storage/document-store.js';
import { RedisStore } from '../../storage/redis-store.js';
import { concatValues, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';
import { redisInstalled, redisRequired, startRedisCluster, type RedisCluster } from '../helpers/redis-cluster.js';
import { startChild, startInProcess, tempDataDir, type ChildServer } from '../helpers/server.js';

const available = redisInstalled();
const skip = !available && !redisRequired();
if (skip) console.warn('redis-store: SKIPPED: redis-server and redis-cli are not installed (apt-get install redis-server); CI installs them and runs these tests');

const seed = freshSeed();
console.log(`redis-store: seed ${seed}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Rounds of the delete/PUT race (KVRECALL_RACE_ROUNDS to measure how often the old store lost the id). */
const RACE_ROUNDS = Number(process.env.KVRECALL_RACE_ROUNDS ?? 60);

/** Random f16 K or V bits, [kvHeads, n, d], finite; for documents whose answers are compared between servers, not to a reference. */
function randomBits(kvHeads: number, n: number, d: number): Tensor {
  const words = new Uint32Array((kvHeads * n * d) / 2);
  randomFillSync(words);
  for (let i = 0; i < words.length; i++) words[i] &= 0xbfffbfff;
  return { dtype: 'f16', shape: [kvHeads, n, d], data: new Uint8Array(words.buffer) };
}

async function statusOf(c: KvrecallClient, id: string): Promise<number> {
  try {
    await c.getDocument(id);
    return 200;
  } catch (e) {
    return (e as KvrecallRequestError).status;
  }
}

describe.skipIf(skip)('documents on a Redis Cluster shared by several servers', () => {
  let cluster: RedisCluster;
  let store: string;
  const dirs = [tempDataDir(), tempDataDir(), tempDataDir(), tempDataDir(), tempDataDir()];
  const servers: RunningServer[] = [];
  const children: ChildServer[] = [];
  let a: KvrecallClient, b: KvrecallClient;

  beforeAll(async () => {
    if (!available) throw new Error('redis-server and redis-cli are not installed, and CI must run the Redis store tests: .ci/run installs them (apt-get install redis-server)');
    cluster = await startRedisCluster({ nodeTimeoutMs: 2000 });
    // A short lease: a loader silent for 3 s leaves its document incomplete.
    store = `${cluster.url}?lease=3000&failover=15000`;
    for (const d of dirs.slice(0, 2)) servers.push(await startInProcess(d.dir, { store }));
    [a, b] = servers.map((s) => new KvrecallClient({ url: s.url }));
  }, 120_000);

  afterAll(async () => {
    for (const c of children) await c.stop('SIGKILL');
    for (const s of servers) await s.close();
    await cluster?.stop();
    for (const d of dirs) d.cleanup();
  }, 60_000);

  /** Keys of a document's blocks on the cluster, per master. */
  const blockKeysPerMaster = (id: string) => cluster.topology().masters.map((m) => cluster.cli(m, '--scan', '--pattern', `kvr:{b/${id}/*`).split('\n').filter(Boolean).length);

  it('one server preloads and seals; the other attends it: equal to float64 exact attention, blocks on every master, replicated; its index is read, not rebuilt', async () => {
    const rng = new Rng(seed);
    const model = { layers: 2, qHeads: 16, kvHeads: 4, headDim: 64, dtype: 'f16' as const };
    const { qHeads, kvHeads, headDim: d } = model;
    const tokens = 24000, chunk = 6000;
    const context: KvChunk[][] = [[], []];
    await a.createDocument('shared', model, { methods: ['nosa'] });
    for (let layer = 0; layer < model.layers; layer++)
      for (let start = 0; start < tokens; start += chunk) {
        const c = randomKv(rng, 'f16', kvHeads, chunk, d);
        await a.uploadDocumentKv('shared', { layer, start, k: c.k, v: c.v });
        context[layer].push(c);
      }
    // The other server sees it loading while it loads.
    expect((await b.getDocument('shared')).status).toBe('loading');
    expect(await a.sealDocument('shared')).toMatchObject({ status: 'ready', tokens });
    expect(await b.getDocument('shared')).toMatchObject({ status: 'ready', tokens, methods: ['nosa'] });
    expect((await b.listDocuments()).map((x) => x.id)).toContain('shared');

    // A layer's blocks are spread over every master (hash tags per group of blocks), and every replica holds its master's keys.
    expect(blockKeysPerMaster('shared').every((n) => n > 0)).toBe(true);
    const { masters, replicasOf } = cluster.topology();
    for (const m of masters) for (const r of replicasOf.get(m) ?? []) expect(cluster.cli(r, 'dbsize').trim()).toBe(cluster.cli(m, 'dbsize').trim());

    // Attended through B, which has never seen it: read from the cluster, every block checked.
    const s = await b.createSession({ model, documents: ['shared'], method: 'exact' });
    expect(s.documentTokens).toBe(tokens);
    for (let layer = 0; layer < model.layers; layer++) {
      const q = randomQ(rng, qHeads, d);
      const got = await b.attend(s.id, { layer, q: tensor('f32', [qHeads, d], q) });
      const ref = referenceAttention(q, concatValues(context[layer], 'kValues'), concatValues(context[layer], 'vValues'), qHeads, d);
      expect(maxRelError(got.out, ref.out, qHeads)).toBeLessThan(1e-4);
      expect(maxRelErrorScalar(got.lse, ref.lse)).toBeLessThan(1e-4);
      // The server that preloaded it answers bit for bit the same.
      const sa = await a.createSession({ model, documents: ['shared'], method: 'exact' });
      const mine = await a.attend(sa.id, { layer, q: tensor('f32', [qHeads, d], q) });
      expect(Buffer.from(mine.out.buffer).equals(Buffer.from(got.out.buffer))).toBe(true);
    }
    // The index built at seal is read from the cluster, not rebuilt.
    const before = servers[1].engine.documents.buildsAfterSeal;
    await b.createSession({ model, documents: ['shared'], method: 'nosa', budget: 1024 });
    expect(servers[1].engine.documents.buildsAfterSeal).toBe(before);
  });

  it('DELETE through one server removes the document cluster-wide', async () => {
    const rng = new Rng(seed ^ 1);
    const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
    await a.createDocument('doomed', model, { methods: ['nosa'] });
    const c = randomKv(rng, 'f16', 2, 3000, 32);
    await a.uploadDocumentKv('doomed', { layer: 0, start: 0, k: c.k, v: c.v });
    await a.sealDocument('doomed');
    await b.createSession({ model, documents: ['doomed'] }); // B holds it in memory now
    expect(blockKeysPerMaster('doomed').reduce((x, y) => x + y)).toBeGreaterThan(0);
    await b.deleteDocument('doomed');
    expect(await statusOf(a, 'doomed')).toBe(404);
    expect(await statusOf(b, 'doomed')).toBe(404);
    await expect(a.createSession({ model, documents: ['doomed'] })).rejects.toMatchObject({ status: 404 });
    await expect(b.createSession({ model, documents: ['doomed'] })).rejects.toMatchObject({ status: 404 });
    expect(blockKeysPerMaster('doomed').reduce((x, y) => x + y)).toBe(0);
    expect(cluster.topology().masters.map((m) => cluster.cli(m, '--scan', '--pattern', 'kvr:{a/doomed/*').trim()).join('')).toBe('');
  });

  /** The shape of the delete-and-replace tests' documents. */
  const SMALL = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
  /** Host bytes server A counts in its budget now. */
  const usedOnA = () => servers[0].engine.budget.used;
  /** A document of SMALL's shape, every layer `kv`, made and sealed through `via`. */
  const sealThrough = async (via: KvrecallClient, id: string, kv: KvChunk) => {
    await via.createDocument(id, SMALL);
    for (let layer = 0; layer < SMALL.layers; layer++) await via.uploadDocumentKv(id, { layer, start: 0, k: kv.k, v: kv.v });
    await via.sealDocument(id);
  };
  /** A document sealed through B, attached on A by an exact session that has stepped once (A holds its layers). */
  const attachedOnA = async (id: string, kv: KvChunk, rng: Rng) => {
    await sealThrough(b, id, kv);
    const sid = (await a.createSession({ model: SMALL, documents: [id], method: 'exact' })).id;
    const q = tensor('f32', [SMALL.qHeads, SMALL.headDim], randomQ(rng, SMALL.qHeads, SMALL.headDim));
    await a.attend(sid, { layer: 0, q });
    return { sid, q };
  };

  it('a document deleted through one server while another loads it: the loader lets its memory go on DELETE or a new PUT', async () => {
    const base = usedOnA();
    const bytes = 2 * 20000 * 2 * 32 * 2 * 2; // layers × tokens × kvHeads × d × 2 bytes × (K, V)
    const c = randomKv(new Rng(seed ^ 5), 'f16', 2, 300, 32);
    for (const retire of ['DELETE', 'PUT'] as const) {
      await a.createDocument('orphan', SMALL, { tokens: 20000 });
      await a.uploadDocumentKv('orphan', { layer: 0, start: 0, k: c.k, v: c.v });
      expect(usedOnA() - base).toBe(bytes);
      await b.deleteDocument('orphan');
      // A still shows what it loads: its DELETE removes it (it said 404 and kept the memory), a new PUT replaces it (it added its own).
      expect(await a.getDocument('orphan')).toMatchObject({ status: 'loading' });
      if (retire === 'DELETE') {
        await a.deleteDocument('orphan');
        expect(usedOnA()).toBe(base);
        expect(await statusOf(a, 'orphan')).toBe(404);
      } else {
        await a.createDocument('orphan', SMALL, { tokens: 20000 });
        expect(usedOnA() - base).toBe(bytes);
        await a.uploadDocumentKv('orphan', { layer: 0, start: 0, k: c.k, v: c.v });
        await a.uploadDocumentKv('orphan', { layer: 1, start: 0, k: c.k, v: c.v });
        expect(await a.sealDocument('orphan')).toMatchObject({ status: 'ready', tokens: 300 });
        await a.deleteDocument('orphan');
        expect(usedOnA()).toBe(base);
      }
    }
  });

  it('a document one server was loading, deleted and sealed again through another: sessions on the first attach the sealed one (not 409 loading), its stale memory given back', async () => {
    const base = usedOnA();
    const stale = 2 * 20000 * 2 * 32 * 2 * 2; // A's reservation for the document it was loading
    const rng = new Rng(seed ^ 8);
    const old = randomKv(rng, 'f16', 2, 300, 32), now = randomKv(rng, 'f16', 2, 200, 32);
    await a.createDocument('remade', SMALL, { tokens: 20000 });
    await a.uploadDocumentKv('remade', { layer: 0, start: 0, k: old.k, v: old.v });
    expect(usedOnA() - base).toBe(stale);
    await b.deleteDocument('remade');
    await sealThrough(b, 'remade', now);
    // A attaches what the store holds (it answered 409 "loading, not ready" for its own stale copy, kept reserved).
    const sid = (await a.createSession({ model: SMALL, documents: ['remade'], method: 'exact' })).id;
    expect(usedOnA() - base).toBeLessThan(stale);
    const q = randomQ(rng, 4, 32);
    const want = referenceAttention(q, now.kValues, now.vValues, 4, 32);
    const got = await a.attend(sid, { layer: 1, q: tensor('f32', [4, 32], q) });
    expect(maxRelError(got.out, want.out, 4)).toBeLessThan(1e-5);
    expect(await a.getDocument('remade')).toMatchObject({ status: 'ready', tokens: 200 });
    await a.deleteSession(sid);
    await a.deleteDocument('remade');
    expect(usedOnA()).toBe(base);
  });

  it('a document deleted through another server and made again here: sessions here that attached the old one are refused (409), its memory given back', async () => {
    const base = usedOnA();
    const rng = new Rng(seed ^ 9);
    const old = randomKv(rng, 'f16', 2, 300, 32), now = randomKv(rng, 'f16', 2, 200, 32);
    const { sid, q } = await attachedOnA('again', old, rng);
    await b.deleteDocument('again');
    await sealThrough(a, 'again', now);
    // The old session's document is gone: refused, not answered from the old KV still resident here.
    await expect(a.attend(sid, { layer: 0, q })).rejects.toMatchObject({ status: 409 });
    await a.deleteSession(sid);
    await a.deleteDocument('again');
    // No layer of the old document left resident (they stayed in the cache, counted, once the new seal took its place).
    expect(usedOnA()).toBe(base);
  });

  it('a document deleted through another server and then DELETEd here: sessions here that attached it are refused (409), its memory given back', async () => {
    const base = usedOnA();
    const rng = new Rng(seed ^ 10);
    const c = randomKv(rng, 'f16', 2, 300, 32);
    const { sid, q } = await attachedOnA('twice', c, rng);
    await b.deleteDocument('twice');
    // DELETE here of what this server still holds: it goes here too (it answered 404 and kept serving it).
    expect(await a.deleteDocument('twice')).toEqual({ deleted: 'twice' });
    await expect(a.attend(sid, { layer: 0, q })).rejects.toMatchObject({ status: 409 });
    await a.deleteSession(sid);
    expect(usedOnA()).toBe(base);
    expect(await statusOf(a, 'twice')).toBe(404);
  });

  it('a seal refused with 503 (a replica silent past wait) leaves the document loading: it takes more uploads and seals', async () => {
    const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
    const server = await startInProcess(dirs[3].dir, { store: `${cluster.url}?lease=3000&failover=15000&wait=300` });
    servers.push(server);
    const c = new KvrecallClient({ url: server.url });
    const rng = new Rng(seed ^ 6);
    const chunks = [randomKv(rng, 'f16', 2, 200, 32), randomKv(rng, 'f16', 2, 100, 32)];
    await c.createDocument('retried', model);
    for (let layer = 0; layer < 2; layer++) await c.uploadDocumentKv('retried', { layer, start: 0, k: chunks[0].k, v: chunks[0].v });
    const replicas = [...cluster.topology().replicasOf.values()].flat();
    const paused = cluster.nodes.filter((n) => replicas.includes(n.port));
    for (const n of paused) n.proc.kill('SIGSTOP');
    try {
      await expect(c.sealDocument('retried')).rejects.toMatchObject({ status: 503 });
    } finally {
      for (const n of paused) n.proc.kill('SIGCONT');
    }
    await cluster.waitHealthy(30000, 1);
    expect(await c.getDocument('retried')).toMatchObject({ status: 'loading' });
    for (let layer = 0; layer < 2; layer++) await c.uploadDocumentKv('retried', { layer, start: 200, k: chunks[1].k, v: chunks[1].v });
    expect(await c.sealDocument('retried')).toMatchObject({ status: 'ready', tokens: 300 });
    // Another server reads it whole: every token as uploaded.
    const sid = (await b.createSession({ model, documents: ['retried'] })).id;
    const q = randomQ(rng, 4, 32);
    const want = referenceAttention(q, concatValues(chunks, 'kValues'), concatValues(chunks, 'vValues'), 4, 32);
    const got = await b.attend(sid, { layer: 1, q: tensor('f32', [4, 32], q) });
    expect(maxRelError(got.out, want.out, 4)).toBeLessThan(1e-5);
  });

  it('a conditional DELETE leaves alone a document made again through another server between its check and its removal (412, theirs whole)', async () => {
    const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
    const c = randomKv(new Rng(seed ^ 7), 'f16', 2, 300, 32);
    const used = () => servers[0].engine.budget.used;
    const base = used();
    const mine = await a.createDocument('cond', model, { tokens: 300 });
    await a.uploadDocumentKv('cond', { layer: 0, start: 0, k: c.k, v: c.v });
    // A's check has passed (the store held A's document); B deletes it and makes it again before A's removal reaches the store.
    const { store } = servers[0].engine;
    const remove = store.remove.bind(store);
    let theirs: DocumentInfo | undefined;
    store.remove = async (id, expect) => {
      if (id === 'cond' && !theirs) {
        await b.deleteDocument('cond');
        await sleep(3); // a later createdAt (ms)
        theirs = await b.createDocument('cond', model);
      }
      return remove(id, expect);
    };
    try {
      const e = await a.deleteDocument('cond', { createdAt: mine.createdAt }).catch((err: unknown) => err);
      expect(e).toMatchObject({ status: 412, code: 'precondition_failed' });
      expect((e as Error).message).toContain(theirs!.createdAt);
    } finally {
      store.remove = remove;
    }
    expect(theirs!.createdAt).not.toBe(mine.createdAt);
    // Theirs is whole on both servers (A no longer shows its own, and gave its memory back); B loads and seals it.
    for (const s of [a, b]) expect(await s.getDocument('cond')).toMatchObject({ status: 'loading', createdAt: theirs!.createdAt });
    expect(used()).toBe(base);
    await b.uploadDocumentKv('cond', { layer: 0, start: 0, k: c.k, v: c.v });
    expect(await b.sealDocument('cond')).toMatchObject({ status: 'ready', tokens: 300, createdAt: theirs!.createdAt });
    // Named by its own createdAt, through A, it goes.
    expect(await a.deleteDocument('cond', { createdAt: theirs!.createdAt })).toEqual({ deleted: 'cond' });
    expect(await statusOf(b, 'cond')).toBe(404);
    expect(blockKeysPerMaster('cond').reduce((x, y) => x + y)).toBe(0);
  });

  it('a delete and a PUT of one id racing through two servers: the id is listed exactly while its document lives (plain and conditional deletes, many rounds)', async () => {
    // Two stores, each its own worker and cluster connections, as two servers. The delete's script and the
    // create's land in either order on the document's master; what the listing must never do is drop a live id.
    const [x, y] = await Promise.all([RedisStore.open(store), RedisStore.open(store)]).then((o) => o.map((s) => s.store));
    const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const, blockSize: DEFAULT_BLOCK_SIZE };
    const meta = (): DocumentMeta => ({ id: 'race', model, status: 'loading', tokens: 0, methods: [], createdAt: new Date().toISOString() });
    const wrong: string[] = [];
    let recreated = 0;
    try {
      for (let round = 0; round < RACE_ROUNDS; round++) {
        await x.remove('race');
        const mine = meta();
        await x.create(mine);
        const condition = round % 2 ? { createdAt: mine.createdAt } : {};
        await Promise.allSettled([x.remove('race', condition), y.create(meta())]);
        const lives = (await x.get('race')) !== undefined;
        const listed = (await x.list()).some((m) => m.id === 'race');
        if (lives) recreated++;
        if (listed !== lives) wrong.push(`round ${round} (${round % 2 ? 'conditional' : 'plain'} delete): ${lives ? 'lives' : 'gone'} but ${listed ? 'listed' : 'not listed'}`);
      }
    } finally {
      await x.remove('race');
      await Promise.all([x.close(), y.close()]);
    }
    console.log(`redis-store: delete/PUT race: the PUT landed after the delete in ${recreated} of ${RACE_ROUNDS} rounds`);
    expect(wrong).toEqual([]);
    expect(recreated).toBeGreaterThan(0);
  }, 120_000);

  it("a seal whose ready flip lands but whose replicas do not acknowledge it (503): served here as everywhere, and the seal asked again answers as the seal once they do", async () => {
    const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
    // A long lease: no renewal writes to the document's slot while its replica is paused, so the WAIT before the flip
    // passes (every write so far acknowledged) and only the one after it, which must cover the flip, fails.
    const server = await startInProcess(dirs[4].dir, { store: `${cluster.url}?lease=600000&failover=15000&wait=300` });
    servers.push(server);
    const c = new KvrecallClient({ url: server.url });
    const rng = new Rng(seed ^ 8);
    const tokens = 4 * DEFAULT_BLOCK_SIZE; // whole blocks: all written before the seal, which writes no block
    const chunk = randomKv(rng, 'f16', 2, tokens, 32);
    await c.createDocument('flipped', model);
    for (let layer = 0; layer < 2; layer++) await c.uploadDocumentKv('flipped', { layer, start: 0, k: chunk.k, v: chunk.v });
    // The uploads' blocks are written behind their answers: every one in, then acknowledged by the replica of the document's master.
    for (let t = Date.now(); blockKeysPerMaster('flipped').reduce((x, y) => x + y) < 2 * 2 * 4; await sleep(20)) expect(Date.now() - t).toBeLessThan(10000);
    const slot = String(keySlot(metaKey('flipped')));
    const { masters, replicasOf } = cluster.topology();
    const master = masters.find((m) => Number(cluster.cli(m, 'cluster', 'countkeysinslot', slot).trim()) > 0)!;
    const replica = cluster.nodes.find((n) => n.port === replicasOf.get(master)![0])!;
    const offsets = () => {
      const info = cluster.cli(master, 'info', 'replication');
      return [Number(/master_repl_offset:(\d+)/.exec(info)![1]), Number(/slave0:.*offset=(\d+)/.exec(info)![1])];
    };
    for (let t = Date.now(), [m, r] = offsets(); r < m; [m, r] = offsets()) {
      expect(Date.now() - t).toBeLessThan(10000);
      await sleep(50);
    }
    replica.proc.kill('SIGSTOP');
    let sealedAt: string | undefined;
    try {
      const e = await c.sealDocument('flipped').catch((err: unknown) => err);
      expect(e).toMatchObject({ status: 503 });
      // Ready in the store: every server, this one included, says so and serves it.
      const held = await b.getDocument('flipped');
      expect(held).toMatchObject({ status: 'ready', tokens });
      sealedAt = held.sealedAt;
      expect(await c.getDocument('flipped')).toMatchObject({ status: 'ready', tokens, sealedAt });
      expect((e as Error).message).toMatch(/sealing flipped \(its ready metadata\): 0 of 1 replicas.*sealed and served.*POST its seal again/);
      const sid = (await c.createSession({ model, documents: ['flipped'] })).id;
      const q = randomQ(rng, 4, 32);
      const want = referenceAttention(q, chunk.kValues, chunk.vValues, 4, 32);
      expect(maxRelError((await c.attend(sid, { layer: 1, q: tensor('f32', [4, 32], q) })).out, want.out, 4)).toBeLessThan(1e-5);
      // Asked again while the replica is still silent: the same 503, still unconfirmed.
      await expect(c.sealDocument('flipped')).rejects.toMatchObject({ status: 503 });
    } finally {
      replica.proc.kill('SIGCONT');
    }
    await cluster.waitHealthy(30000, 1);
    expect(await c.sealDocument('flipped')).toMatchObject({ status: 'ready', tokens, sealedAt });
    // Confirmed once: a seal after that is the usual 409 of a sealed document.
    await expect(c.sealDocument('flipped')).rejects.toMatchObject({ status: 409 });
    await c.deleteDocument('flipped');
  });

  it('a preload killed midway (SIGKILL) is incomplete on both servers once its lease lapses; PUT starts it again', async () => {
    const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
    const child = await startChild(dirs[2].dir, ['--store', store]);
    children.push(child);
    const c = new KvrecallClient({ url: child.url });
    await c.createDocument('victim', model);
    for (let start = 0; start < 4000; start += 1000) await c.uploadDocumentKv('victim', { layer: 0, start, k: randomBits(2, 1000, 64), v: randomBits(2, 1000, 64) });
    const inflight = c.uploadDocumentKv('victim', { layer: 1, start: 0, k: randomBits(2, 20000, 64), v: randomBits(2, 20000, 64) }).catch((e: Error) => e);
    await sleep(5);
    await child.stop('SIGKILL');
    await inflight;
    expect(['loading', 'incomplete']).toContain((await a.getDocument('victim')).status);
    const deadline = Date.now() + 15000;
    while ((await a.getDocument('victim')).status !== 'incomplete') {
      expect(Date.now()).toBeLessThan(deadline);
      await sleep(200);
    }
    expect(await b.getDocument('victim')).toMatchObject({ status: 'incomplete', tokens: 0 });
    await expect(b.createSession({ model, documents: ['victim'] })).rejects.toMatchObject({ status: 409 });
    // Its blocks are dropped.
    for (let t = Date.now(); blockKeysPerMaster('victim').some((n) => n > 0); await sleep(100)) expect(Date.now() - t).toBeLessThan(10000);
    // PUT again through B: a fresh preload that seals.
    await b.createDocument('victim', model);
    for (let layer = 0; layer < 2; layer++) await b.uploadDocumentKv('victim', { layer, start: 0, k: randomBits(2, 500, 64), v: randomBits(2, 500, 64) });
    expect(await b.sealDocument('victim')).toMatchObject({ status: 'ready', tokens: 500 });
    expect(await a.getDocument('victim')).toMatchObject({ status: 'ready', tokens: 500 });
  });

  it('a damaged or missing block is detected on read and the document is not attended (409, saying which block)', async () => {
    const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
    for (const id of ['damaged', 'gapped']) {
      await a.createDocument(id, model);
      await a.uploadDocumentKv(id, { layer: 0, start: 0, k: randomBits(2, 1000, 64), v: randomBits(2, 1000, 64) });
      await a.sealDocument(id);
    }
    const anyMaster = cluster.topology().masters[0];
    const gen = (id: string) => cluster.cli(anyMaster, '-c', 'HGET', metaKey(id), 'gen').trim();
    // Overwrite 8 bytes of V in block 3 of kv head 1 (the value's length is unchanged).
    const key = blockKey('damaged', gen('damaged'), 0, 1, 3);
    expect(cluster.cli(anyMaster, '-c', 'SETRANGE', key, String(BLOCK_HEADER + 64 * 128 + 40), 'CORRUPT!').trim()).toBe(String(BLOCK_HEADER + 2 * 64 * 128));
    const err = await b.createSession({ model, documents: ['damaged'] }).catch((e: KvrecallRequestError) => e);
    expect(err).toBeInstanceOf(KvrecallRequestError);
    expect(err).toMatchObject({ status: 409 });
    expect((err as Error).message).toMatch(/block 3 of layer 0, kv head 1 fails its V checksum .*not attended/);
    // A block gone is as plain.
    cluster.cli(anyMaster, '-c', 'DEL', blockKey('gapped', gen('gapped'), 0, 0, 7));
    await expect(b.createSession({ model, documents: ['gapped'] })).rejects.toThrow(/block 7 of layer 0, kv head 0 is missing/);
    // Nothing half-read stays behind: the budget is back and the server still answers.
    expect(servers[1].engine.budget.used).toBeLessThan(2 ** 30);
    expect((await b.getDocument('damaged')).status).toBe('ready');
  });

  it('a master SIGKILLed during an attach: its replica takes over and the attach completes with every block checked, or fails with a clear 503; never a wrong answer', async () => {
    const model = { layers: 2, qHeads: 16, kvHeads: 8, headDim: 128, dtype: 'f16' as const };
    const tokens = 16384, chunk = 4096;
    await a.createDocument('big', model, { tokens });
    for (let layer = 0; layer < model.layers; layer++)
      for (let start = 0; start < tokens; start += chunk)
        await a.uploadDocumentKv('big', { layer, start, k: randomBits(8, chunk, 128), v: randomBits(8, chunk, 128) });
    await a.sealDocument('big');
    const rng = new Rng(seed ^ 2);
    const qs = [0, 1].map(() => randomQ(rng, model.qHeads, model.headDim));
    const want: Buffer[] = [];
    const sa = await a.createSession({ model, documents: ['big'] });
    for (let layer = 0; layer < 2; layer++) want.push(Buffer.from((await a.attend(sa.id, { layer, q: tensor('f32', [16, 128], qs[layer]) })).out.buffer));

    // A fresh server (its own process, so this one can kill a master while it reads).
    const child = await startChild(dirs[3].dir, ['--store', store]);
    children.push(child);
    const c = new KvrecallClient({ url: child.url });
    const answers = async (sid: string) => {
      for (let layer = 0; layer < 2; layer++) {
        const got = await c.attend(sid, { layer, q: tensor('f32', [16, 128], qs[layer]) });
        expect(Buffer.from(got.out.buffer).equals(want[layer])).toBe(true);
      }
    };
    const victim = cluster.topology().masters[1];
    const node = cluster.nodes.find((n) => n.port === victim)!;
    const t0 = performance.now();
    const attach = c.createSession({ model, documents: ['big'] }).catch((e: KvrecallRequestError) => e);
    await sleep(15);
    node.proc.kill('SIGKILL');
    const killedAt = performance.now() - t0;
    const first = await attach;
    console.log(`redis-store: master ${victim} killed ${killedAt.toFixed(0)} ms into an attach that ${first instanceof Error ? `failed: ${first.message}` : 'completed'} after ${(performance.now() - t0).toFixed(0)} ms`);
    if (first instanceof Error) {
      expect(first).toMatchObject({ status: 503 });
      expect(first.message).toMatch(/Redis Cluster.*try again/);
    } else await answers(first.id);
    // Once the replica has taken over, the attach completes and answers the same.
    await cluster.waitHealthy(30000, 0);
    expect(cluster.topology().masters).not.toContain(victim);
    const again = await c.createSession({ model, documents: ['big'] });
    await answers(again.id);
  }, 120_000);
});
