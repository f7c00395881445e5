// The LMDB store with each document's blocks spread over environments of its
// own, on real LMDB files in a temp folder: blocks round-trip through several
// shards bit for bit; a document cut off mid-preload loses its blocks in every
// shard on reopen; a delete (and one cut off midway) removes them everywhere
// and gives their disk space back; a store written before shards (every block
// in the main environment) opens and reads, and a store reopened with another
// shard count reads what it holds.
import { mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { open } from 'lmdb';
import { describe, expect, it } from 'vitest';
import { parseConfig } from '../../core/config.js';
import type { BlockWrite, DocumentMeta } from '../../storage/document-store.js';
import { HostBudget } from '../../storage/host-budget.js';
import { documentFolder } from '../../storage/lmdb-doc-envs.js';
import { defaultShards, LmdbStore } from '../../storage/lmdb-store.js';
import { blocksPerShard } from '../helpers/lmdb-blocks.js';
import { tempFolders } from '../helpers/server.js';
import { lmdbPreload } from '../helpers/lmdb-preload.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`lmdb-shards: seed ${seed}`);
// Odd sizes: 1001 tokens = 62 full blocks of 16 and a tail of 9.
const model = { layers: 3, qHeads: 4, kvHeads: 2, headDim: 8, dtype: 'f16' as const, blockSize: 16 };
const TOKENS = 1001;
const ROW = model.headDim * 2;
const { meta, source, blocksOf, preload, expectSame } = lmdbPreload(model, TOKENS, 10);

const folder = tempFolders();

const BLOCKS = model.layers * model.kvHeads * Math.ceil(TOKENS / model.blockSize);

describe('LMDB store over shards', () => {
  const rng = new Rng(seed);

  it('blocks spread evenly over every shard and read back bit for bit, also after reopening with another count', async () => {
    const dir = folder(), src = source(rng);
    let { store } = await LmdbStore.open(dir, { shards: 4 });
    expect(store.shardCount).toBe(4);
    await preload(store, 'doc', src);
    expectSame(store, 'doc', src);
    await store.close();

    const counts = blocksPerShard(dir, 'doc', 4);
    expect(counts.reduce((a, b) => a + b)).toBe(BLOCKS);
    // 378 blocks over 4 shards: none more than a few off a quarter.
    for (const c of counts) expect(Math.abs(c - BLOCKS / 4)).toBeLessThanOrEqual(3);

    for (const shards of [1, 2, 7]) {
      ({ store } = await LmdbStore.open(dir, { shards }));
      expect(store.get('doc')?.status).toBe('ready');
      expectSame(store, 'doc', src);
      await store.close();
    }
  });

  it('a document left loading with blocks in several shards is incomplete on reopen, its blocks gone from every shard', async () => {
    const dir = folder(), src = source(rng);
    let { store } = await LmdbStore.open(dir, { shards: 3 });
    await preload(store, 'kept', src);
    await preload(store, 'cut', src, false);
    await store.close(); // as a crash after the block commits: the metadata still says loading
    const before = blocksPerShard(dir, 'cut', 3);
    expect(before.filter((c) => c > 0).length).toBe(3);

    let recovered: string[];
    ({ store, recovered } = await LmdbStore.open(dir, { shards: 3 }));
    expect(recovered).toEqual(['cut']);
    expect(store.get('cut')).toMatchObject({ status: 'incomplete', tokens: 0 });
    expectSame(store, 'kept', src);
    // Preloaded again from scratch, it is whole.
    await preload(store, 'cut', src);
    expectSame(store, 'cut', src);
    await store.remove('cut');
    await store.close();
    expect(blocksPerShard(dir, 'cut', 3)).toEqual([0, 0, 0]);

    // Reopened with fewer shards than hold blocks: recovery still reaches every shard folder.
    ({ store } = await LmdbStore.open(dir, { shards: 3 }));
    await preload(store, 'cut2', src, false);
    await store.close();
    ({ store, recovered } = await LmdbStore.open(dir, { shards: 1 }));
    expect(recovered).toEqual(['cut2']);
    await store.close();
    expect(blocksPerShard(dir, 'cut2', 3)).toEqual([0, 0, 0]);
    expect(blocksPerShard(dir, 'kept', 3).reduce((a, b) => a + b)).toBe(BLOCKS);
  });

  it('delete removes the blocks from every shard; a delete cut off after marking the document incomplete is finished on reopen', async () => {
    const dir = folder(), src = source(rng);
    let { store } = await LmdbStore.open(dir, { shards: 2 });
    await preload(store, 'a', src);
    await preload(store, 'b', src);
    await store.remove('a');
    expect(store.get('a')).toBeUndefined();
    await store.close();
    expect(blocksPerShard(dir, 'a', 2)).toEqual([0, 0]);

    // A crash after the delete's first step (metadata marked incomplete, durably) and before the blocks went.
    const env = open({ path: dir, maxDbs: 8, noSubdir: false });
    await env.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' }).put('b', meta('b', 'incomplete'));
    await env.close();
    expect(blocksPerShard(dir, 'b', 2).every((c) => c > 0)).toBe(true);
    let recovered: string[];
    ({ store, recovered } = await LmdbStore.open(dir, { shards: 2 }));
    expect(recovered).toEqual([]); // it was not mid-preload
    expect(store.get('b')?.status).toBe('incomplete');
    await store.close();
    expect(blocksPerShard(dir, 'b', 2)).toEqual([0, 0]);
  });

  it('a store written before shards (every block in the main environment) opens and reads with shards; new documents spread', async () => {
    const dir = folder(), src = source(rng);
    // The layout as lmdb-store.ts wrote it before shards, written with lmdb directly.
    const env = open({ path: dir, maxDbs: 8, mapSize: 2 ** 30, noSubdir: false });
    const metaDb = env.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' });
    const blocksDb = env.openDB<Buffer, [string, number, number, number]>({ name: 'blocks', encoding: 'binary' });
    await env.transaction(() => {
      for (const w of blocksOf(src, 0, Math.ceil(TOKENS / model.blockSize))) blocksDb.put(['old', w.layer, w.head, w.block], Buffer.concat([w.k, w.v]));
      metaDb.put('old', meta('old', 'ready', TOKENS));
    });
    await env.close();

    const { store } = await LmdbStore.open(dir, { shards: 4 });
    expectSame(store, 'old', src);
    const src2 = source(rng);
    await preload(store, 'new', src2);
    expectSame(store, 'new', src2);
    expectSame(store, 'old', src);
    await store.close();
    expect(blocksPerShard(dir, 'old', 4)).toEqual([BLOCKS, 0, 0, 0]);
    expect(blocksPerShard(dir, 'new', 4).every((c) => c > 0)).toBe(true);
  });

  it('a ready document missing a shard folder is refused with a message naming it, not read with holes', async () => {
    const dir = folder(), src = source(rng);
    let { store } = await LmdbStore.open(dir, { shards: 3 });
    await preload(store, 'doc', src);
    await store.close();
    rmSync(join(documentFolder(dir, 'doc'), '2'), { recursive: true });
    ({ store } = await LmdbStore.open(dir, { shards: 2 }));
    expect(() => store.load(store.get('doc')!, new HostBudget(1 << 30))).toThrow(/of its 378 KV blocks .*2 environment\(s\) in .*docs.*folder missing/);
    rmSync(documentFolder(dir, 'doc'), { recursive: true });
    expect(() => store.load(store.get('doc')!, new HostBudget(1 << 30))).toThrow(/0 of its 378 KV blocks .*no folder .*docs/);
    await store.close();
  });

  it("a ready document whose environment does not open is refused, the host memory reserved for it given back", async () => {
    const dir = folder(), src = source(rng);
    const { store } = await LmdbStore.open(dir, { shards: 3 });
    await preload(store, 'doc', src);
    // Environment 1's file replaced by a folder: lmdb's open throws after environment 0 opened.
    const file = join(documentFolder(dir, 'doc'), '1', 'data.mdb');
    rmSync(file);
    mkdirSync(file);
    const budget = new HostBudget(1 << 30);
    expect(() => store.load(store.get('doc')!, budget)).toThrow(/directory/i);
    expect(budget.used).toBe(0);
    await store.close();
  });

  it('a ready document larger than the host budget left is refused (503) with nothing reserved: the layers that fit are given back', async () => {
    const dir = folder(), src = source(rng);
    const { store } = await LmdbStore.open(dir, { shards: 2 });
    await preload(store, 'doc', src);
    // Room for two of its three layers (64064 B each): the third's reservation is refused.
    const layerBytes = TOKENS * ROW * 2 * model.kvHeads;
    const budget = new HostBudget(2.5 * layerBytes);
    expect(() => store.load(store.get('doc')!, budget)).toThrow(/host memory/);
    expect(budget.used).toBe(0);
    // The refused load changed nothing of the document.
    expectSame(store, 'doc', src);
    await store.close();
  });

  it('delete gives the disk space of its blocks back (no LMDB freelist for the next preload to allocate from); folders no document names go at open', async () => {
    // Blocks of 64 tokens x d=128: 32 KiB values, on LMDB overflow pages as a real preload's (12 MiB in all).
    const big = { layers: 3, qHeads: 2, kvHeads: 2, headDim: 128, dtype: 'f16' as const, blockSize: 64 };
    const tokens = 64 * 64, row = big.headDim * 2;
    const dir = folder(), bytes = new Uint8Array(64 * row).fill(7);
    const writes = (from: number, to: number): BlockWrite[] =>
      Array.from({ length: big.layers * (to - from) * big.kvHeads }, (_, i) => ({ layer: i % big.layers, head: Math.floor(i / big.layers) % big.kvHeads, block: from + Math.floor(i / (big.layers * big.kvHeads)), k: bytes, v: bytes }));
    const onDisk = (): number => {
      const walk = (p: string): number => (statSync(p).isDirectory() ? readdirSync(p).reduce((n, e) => n + walk(join(p, e)), 0) : statSync(p).size);
      return walk(dir);
    };
    let { store } = await LmdbStore.open(dir, { shards: 2 });
    const empty = onDisk();
    const docMeta = (id: string, status: DocumentMeta['status'], n = 0): DocumentMeta => ({ ...meta(id, status, n), model: big });
    for (const id of ['a', 'b']) {
      await store.create(docMeta(id, 'loading'));
      for (let b = 0; b < 64; b += 16) await store.writeBlocks(id, writes(b, b + 16));
      await store.seal(docMeta(id, 'ready', tokens), [], []);
    }
    const kv = 2 * big.layers * tokens * big.kvHeads * row;
    expect(onDisk() - empty).toBeGreaterThan(2 * kv);
    await store.remove('a');
    await store.remove('b');
    // In one shared environment the file keeps every page it ever held (LMDB frees them onto its freelist).
    expect(onDisk() - empty).toBeLessThan(kv / 16);

    // A loading document whose metadata is gone (as after a delete whose folder removal the file system lost).
    await store.create(docMeta('ghost', 'loading'));
    await store.writeBlocks('ghost', writes(0, 4));
    await store.close();
    const env = open({ path: dir, maxDbs: 8, noSubdir: false });
    await env.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' }).remove('ghost');
    await env.close();
    mkdirSync(join(dir, 'docs', 'not-a-key'));
    expect(blocksPerShard(dir, 'ghost', 2).every((c) => c > 0)).toBe(true);
    ({ store } = await LmdbStore.open(dir, { shards: 2 }));
    await store.close();
    expect(readdirSync(join(dir, 'docs'))).toEqual(['not-a-key']);
  });

  it('the shard count: default one per 4 cores (at most 8, 2 under the libuv pool), the flag and environment checked at the edge', async () => {
    expect([1, 2, 4, 8, 16, 64].map((c) => defaultShards(c))).toEqual([1, 1, 1, 2, 2, 2]);
    expect([1, 2, 4, 8, 16, 64].map((c) => defaultShards(c, 16))).toEqual([1, 1, 1, 2, 4, 8]);
    expect(parseConfig([], { UV_THREADPOOL_SIZE: '16' }).threadPool).toBe(16);
    expect(parseConfig([], {}).threadPool).toBe(4);
    // As libuv reads it (atoi; below 1 is one thread; at most 1024).
    for (const [v, n] of [['', 1], ['0', 1], ['x', 1], ['8x', 8], ['2000', 1024]] as const) expect(parseConfig([], { UV_THREADPOOL_SIZE: v }).threadPool).toBe(n);
    expect(parseConfig(['--lmdb-shards', '6'], {}).lmdbShards).toBe(6);
    expect(parseConfig([], { KVRECALL_LMDB_SHARDS: '3' }).lmdbShards).toBe(3);
    expect(parseConfig([], {}).lmdbShards).toBeUndefined();
    for (const bad of ['0', '65', '2.5', 'x']) expect(() => parseConfig(['--lmdb-shards', bad], {})).toThrow(/lmdb-shards|non-negative integer/);
    await expect(LmdbStore.open(folder(), { shards: 0 })).rejects.toThrow(/not an integer in \[1, 64\]/);
  });
});
