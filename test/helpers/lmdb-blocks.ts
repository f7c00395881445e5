// A document's KV blocks per LMDB shard of a store folder, read from the
// files directly (read-only), so tests see what a crash left on disk.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { open } from 'lmdb';
import { documentBlocks } from '../../storage/lmdb-shards.js';

/** Blocks of document `id` in the main environment (shard 0) and in blocks-1 … blocks-<shards-1>. */
export function blocksPerShard(dir: string, id: string, shards: number): number[] {
  return Array.from({ length: shards }, (_, i) => {
    const path = i === 0 ? dir : join(dir, `blocks-${i}`);
    if (!existsSync(path)) return 0;
    const env = open({ path, maxDbs: 8, noSubdir: false, readOnly: true });
    try {
      return env.openDB({ name: 'blocks', encoding: 'binary' }).getKeysCount(documentBlocks(id));
    } finally {
      void env.close();
    }
  });
}
