// Index artifacts in the LMDB store, on real LMDB files in a temp folder: a
// document's artifacts live in an environment of its own
// (docs/<key>/artifacts/), round-trip bit for bit, and a delete gives their
// disk space back; a document cut off after its artifacts were flushed but
// before its ready metadata is incomplete on reopen, its artifacts gone; a
// store written before (artifacts in the main environment) reads them, a
// rewrite goes to the document's own environment and wins, and a delete
// drops both.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { open } from 'lmdb';
import { describe, expect, it } from 'vitest';
import type { ArtifactWrite, BlockWrite, DocumentMeta } from '../../storage/document-store.js';
import { HostBudget } from '../../storage/host-budget.js';
import { documentFolder } from '../../storage/lmdb-doc-envs.js';
import { LmdbStore } from '../../storage/lmdb-store.js';
import { tempFolders } from '../helpers/server.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`lmdb-artifacts: seed ${seed}`);
// Odd sizes: 3 layers x 3 kv heads, 100 tokens (blocks of 16: 6 full and a tail of 4).
const model = { layers: 3, qHeads: 3, kvHeads: 3, headDim: 8, dtype: 'f16' as const, blockSize: 16 };
const TOKENS = 100;
const ROW = model.headDim * 2;

const folder = tempFolders();

const meta = (id: string, status: DocumentMeta['status'], methods: string[] = []): DocumentMeta => ({
  id,
  model,
  status,
  tokens: status === 'ready' ? TOKENS : 0,
  methods,
  queryStride: 4,
  createdAt: '2026-12-05T00:00:00Z',
});

function bytes(rng: Rng, n: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(n / 4));
  for (let i = 0; i < words.length; i++) words[i] = rng.next() * 2 ** 32;
  return new Uint8Array(words.buffer, 0, n);
}

function blocks(rng: Rng): BlockWrite[] {
  const out: BlockWrite[] = [];
  for (let layer = 0; layer < model.layers; layer++)
    for (let block = 0; block < Math.ceil(TOKENS / model.blockSize); block++)
      for (let head = 0; head < model.kvHeads; head++) {
        const n = Math.min(model.blockSize, TOKENS - block * model.blockSize);
        out.push({ layer, head, block, k: bytes(rng, n * ROW), v: bytes(rng, n * ROW) });
      }
  return out;
}

/** Random artifacts of `method` for every (layer, head), each `size` bytes (odd). */
function artifacts(rng: Rng, method: string, size: number): ArtifactWrite[] {
  return Array.from({ length: model.layers * model.kvHeads }, (_, i) => ({ method, layer: Math.floor(i / model.kvHeads), head: i % model.kvHeads, bytes: bytes(rng, size) }));
}

function expectArtifacts(store: LmdbStore, id: string, expected: ArtifactWrite[]): void {
  const got = store.loadArtifacts(id, expected[0].method, model.layers, model.kvHeads);
  expect(got).toBeDefined();
  for (const a of expected) expect(Buffer.from(got![a.layer][a.head]).equals(Buffer.from(a.bytes)), `${a.method} layer ${a.layer} head ${a.head}`).toBe(true);
}

async function sealed(store: LmdbStore, id: string, rng: Rng, arts: ArtifactWrite[]): Promise<void> {
  const methods = [...new Set(arts.map((a) => a.method))];
  await store.create(meta(id, 'loading', methods));
  const all = blocks(rng), full = all.filter((w) => w.block < Math.floor(TOKENS / model.blockSize));
  await store.writeBlocks(id, full);
  await store.seal(meta(id, 'ready', methods), all.filter((w) => !full.includes(w)), arts);
}

function onDisk(dir: string): number {
  const walk = (p: string): number => (statSync(p).isDirectory() ? readdirSync(p).reduce((n, e) => n + walk(join(p, e)), 0) : statSync(p).size);
  return walk(dir);
}

/** Artifact records of document `id` in the main environment (as a store written before keeps them), read with lmdb directly. */
function mainArtifacts(dir: string, id: string): number {
  const env = open({ path: dir, maxDbs: 8, noSubdir: false, readOnly: true });
  try {
    return env.openDB({ name: 'artifacts', encoding: 'binary' }).getKeysCount({ start: [id], end: [id, '\uffff'] });
  } finally {
    void env.close();
  }
}

