// A create, seal or remove whose reply is lost after its script ran on the
// Redis Cluster (a reset connection, a failover, a timeout): the store's
// worker runs the script again, and the call must end as one run ends — the
// same answer, the lease recorded, the document ready, the old blocks gone.
// RedisStore.open's `loseReply` drops the named script's first reply after
// Redis ran it; everything else is real (a 6-node cluster on loopback, the
// store's worker and connections). Each test fails on the scripts that had
// no receipts (409 "exists", 409 "ready, not loading", 404 or blocks left).
//
// Needs redis-server and redis-cli and the compiled worker (dist/), as
// redis-store.test.ts does; skipped without Redis except in CI.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomFillSync } from 'node:crypto';
import { DEFAULT_BLOCK_SIZE } from '../../core/model.js';
import type { BlockWrite, DocumentMeta } from '../../storage/document-store.js';
import { HostBudget } from '../../storage/host-budget.js';
import { leaseKey, metaKey } from '../../storage/redis-format.js';
import { RedisStore } from '../../storage/redis-store.js';
import { redisInstalled, redisRequired, startRedisCluster, type RedisCluster } from '../helpers/redis-cluster.js';

const available = redisInstalled();
const skip = !available && !redisRequired();
if (skip) console.warn('redis-retry: SKIPPED: redis-server and redis-cli are not installed (apt-get install redis-server)');

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const LEASE_MS = 3000;
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const, blockSize: DEFAULT_BLOCK_SIZE };
/** Not a multiple of the block size: the last block is partial. */
const TOKENS = 300;
const BLOCKS = Math.ceil(TOKENS / DEFAULT_BLOCK_SIZE);
/** Block keys of a whole document: layers × kv heads × blocks. */
const BLOCK_KEYS = model.layers * model.kvHeads * BLOCKS;

/** Every block of a TOKENS-token document, random bytes (the store checks and moves them, never reads them as numbers). */
function blocks(): BlockWrite[] {
  const rowBytes = model.headDim * 2;
  const out: BlockWrite[] = [];
  for (let layer = 0; layer < model.layers; layer++)
    for (let head = 0; head < model.kvHeads; head++)
      for (let block = 0; block < BLOCKS; block++) {
        const n = Math.min(DEFAULT_BLOCK_SIZE, TOKENS - block * DEFAULT_BLOCK_SIZE);
        out.push({ layer, head, block, k: randomFillSync(new Uint8Array(n * rowBytes)), v: randomFillSync(new Uint8Array(n * rowBytes)) });
      }
  return out;
}

const metaOf = (id: string, tokens = 0): DocumentMeta => ({ id, model, status: 'loading', tokens, methods: [], createdAt: new Date().toISOString() });

