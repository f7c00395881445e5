// A document's KV blocks in LMDB environments of its own:
// `<store>/docs/<key>/<i>/`, i = 0 … S−1 (S: the store's shard count when
// the document was created; each environment has its own writer, as the
// block shards had), and its index artifacts in one more,
// `<store>/docs/<key>/artifacts/` (made only for a document that has
// some). Deleting a document removes its folder: its pages go back to the
// file system, not onto an LMDB freelist. In one shared
// environment a deleted document's pages were freed in place, and the next
// preload's writer allocated its 32 KiB values (9 overflow pages each) out
// of that freelist: a server over 4 environments spent 6.5-8.4 CPU s on a
// 2.1 GB preload after a delete against 3.5-4.0 on its first (2-core VM;
// the H200 host's second Python preload round ran at a third of the
// first's speed), and 3.4-4.6 on every one with environments of their own
// (bench/results/preload-vm-rounds.md).
//
// Artifacts in the shared environment kept their pages in its file after a
// delete (290 MB of wave artifacts per GiB of K/V), reused by the next seal
// but never given back; their writes, a few large values, did not slow on
// the freelist as the blocks' did (bench/results/artifact-rounds-vm*.md).
//
// <key> is a hash of the document id: ids differing only in case stay apart
// on a file system that ignores case. Environments are open while their
// document is loading and closed once it is sealed; a ready document's are
// opened to read it (or to add artifacts) and closed again.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { open as openFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Database, RootDatabase } from 'lmdb';
import { openBlockEnv, openBlockEnvs, syncEnv, type BlockKey } from './lmdb-shards.js';

/** [doc, method, layer, kv head]: the key of an index artifact (in a document's environment or an older store's main one). */
export type ArtifactKey = [string, string, number, number];

const DOCS = 'docs';
const ARTIFACTS = 'artifacts';
const KEY = /^[0-9a-f]{32}$/;
const ENV = /^(0|[1-9][0-9]*)$/;

/** The folder name of a document's environments. */
export function documentKey(id: string): string {
  return createHash('sha256').update(id).digest('hex').slice(0, 32);
}

/** The folder holding a document's environments. */
export function documentFolder(root: string, id: string): string {
  return join(root, DOCS, documentKey(id));
}

/** Every document folder of a store, by key (names that are not keys are not ours and left alone). */
export function documentKeys(root: string): string[] {
  const dir = join(root, DOCS);
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true })
    .filter((e) => e.isDirectory() && KEY.test(e.name))
    .map((e) => e.name);
}

/** A document environment's first map: it grows as the file does (lmdb's own remap), so many loading documents fit the address space. */
const MAP_SIZE = 2 ** 28;

/** Open environments of one document. */
export class DocumentEnvs {
  private constructor(
    readonly folder: string,
    private readonly envs: RootDatabase[],
    private readonly dbs: Database<Buffer, BlockKey>[],
  ) {}

  /** Opens (creating) environments 0 … count−1 of a document, to write its blocks. */
  static create(root: string, id: string, count: number): DocumentEnvs {
    return DocumentEnvs.openAll(documentFolder(root, id), Array.from({ length: count }, (_, i) => i));
  }

  /** Opens every environment a document's folder holds, to read its blocks; undefined when it has none. */
  static existing(root: string, id: string): DocumentEnvs | undefined {
    const folder = documentFolder(root, id);
    if (!existsSync(folder)) return undefined;
    const numbers = readdirSync(folder, { withFileTypes: true })
      .filter((e) => e.isDirectory() && ENV.test(e.name))
      .map((e) => Number(e.name));
    return DocumentEnvs.openAll(folder, numbers);
  }

  private static openAll(folder: string, numbers: number[]): DocumentEnvs {
    const dbs: Database<Buffer, BlockKey>[] = [];
    const envs = openBlockEnvs(numbers, (i) => join(folder, String(i)), MAP_SIZE, dbs);
    return new DocumentEnvs(folder, envs, dbs);
  }

  /** Environment i's block database. */
  db(i: number): Database<Buffer, BlockKey> {
    const db = this.dbs[i];
    if (!db) throw new RangeError(`${this.folder}: block environment ${i} is not open`);
    return db;
  }

  /** Every open environment's block database. */
  all(): Database<Buffer, BlockKey>[] {
    return this.dbs.filter((d): d is Database<Buffer, BlockKey> => d !== undefined);
  }

  /** The data file of every open environment. */
  files(): string[] {
    return this.dbs.flatMap((d, i) => (d ? [join(this.folder, String(i), 'data.mdb')] : []));
  }

  /**
   * Every commit on disk, and the folders that name the files: LMDB's sync
   * flushes a file, not the directory entries of one just created.
   */
  async sync(): Promise<void> {
    await Promise.all(this.envs.map((env) => syncEnv(env)));
    await syncFolders(this.dbs.flatMap((d, i) => (d ? [join(this.folder, String(i))] : [])), this.folder);
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.envs.map((env) => env.close()));
  }
}

/** The environment of a document's index artifacts. */
export class ArtifactEnv {
  private constructor(
    readonly folder: string,
    private readonly env: RootDatabase,
    readonly db: Database<Buffer, ArtifactKey>,
  ) {}

  /**
   * Opens (creating, with the document's folder) the environment, to write
   * `bytes` of artifacts. Its map is sized for them beside what the file
   * holds (a rewrite frees the old pages only at its commit): a transaction
   * that outgrows the map is run again whole by lmdb-js once it has grown
   * it, and a seal's artifacts are one transaction (288 MB written into a
   * 256 MiB map cost 0.70 CPU s against 0.25 into one large enough, 2-core VM).
   */
  static create(root: string, id: string, bytes = 0): ArtifactEnv {
    const folder = documentFolder(root, id);
    const file = join(folder, ARTIFACTS, 'data.mdb');
    const held = existsSync(file) ? statSync(file).size : 0;
    const env = openBlockEnv(join(folder, ARTIFACTS), Math.max(MAP_SIZE, Math.ceil((held + 1.25 * bytes + 2 ** 24) / 2 ** 20) * 2 ** 20));
    try {
      return new ArtifactEnv(folder, env, env.openDB<Buffer, ArtifactKey>({ name: ARTIFACTS, encoding: 'binary' }));
    } catch (e) {
      void env.close();
      throw e;
    }
  }

  /** Opens the environment to read; undefined when the document has none (no artifacts, or a store written before). */
  static existing(root: string, id: string): ArtifactEnv | undefined {
    return existsSync(join(documentFolder(root, id), ARTIFACTS)) ? ArtifactEnv.create(root, id) : undefined;
  }

  /** Every commit on disk, and the folders naming its file (as DocumentEnvs.sync). */
  async sync(): Promise<void> {
    await syncEnv(this.env);
    await syncFolders([join(this.folder, ARTIFACTS)], this.folder);
  }

  async close(): Promise<void> {
    await this.env.close();
  }
}

/**
 * Removes a document's folder (its environments closed first by the
 * caller). Not synced: a removal the file system loses leaves a folder no
 * metadata names, which the next open removes (`documentKeys`).
 */
export async function removeDocumentFolder(root: string, key: string): Promise<void> {
  await rm(join(root, DOCS, key), { recursive: true, force: true });
}

/** Environment folders, then the document's folder and the two above it: each names what was made in it. */
async function syncFolders(envDirs: string[], folder: string): Promise<void> {
  for (const dir of [...envDirs, folder, join(folder, '..'), join(folder, '..', '..')]) await syncDir(dir);
}

async function syncDir(path: string): Promise<void> {
  const handle = await openFile(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
