// The HTTP surface of DESIGN.md's v1 wire protocol. Routes decode and
// encode; the engine does the work.
import { Hono } from 'hono';
import { routePath } from 'hono/route';
import type { Engine } from '../engine/engine.js';
import { cudaAvailable } from '../addon/cuda.js';
import { nativeThreads } from '../addon/kernels.js';
import { bearerAuth } from './auth.js';
import { bodyLeftUnread, limitBody, readBody, reply, withBody } from './codec.js';
import { onError, errorBody, errorOf } from './errors.js';
import { invalid } from '../core/errors.js';
import { unalignedF32Copies } from '../core/tensor.js';
import { attendAnswer, batchAnswer } from './attend-answer.js';
import { Metrics } from './metrics.js';
import { refuseInto } from './shm.js';

export const VERSION = '0.1.0';

export interface AppOptions {
  token?: string;
  bodyLimit: number;
}

export function createApp(engine: Engine, opts: AppOptions, metrics = new Metrics()): Hono {
  const app = new Hono();
  const { documents, sessions } = engine;
  const gpu = cudaAvailable();

  app.use(async (c, next) => {
    await next();
    metrics.countRequest(routePath(c) ?? 'unmatched', c.res.status);
    // Answered without reading a body (an error, a GET with a body): the
    // server will drop the connection, so say so and the client opens a new one.
    if (bodyLeftUnread(c)) c.res.headers.set('connection', 'close');
  });
  app.use(bearerAuth(opts.token));
  app.use(limitBody(opts.bodyLimit));
  app.onError(onError);
  app.notFound((c) => c.json(errorBody('not_found', `no route ${c.req.method} ${c.req.path}`), 404));

  app.get('/v1/health', (c) =>
    reply(c, {
      ok: true,
      version: VERSION,
      backend: engine.gpu ? 'cuda' : 'cpu',
      threads: nativeThreads,
      documents: documents.count(),
      resident: documents.residency.stats(),
      sessions: sessions.size,
      recovered: engine.recovered,
      memory: { used: engine.budget.used, budget: engine.budget.limit },
      // The device and its block pool when attends use it; otherwise what the CUDA path found, or why not (error).
      gpu: engine.gpu ? engine.gpu.describe() : { available: gpu.ok, ...(gpu.ok ? { device: gpu.device } : { error: gpu.error }), memory: gpu.memory, built: gpu.built },
    }),
  );

  app.put('/v1/documents/:doc', async (c) => reply(c, await documents.create(c.req.param('doc'), await readBody(c)), 201));
  // The body's tensors are views into a pooled buffer, copied out before appendKv settles.
  app.post('/v1/documents/:doc/kv', async (c) => reply(c, await withBody(c, (body, times) => documents.appendKv(c.req.param('doc'), body, times))));
  app.post('/v1/documents/:doc/seal', async (c) => {
    await readBody(c);
    return reply(c, await documents.seal(c.req.param('doc')));
  });
  app.get('/v1/documents/:doc', async (c) => reply(c, await documents.get(c.req.param('doc'))));
  app.get('/v1/documents', async (c) => reply(c, { documents: await documents.list() }));
  // ?createdAt=: only the document created then (412 for one made again under the id since).
  app.delete('/v1/documents/:doc', async (c) => {
    const createdAt = c.req.query('createdAt');
    if (createdAt === '') throw invalid('createdAt, when given, names the createdAt of the document to delete');
    await documents.remove(c.req.param('doc'), { createdAt });
    return reply(c, { deleted: c.req.param('doc') });
  });

  app.post('/v1/sessions', async (c) => {
    const s = await sessions.create(await readBody(c));
    return reply(c, { id: s.id, method: s.method.name, documentTokens: s.documentTokens(), backend: s.gpu ? 'cuda' : 'cpu' }, 201);
  });
  app.post('/v1/sessions/:sid/kv', async (c) => reply(c, await sessions.appendKv(c.req.param('sid'), await readBody(c))));
  app.post('/v1/sessions/:sid/attend', async (c) => {
    // The body first: answering before it is read would drop the connection.
    const body = await readBody(c);
    refuseInto(body);
    const res = await sessions.attend(c.req.param('sid'), body);
    metrics.observeAttend(res.stats.ms);
    return reply(c, attendAnswer(res));
  });
  // A server's running batch: one layer of many sessions, answered in order; a bad step fails only itself.
  app.post('/v1/attend', async (c) => {
    const { results, ms } = await sessions.attendBatch(await readBody(c), undefined, refuseInto);
    for (const r of results) if (r.status === 'fulfilled') metrics.observeAttend(r.value.stats.ms);
    return reply(c, { results: results.map((r) => batchAnswer(r, errorOf)), stats: { ms } });
  });
  app.get('/v1/sessions/:sid', (c) => reply(c, sessions.get(c.req.param('sid')).describe()));
  app.delete('/v1/sessions/:sid', async (c) => {
    await sessions.remove(c.req.param('sid'));
    return reply(c, { deleted: c.req.param('sid') });
  });

  app.get('/metrics', (c) =>
    c.text(
      metrics.render(
        { documents: documents.count(), sessions: sessions.size, native_threads: nativeThreads },
        { f32_unaligned_copies_total: unalignedF32Copies() },
      ),
    ),
  );
  return app;
}
