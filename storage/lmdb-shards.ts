// Block shards of stores written before each document had environments of
// its own (`lmdb-doc-envs.ts`): the main environment's `blocks` database
// (shard 0, where a store written before shards keeps every block) and
// `<store>/blocks-<i>/` environments beside it. New blocks go to the
// document's own environments; these are opened where found, read, and
// dropped from, so a store written by an older version serves its
// documents as they are, with no migration.
//
// A block's shard (here and among a document's own environments) spreads
// an upload's blocks (every head of a run of blocks of one layer) evenly
// over the writers: each LMDB environment has one writer, and lmdb-js
// commits an environment's writes on one libuv thread (1.4-1.7 GB/s of
// 32 KiB values on the 2-core VM and on the 16-core GPU host alike:
// bench/results/lmdb-write-*.md).
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { open, type Database, type RootDatabase } from 'lmdb';

export type BlockKey = [string, number, number, number];

/** The key range of a document's blocks, in any shard. */
export function documentBlocks(id: string): { start: [string]; end: [string, number] } {
  return { start: [id], end: [id, Number.MAX_SAFE_INTEGER] };
}

/** Shard folders hold `blocks-<i>`; more than this many are refused (a stray folder name, not a store). */
export const MAX_SHARDS = 64;
const SHARD_DIR = /^blocks-([1-9][0-9]*)$/;

/**
 * The shard a block is written to, of `count`. Consecutive (block, head)
 * pairs of a layer go to consecutive shards; the layer offsets the start,
 * for layers uploaded side by side.
 */
export function blockShard(layer: number, head: number, block: number, kvHeads: number, count: number): number {
  return (block * kvHeads + head + layer) % count;
}

/** Checks a shard count (the store's option, the flag or environment's value). */
export function checkShardCount(count: number): number {
  if (!Number.isInteger(count) || count < 1 || count > MAX_SHARDS) throw new RangeError(`LMDB block shards: ${count} is not an integer in [1, ${MAX_SHARDS}]`);
  return count;
}

export class BlockShards {
  private constructor(
    /** Every open shard's block database, by shard number (gaps: folders not there). */
    private readonly dbs: (Database<Buffer, BlockKey> | undefined)[],
    /** Environments of shards 1.. (shard 0 is the main environment, synced by its owner). */
    private readonly envs: RootDatabase[],
  ) {}

  /** Opens shard 0 (given: the main environment's `blocks`) and every shard folder found under `path`; creates none. */
  static open(path: string, main: Database<Buffer, BlockKey>): BlockShards {
    const numbers: number[] = [];
    for (const entry of readdirSync(path, { withFileTypes: true })) {
      const m = entry.isDirectory() ? SHARD_DIR.exec(entry.name) : null;
      if (!m) continue;
      const i = Number(m[1]);
      if (i >= MAX_SHARDS) throw new RangeError(`${join(path, entry.name)}: shard ${i} past the most a store has (${MAX_SHARDS - 1})`);
      numbers.push(i);
    }
    const dbs: (Database<Buffer, BlockKey> | undefined)[] = [main];
    const envs = openBlockEnvs(numbers, (i) => join(path, `blocks-${i}`), 2 ** 40, dbs);
    return new BlockShards(dbs, envs);
  }

  /** How many shard folders (and the main environment) there are: the highest shard number + 1. */
  get count(): number {
    return this.dbs.length;
  }

  /** Every open shard's block database, shard 0 first. */
  all(): Database<Buffer, BlockKey>[] {
    return this.dbs.filter((d): d is Database<Buffer, BlockKey> => d !== undefined);
  }

  /** Removes a document's blocks from shards 1.. (each in one transaction); shard 0's are its owner's to drop with the metadata. */
  async dropOthers(id: string): Promise<void> {
    await Promise.all(
      this.dbs.slice(1).map(async (db) => {
        if (!db) return;
        const keys = Array.from(db.getKeys(documentBlocks(id)));
        if (keys.length > 0) await db.transaction(() => keys.forEach((k) => db.remove(k)));
      }),
    );
  }

  /** Every commit of shards 1.. so far on disk. */
  async syncOthers(): Promise<void> {
    await Promise.all(this.envs.map((env) => syncEnv(env)));
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.envs.map((env) => env.close()));
  }
}

/**
 * An environment of blocks (and a document's artifacts): not synced per
 * commit, its owner syncs where it must (recovery, seal, delete: syncEnv).
 */
export function openBlockEnv(path: string, mapSize: number): RootDatabase {
  return open({ path, maxDbs: 2, mapSize, noSubdir: false, noSync: true });
}

/**
 * Opens the block environments numbered `numbers` (at `pathOf(i)`), in
 * number order, their `blocks` databases into dbs[i]; when one fails, those
 * opened are closed and the error thrown.
 */
export function openBlockEnvs(
  numbers: number[],
  pathOf: (i: number) => string,
  mapSize: number,
  dbs: (Database<Buffer, BlockKey> | undefined)[],
): RootDatabase[] {
  const envs: RootDatabase[] = [];
  try {
    for (const i of numbers.sort((a, b) => a - b)) {
      const env = openBlockEnv(pathOf(i), mapSize);
      envs.push(env);
      dbs[i] = env.openDB<Buffer, BlockKey>({ name: 'blocks', encoding: 'binary' });
    }
  } catch (e) {
    for (const env of envs) void env.close();
    throw e;
  }
  return envs;
}

/** An environment's commits so far, flushed (it does not sync per commit). */
export async function syncEnv(env: RootDatabase): Promise<void> {
  await env.committed;
  // lmdb-js's sync(callback): mdb_env_sync(force) on a worker thread (not in its typings).
  const e = env as unknown as { sync(done: (err?: Error | null) => void): void };
  await new Promise<void>((resolve, reject) => e.sync((err) => (err ? reject(err) : resolve())));
}
