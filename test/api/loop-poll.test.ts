// api/loop-poll.ts: the loop polls (one setImmediate a turn) from an
// answer until the window after the latest one has passed, then stops by
// itself; a window of 0 never polls. And a server started with --poll-us
// answers its stream as one without it, bit for bit, the poller running
// after an answer and stopped once its window is over.
import { afterAll, describe, expect, it } from 'vitest';
import { defaultPollUs, LoopPoller } from '../../api/loop-poll.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('LoopPoller', () => {
  it('polls until the window after the latest extend, then stops', async () => {
    // Windows wide against the timers' slack on a loaded machine.
    const p = new LoopPoller(300);
    expect(p.active).toBe(false);
    p.extend();
    expect(p.active).toBe(true);
    await sleep(150);
    // Extended before the first window ends: the chain goes on past it.
    p.extend();
    await sleep(200);
    expect(p.active).toBe(true);
    const turns = p.turns;
    expect(turns).toBeGreaterThan(1);
    await sleep(400);
    expect(p.active).toBe(false);
    // Stopped: no more turns.
    const after = p.turns;
    await sleep(10);
    expect(p.turns).toBe(after);
  });

  it('never polls with a window of 0', async () => {
    const p = new LoopPoller(0);
    p.extend();
    expect(p.active).toBe(false);
    await sleep(5);
    expect(p.turns).toBe(0);
  });
});

describe('defaultPollUs (--poll-us unset)', () => {
  it('polls 1 ms on the CUDA backend of a host with 8 cores or more, never elsewhere', () => {
    expect(defaultPollUs(true, 16)).toBe(1000);
    expect(defaultPollUs(true, 8)).toBe(1000);
    expect(defaultPollUs(true, 7)).toBe(0);
    expect(defaultPollUs(false, 64)).toBe(0);
  });
});

describe('a server with --poll-us unset', () => {
  const dir = tempDataDir();
  afterAll(() => dir.cleanup());

  it("polls as defaultPollUs says for its backend and this host's cores", async () => {
    const s = await startInProcess(dir.dir);
    try {
      expect(s.stream.poller.windowMs).toBe(defaultPollUs(s.engine.gpu !== undefined) / 1000);
    } finally {
      await s.close();
    }
  });
});

describe('a server with --poll-us', () => {
  const dirs = [tempDataDir(), tempDataDir()];
  const servers: Awaited<ReturnType<typeof startInProcess>>[] = [];
  afterAll(async () => {
    for (const s of servers) await s.close();
    for (const d of dirs) d.cleanup();
  });

  it('answers its stream as a server without it, and its poller stops after the window', async () => {
    const seed = freshSeed();
    const shape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
    servers.push(await startInProcess(dirs[0].dir, { pollUs: 0 }), await startInProcess(dirs[1].dir, { pollUs: 300_000 }));
    const replies = [];
    for (const s of servers) {
      const rng = new Rng(seed), c = new KvrecallClient({ url: s.url });
      const kv = randomKv(rng, 'f16', shape.kvHeads, 200, shape.headDim);
      await c.createDocument('d', shape, { methods: ['exact'] });
      await c.uploadDocumentKv('d', { layer: 0, start: 0, k: kv.k, v: kv.v });
      await c.sealDocument('d');
      const { id } = await c.createSession({ model: shape, documents: ['d'] });
      const stream = await c.openStream();
      try {
        const r = await stream.attend(id, { layer: 0, q: tensor('f32', [shape.qHeads, shape.headDim], randomQ(rng, shape.qHeads, shape.headDim)) });
        replies.push(r);
        if (s === servers[1]) {
          expect(s.stream.poller.active).toBe(true);
          await sleep(600);
          expect(s.stream.poller.active).toBe(false);
        } else expect(s.stream.poller.turns).toBe(0);
      } finally {
        stream.close();
      }
    }
    expect(Buffer.from(replies[1].out.buffer).equals(Buffer.from(replies[0].out.buffer))).toBe(true);
    expect(Buffer.from(replies[1].lse.buffer).equals(Buffer.from(replies[0].lse.buffer))).toBe(true);
  });
});
