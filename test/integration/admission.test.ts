// Admission control: past the host memory budget a request gets 503 with a
// clear message, changes nothing, and memory returns when sessions close.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const rng = new Rng(freshSeed());
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 64, dtype: 'f16' as const };
// One session's initial segments: 2 layers × 256 tokens × 2 heads × 64 × 2 bytes × (K, V) = 256 KiB.
const SESSION_BYTES = 2 * 256 * 2 * 64 * 2 * 2;
const BUDGET = 4 * SESSION_BYTES + 1000;
const tmp = tempDataDir();
let server: RunningServer;
let client: KvrecallClient;

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { memoryBudget: BUDGET });
  client = new KvrecallClient({ url: server.url });
});
afterAll(async () => {
  await server.close();
  tmp.cleanup();
});

describe('admission control', () => {
  it('refuses sessions past the budget with 503 and admits again after one closes', async () => {
    const ids = [];
    for (let i = 0; i < 4; i++) ids.push((await client.createSession({ model })).id);
    const err = await client.createSession({ model }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(KvrecallRequestError);
    expect(err).toMatchObject({ status: 503, code: 'over_budget' });
    expect((err as Error).message).toMatch(/host memory/);
    const health = (await client.health()) as unknown as { memory: { used: number; budget: number } };
    expect(health.memory).toEqual({ used: 4 * SESSION_BYTES, budget: BUDGET });
    await client.deleteSession(ids.pop()!);
    ids.push((await client.createSession({ model })).id);
    for (const id of ids) await client.deleteSession(id);
    expect(((await client.health()) as unknown as { memory: { used: number } }).memory.used).toBe(0);
  });

  it('refuses an upload that would grow past the budget, keeping what the session held', async () => {
    const { id } = await client.createSession({ model });
    const first = randomKv(rng, 'f16', 2, 200, 64);
    await client.uploadSessionKv(id, { layer: 0, start: 0, k: first.k, v: first.v });
    const big = randomKv(rng, 'f16', 2, 2000, 64);
    const err = await client.uploadSessionKv(id, { layer: 0, start: 200, k: big.k, v: big.v }).catch((e: unknown) => e);
    expect(err).toMatchObject({ status: 503, code: 'over_budget' });
    // Nothing changed: the next upload still starts at 200, and attend sees 200 tokens.
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [4, 64], randomQ(rng, 4, 64)) });
    expect(r.stats.tokens).toBe(200);
    const small = randomKv(rng, 'f16', 2, 10, 64);
    await expect(client.uploadSessionKv(id, { layer: 0, start: 200, k: small.k, v: small.v })).resolves.toMatchObject({ tokens: 210 });
    await client.deleteSession(id);
  });
});