describe.skipIf(skip)('create, seal and remove run again after a lost reply end as one run does', () => {
  let cluster: RedisCluster;
  let url: string;
  /** A store that loses nothing: it sets documents up and looks at them. */
  let plain: RedisStore;
  const opened: RedisStore[] = [];

  const open = async (loseReply: ('kvrCreate' | 'kvrSeal' | 'kvrRemove')[] = []) => {
    const { store } = await RedisStore.open(url, { loseReply });
    opened.push(store);
    return store;
  };
  const anyMaster = () => cluster.topology().masters[0];
  const hget = (id: string, field: string) => cluster.cli(anyMaster(), '-c', 'HGET', metaKey(id), field).trim();
  const exists = (key: string) => cluster.cli(anyMaster(), '-c', 'EXISTS', key).trim();
  /** Keys of one generation of a document's blocks, over every master. */
  const blockKeys = (id: string, gen: string) =>
    cluster
      .topology()
      .masters.map((m) => cluster.cli(m, '--scan', '--pattern', `kvr:{b/${id}/${gen}/*`).split('\n').filter(Boolean).length)
      .reduce((x, y) => x + y);

  /** Checks that another store reads the sealed document whole: every byte as written. */
  const readsBack = (meta: DocumentMeta, written: BlockWrite[]) => {
    const segments = plain.load({ ...meta, status: 'ready' }, new HostBudget(2 ** 30));
    const rowBytes = model.headDim * 2;
    for (const w of written) {
      const s = segments[w.layer];
      const at = w.block * DEFAULT_BLOCK_SIZE * rowBytes;
      const k = new Uint8Array(s.k[w.head].buffer, s.k[w.head].byteOffset + at, w.k.byteLength);
      const v = new Uint8Array(s.v[w.head].buffer, s.v[w.head].byteOffset + at, w.v.byteLength);
      expect(Buffer.from(k).equals(Buffer.from(w.k)) && Buffer.from(v).equals(Buffer.from(w.v))).toBe(true);
    }
    for (const s of segments) s.release();
  };

  beforeAll(async () => {
    if (!available) throw new Error('redis-server and redis-cli are not installed, and CI must run the Redis store tests (apt-get install redis-server)');
    cluster = await startRedisCluster({ nodeTimeoutMs: 2000 });
    url = `${cluster.url}?lease=${LEASE_MS}&failover=15000`;
    plain = await open();
  }, 120_000);

  afterAll(async () => {
    await Promise.allSettled(opened.map((s) => s.close()));
    await cluster?.stop();
  }, 60_000);

  it('create: created (not 409 "exists"), listed, its lease recorded and renewed, the incomplete predecessor’s blocks dropped', async () => {
    // A predecessor whose loader died after writing every block: loading, its lease gone.
    await plain.create(metaOf('made'));
    await plain.writeBlocks('made', blocks());
    const oldGen = hget('made', 'gen');
    const deadline = Date.now() + 10_000;
    while (blockKeys('made', oldGen) < BLOCK_KEYS && Date.now() < deadline) await sleep(50);
    expect(blockKeys('made', oldGen)).toBe(BLOCK_KEYS);
    cluster.cli(anyMaster(), '-c', 'DEL', leaseKey('made'));

    const lossy = await open(['kvrCreate']);
    const meta = metaOf('made');
    await lossy.create(meta);
    expect(hget('made', 'gen')).not.toBe(oldGen);
    expect(blockKeys('made', oldGen)).toBe(0);
    expect(await plain.get('made')).toMatchObject({ status: 'loading', createdAt: meta.createdAt });
    expect((await plain.list()).filter((m) => m.id === 'made')).toHaveLength(1);
    // Past the lease's TTL it is still loading (renewed by its creator, which holds it), and the creator seals it.
    await sleep(LEASE_MS + 1000);
    expect(await plain.get('made')).toMatchObject({ status: 'loading' });
    const written = blocks();
    await lossy.seal({ ...meta, tokens: TOKENS }, written, []);
    expect(await plain.get('made')).toMatchObject({ status: 'ready', tokens: TOKENS, createdAt: meta.createdAt });
    readsBack({ ...meta, tokens: TOKENS }, written);
  }, 60_000);

  it('seal: sealed (not 409 "ready, not loading"), ready everywhere, its lease released', async () => {
    const lossy = await open(['kvrSeal']);
    const meta = metaOf('sealed');
    await lossy.create(meta);
    const written = blocks();
    await lossy.seal({ ...meta, tokens: TOKENS }, written, []);
    expect(await plain.get('sealed')).toMatchObject({ status: 'ready', tokens: TOKENS, createdAt: meta.createdAt });
    expect(exists(leaseKey('sealed'))).toBe('0');
    readsBack({ ...meta, tokens: TOKENS }, written);
  });

  for (const conditional of [false, true])
    it(`${conditional ? 'conditional' : 'plain'} remove: removed${conditional ? ' (not 404)' : ''}, unlisted, every block key of the document gone; the id can be made again`, async () => {
      const id = conditional ? 'gone-cond' : 'gone';
      const meta = metaOf(id);
      await plain.create(meta);
      await plain.seal({ ...meta, tokens: TOKENS }, blocks(), []);
      const gen = hget(id, 'gen');
      expect(blockKeys(id, gen)).toBe(BLOCK_KEYS);

      const lossy = await open(['kvrRemove']);
      await lossy.remove(id, conditional ? { createdAt: meta.createdAt } : {});
      expect(await plain.get(id)).toBeUndefined();
      expect((await plain.list()).some((m) => m.id === id)).toBe(false);
      expect(exists(metaKey(id))).toBe('0');
      expect(blockKeys(id, gen)).toBe(0);
      // The call's receipt does not stand in the way of the id's next life.
      const again = metaOf(id);
      await lossy.create(again);
      expect(await plain.get(id)).toMatchObject({ status: 'loading', createdAt: again.createdAt });
      await lossy.remove(id);
      expect(await plain.get(id)).toBeUndefined();
    });
});
