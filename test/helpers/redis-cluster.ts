// A real Redis Cluster for tests and the store benchmark: six redis-server
// processes on loopback ports (3 masters, 3 replicas), no persistence, in a
// temp folder; created with `redis-cli --cluster create`, stopped (and the
// folder removed) by stop().
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface RedisNode {
  port: number;
  proc: ChildProcess;
}

export interface RedisCluster {
  /** The seed list for `--store`: every node. */
  url: string;
  nodes: RedisNode[];
  /** Runs redis-cli against one node and returns its output. */
  cli(port: number, ...args: string[]): string;
  /** Ports of the nodes that are masters now, and each master's replica ports. */
  topology(): { masters: number[]; replicasOf: Map<number, number[]> };
  /** Waits until every node that is up says the cluster is ok and every master has `replicas` replicas online. */
  waitHealthy(timeoutMs?: number, replicas?: number): Promise<void>;
  stop(): Promise<void>;
}

/** Whether redis-server and redis-cli are installed. */
export function redisInstalled(): boolean {
  return ['redis-server', 'redis-cli'].every((bin) => spawnSync('sh', ['-c', `command -v ${bin}`]).status === 0);
}

/** In CI the Redis tests must run (.ci/run installs redis-server); elsewhere they may be skipped when it is absent. */
export function redisRequired(): boolean {
  return Boolean(process.env.CI || process.env.KVRECALL_CI);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** Six ports whose cluster-bus ports (port + 10000) are free too. */
async function freePorts(n: number): Promise<number[]> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 30000);
    const ports = Array.from({ length: n }, (_, i) => base + i);
    const ok = await Promise.all(ports.flatMap((p) => [portFree(p), portFree(p + 10000)]));
    if (ok.every(Boolean)) return ports;
  }
  throw new Error('no free loopback ports for a Redis Cluster');
}

export interface ClusterOptions {
  /** cluster-node-timeout: how long a master may be silent before its replica takes over. */
  nodeTimeoutMs?: number;
  /** More redis-server arguments for every node. */
  extraArgs?: string[];
}

export async function startRedisCluster(opts: ClusterOptions = {}): Promise<RedisCluster> {
  const dir = mkdtempSync(join(tmpdir(), 'kvrecall.redis-'));
  const ports = await freePorts(6);
  const cli = (port: number, ...args: string[]) =>
    execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], { encoding: 'utf8', timeout: 30000, stdio: ['ignore', 'pipe', 'pipe'] });
  const nodes: RedisNode[] = ports.map((port) => ({
    port,
    proc: spawn(
      'redis-server',
      [
        '--port', String(port), '--bind', '127.0.0.1', '--protected-mode', 'no',
        '--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`,
        '--cluster-node-timeout', String(opts.nodeTimeoutMs ?? 1000),
        '--appendonly', 'no', '--save', '', '--repl-diskless-sync-delay', '0',
        '--dir', dir, '--logfile', `redis-${port}.log`,
        ...(opts.extraArgs ?? []),
      ],
      { stdio: 'ignore' },
    ),
  }));
  const stop = async () => {
    await Promise.all(
      nodes.map(
        ({ proc }) =>
          new Promise<void>((done) => {
            if (proc.exitCode !== null || proc.signalCode !== null) return done();
            proc.once('exit', () => done());
            proc.kill('SIGKILL');
          }),
      ),
    );
    rmSync(dir, { recursive: true, force: true });
  };
  const topology = () => {
    const masters: number[] = [];
    const replicasOf = new Map<number, number[]>();
    const byId = new Map<string, number>();
    const lines = cli(nodes.find((n) => n.proc.exitCode === null && n.proc.signalCode === null)!.port, 'cluster', 'nodes').trim().split('\n');
    const rows = lines.map((l) => l.split(' '));
    for (const r of rows) byId.set(r[0], Number(/:(\d+)@/.exec(r[1])![1]));
    for (const r of rows) {
      const port = byId.get(r[0])!;
      const flags = r[2].split(',');
      if (flags.includes('fail') || flags.includes('fail?')) continue;
      if (flags.includes('master') && r.length > 8) masters.push(port);
      if (flags.includes('slave')) {
        const of = byId.get(r[3])!;
        replicasOf.set(of, [...(replicasOf.get(of) ?? []), port]);
      }
    }
    return { masters: masters.sort((a, b) => a - b), replicasOf };
  };
  const waitHealthy = async (timeoutMs = 30000, replicas = 1) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const up = nodes.filter((n) => n.proc.exitCode === null && n.proc.signalCode === null);
        const ok = up.every((n) => /cluster_state:ok/.test(cli(n.port, 'cluster', 'info')));
        const t = topology();
        const online = (m: number) => (cli(m, 'info', 'replication').match(/^slave\d+:.*state=online/gm) ?? []).length;
        const replicated = t.masters.length === 3 && t.masters.every((m) => online(m) >= replicas);
        if (ok && replicated) return;
      } catch {
        // a node still starting
      }
      if (Date.now() > deadline) throw new Error(`the Redis Cluster in ${dir} did not become healthy`);
      await sleep(100);
    }
  };
  try {
    for (const { port } of nodes) {
      const deadline = Date.now() + 10000;
      for (;;) {
        try {
          if (cli(port, 'ping').trim() === 'PONG') break;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) throw new Error(`redis-server on port ${port} did not start (see ${dir}/redis-${port}.log)`);
        await sleep(50);
      }
    }
    execFileSync('redis-cli', ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '1', '--cluster-yes'], { stdio: 'pipe', timeout: 60000 });
    await waitHealthy();
  } catch (e) {
    await stop();
    throw e;
  }
  return { url: `redis://${ports.map((p) => `127.0.0.1:${p}`).join(',')}`, nodes, cli, topology, waitHealthy, stop };
}
