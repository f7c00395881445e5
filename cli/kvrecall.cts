#!/usr/bin/env node
// `kvrecall`: gives libuv's thread pool 16 threads unless UV_THREADPOOL_SIZE
// says otherwise, then runs the CLI (cli.ts). libuv reads the size once, when
// the pool first starts, and Node's ESM loader starts it reading modules:
// only a CommonJS entry can set it in time. Each LMDB shard's commit holds a
// pool thread while it runs, beside an upload's copies and prefault
// (storage/lmdb-shards.ts); `node dist/cli/cli.js` runs with libuv's 4.
process.env.UV_THREADPOOL_SIZE ||= '16'; // set but empty is unset
void import('./cli.js');
