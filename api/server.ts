// Starts the engine and the HTTP server for a config; used by the CLI and
// by the integration tests (which start it on port 0).
import { serve, type ServerType } from '@hono/node-server';
import type { AddressInfo } from 'node:net';
import { setAttendSyncWork } from '../addon/kernels.js';
import { setGpuSyncUs } from '../addon/device-calls.js';
import type { Config } from '../core/config.js';
import { Engine } from '../engine/engine.js';
import { createServer, type RequestListener, type Server, type ServerOptions } from 'node:http';
import { createApp } from './app.js';
import { withFastAttend } from './fast-attend.js';
import { lingerOnClose } from './linger.js';
import { Metrics } from './metrics.js';
import { defaultPollUs } from './loop-poll.js';
import { attachStream, type StreamHandle } from './stream.js';

export interface RunningServer {
  url: string;
  engine: Engine;
  /** The listening HTTP server (for embedding: its events, its sockets). */
  http: Server;
  /** The decode stream's handle (its connections, the loop's poller). */
  stream: StreamHandle;
  close(): Promise<void>;
}

/** `given`: parts made by the caller instead of from the config (Engine.open's). */
export async function startServer(cfg: Config, given?: Parameters<typeof Engine.open>[1]): Promise<RunningServer> {
  // Process-wide (the kernels' own setting): the last server started in a process sets it.
  if (cfg.attendSyncWork !== undefined) setAttendSyncWork(cfg.attendSyncWork);
  if (cfg.gpuSyncUs !== undefined) setGpuSyncUs(cfg.gpuSyncUs);
  const engine = await Engine.open({ dataDir: cfg.dataDir, store: cfg.store, lmdbShards: cfg.lmdbShards, lmdbWriteBack: cfg.lmdbWriteBack, threadPool: cfg.threadPool, memoryBudget: cfg.memoryBudget, gpuBudget: cfg.gpuBudget, gpuWaveBudget: cfg.gpuWaveBudget, gpuScanBudget: cfg.gpuScanBudget, gpuWaveCache: cfg.gpuWaveCache, gpuWavePageCap: cfg.gpuWavePageCap, gpuKmeans: cfg.gpuKmeans === 1 }, given);
  const metrics = new Metrics();
  const app = createApp(engine, { token: cfg.token, bodyLimit: cfg.bodyLimit }, metrics);
  let server: ServerType;
  try {
    server = await new Promise((resolve, reject) => {
      // The attend routes' common case is served before the Hono app (api/fast-attend.ts).
      const withFast = (options: ServerOptions, listener: RequestListener) =>
        createServer(options, withFastAttend(engine.sessions, metrics, { token: cfg.token, bodyLimit: cfg.bodyLimit }, listener));
      const s = serve({ fetch: app.fetch, hostname: cfg.host, port: cfg.port, createServer: withFast as typeof createServer }, () => {
        s.off('error', reject);
        resolve(s);
      });
      // Unheard, a port in use was an unhandled 'error' event: a stack trace instead of what to change.
      s.once('error', reject);
    });
  } catch (e) {
    await engine.close();
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'EADDRINUSE' ? 'the address is in use' : code === 'EADDRNOTAVAIL' ? 'no interface has that address' : (e as Error).message;
    throw new Error(`cannot listen on ${cfg.host}:${cfg.port}: ${why}; choose another with --port (or --host)`);
  }
  // After listening, an 'error' is a failed accept (EMFILE: out of file
  // descriptors, ENFILE, ENOMEM): unheard it would end the process and every
  // session with it; the connections already open are served on.
  server.on('error', (e: NodeJS.ErrnoException) => console.error(`kvrecall: accepting a connection failed (${e.code ?? e.message}); serving on`));
  lingerOnClose(server as Server);
  const stream = attachStream(server as Server, engine.sessions, metrics, { token: cfg.token, maxFrame: cfg.bodyLimit, maxConnections: cfg.maxStreams, progressMs: cfg.streamIdleMs, documents: engine.documents, shmDir: cfg.shmDir, shmStreamBytes: cfg.shmStreamBytes, shmTotalBytes: cfg.shmTotalBytes, pollUs: cfg.pollUs ?? defaultPollUs(engine.gpu !== undefined) });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://${cfg.host}:${port}`,
    engine,
    http: server as Server,
    stream,
    close: async () => {
      stream.close();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await engine.close();
    },
  };
}
