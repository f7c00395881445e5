// Shared-memory tensors on the stream (api/shm.ts), through the real server
// on 127.0.0.1 with real files in /dev/shm: tensors given by `at` and
// answers written `into` the segment are bit-identical to the byte form
// (an attend, a batch with a bad step, a document upload); bad attaches
// and bad references get error frames, change nothing, and the stream
// answers the next frame; random frames with references get documented
// codes only.
import { closeSync, symlinkSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { errorOf as err, keepShmFile, RawStream, removeShmFiles, Segment, SHM } from '../helpers/shm-stream.js';

const seed = freshSeed();
console.log(`stream-shm: seed ${seed}`);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const DOCUMENTED = new Set(['malformed', 'not_found', 'conflict', 'invalid']);
const tmp = tempDataDir();
const rng = new Rng(seed);
let server: RunningServer;
let client: KvrecallClient;

type Ref = { dtype: string; shape: number[]; at: number };
const dataOf = (t: unknown) => Buffer.from((t as { data: Uint8Array }).data);
const qT = (q: Float32Array) => tensor('f32', [model.qHeads, model.headDim], q);
const port = () => Number(new URL(server.url).port);
const session = async (method = 'exact') => (await client.createSession({ model, documents: ['doc'], method })).id;
const ownTokens = async (sid: string) => (await client.getSession(sid)).ownTokens as number[];
/** `n` fresh sessions over the document. */
const sessionsOf = (n: number) => Promise.all(Array.from({ length: n }, () => session()));
/** `n` random decode steps: q f32 and the new token's k, v f16. */
const stepsOf = (n: number) => Array.from({ length: n }, () => ({ q: qT(randomQ(rng, model.qHeads, model.headDim)), ...asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim)) }));

beforeAll(async () => {
  server = await startInProcess(tmp.dir);
  client = new KvrecallClient({ url: server.url });
  await client.createDocument('doc', model, {});
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, 301, model.headDim);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
});
afterAll(async () => {
  removeShmFiles();
  await server.close();
  tmp.cleanup();
});

