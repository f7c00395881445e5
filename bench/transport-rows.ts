// What bench/transport.ts and bench/transport-ab.ts both measure against: a
// server from a built tree's CLI in its own process on 127.0.0.1, a bare
// GET /v1/health on one keep-alive connection, and the decode-call fixture
// (one sealed document, a batch of exact sessions over it, one q in f32 and
// the same q in f16), so both benches time the same calls.
import { spawn } from 'node:child_process';
import { Agent, request } from 'node:http';
import { convert } from '../addon/kernels.js';
import { tensor, type KvrecallClient, type Tensor } from '../clients/ts/client.js';

export interface BenchModel {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  dtype: 'f16';
}

/** `cli serve` on port 0 over `dir` (`env`: added to this process's); resolves once it listens. stop() kills it at once (SIGKILL). */
export async function startServer(cli: string, dir: string, gpuBudget: string, env: Record<string, string> = {}): Promise<{ url: string; pid: number; stop(): void }> {
  const proc = spawn(process.execPath, [cli, 'serve', '--port', '0', '--data', dir, '--gpu-budget', gpuBudget], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...env } });
  const url = await new Promise<string>((resolve, reject) => {
    proc.stdout.on('data', (d: Buffer) => {
      const m = /listening on (http:\/\/\S+)/.exec(d.toString());
      if (m) resolve(m[1]);
    });
    proc.once('exit', (c) => reject(new Error(`server ${cli} exited ${c}`)));
  });
  return { url, pid: proc.pid!, stop: () => proc.kill('SIGKILL') };
}

/** GET /v1/health on one keep-alive connection (node:http, nothing else): a call's wall ms. */
export function bareHealth(url: string): { call(): Promise<number>; close(): void } {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  const call = () =>
    new Promise<number>((resolve, reject) => {
      const t0 = performance.now();
      request(`${url}/v1/health`, { agent, headers: { accept: 'application/msgpack' } }, (res) => {
        res.on('data', () => undefined);
        res.on('end', () => resolve(performance.now() - t0));
      })
        .on('error', reject)
        .end();
    });
  return { call, close: () => agent.destroy() };
}

/**
 * Document 'doc' of `tokens` random f16 tokens (layer 0), sealed, and `batch`
 * exact sessions over it; a random q in f32 and the same q converted to f16.
 */
export async function decodeFixture(client: KvrecallClient, model: BenchModel, tokens: number, batch: number): Promise<{ sids: string[]; q: Tensor; q16: Tensor }> {
  const n = tokens, d = model.headDim;
  const words = new Uint16Array(model.kvHeads * n * d).map(() => 0x3c00 ^ ((Math.random() * 0x3ff) | 0));
  await client.createDocument('doc', model);
  await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: tensor('f16', [model.kvHeads, n, d], words), v: tensor('f16', [model.kvHeads, n, d], words) });
  await client.sealDocument('doc');
  const sids: string[] = [];
  for (let i = 0; i < batch; i++) sids.push((await client.createSession({ model, documents: ['doc'], method: 'exact' })).id);
  const qValues = new Float32Array(model.qHeads * d).map(() => Math.random());
  const q16Words = new Uint16Array(qValues.length);
  convert(new Uint8Array(qValues.buffer), 'f32', new Uint8Array(q16Words.buffer), 'f16', qValues.length);
  return { sids, q: tensor('f32', [model.qHeads, d], qValues), q16: tensor('f16', [model.qHeads, d], q16Words) };
}
