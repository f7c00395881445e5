// A loading document's LMDB files written back and dropped from the page
// cache as its blocks commit (storage/lmdb-store.ts WRITE_BACK_BYTES), on
// real LMDB files in a temp folder: with a write-back after every batch the
// blocks still read back bit for bit after seal and reopen; a document cut
// off mid-preload is incomplete on reopen (never ready) and loses its blocks;
// a delete while write-backs run removes the folder and the id preloads again;
// with 0 none runs. The write-back itself on a real file and a missing one.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { writeBackDrop } from '../../addon/file-pages.js';
import { parseConfig } from '../../core/config.js';
import { documentFolder } from '../../storage/lmdb-doc-envs.js';
import { LmdbStore } from '../../storage/lmdb-store.js';
import { blocksPerShard } from '../helpers/lmdb-blocks.js';
import { lmdbPreload } from '../helpers/lmdb-preload.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { tempFolders } from '../helpers/server.js';

const seed = freshSeed();
console.log(`lmdb-write-back: seed ${seed}`);
// 1001 tokens = 62 full blocks of 16 and a tail of 9.
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 8, dtype: 'f16' as const, blockSize: 16 };
const TOKENS = 1001, BATCH = 5;
const { meta, source, blocksOf, preload, expectSame } = lmdbPreload(model, TOKENS, BATCH);

const folder = tempFolders();

describe('LMDB store: a loading document written back as it commits', () => {
  const rng = new Rng(seed);

  it('with a write-back after every batch, blocks read back bit for bit after seal and after reopening', async () => {
    const dir = folder(), src = source(rng);
    let { store } = await LmdbStore.open(dir, { shards: 2, writeBack: 1 });
    await preload(store, 'doc', src);
    expectSame(store, 'doc', src);
    await store.close();
    // 13 batches, one write-back at a time: at least one ran (each finishes before close resolves).
    expect(store.writeBacks).toBeGreaterThan(0);
    ({ store } = await LmdbStore.open(dir, { shards: 2 }));
    expect(store.get('doc')?.status).toBe('ready');
    expectSame(store, 'doc', src);
    await store.close();
  });

  it('with 0, no write-back runs, and the blocks read back as well', async () => {
    const dir = folder(), src = source(rng);
    const { store } = await LmdbStore.open(dir, { shards: 2, writeBack: 0 });
    await preload(store, 'doc', src);
    expectSame(store, 'doc', src);
    await store.close();
    expect(store.writeBacks).toBe(0);
  });

  it('a document cut off mid-preload after write-backs is incomplete on reopen, never ready, its blocks gone', async () => {
    const dir = folder(), src = source(rng);
    let { store } = await LmdbStore.open(dir, { shards: 2, writeBack: 1 });
    await preload(store, 'kept', src);
    await preload(store, 'cut', src, false);
    await store.close(); // as a crash after the block commits and their write-backs: the metadata still says loading
    expect(store.writeBacks).toBeGreaterThan(0);
    expect(blocksPerShard(dir, 'cut', 2).reduce((a, b) => a + b)).toBe(model.layers * model.kvHeads * Math.floor(TOKENS / model.blockSize));
    let recovered: string[];
    ({ store, recovered } = await LmdbStore.open(dir, { shards: 2 }));
    expect(recovered).toEqual(['cut']);
    expect(store.get('cut')).toMatchObject({ status: 'incomplete', tokens: 0 });
    expectSame(store, 'kept', src);
    await store.close();
    expect(blocksPerShard(dir, 'cut', 2)).toEqual([0, 0]);
  });

  it('a delete while write-backs run removes the folder; the id preloads again whole', async () => {
    const dir = folder(), src = source(rng);
    const { store } = await LmdbStore.open(dir, { shards: 2, writeBack: 1 });
    await preload(store, 'doc', src, false);
    const before = store.writeBacks;
    // The last batch's write-back may still run: the delete waits for it before the folder goes.
    await store.remove('doc');
    expect(existsSync(documentFolder(dir, 'doc'))).toBe(false);
    expect(store.get('doc')).toBeUndefined();
    await preload(store, 'doc', src);
    expectSame(store, 'doc', src);
    await store.close();
    expect(store.writeBacks).toBeGreaterThan(before);
  });

  it('--lmdb-write-back and KVRECALL_LMDB_WRITE_BACK take bytes (0: none); unset is the store default', () => {
    expect(parseConfig(['--lmdb-write-back', '0'], {}).lmdbWriteBack).toBe(0);
    expect(parseConfig([], { KVRECALL_LMDB_WRITE_BACK: '1048576' }).lmdbWriteBack).toBe(1048576);
    expect(parseConfig([], {}).lmdbWriteBack).toBeUndefined();
    for (const bad of ['-1', '2.5', 'x']) expect(() => parseConfig(['--lmdb-write-back', bad], {})).toThrow(/lmdb-write-back|non-negative integer/);
  });

  it('writeBackDrop answers true for real files and false when one does not open, the contents unchanged', async () => {
    const dir = folder();
    const file = join(dir, 'f'), bytes = Buffer.from(Uint8Array.from({ length: 3 * 4096 + 17 }, () => rng.int(256)));
    writeFileSync(file, bytes);
    expect(await writeBackDrop([file])).toBe(process.platform === 'linux');
    expect(await writeBackDrop([file, join(dir, 'missing')])).toBe(false);
    expect(readFileSync(file).equals(bytes)).toBe(true);
  });
});
