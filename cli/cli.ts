#!/usr/bin/env node
// kvrecall serve   [--host 127.0.0.1] [--port 8700] [--data ./kvrecall-data [--lmdb-shards N] [--lmdb-write-back BYTES] | --store redis://HOST:PORT[,HOST:PORT...]]
//                  [--token T] [--body-limit BYTES]
//                  [--memory-budget BYTES] [--gpu-budget BYTES (0: CPU only)] [--gpu-wave-budget BYTES] [--gpu-wave-cache SHARE] [--gpu-scan-budget BYTES] [--gpu-kmeans 0|1]
//                  [--max-streams N] [--stream-idle-ms MS] [--attend-sync-work N] [--gpu-sync-us N] [--shm-dir DIR|off] [--shm-stream-bytes BYTES] [--shm-total-bytes BYTES] [--poll-us N]
// kvrecall preload <file.safetensors> --id <doc> [--url http://127.0.0.1:8700] [--token T]
//                  [--methods m1,m2] [--chunk 4096] [--q-heads N] [--dtype f16|bf16] [--window 2] [--timings 0|1]
// Each command imports what it runs when it runs: `preload` loaded the whole server side first (the API, the
// engine, the storage layers and the native addon), ~90 ms of its start on a 2-core VM for nothing it uses.
import type { PreloadTimings } from '../clients/ts/preload.js';

const USAGE = `usage:
  kvrecall serve [--host 127.0.0.1] [--port 8700] [--data ./kvrecall-data [--lmdb-shards N] [--lmdb-write-back BYTES] | --store redis://HOST:PORT[,HOST:PORT...]] [--token T] [--body-limit BYTES] [--memory-budget BYTES] [--gpu-budget BYTES] [--gpu-wave-budget BYTES] [--gpu-wave-cache SHARE] [--gpu-scan-budget BYTES] [--gpu-kmeans 0|1] [--max-streams N] [--stream-idle-ms MS] [--attend-sync-work N] [--gpu-sync-us N] [--shm-dir DIR|off] [--shm-stream-bytes BYTES] [--shm-total-bytes BYTES] [--poll-us N]
  kvrecall preload <file.safetensors> --id <doc> [--url http://127.0.0.1:8700] [--token T] [--methods m1,m2] [--chunk 4096] [--q-heads N] [--dtype f16|bf16] [--window 2] [--timings 0|1]`;

async function serve(args: string[]): Promise<void> {
  const [{ startServer }, { parseConfig }] = await Promise.all([import('../api/server.js'), import('../core/config.js')]);
  const cfg = parseConfig(args, process.env);
  const server = await startServer(cfg);
  for (const id of server.engine.recovered) console.log(`kvrecall: document ${id} was interrupted mid-preload; marked incomplete`);
  const gpu = server.engine.gpu?.describe();
  const backend = gpu ? `cuda: ${gpu.device}, pool ${(gpu.pool.budgetBytes / 2 ** 30).toFixed(1)} GiB` : 'cpu';
  console.log(`kvrecall listening on ${server.url} (${cfg.store ? `store ${cfg.store}` : `data ${cfg.dataDir}`}, ${backend}${cfg.token ? ', token required' : ''})`);
  const stop = async () => {
    await server.close();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

function flags(args: string[]): { positional: string[]; opts: Map<string, string> } {
  const positional: string[] = [], opts = new Map<string, string>();
  for (let i = 0; i < args.length; i++) {
    if (args[i].startsWith('--')) {
      if (args[i + 1] === undefined) throw new Error(`${args[i]} needs a value`);
      opts.set(args[i].slice(2), args[++i]);
    } else positional.push(args[i]);
  }
  return { positional, opts };
}

/** A flag that takes a count: refused here, before a document is created (`--chunk 0` had the document created and then refused its first upload, `abc` failed sizing a buffer). */
function positive(opts: Map<string, string>, name: string): number | undefined {
  const value = opts.get(name);
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} takes a positive integer, not ${value}`);
  return n;
}

async function preloadCommand(args: string[]): Promise<void> {
  const { positional, opts } = flags(args);
  const file = positional[0], id = opts.get('id');
  if (!file || !id) throw new Error(USAGE);
  const dtype = opts.get('dtype');
  const timed = opts.get('timings');
  if (timed !== undefined && timed !== '0' && timed !== '1') throw new Error('--timings is 0 or 1');
  const loaded = performance.now();
  const { preload, progressBar } = await import('../clients/ts/preload.js');
  const started = performance.now();
  const timings: PreloadTimings | undefined = timed === '1' ? { created: 0, ready: 0, firstSent: 0, uploaded: 0, sealed: 0, readWait: 0, send: 0, drain: 0, reads: 0 } : undefined;
  if (dtype !== undefined && dtype !== 'f16' && dtype !== 'bf16') throw new Error('--dtype is f16 or bf16');
  const res = await preload({
    file,
    id,
    url: opts.get('url') ?? 'http://127.0.0.1:8700',
    token: opts.get('token') ?? process.env.KVRECALL_TOKEN,
    methods: opts.get('methods')?.split(',').filter(Boolean) ?? [],
    chunk: positive(opts, 'chunk') ?? 4096,
    qHeads: positive(opts, 'q-heads'),
    window: positive(opts, 'window'),
    dtype,
    progress: progressBar(`preload ${id}`),
    timings,
  });
  // ms from the process start (performance.now()'s origin); `main`: this module loaded and running.
  if (timings) console.error(`kvrecall timings ${JSON.stringify({ main: loaded, clientLoaded: started, ...timings })}`);
  console.log(`kvrecall: document ${id} ready: ${res.tokens} tokens × ${res.layers} layers`);
}

async function main([command, ...rest]: string[]): Promise<void> {
  if (command === 'serve') return serve(rest);
  if (command === 'preload') return preloadCommand(rest);
  console.error(USAGE);
  process.exit(2);
}

main(process.argv.slice(2)).catch((e: unknown) => {
  console.error(`kvrecall: ${(e as Error).message}`);
  process.exit(1);
});
