// A refused attach is not for the stream's whole life (clients/ts/shm.ts
// AttachRetry), against a real server on 127.0.0.1 whose --shm-total-bytes
// holds one segment: a second stream's attach is refused while the first
// holds it, and its stacked calls go in bytes, trying the attach again now
// and then (not at every call) and refused again; once the first stream
// closes (the server's kvrecall_shm_mapped_bytes back to 0), a later call
// attaches the segment and goes as a stacked frame through it, its answers
// bit for bit the byte path's and single attends'. A stacked frame (with
// `sessions`) tells the segment from the bytes (a batch with `steps`).
import { describe, expect, it, vi } from 'vitest';
import { tensor, type OutArray, type Tensor } from '../../clients/ts/client.js';
import { ATTACH_RETRY_FIRST, ATTACH_RETRY_LAST } from '../../clients/ts/shm.js';
import type { KvrecallStream } from '../../clients/ts/stream.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`stream-shm-retry: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const { qHeads: H, kvHeads: KV, headDim: D } = model;
const N = 3;
const SEGMENT = 64 * 1024;
// Room for one stream's segment: a second is over the total while the first holds it.
const live = useServer({ shmStreamBytes: SEGMENT, shmTotalBytes: SEGMENT });

const bytesOf = (a: ArrayBufferView) => Buffer.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
const row = (t: Tensor, i: number): Tensor => {
  const b = t.data.byteLength / t.shape[0];
  return { dtype: t.dtype, shape: t.shape.slice(1), data: t.data.subarray(i * b, (i + 1) * b) };
};
/** The stream's requests, watched: an attach has `shm`, a stacked frame `sessions`, a byte batch `steps`. */
const watch = (s: KvrecallStream) => vi.spyOn(s as unknown as { request(body: Record<string, unknown>): Promise<unknown> }, 'request');
const kindOf = (b: Record<string, unknown>) => (b.shm ? 'attach' : Array.isArray(b.sessions) ? 'stacked' : Array.isArray(b.steps) ? 'bytes' : 'other');
const mapped = async () => Number(/^kvrecall_shm_mapped_bytes (\d+)$/m.exec(await (await fetch(`${live.server().url}/metrics`)).text())?.[1]);

describe('a stream whose attach was refused', () => {
  it('tries it again now and then, and once the cap has room its stacked calls go through the segment, answering as the byte path', async () => {
    const client = live.client();
    await client.createDocument('doc', model, {});
    const c = randomKv(rng, 'f16', KV, 300, D);
    await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('doc');
    const sessions = await Promise.all(Array.from({ length: N }, async () => (await client.createSession({ model, documents: ['doc'], method: 'exact' })).id));
    // q alone: nothing is appended, so every call has the same answer.
    const q = tensor('f32', [N, H, D], Float32Array.from({ length: N * H * D }, () => rng.normal() * 1.5));
    const single = await Promise.all(sessions.map(async (sid, i) => client.attend(sid, { layer: 0, q: row(q, i) })));
    const want = Buffer.concat([...single.map((r) => bytesOf(r.out)), ...single.map((r) => bytesOf(r.lse))]);
    const answer = (r: { out: OutArray; lse: Float32Array }) => Buffer.concat([bytesOf(r.out), bytesOf(r.lse)]);

    const first = await client.openStream(), second = await client.openStream();
    try {
      await first.attachShm({ bytes: SEGMENT });
      expect(await mapped()).toBe(SEGMENT);
      await expect(second.attachShm({ bytes: SEGMENT })).rejects.toMatchObject({ status: 422, message: expect.stringMatching(/--shm-total-bytes/) });
      const sent = watch(second);
      // While the first holds the cap: every call in bytes, the attach tried again only now and then, and refused.
      const calls = 4 * ATTACH_RETRY_FIRST;
      for (let i = 0; i < calls; i++) expect(answer(await second.attendStacked(0, sessions, q)).equals(want), `call ${i}`).toBe(true);
      const kinds = sent.mock.calls.map(([b]) => kindOf(b));
      expect(kinds.filter((k) => k === 'bytes').length).toBe(calls);
      expect(kinds.includes('stacked')).toBe(false);
      const tries = kinds.filter((k) => k === 'attach').length;
      expect(tries).toBeGreaterThanOrEqual(1);
      expect(tries).toBeLessThanOrEqual(calls / ATTACH_RETRY_FIRST - 1);
      expect(second.shm).toBeUndefined();
      expect(await mapped()).toBe(SEGMENT);

      // The first stream goes: its segment is unmapped once the server has seen it close.
      first.close();
      for (let i = 0; i < 500 && (await mapped()) !== 0; i++) await new Promise((r) => setTimeout(r, 10));
      expect(await mapped()).toBe(0);
      sent.mockClear();
      let n = 0;
      for (; n <= ATTACH_RETRY_LAST && !sent.mock.calls.some(([b]) => kindOf(b) === 'stacked'); n++)
        expect(answer(await second.attendStacked(0, sessions, q)).equals(want), `call ${n} after the close`).toBe(true);
      // It came back: the call that attached went as a stacked frame, after the attach, with the byte path's answer.
      const after = sent.mock.calls.map(([b]) => kindOf(b));
      expect(after.slice(-2)).toEqual(['attach', 'stacked']);
      expect(after.slice(0, -2).every((k) => k === 'bytes')).toBe(true);
      expect(second.shm?.bytes).toBe(SEGMENT);
      expect(await mapped()).toBe(SEGMENT);
      // And stays: the next calls through the segment without another attach, into the caller's arrays too.
      sent.mockClear();
      const out = new Float32Array(N * H * D), lse = new Float32Array(N * H);
      expect(answer(await second.attendStacked(0, sessions, q, undefined, undefined, undefined, { out, lse })).equals(want)).toBe(true);
      expect(answer(await second.attendStacked(0, sessions, q)).equals(want)).toBe(true);
      expect(sent.mock.calls.map(([b]) => kindOf(b))).toEqual(['stacked', 'stacked']);
    } finally {
      first.close();
      second.close();
    }
  });
});
