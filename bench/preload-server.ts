// The server a preload bench talks to: `kvrecall serve` in its own process
// on 127.0.0.1 with an LMDB store in `dir`, and CPU seconds from /proc.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export interface BenchServer {
  url: string;
  pid: number;
  stop(): Promise<void>;
}

/**
 * Starts the server. shards > 0: its --lmdb-shards; pool > 0: its libuv
 * pool (UV_THREADPOOL_SIZE); cli: the entry to run (default this build's
 * kvrecall.cjs, as `kvrecall serve` runs: libuv's pool at 16 unless set).
 * KVRECALL_SERVER_FLAGS: node flags for the server process (e.g.
 * --cpu-prof --cpu-prof-dir=DIR to see where its time goes).
 */
export async function startServer(dir: string, { shards = 0, pool = 0, cli = join(import.meta.dirname, '..', 'cli', 'kvrecall.cjs') } = {}): Promise<BenchServer> {
  const flags = (process.env.KVRECALL_SERVER_FLAGS ?? '').split(' ').filter(Boolean);
  const args = ['serve', '--port', '0', '--data', dir, '--gpu-budget', '0', ...(shards > 0 ? ['--lmdb-shards', String(shards)] : [])];
  const env = pool > 0 ? { ...process.env, UV_THREADPOOL_SIZE: String(pool) } : process.env;
  const proc = spawn(process.execPath, [...flags, cli, ...args], { stdio: ['ignore', 'pipe', 'inherit'], env });
  const url = await new Promise<string>((resolve, reject) => {
    proc.stdout.on('data', (d: Buffer) => {
      const m = /listening on (http:\/\/\S+)/.exec(d.toString());
      if (m) resolve(m[1]);
    });
    proc.once('exit', (c) => reject(new Error(`server exited ${c}`)));
  });
  return { url, pid: proc.pid!, stop: () => new Promise((r) => (proc.once('exit', () => r()), proc.kill('SIGTERM'))) };
}

/** CPU seconds (user + system, every thread, or one thread) a process has used, from /proc. */
export function cpuSeconds(pid: number, thread?: number): number {
  const fields = readFileSync(thread === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${thread}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
}
