// Starts the engine and the HTTP server for a config; used by the CLI and
// by the integration tests (which start it on port 0).
import { serve, type ServerType } from '@hono/node-server';
import type { AddressInfo } from 'node:net';
import type { Config } from '../core/config.js';
import { Engine } from '../engine/engine.js';
import { createServer, type RequestListener, type Server, type ServerOptions } from 'node:http';
import { createApp } from './app.js';
import { withFastAttend } from './fast-attend.js';
import { lingerOnClose } from './linger.js';
import { Metrics } from './metrics.js';
import { attachStream } from './stream.js';

export interface RunningServer {
  url: string;
  engine: Engine;
  close(): Promise<void>;
}

export async function startServer(cfg: Config): Promise<RunningServer> {
  const engine = await Engine.open({ dataDir: cfg.dataDir, store: cfg.store, lmdbShards: cfg.lmdbShards, threadPool: cfg.threadPool, memoryBudget: cfg.memoryBudget, gpuBudget: cfg.gpuBudget, gpuWaveBudget: cfg.gpuWaveBudget, gpuKmeans: cfg.gpuKmeans === 1 });
  const metrics = new Metrics();
  const app = createApp(engine, { token: cfg.token, bodyLimit: cfg.bodyLimit }, metrics);
  const server: ServerType = await new Promise((resolve) => {
    // The attend routes' common case is served before the Hono app (api/fast-attend.ts).
    const withFast = (options: ServerOptions, listener: RequestListener) =>
      createServer(options, withFastAttend(engine.sessions, metrics, { token: cfg.token, bodyLimit: cfg.bodyLimit }, listener));
    const s = serve({ fetch: app.fetch, hostname: cfg.host, port: cfg.port, createServer: withFast as typeof createServer }, () => resolve(s));
  });
  lingerOnClose(server as Server);
  const stream = attachStream(server as Server, engine.sessions, metrics, { token: cfg.token, maxFrame: cfg.bodyLimit, maxConnections: cfg.maxStreams, progressMs: cfg.streamIdleMs, documents: engine.documents });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://${cfg.host}:${port}`,
    engine,
    close: async () => {
      stream.close();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await engine.close();
    },
  };
}