describe('shared-memory tensors on the stream', () => {
  it('an attend with q, k, v by `at` and its answer `into` the segment is bit-identical to the byte form', async () => {
    const seg = new Segment(1 << 16);
    const s = await RawStream.open(port());
    try {
      expect(await s.call({ shm: { name: seg.name, bytes: seg.bytes } })).toMatchObject({ shm: { bytes: seg.bytes } });
      // Mapped: the file may go now.
      unlinkSync(seg.path);
      const [a, b] = [await session(), await session()];
      for (let pos = 0; pos < 3; pos++)
        for (let layer = 0; layer < model.layers; layer++) {
          // Out in f32 and in the model's f16; q alone now and then (no append).
          const outDtype = (pos + layer) % 2 === 0 ? 'f32' : 'f16', append = pos !== 1 || layer === 0;
          const q = qT(randomQ(rng, model.qHeads, model.headDim)), kv = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
          const position = (await ownTokens(a))[layer];
          const step = { layer, outDtype, ...(append && { position }) };
          const bytes = await s.call({ session: a, ...step, q, ...(append && kv) });
          // At odd multiples of 4, the answer after the inputs.
          const ref = { session: b, ...step, q: seg.put(q, 12) };
          if (append) Object.assign(ref, { k: seg.put(kv.k, 4108), v: seg.put(kv.v, 8204) });
          const shared = await s.call({ ...ref, into: 20_004 });
          expect(err(shared).code).toBe('ok');
          const out = shared.out as Ref, lse = shared.lse as Ref;
          const outBytes = model.qHeads * model.headDim * (outDtype === 'f32' ? 4 : 2);
          expect(out).toEqual({ dtype: outDtype, shape: [model.qHeads, model.headDim], at: 20_004 });
          expect(lse).toEqual({ dtype: 'f32', shape: [model.qHeads], at: 20_004 + outBytes });
          expect(seg.read(out.at, outBytes).equals(dataOf(bytes.out))).toBe(true);
          expect(seg.read(lse.at, 4 * model.qHeads).equals(dataOf(bytes.lse))).toBe(true);
          expect(shared.stats).toMatchObject({ tokens: (bytes.stats as { tokens: number }).tokens });
        }
      expect(await ownTokens(b)).toEqual(await ownTokens(a));
    } finally {
      s.close();
    }
  });

  it('a batch by `at` and `into`, one step bad, answers the good ones bit-identically and the bad one changes nothing', async () => {
    const N = 5, BAD = 2;
    const seg = new Segment(1 << 17);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      const [viaBytes, viaShm, steps] = [await sessionsOf(N), await sessionsOf(N), stepsOf(N)];
      const stepBytes = (model.qHeads + 2 * model.kvHeads) * model.headDim * 4;
      const plain = await s.call({ layer: 1, steps: steps.map((st, i) => ({ session: viaBytes[i], ...st, position: 0 })) });
      const shared = await s.call({
        layer: 1,
        steps: steps.map((st, i) => {
          const at = i * stepBytes, q = seg.put(st.q, at), k = seg.put(st.k, at + 4096), v = seg.put(st.v, at + 4096 + 128 * model.kvHeads);
          // The bad step's q runs past the segment's end.
          return { session: viaShm[i], q: i === BAD ? { ...q, at: seg.bytes - 64 } : q, k, v, position: 0, into: 65_536 + i * 2048 };
        }),
      });
      const [pr, sr] = [plain.results as Record<string, unknown>[], shared.results as Record<string, unknown>[]];
      expect(sr.map((r) => err(r).code)).toEqual(['ok', 'ok', 'invalid', 'ok', 'ok']);
      expect(err(sr[BAD]).message).toMatch(/q\.at must be a multiple of 4/);
      for (let i = 0; i < N; i++) {
        if (i === BAD) continue;
        const out = sr[i].out as Ref, lse = sr[i].lse as Ref;
        expect(out.at).toBe(65_536 + i * 2048);
        expect(seg.read(out.at, model.qHeads * model.headDim * 4).equals(dataOf(pr[i].out))).toBe(true);
        expect(seg.read(lse.at, model.qHeads * 4).equals(dataOf(pr[i].lse))).toBe(true);
      }
      // The bad step appended nothing; its `into` was not written.
      expect(await ownTokens(viaShm[BAD])).toEqual([0, 0]);
      expect(seg.read(65_536 + BAD * 2048, 2048).every((x) => x === 0)).toBe(true);
      expect(await ownTokens(viaShm[0])).toEqual([0, 1]);
    } finally {
      s.close();
    }
  });

  it("a batch step whose answer would meet another step's input or answer in the segment fails alone, nothing of it run or written", async () => {
    const N = 3;
    const seg = new Segment(1 << 17);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      const answerBytes = model.qHeads * model.headDim * 4 + 4 * model.qHeads;
      const cases: [string, (at: (i: number) => number) => number[], number, RegExp][] = [
        // Step 1's answer over step 0's q; step 1's answer over where step 2's q is (step 2 fails); step 2's answer over step 0's.
        ["an answer over an earlier step's q", (at) => [65_536, at(0), 65_536 + 4096], 1, /into's answer bytes \[\d+, \d+\) overlap step 0's q/],
        ["a q under an earlier step's answer", (at) => [65_536, at(2), 65_536 + 4096], 2, /step 2's q's \[\d+, \d+\) lies under step 1's answer/],
        ["an answer over an earlier step's answer", () => [65_536, 65_536 + 4096, 65_536 + 64], 2, /overlap step 0's answer/],
      ];
      for (const [what, intos, bad, why] of cases) {
        const [viaBytes, viaShm, steps] = [await sessionsOf(N), await sessionsOf(N), stepsOf(N)];
        const plain = await s.call({ layer: 1, steps: steps.map((st, i) => ({ session: viaBytes[i], ...st, position: 0 })) });
        const at = (i: number) => i * 8192;
        const into = intos(at);
        const shared = await s.call({
          layer: 1,
          steps: steps.map((st, i) => ({ session: viaShm[i], q: seg.put(st.q, at(i)), k: seg.put(st.k, at(i) + 4096), v: seg.put(st.v, at(i) + 6144), position: 0, into: into[i] })),
        });
        const sr = shared.results as Record<string, unknown>[];
        expect(sr.map((r) => err(r).code), what).toEqual([0, 1, 2].map((i) => (i === bad ? 'invalid' : 'ok')));
        expect(err(sr[bad]).message, what).toMatch(why);
        // The bad step ran nothing (its token not appended); the others answer as the byte form, where they said.
        expect(await ownTokens(viaShm[bad])).toEqual([0, 0]);
        for (let i = 0; i < N; i++) {
          if (i === bad) continue;
          expect(seg.read(into[i], model.qHeads * model.headDim * 4).equals(dataOf((plain.results as Record<string, unknown>[])[i].out)), `${what}: step ${i}`).toBe(true);
        }
        expect(answerBytes).toBeLessThan(4096);
      }
    } finally {
      s.close();
    }
  });

  it('a stacked batch (api/stacked.ts) answers as the batch form bit for bit; a bad step is named, the others answered; bad arrays fail the frame and change nothing', async () => {
    const N = 4, BAD = 1;
    const seg = new Segment(1 << 17);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      const [viaSteps, viaStacked, steps] = [await sessionsOf(N), await sessionsOf(N), stepsOf(N)];
      const { qHeads: H, kvHeads: KVH, headDim: D } = model;
      const join = (name: 'q' | 'k' | 'v') => Buffer.concat(steps.map((st) => Buffer.from(st[name].data)));
      const qAt = 0, kAt = N * H * D * 4, vAt = kAt + N * KVH * D * 2, posAt = vAt + N * KVH * D * 2, into = 32_768;
      const q = seg.put(tensor('f32', [N, H, D], join('q')), qAt);
      const k = seg.put(tensor('f16', [N, KVH, D], join('k')), kAt);
      const v = seg.put(tensor('f16', [N, KVH, D], join('v')), vAt);
      // The bad step skips a position (409): it alone fails.
      const positions = seg.put(tensor('i32', [N], new Uint8Array(Int32Array.from({ length: N }, (_, i) => (i === BAD ? 1 : 0)).buffer)), posAt);
      const plain = await s.call({ layer: 1, steps: steps.map((st, i) => ({ session: viaSteps[i], ...st, position: i === BAD ? 1 : 0 })) });
      const stacked = await s.call({ layer: 1, sessions: viaStacked, q, k, v, positions, into });
      const pr = plain.results as Record<string, unknown>[];
      expect(err(pr[BAD]).code).toBe('conflict');
      expect(stacked.errors).toEqual([[BAD, 'conflict', err(pr[BAD]).message.replace(viaSteps[BAD], viaStacked[BAD])]]);
      const lseAt = into + N * H * D * 4;
      expect(stacked.out).toEqual({ dtype: 'f32', shape: [N, H, D], at: into });
      expect(stacked.lse).toEqual({ dtype: 'f32', shape: [N, H], at: lseAt });
      expect(typeof (stacked.stats as { ms: number }).ms).toBe('number');
      for (let i = 0; i < N; i++) {
        if (i === BAD) {
          // Its rows were not written.
          expect(seg.read(into + i * H * D * 4, H * D * 4).every((x) => x === 0)).toBe(true);
          continue;
        }
        expect(seg.read(into + i * H * D * 4, H * D * 4).equals(dataOf(pr[i].out))).toBe(true);
        expect(seg.read(lseAt + i * H * 4, H * 4).equals(dataOf(pr[i].lse))).toBe(true);
      }
      expect(await ownTokens(viaStacked[0])).toEqual([0, 1]);
      expect(await ownTokens(viaStacked[BAD])).toEqual([0, 0]);
      // Arrays that cannot be the batch fail the frame whole and append nothing.
      const bad: Record<string, unknown>[] = [
        { q: { ...q, shape: [N - 1, H, D] } },
        { q: { ...q, shape: [N * H, D] } },
        { q, k },
        { q, positions },
        { q, k, v, positions: { ...positions, dtype: 'f32' } },
        { q, k, v, positions, into: seg.bytes - 64 },
        { q, k, v, positions, outDtype: 'f64' },
        { q, k, v, positions, steps: [] },
        // The answers over the frame's own inputs: out over k (and v and positions), lse's end over q.
        { q, k, v, positions, into: kAt },
        { q: seg.put(tensor('f32', [N, H, D], join('q')), 40_960), k, v, positions, into: 40_960 - N * H * D * 4 - 4 },
      ];
      const before = seg.read(0, seg.bytes);
      for (const b of bad) {
        const a = await s.call({ layer: 1, sessions: viaStacked, into, ...b });
        expect(err(a).code, JSON.stringify(Object.keys(b))).toBe('invalid');
      }
      expect(err(await s.call({ layer: 1, sessions: viaStacked, q, k, v, positions, into: vAt })).message).toMatch(/into's answer bytes \[4608, 8832\) overlap v's \[4608, 5120\)/);
      // No step ran: nothing appended, nothing written (the second q was put before the snapshot).
      expect(seg.read(0, seg.bytes).equals(before)).toBe(true);
      expect(err(await s.call({ layer: 1, sessions: [], q, into })).code).toBe('invalid');
      expect(await ownTokens(viaStacked[0])).toEqual([0, 1]);
    } finally {
      s.close();
    }
  });

  it("a stacked batch's positions given as data sit at any byte offset of the frame: each is taken, none refused for its alignment", async () => {
    const seg = new Segment(1 << 16);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      const [st] = stepsOf(1);
      for (let pad = 0; pad < 4; pad++) {
        const [sid] = await sessionsOf(1);
        // `pad` first in the map: it moves the bytes of positions' data by one byte a turn.
        const positions = { dtype: 'i32', shape: [1], data: new Uint8Array(Int32Array.of(0).buffer) };
        const one = (t: Tensor, heads: number) => ({ ...t, shape: [1, heads, model.headDim] });
        const a = await s.call({ pad: 'x'.repeat(pad), layer: 1, sessions: [sid], q: one(st.q, model.qHeads), k: one(st.k, model.kvHeads), v: one(st.v, model.kvHeads), positions, into: 32_768 });
        expect(err(a).code, `pad ${pad}: ${err(a).message}`).toBe('ok');
        expect(a.errors).toBeUndefined();
        expect(await ownTokens(sid)).toEqual([0, 1]);
      }
    } finally {
      s.close();
    }
  });

  it('a document uploaded by `at` holds what the byte form stores', async () => {
    const n = 97;
    const seg = new Segment(1 << 18);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      for (const doc of ['up-bytes', 'up-shm']) await client.createDocument(doc, model, {});
      const chunks = Array.from({ length: model.layers }, () => randomKv(rng, 'f16', model.kvHeads, n, model.headDim));
      for (let layer = 0; layer < model.layers; layer++) {
        const { k, v } = chunks[layer];
        expect(err(await s.call({ document: 'up-bytes', layer, start: 0, k, v })).code).toBe('ok');
        const up = await s.call({ document: 'up-shm', layer, start: 0, k: seg.put(k, 0), v: seg.put(v, 65_536) });
        expect(up).toMatchObject({ layer, tokens: n });
      }
      // A bad reference changes nothing: the next upload still starts at n.
      const bad = await s.call({ document: 'up-shm', layer: 0, start: n, k: seg.put(chunks[0].k, 2), v: seg.put(chunks[0].v, 65_536) });
      expect(err(bad).code).toBe('invalid');
      for (const doc of ['up-bytes', 'up-shm']) await client.sealDocument(doc);
      const q = qT(randomQ(rng, model.qHeads, model.headDim));
      const answers = [];
      for (const doc of ['up-bytes', 'up-shm']) {
        const sid = (await client.createSession({ model, documents: [doc], method: 'exact' })).id;
        answers.push(await client.attend(sid, { layer: 1, q }));
      }
      expect(answers[1].stats.tokens).toBe(n);
      expect(Buffer.from(answers[1].out.buffer, answers[1].out.byteOffset, answers[1].out.byteLength).equals(Buffer.from(answers[0].out.buffer, answers[0].out.byteOffset, answers[0].out.byteLength))).toBe(true);
    } finally {
      s.close();
    }
  });

  it('refuses bad attaches with error frames; the stream goes on and keeps the segment it had', async () => {
    const good = new Segment(4096), small = new Segment(64);
    const link = join(SHM, `kvrecall-${good.name}-link`);
    symlinkSync(good.path, link);
    keepShmFile(link);
    const s = await RawStream.open(port());
    try {
      const q = qT(randomQ(rng, model.qHeads, model.headDim));
      const cases: [unknown, RegExp][] = [
        [{ name: '../etc', bytes: 64 }, /shm\.name must be/],
        [{ name: 'a/b', bytes: 64 }, /shm\.name must be/],
        [{ name: '', bytes: 64 }, /shm\.name must be/],
        [{ name: 'x'.repeat(101), bytes: 64 }, /shm\.name must be/],
        [{ name: `${good.name}-link`, bytes: 64 }, /symbolic link/],
        [{ name: `${good.name}-missing`, bytes: 64 }, /does not exist/],
        [{ name: small.name, bytes: 128 }, /shorter than/],
        [{ name: good.name, bytes: 6 }, /multiple of 4/],
        [{ name: good.name, bytes: 0 }, /multiple of 4/],
        [{ name: good.name, bytes: 2 ** 40 }, /at most/],
        ['name', /shm must be a map/],
      ];
      // Before any segment: a reference is refused as such.
      const sid = await session();
      const none = await s.call({ session: sid, layer: 0, q: { dtype: 'f32', shape: q.shape, at: 0 } });
      expect(err(none)).toMatchObject({ code: 'invalid', message: expect.stringMatching(/no shared-memory segment is attached/) });
      await s.call({ shm: { name: good.name, bytes: 4096 } });
      good.put(q, 0);
      for (const [shm, why] of cases) {
        const a = await s.call({ shm });
        expect(err(a)).toMatchObject({ code: 'invalid', message: expect.stringMatching(why) });
        // The segment attached before still serves.
        const r = await s.call({ session: sid, layer: 0, q: { dtype: 'f32', shape: q.shape, at: 0 } });
        expect(err(r).code).toBe('ok');
      }
      expect(await ownTokens(sid)).toEqual([0, 0]);
    } finally {
      s.close();
    }
  });

  it('refuses bad references and spans with error frames that change nothing', async () => {
    const seg = new Segment(8192);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      const sid = await session();
      const q = seg.put(qT(randomQ(rng, model.qHeads, model.headDim)), 0);
      const kv = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
      const k = seg.put(kv.k, 4096), v = seg.put(kv.v, 4096 + 512);
      const before = seg.read(0, seg.bytes);
      const bad: [Record<string, unknown>, RegExp][] = [
        [{ q: { ...q, at: 2 } }, /q\.at must be a multiple of 4/],
        [{ q: { ...q, at: -4 } }, /q\.at must be/],
        [{ q: { ...q, at: 8192 } }, /q\.at must be/],
        [{ q: { ...q, at: 1.5 } }, /q\.at must be/],
        [{ q: { ...q, at: '0' } }, /q\.at must be/],
        [{ k: { ...k, at: 8190 } }, /k\.at must be/],
        [{ v: { ...v, shape: [2, 64] } }, /v must have shape/],
        [{ q: { dtype: 'f64', shape: q.shape, at: 0 } }, /q\.dtype must be/],
        [{ into: 2 }, /into must be a multiple of 4/],
        [{ into: 8192 - 1024 }, /into must be/],
        [{ into: -4 }, /into must be/],
        [{ into: 'x' }, /into must be/],
        // The answer over the frame's own inputs: out over q, lse alone over k, out over v.
        [{ into: 0 }, /overlap q's \[0, 1024\)/],
        [{ into: 3072 }, /answer bytes \[3072, 4128\) overlap k's \[4096, 4224\)/],
        [{ into: 4096 + 512 + 64 }, /overlap v's \[4608, 4736\)/],
      ];
      for (const [change, why] of bad) {
        const a = await s.call({ session: sid, layer: 0, q, k, v, position: 0, into: 6144, ...change });
        expect(err(a)).toMatchObject({ code: 'invalid', message: expect.stringMatching(why) });
        // Nothing appended, nothing written into the segment; the stream answers the next frame.
        expect(await ownTokens(sid)).toEqual([0, 0]);
        expect(seg.read(0, seg.bytes).equals(before)).toBe(true);
        expect(err(await s.call({ session: sid, layer: 1, q })).code).toBe('ok');
      }
      // Over HTTP a reference is refused: shared memory needs a stream.
      const http = await client.attend(sid, { layer: 0, q: q as unknown as Tensor }).catch((e: unknown) => e);
      expect(http).toBeInstanceOf(KvrecallRequestError);
      expect((http as KvrecallRequestError).status).toBe(422);
      expect((http as KvrecallRequestError).message).toMatch(/shared memory/);
      // And the good frame goes through.
      expect(err(await s.call({ session: sid, layer: 0, q, k, v, position: 0, into: 6144 })).code).toBe('ok');
      expect(await ownTokens(sid)).toEqual([1, 0]);
    } finally {
      s.close();
    }
  });

  it('a second attach replaces the first; a closed stream forgets its segment', async () => {
    const [one, two] = [new Segment(4096), new Segment(4096)];
    const q1 = qT(randomQ(rng, model.qHeads, model.headDim)), q2 = qT(randomQ(rng, model.qHeads, model.headDim));
    one.put(q1, 0);
    two.put(q2, 0);
    const sid = await session();
    const s = await RawStream.open(port());
    try {
      const plain = await s.call({ session: sid, layer: 0, q: q2 });
      await s.call({ shm: { name: one.name, bytes: 4096 } });
      await s.call({ shm: { name: two.name, bytes: 4096 } });
      const r = await s.call({ session: sid, layer: 0, q: { dtype: 'f32', shape: q2.shape, at: 0 } });
      expect(dataOf(r.out).equals(dataOf(plain.out))).toBe(true);
    } finally {
      s.close();
    }
    const again = await RawStream.open(port());
    try {
      const r = await again.call({ session: sid, layer: 0, q: { dtype: 'f32', shape: q2.shape, at: 0 } });
      expect(err(r).message).toMatch(/no shared-memory segment/);
    } finally {
      again.close();
    }
  });

  it('random frames with references get documented codes only, and the stream goes on', async () => {
    const seg = new Segment(1 << 16);
    const s = await RawStream.open(port());
    try {
      await s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      const sessions = [await session(), await session()];
      seg.put(qT(randomQ(rng, model.qHeads, model.headDim)), 0);
      const pick = <T>(xs: T[]) => xs[rng.int(xs.length)];
      const ref = () => ({
        dtype: pick(['f32', 'f16', 'bf16', 'i32', 'x', 3]),
        shape: pick([[model.qHeads, model.headDim], [model.kvHeads, model.headDim], [1 << 20, 1 << 20], [-1], 'x', [2, 3, 5]]),
        at: pick([0, 4, 2, 1 << 16, (1 << 16) - 4, -4, 2 ** 53, 'x', null, 0.5, 4096]),
      });
      const step = () => ({
        session: pick([...sessions, 'nope']),
        q: ref(),
        ...(rng.next() < 0.4 && { k: ref(), v: ref(), position: rng.int(3) }),
        ...(rng.next() < 0.5 && { into: pick([0, 4, 2, 60_000, 65_536, -4, 'x', 1e300]) }),
        ...(rng.next() < 0.3 && { outDtype: pick(['f16', 'f32', 'bf16', 7]) }),
      });
      // A stacked batch (api/stacked.ts): a well-formed frame of n rows, often with one field replaced by a random one.
      const stacked = () => {
        const n = 1 + rng.int(3);
        const rows = (dtype: string, heads: number, at: number) => ({ dtype, shape: [n, heads, model.headDim], at });
        const good: Record<string, unknown> = {
          layer: rng.int(2),
          sessions: Array.from({ length: n }, () => pick(sessions)),
          q: rows('f32', model.qHeads, 0),
          ...(rng.next() < 0.4 && { k: rows('f16', model.kvHeads, 4096), v: rows('f16', model.kvHeads, 6144), positions: { dtype: 'i32', shape: [n], at: 8192 } }),
          into: 32_768,
          ...(rng.next() < 0.3 && { outDtype: pick(['f16', 'f32', 'bf16']) }),
        };
        if (rng.next() < 0.6) {
          const bad: Record<string, () => unknown> = {
            layer: () => pick([5, -1, 'x', 0.5]),
            sessions: () => pick([[...(good.sessions as string[]), 'nope'], ['nope'], [], 'x', [1], (good.sessions as string[]).slice(1)]),
            q: ref,
            k: ref,
            v: ref,
            positions: () => ({ dtype: pick(['i32', 'f32', 'x']), shape: pick([[n], [n + 1], [n, 1]]), at: pick([0, 8192, 60_000, -4, 2]) }),
            into: () => pick([0, 4, 2, 60_000, 65_536, -4, 'x', 1e300]),
            outDtype: () => pick(['f64', 7, null]),
          };
          const key = pick(Object.keys(bad));
          good[key] = bad[key]();
        }
        return good;
      };
      const codes = new Set<string>();
      let stackedAnswered = 0;
      for (let i = 0; i < 300; i++) {
        const r = rng.next();
        const body =
          r < 0.4
            ? { layer: rng.int(3), ...step() }
            : r < 0.65
              ? { layer: rng.int(3), steps: Array.from({ length: 1 + rng.int(4) }, step) }
              : r < 0.85
                ? stacked()
                : r < 0.93
                  ? { document: 'doc', layer: 0, start: rng.int(400), k: ref(), v: ref() }
                  : { shm: pick([{ name: seg.name, bytes: pick([64, 6, 1 << 16, 1 << 20]) }, { name: '..', bytes: 64 }, 7, null]) };
        const a = await s.call(body);
        const results = (a.results as Record<string, unknown>[] | undefined) ?? [a];
        for (const x of results) codes.add(err(x).code);
        for (const [, code] of (a.errors as [number, string, string][] | undefined) ?? []) codes.add(code);
        if (a.out !== undefined && (body as { sessions?: unknown }).sessions !== undefined) stackedAnswered++;
      }
      // Stacked frames got past their checks too (else the fuzz only met refusals).
      expect(stackedAnswered).toBeGreaterThan(0);
      for (const c of codes) expect(c === 'ok' || DOCUMENTED.has(c), c).toBe(true);
    } finally {
      s.close();
    }
  });
});

describe('shared memory off (--shm-dir off)', () => {
  const off = tempDataDir();
  let offServer: RunningServer;
  beforeAll(async () => {
    offServer = await startInProcess(off.dir, { shmDir: undefined });
  });
  afterAll(async () => {
    await offServer.close();
    off.cleanup();
  });

  it('refuses an attach with a message that says so, and the stream goes on', async () => {
    const seg = new Segment(64);
    const s = await RawStream.open(Number(new URL(offServer.url).port));
    try {
      const a = await s.call({ shm: { name: seg.name, bytes: 64 } });
      expect(err(a)).toMatchObject({ code: 'invalid', message: expect.stringMatching(/shared memory is off/) });
      const sid = (await new KvrecallClient({ url: offServer.url }).createSession({ model })).id;
      expect(err(await s.call({ session: sid, layer: 0, q: qT(randomQ(rng, model.qHeads, model.headDim)) })).code).toBe('ok');
    } finally {
      s.close();
      closeSync(seg.fd);
    }
  });
});
