// Real servers for integration tests: in-process on 127.0.0.1:0, or as a
// child process (for restarts and SIGKILL), always over real LMDB files in a
// temp folder.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { startServer, type RunningServer } from '../../api/server.js';
import { KvrecallClient } from '../../clients/ts/client.js';
import { DEFAULTS, type Config } from '../../core/config.js';

export function tempDataDir(): { dir: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'kvrecall.test-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A fresh temp folder per call, each removed after the test that made it (afterEach of the calling file). */
export function tempFolders(): () => string {
  const made: { cleanup(): void }[] = [];
  afterEach(() => made.splice(0).forEach((t) => t.cleanup()));
  return () => {
    const t = tempDataDir();
    made.push(t);
    return t.dir;
  };
}

// Test servers share a GPU (where there is one) across parallel test files:
// each takes a modest pool instead of 80% of the device.
const TEST_GPU_BUDGET = 1 << 30;

export function startInProcess(dataDir: string, overrides: Partial<Config> = {}, given?: Parameters<typeof startServer>[1]): Promise<RunningServer> {
  return startServer({ ...DEFAULTS, port: 0, dataDir, gpuBudget: TEST_GPU_BUDGET, ...overrides }, given);
}

export interface LiveServer {
  server(): RunningServer;
  client(): KvrecallClient;
  port(): number;
}

/**
 * One in-process server and a client of it for the enclosing suite (file or
 * describe): started in beforeAll over a fresh temp data dir, closed and the
 * dir removed in afterAll. Getters, since the server exists only once
 * beforeAll has run.
 */
export function useServer(overrides: Partial<Config> = {}): LiveServer {
  const tmp = tempDataDir();
  let server: RunningServer | undefined;
  let client: KvrecallClient | undefined;
  beforeAll(async () => {
    server = await startInProcess(tmp.dir, overrides);
    client = new KvrecallClient({ url: server.url });
  });
  afterAll(async () => {
    await server?.close();
    tmp.cleanup();
  });
  const started = <T>(x: T | undefined): T => {
    if (x === undefined) throw new Error('useServer: the server starts in beforeAll');
    return x;
  };
  return {
    server: () => started(server),
    client: () => started(client),
    port: () => Number(new URL(started(server).url).port),
  };
}

export interface ChildServer {
  url: string;
  proc: ChildProcess;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

const CLI = join(import.meta.dirname, '..', '..', 'dist', 'cli', 'cli.js');

export function startChild(dataDir: string, extra: string[] = [], env: Record<string, string> = {}): Promise<ChildServer> {
  const proc = spawn(process.execPath, [CLI, 'serve', '--port', '0', '--data', dataDir, '--gpu-budget', String(TEST_GPU_BUDGET), ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let log = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${log}`)), 20000);
    proc.stderr!.on('data', (b: Buffer) => (log += b.toString()));
    proc.stdout!.on('data', (b: Buffer) => {
      log += b.toString();
      const m = /listening on (http:\/\/\S+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve({
          url: m[1],
          proc,
          stop: (signal = 'SIGTERM') =>
            new Promise((done) => {
              if (proc.exitCode !== null || proc.signalCode !== null) return done();
              proc.once('exit', () => done());
              proc.kill(signal);
            }),
        });
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code}:\n${log}`));
    });
  });
}