describe('index artifacts in the LMDB store', () => {
  const rng = new Rng(seed);

  it("live in the document's own environment, read back bit for bit; a delete gives their disk space back", async () => {
    const dir = folder();
    let { store } = await LmdbStore.open(dir, { shards: 2 });
    const empty = onDisk(dir);
    // 9 artifacts of 1 MiB + 3 bytes per document (LMDB overflow pages, as a real index's), two methods on 'a'.
    const size = (1 << 20) + 3;
    const a = artifacts(rng, 'wave', size), a2 = artifacts(rng, 'squeezed', 777), b = artifacts(rng, 'wave', size);
    await sealed(store, 'a', rng, [...a, ...a2]);
    await sealed(store, 'b', rng, b);
    expectArtifacts(store, 'a', a);
    expectArtifacts(store, 'a', a2);
    expectArtifacts(store, 'b', b);
    expect(store.loadArtifacts('a', 'ivf', model.layers, model.kvHeads)).toBeUndefined();
    await store.close();
    ({ store } = await LmdbStore.open(dir, { shards: 1 }));
    expectArtifacts(store, 'a', a);
    expectArtifacts(store, 'b', b);

    const bytes = 2 * a.length * size;
    expect(onDisk(dir) - empty).toBeGreaterThan(bytes);
    await store.remove('a');
    await store.remove('b');
    // In the main environment the file kept every page the artifacts held (freed onto LMDB's freelist).
    expect(onDisk(dir) - empty).toBeLessThan(bytes / 16);
    expect(store.loadArtifacts('a', 'wave', model.layers, model.kvHeads)).toBeUndefined();
    await store.close();
  });

  it('a document whose artifacts were flushed but whose ready metadata was not is incomplete on reopen, its artifacts gone', async () => {
    const dir = folder();
    let { store } = await LmdbStore.open(dir, { shards: 2 });
    const kept = artifacts(rng, 'wave', 5000);
    await sealed(store, 'kept', rng, kept);
    await sealed(store, 'cut', rng, artifacts(rng, 'wave', 5000));
    await store.close();
    // The disk as a crash between the seal's flush of blocks and artifacts and its ready metadata leaves it.
    const env = open({ path: dir, maxDbs: 8, noSubdir: false });
    await env.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' }).put('cut', meta('cut', 'loading', ['wave']));
    await env.close();

    let recovered: string[];
    ({ store, recovered } = await LmdbStore.open(dir, { shards: 2 }));
    expect(recovered).toEqual(['cut']);
    expect(store.get('cut')?.status).toBe('incomplete');
    expect(existsSync(documentFolder(dir, 'cut'))).toBe(false);
    expect(store.loadArtifacts('cut', 'wave', model.layers, model.kvHeads)).toBeUndefined();
    expectArtifacts(store, 'kept', kept);
    await store.close();
  });

  it("a store written before reads its artifacts from the main environment; a rewrite goes to the document's own and wins; delete drops both", async () => {
    const dir = folder();
    // The layout before per-document environments, written with lmdb directly: metadata, blocks and artifacts in the main environment.
    const old = artifacts(rng, 'squeezed', 4099);
    const env = open({ path: dir, maxDbs: 8, mapSize: 2 ** 30, noSubdir: false });
    const metaDb = env.openDB<DocumentMeta, string>({ name: 'meta', encoding: 'msgpack' });
    const blocksDb = env.openDB<Buffer, [string, number, number, number]>({ name: 'blocks', encoding: 'binary' });
    const artifactsDb = env.openDB<Buffer, [string, string, number, number]>({ name: 'artifacts', encoding: 'binary' });
    await env.transaction(() => {
      for (const w of blocks(rng)) blocksDb.put(['old', w.layer, w.head, w.block], Buffer.concat([w.k, w.v]));
      for (const a of old) artifactsDb.put(['old', a.method, a.layer, a.head], Buffer.from(a.bytes));
      metaDb.put('old', meta('old', 'ready', ['squeezed']));
    });
    await env.close();

    let { store } = await LmdbStore.open(dir, { shards: 2 });
    expectArtifacts(store, 'old', old);
    expect(existsSync(documentFolder(dir, 'old'))).toBe(false);
    // Rebuilt (as a stale artifact is at attach), and a method added after seal.
    const rebuilt = artifacts(rng, 'squeezed', 4099), added = artifacts(rng, 'nosa', 333);
    await store.addArtifacts('old', 'squeezed', rebuilt);
    await store.addArtifacts('old', 'nosa', added);
    expect(store.get('old')?.methods).toEqual(['squeezed', 'nosa']);
    await store.close();
    expect(mainArtifacts(dir, 'old')).toBe(old.length);
    ({ store } = await LmdbStore.open(dir, { shards: 2 }));
    expectArtifacts(store, 'old', rebuilt);
    expectArtifacts(store, 'old', added);
    expect(store.load(store.get('old')!, new HostBudget(1 << 30))[0].tokens).toBe(TOKENS);
    await store.remove('old');
    // Of a document the store no longer holds, nothing is written (no folder made again).
    await store.addArtifacts('old', 'nosa', added);
    await store.close();
    expect(mainArtifacts(dir, 'old')).toBe(0);
    expect(existsSync(documentFolder(dir, 'old'))).toBe(false);
  });

  it("a document's environments in use hold back its own first write, not another document's", async () => {
    const dir = folder();
    const { store } = await LmdbStore.open(dir, { shards: 2 });
    const rng = new Rng(seed + 7);
    // Stands for a's artifact write (or a reader's close) still under way; the store's own hook for it.
    let finish!: () => void;
    const held = new Promise<void>((resolve) => (finish = resolve));
    await store.create(meta('a', 'loading'));
    await store.create(meta('b', 'loading'));
    (store as unknown as { track(id: string, p: Promise<void>): void }).track('a', held);
    const order: string[] = [];
    const aWrite = store.writeBlocks('a', blocks(rng).slice(0, 3)).then(() => order.push('a'));
    await store.writeBlocks('b', blocks(rng).slice(0, 3)).then(() => order.push('b'));
    expect(order).toEqual(['b']); // b's first write went on while a's environments were held
    finish();
    await aWrite;
    expect(order).toEqual(['b', 'a']);
    await store.close();
  }, 20_000); // the old store's b waited for a, forever here
});
