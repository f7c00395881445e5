// A document's KV blocks per LMDB shard of a store folder, read from the
// files directly (read-only), so tests see what a crash left on disk.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { open } from 'lmdb';
import { documentFolder } from '../../storage/lmdb-doc-envs.js';
import { documentBlocks } from '../../storage/lmdb-shards.js';

function count(path: string, id: string, maxDbs: number): number {
  if (!existsSync(join(path, 'data.mdb'))) return 0;
  const env = open({ path, maxDbs, noSubdir: false, readOnly: true });
  try {
    return env.openDB({ name: 'blocks', encoding: 'binary' }).getKeysCount(documentBlocks(id));
  } finally {
    void env.close();
  }
}

/**
 * Blocks of document `id` per shard i < shards: in its own environment
 * `docs/<key>/<i>/`, plus, as a store written before those keeps them, in
 * the main environment (i = 0) or `blocks-<i>/`.
 */
export function blocksPerShard(dir: string, id: string, shards: number): number[] {
  return Array.from({ length: shards }, (_, i) => count(join(documentFolder(dir, id), String(i)), id, 2) + count(i === 0 ? dir : join(dir, `blocks-${i}`), id, 8));
}

/** Artifact records of document `id` in its own environment `docs/<key>/artifacts/` (0 when it has none). */
export function artifactCount(dir: string, id: string): number {
  const path = join(documentFolder(dir, id), 'artifacts');
  if (!existsSync(join(path, 'data.mdb'))) return 0;
  const env = open({ path, maxDbs: 2, noSubdir: false, readOnly: true });
  try {
    return env.openDB({ name: 'artifacts', encoding: 'binary' }).getKeysCount({ start: [id], end: [id, '\uffff'] });
  } finally {
    void env.close();
  }
}
