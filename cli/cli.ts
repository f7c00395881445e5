#!/usr/bin/env node
// kvrecall serve   [--host 127.0.0.1] [--port 8700] [--data ./kvrecall-data [--lmdb-shards N] | --store redis://HOST:PORT[,HOST:PORT...]]
//                  [--token T] [--body-limit BYTES]
//                  [--memory-budget BYTES] [--gpu-budget BYTES (0: CPU only)] [--gpu-wave-budget BYTES] [--gpu-wave-cache SHARE] [--gpu-kmeans 0|1]
//                  [--max-streams N] [--stream-idle-ms MS] [--attend-sync-work N] [--gpu-sync-us N]
// kvrecall preload <file.safetensors> --id <doc> [--url http://127.0.0.1:8700] [--token T]
//                  [--methods m1,m2] [--chunk 4096] [--q-heads N] [--dtype f16|bf16]
import { startServer } from '../api/server.js';
import { parseConfig } from '../core/config.js';
import { preload, progressBar } from '../clients/ts/preload.js';

const USAGE = `usage:
  kvrecall serve [--host 127.0.0.1] [--port 8700] [--data ./kvrecall-data [--lmdb-shards N] | --store redis://HOST:PORT[,HOST:PORT...]] [--token T] [--body-limit BYTES] [--memory-budget BYTES] [--gpu-budget BYTES] [--gpu-wave-budget BYTES] [--gpu-wave-cache SHARE] [--gpu-kmeans 0|1] [--max-streams N] [--stream-idle-ms MS] [--attend-sync-work N] [--gpu-sync-us N]
  kvrecall preload <file.safetensors> --id <doc> [--url http://127.0.0.1:8700] [--token T] [--methods m1,m2] [--chunk 4096] [--q-heads N] [--dtype f16|bf16]`;

async function serve(args: string[]): Promise<void> {
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
  if (dtype !== undefined && dtype !== 'f16' && dtype !== 'bf16') throw new Error('--dtype is f16 or bf16');
  const res = await preload({
    file,
    id,
    url: opts.get('url') ?? 'http://127.0.0.1:8700',
    token: opts.get('token') ?? process.env.KVRECALL_TOKEN,
    methods: opts.get('methods')?.split(',').filter(Boolean) ?? [],
    chunk: positive(opts, 'chunk') ?? 4096,
    qHeads: positive(opts, 'q-heads'),
    dtype,
    progress: progressBar(`preload ${id}`),
  });
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
