#!/usr/bin/env node
// kvrecall serve [--host 127.0.0.1] [--port 8700] [--data ./kvrecall-data] [--token T] [--body-limit BYTES]
import { startServer } from '../api/server.js';
import { parseConfig } from './config.js';

const USAGE = 'usage: kvrecall serve [--host 127.0.0.1] [--port 8700] [--data ./kvrecall-data] [--token T] [--body-limit BYTES]';

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  if (command !== 'serve') {
    console.error(USAGE);
    process.exit(2);
  }
  const cfg = parseConfig(rest, process.env);
  const server = await startServer(cfg);
  for (const id of server.engine.recovered) console.log(`kvrecall: document ${id} was interrupted mid-preload; marked incomplete`);
  console.log(`kvrecall listening on ${server.url} (data ${cfg.dataDir}${cfg.token ? ', token required' : ''})`);
  const stop = async () => {
    await server.close();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main(process.argv.slice(2)).catch((e: unknown) => {
  console.error(`kvrecall: ${(e as Error).message}`);
  process.exit(1);
});
