// The TypeScript client's shared-memory segment and stacked batch
// (clients/ts/shm.ts, clients/ts/stacked.ts) against a real server on
// 127.0.0.1 with its segment in /dev/shm: attendStacked answers bit for bit
// as the same steps sent as a byte-form batch and as single attends, on
// sessions fed the same steps (appends included; q and out in f32 and f16);
// a bad step is named with its rows NaN, the others answered, the bad one
// changing nothing; arrays that cannot be the batch are refused before
// anything is sent; calls made at once go in turn; without a segment (or
// one too small) the same call goes in bytes with the same answers; the
// file is made 0600 and O_EXCL, unlinked once the server answers the
// attach, and its descriptor closed with the stream; a refused attach
// rejects with the typed error, removes its file and keeps the segment the
// stream had.
import { mkdtempSync, readdirSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, expectTypeOf, it, vi } from 'vitest';
import { KvrecallRequestError, tensor, type AttendReply, type BatchResult, type OutArray, type Tensor } from '../../clients/ts/client.js';
import { ShmFile } from '../../clients/ts/shm.js';
import type { KvrecallStream } from '../../clients/ts/stream.js';
import { f16Bits } from '../helpers/half.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`stream-stacked: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const { qHeads: H, kvHeads: KV, headDim: D } = model;
const N = 5;
const SHM = '/dev/shm';
const live = useServer();
const scratch = mkdtempSync(join(tmpdir(), 'kvrecall-stacked-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const bytesOf = (a: ArrayBufferView) => Buffer.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
/** Row i of an array of n rows, as bytes. */
const rowOf = (a: OutArray, i: number, n: number) => bytesOf(a.subarray((i * a.length) / n, ((i + 1) * a.length) / n));
/** The batch's arrays: q [n, H, D] (f32, or f16 words), the new token's k, v [n, KV, D] f16. */
function arrays(n = N, half = false): { q: Tensor; k: Tensor; v: Tensor } {
  const q = half ? Uint16Array.from({ length: n * H * D }, () => f16Bits(rng.normal() * 1.5)) : Float32Array.from({ length: n * H * D }, () => rng.normal() * 1.5);
  const c = randomKv(rng, 'f16', KV, n, D);
  // randomKv's [KV, n, D] bytes taken as [n, KV, D]: any random words do.
  return { q: tensor(half ? 'f16' : 'f32', [n, H, D], q), k: { ...c.k, shape: [n, KV, D] }, v: { ...c.v, shape: [n, KV, D] } };
}
/** Row i of a stacked tensor as a step's tensor. */
const row = (t: Tensor, i: number): Tensor => {
  const b = t.data.byteLength / t.shape[0];
  return { dtype: t.dtype, shape: t.shape.slice(1), data: t.data.subarray(i * b, (i + 1) * b) };
};
const ok = <T extends OutArray>(r: BatchResult<T>): AttendReply<T> => {
  if ('error' in r) throw new Error(`step failed: ${r.error.code} ${r.error.message}`);
  return r;
};
const ownTokens = async (sid: string) => (await live.client().getSession(sid)).ownTokens as number[];
const sessionsOf = (n: number) => Promise.all(Array.from({ length: n }, async () => (await live.client().createSession({ model, documents: ['doc'], method: 'exact' })).id));
/** The descriptors of this process open on the segment file `name` (its link reads "... (deleted)" once unlinked). */
const descriptorsOf = (name: string) =>
  readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`).includes(`kvrecall-${name}`);
    } catch {
      return false;
    }
  });
/** The stream's requests, watched (what was sent: a stacked frame has `sessions`). */
const watch = (s: KvrecallStream) => vi.spyOn(s as unknown as { request(body: Record<string, unknown>): Promise<unknown> }, 'request');

let documented = false;
async function document(): Promise<void> {
  if (documented) return;
  documented = true;
  const client = live.client();
  await client.createDocument('doc', model, {});
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', KV, 300, D);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
}

describe('attendStacked through the shared-memory segment', () => {
  it('answers bit for bit as the same steps in a byte-form batch and as single attends, appends included, q and out in f32 and f16', async () => {
    await document();
    const [stacked, batched, single] = [await sessionsOf(N), await sessionsOf(N), await sessionsOf(N)];
    const s = await live.client().openStream();
    try {
      await s.attachShm({ bytes: 1 << 20 });
      const sent = watch(s);
      for (let pos = 0; pos < 3; pos++)
        for (let layer = 0; layer < model.layers; layer++)
          for (const half of [false, true]) {
            // f32: the new token appended, out f32 (into the caller's arrays on odd positions); f16 q and out: an attend alone.
            const { q, k, v } = arrays(N, half);
            const outDtype = half ? ('f16' as const) : undefined;
            const into = !half && pos % 2 === 1 ? { out: new Float32Array(N * H * D), lse: new Float32Array(N * H) } : undefined;
            const got = half ? await s.attendStacked(layer, stacked, q, undefined, undefined, undefined, { outDtype: 'f16' }) : await s.attendStacked(layer, stacked, q, k, v, Int32Array.from({ length: N }, () => pos), into);
            expect(got.errors).toEqual([]);
            expect(typeof got.ms).toBe('number');
            expect(got.outDtype).toBe(half ? 'f16' : 'f32');
            expect(got.out).toBeInstanceOf(half ? Uint16Array : Float32Array);
            if (into) expect(got.out === into.out && got.lse === into.lse).toBe(true);
            const steps = batched.map((session, i) => ({ session, q: row(q, i), ...(outDtype && { outDtype }), ...(!half && { k: row(k, i), v: row(v, i), position: pos }) }));
            const want = await s.attendBatch(layer, steps);
            for (let i = 0; i < N; i++) {
              const one = await s.attend(single[i], { layer, q: row(q, i), ...(outDtype && { outDtype }), ...(!half && { k: row(k, i), v: row(v, i), position: pos }) });
              const r = ok(want[i]);
              const at = `pos ${pos} layer ${layer} ${half ? 'f16' : 'f32'} step ${i}`;
              expect(rowOf(got.out, i, N).equals(bytesOf(r.out)), at).toBe(true);
              expect(rowOf(got.lse, i, N).equals(bytesOf(r.lse)), at).toBe(true);
              expect(rowOf(got.out, i, N).equals(bytesOf(one.out)), at).toBe(true);
              expect(rowOf(got.lse, i, N).equals(bytesOf(one.lse)), at).toBe(true);
            }
          }
      // Every stacked call went as one stacked frame (its tensors in the segment), none as steps.
      const frames = sent.mock.calls.map(([body]) => body);
      expect(frames.filter((b) => Array.isArray(b.sessions)).length).toBe(12);
      // Each with its id first (how a server that keeps stacked forms, api/stacked.ts, finds one by the bytes after it).
      expect(frames.filter((b) => Array.isArray(b.sessions)).every((b) => Object.keys(b)[0] === 'id')).toBe(true);
      expect(frames.filter((b) => Array.isArray(b.steps)).length).toBe(12);
    } finally {
      s.close();
    }
    for (let i = 0; i < N; i++) {
      expect(await ownTokens(stacked[i])).toEqual(await ownTokens(single[i]));
      expect(await ownTokens(batched[i])).toEqual([3, 3]);
    }
  });

  it("carries a scale other than the server's default: the byte batch's answers at that scale, bit for bit", async () => {
    await document();
    const [stacked, batched, byDefault] = [await sessionsOf(N), await sessionsOf(N), await sessionsOf(N)];
    const s = await live.client().openStream();
    try {
      await s.attachShm({ bytes: 1 << 20 });
      const sent = watch(s);
      const { q } = arrays(N);
      const got = await s.attendStacked(1, stacked, q, undefined, undefined, undefined, { scale: 0.25 });
      expect(got.errors).toEqual([]);
      const frame = sent.mock.calls.map(([b]) => b).find((b) => Array.isArray(b.sessions));
      expect(frame?.scale).toBe(0.25);
      const want = await s.attendBatch(1, batched.map((session, i) => ({ session, q: row(q, i), scale: 0.25 })));
      const plain = await s.attendBatch(1, byDefault.map((session, i) => ({ session, q: row(q, i) })));
      for (let i = 0; i < N; i++) {
        expect(rowOf(got.out, i, N).equals(bytesOf(ok(want[i]).out)), `step ${i}`).toBe(true);
        expect(rowOf(got.lse, i, N).equals(bytesOf(ok(want[i]).lse)), `step ${i}`).toBe(true);
        // The scale is the one used: at the default the answer differs.
        expect(rowOf(got.lse, i, N).equals(bytesOf(ok(plain[i]).lse)), `step ${i}`).toBe(false);
      }
    } finally {
      s.close();
    }
  });

  it('at odd sizes (16-bit tensors and out of an odd byte count: padded to multiples of 4 in the segment) answers as the byte-form batch', async () => {
    const odd = { layers: 1, qHeads: 3, kvHeads: 1, headDim: 5, dtype: 'f16' as const }, n = 3;
    const client = live.client();
    await client.createDocument('odd', odd, {});
    const c = randomKv(rng, 'f16', 1, 37, 5);
    await client.uploadDocumentKv('odd', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('odd');
    const open = () => Promise.all(Array.from({ length: n }, async () => (await client.createSession({ model: odd, documents: ['odd'], method: 'exact' })).id));
    const [stacked, batched] = [await open(), await open()];
    const s = await client.openStream();
    try {
      await s.attachShm({ bytes: 4096 });
      for (let pos = 0; pos < 3; pos++) {
        const q = tensor('f16', [n, 3, 5], Uint16Array.from({ length: n * 15 }, () => f16Bits(rng.normal())));
        const kv = randomKv(rng, 'f16', 1, n, 5);
        const [k, v] = [{ ...kv.k, shape: [n, 1, 5] }, { ...kv.v, shape: [n, 1, 5] }];
        const got = await s.attendStacked(0, stacked, q, k, v, [pos, pos, pos], { outDtype: 'f16' });
        expect(got.errors).toEqual([]);
        const want = await s.attendBatch(0, batched.map((session, i) => ({ session, q: row(q, i), k: row(k, i), v: row(v, i), position: pos, outDtype: 'f16' as const })));
        for (let i = 0; i < n; i++) {
          expect(rowOf(got.out, i, n).equals(bytesOf(ok(want[i]).out)), `pos ${pos} step ${i}`).toBe(true);
          expect(rowOf(got.lse, i, n).equals(bytesOf(ok(want[i]).lse)), `pos ${pos} step ${i}`).toBe(true);
        }
      }
    } finally {
      s.close();
    }
    for (let i = 0; i < n; i++) expect(await ownTokens(stacked[i])).toEqual([3]);
  });

  it('names a bad step with its rows NaN and answers the others; the bad step changes nothing', async () => {
    await document();
    const [good, ref] = [await sessionsOf(N), await sessionsOf(N)];
    const names = good.slice();
    names[4] = 'no-such-session';
    const pos = new Int32Array(N);
    pos[2] = 1; // skips a token: 409, that step alone
    const s = await live.client().openStream();
    try {
      await s.attachShm({ bytes: 1 << 20 });
      for (let round = 0; round < 2; round++) {
        const { q, k, v } = arrays();
        for (const outDtype of ['f32', 'f16'] as const) {
          // f16: no append (q alone), so the f32 round's appends are the only ones.
          const got = outDtype === 'f32' ? await s.attendStacked(0, names, q, k, v, pos) : await s.attendStacked(0, names, q, undefined, undefined, undefined, { outDtype });
          const codes = got.errors.map(([i, code]) => [i, code]);
          expect(codes).toEqual(outDtype === 'f32' ? [[2, 'conflict'], [4, 'not_found']] : [[4, 'not_found']]);
          expect(got.errors.at(-1)![2]).toMatch(/no-such-session/);
          for (const [i] of got.errors) {
            const o = got.out.subarray(i * H * D, (i + 1) * H * D);
            expect(outDtype === 'f32' ? Array.from(o).every(Number.isNaN) : Array.from(o).every((w) => w === 0x7e00)).toBe(true);
            expect(Array.from(got.lse.subarray(i * H, (i + 1) * H)).every(Number.isNaN)).toBe(true);
          }
          for (const i of [0, 1, 3]) {
            const one = await s.attend(ref[i], { layer: 0, q: row(q, i), ...(outDtype === 'f32' ? { k: row(k, i), v: row(v, i), position: pos[i] } : { outDtype }) });
            expect(rowOf(got.out, i, N).equals(bytesOf(one.out)), `round ${round} ${outDtype} step ${i}`).toBe(true);
            expect(rowOf(got.lse, i, N).equals(bytesOf(one.lse))).toBe(true);
          }
        }
        for (const i of [0, 1, 3]) pos[i]++;
      }
      expect(await ownTokens(good[2])).toEqual([0, 0]);
      expect(await ownTokens(good[0])).toEqual([2, 0]);
      // A layer the model has not: every step is named, none answered.
      const { q } = arrays();
      const none = await s.attendStacked(model.layers + 5, good, q);
      expect(none.errors.map(([i, code]) => [i, code])).toEqual(good.map((_, i) => [i, 'invalid']));
      expect(Array.from(none.lse).every(Number.isNaN)).toBe(true);
    } finally {
      s.close();
    }
  });

  it('a batch the server refuses whole rejects with KvrecallRequestError, and the stream goes on', async () => {
    await document();
    const [sid] = await sessionsOf(1);
    const n = 4097; // one more step than a batch may carry (engine/sessions.ts MAX_BATCH)
    const q = tensor('f32', [n, H, D], new Float32Array(n * H * D));
    const s = await live.client().openStream();
    try {
      await s.attachShm({ bytes: 16 << 20 });
      const refused = await s.attendStacked(0, Array.from({ length: n }, () => sid), q).catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(KvrecallRequestError);
      expect(refused).toMatchObject({ status: 422, code: 'invalid', message: expect.stringMatching(/sessions must be a list of 1 to 4096/) });
      const one = tensor('f32', [1, H, D], q.data.subarray(0, H * D * 4));
      const got = await s.attendStacked(0, [sid], one);
      expect(bytesOf(got.out).equals(bytesOf((await s.attend(sid, { layer: 0, q: row(one, 0) })).out))).toBe(true);
    } finally {
      s.close();
    }
  });

  it('refuses arrays that cannot be the batch before anything is sent; nothing is appended', async () => {
    await document();
    const names = await sessionsOf(3);
    const { q, k, v } = arrays(3);
    const cut = (t: Tensor, shape: number[]): Tensor => ({ ...t, shape });
    const s = await live.client().openStream();
    try {
      await s.attachShm({ bytes: 1 << 20 });
      const sent = watch(s);
      const bad: [unknown[], RegExp][] = [
        [[0, names, cut(q, [2, H, D])], /q must be/], // a row short
        [[0, names, cut(q, [3 * H, D])], /q must be/], // not stacked
        [[0, names, { ...q, dtype: 'i32' }], /q must be/],
        [[0, names, { ...q, data: q.data.subarray(4) }], /q\.data must hold/],
        [[0, names, q, k], /k and v come together/],
        [[0, names, q, k, { ...v, dtype: 'bf16' }], /v must be of k's dtype/],
        [[0, names, q, cut(k, [3, KV, D / 2]), v], /k must be/],
        [[0, names, q, k, v, [0, 0]], /positions must be 3/],
        [[0, names, q, k, v, [0, -1, 0]], /positions must be integers/],
        [[0, names, q, k, v, [0, 0.5, 0]], /positions must be integers/],
        [[0, names, q, undefined, undefined, [0, 0, 0]], /give k and v/],
        [[0, names, q, k, v, [0, 0, 0], { outDtype: 'f64' }], /outDtype must be/],
        [[0, names, q, undefined, undefined, undefined, { outDtype: 'f16', out: new Float32Array(3 * H * D), lse: new Float32Array(3 * H) }], /out must be a Uint16Array/],
        [[0, names, q, undefined, undefined, undefined, { out: new Float32Array(3 * H * D) }], /out and lse come together/],
        [[0, names, q, undefined, undefined, undefined, { out: new Float32Array(3 * H * D), lse: new Float32Array(3) }], /lse must be/],
        [[0, names, q, undefined, undefined, undefined, { scale: Number.NaN }], /scale must be/],
        [[0, names, q, undefined, undefined, undefined, { scale: -0.5 }], /scale must be/],
        [[0, names, q, undefined, undefined, undefined, { scale: '0.25' }], /scale must be/],
        [[0, [names[0], 7, names[2]], q], /session id is a string/],
        [[0, [], q], /non-empty/],
        [[-1, names, q], /layer must be/],
      ];
      for (const [args, why] of bad) {
        const e = await (s.attendStacked as (...a: unknown[]) => Promise<unknown>).apply(s, args).catch((x: unknown) => x);
        expect(e instanceof TypeError || e instanceof RangeError, String(e)).toBe(true);
        expect(String(e)).toMatch(why);
      }
      expect(sent).not.toHaveBeenCalled();
      // Nothing was appended: position 0 is still the next.
      expect((await s.attendStacked(0, names, q, k, v, [0, 0, 0])).errors).toEqual([]);
    } finally {
      s.close();
    }
    for (const sid of names) expect(await ownTokens(sid)).toEqual([1, 0]);
  });

  it('calls made at once go through the segment in turn, each answered as when made alone; one made during an attach waits for it', async () => {
    await document();
    const names = await sessionsOf(N);
    const qs = Array.from({ length: 6 }, (_, i) => arrays(N, i % 2 === 1).q);
    const s = await live.client().openStream();
    try {
      // A call made while the attach is under way waits for it, and goes through the segment.
      const sent = watch(s);
      const [, early] = await Promise.all([s.attachShm({ bytes: 1 << 20 }), s.attendStacked(0, names, qs[0])]);
      expect(sent.mock.calls.map(([b]) => Object.keys(b).find((key) => key === 'shm' || key === 'sessions' || key === 'steps'))).toEqual(['shm', 'sessions']);
      const alone: Buffer[] = [];
      for (const q of qs) {
        const r = await s.attendStacked(0, names, q);
        alone.push(Buffer.concat([bytesOf(r.out), bytesOf(r.lse)]));
      }
      const together = await Promise.all(qs.map((q) => s.attendStacked(0, names, q)));
      together.forEach((r, i) => expect(Buffer.concat([bytesOf(r.out), bytesOf(r.lse)]).equals(alone[i]), `call ${i}`).toBe(true));

      expect(Buffer.concat([bytesOf(early.out), bytesOf(early.lse)]).equals(alone[0])).toBe(true);
      // The answers differ from call to call (or a call that read another's would pass).
      expect(alone[0].equals(alone[2])).toBe(false);
    } finally {
      s.close();
    }
  });

  it('without a segment, or with one too small, the same call goes as steps in bytes with the same answers', async () => {
    await document();
    const names = await sessionsOf(3);
    const { q } = arrays(3);
    const s = await live.client().openStream();
    let want: Buffer;
    try {
      await s.attachShm({ bytes: 1 << 20 });
      const r = await s.attendStacked(0, names, q);
      want = Buffer.concat([bytesOf(r.out), bytesOf(r.lse)]);
    } finally {
      s.close();
    }
    // No segment; a segment too small for 3 x (1 KiB q + 1 KiB out).
    for (const bytes of [0, 4096]) {
      const p = await live.client().openStream();
      try {
        if (bytes) await p.attachShm({ bytes });
        const sent = watch(p);
        const out = new Float32Array(3 * H * D), lse = new Float32Array(3 * H);
        const got = await p.attendStacked(0, names, q, undefined, undefined, undefined, { out, lse });
        expect(got.out === out && got.lse === lse).toBe(true);
        expectTypeOf(got.out).toEqualTypeOf<Float32Array>();
        expect(Buffer.concat([bytesOf(got.out), bytesOf(got.lse)]).equals(want), `segment of ${bytes}`).toBe(true);
        expect(typeof got.ms).toBe('number');
        expect(sent.mock.calls.map(([b]) => Array.isArray(b.steps))).toEqual([true]);
      } finally {
        p.close();
      }
    }
  });
});

describe('attaching a segment', () => {
  it('makes its file 0600 and O_EXCL, unlinks it once the server answers, and closes its descriptor with the stream', async () => {
    const f = ShmFile.create(4096, scratch);
    try {
      const st = statSync(f.path);
      expect([st.mode & 0o777, st.size, st.isFile()]).toEqual([0o600, 4096, true]);
      expect(f.name).toMatch(/^[A-Za-z0-9_.-]{1,100}$/);
    } finally {
      f.close();
    }
    expect(readdirSync(scratch)).toEqual([]);
    expect(() => ShmFile.create(6, scratch)).toThrow(TypeError);
    expect(() => ShmFile.create(4096, join(scratch, 'missing'))).toThrow(/ENOENT/);
    expect(readdirSync(scratch)).toEqual([]);

    const s = await live.client().openStream();
    await s.attachShm({ bytes: 1 << 16 });
    const name = s.shm!.name;
    expect(s.shm!.bytes).toBe(1 << 16);
    // Mapped by the server (in this process) and held by the stream's descriptor (and any the server keeps); the name is gone.
    expect(readdirSync(SHM)).not.toContain(`kvrecall-${name}`);
    const fds = descriptorsOf(name);
    expect(fds.length).toBeGreaterThanOrEqual(1);
    for (const fd of fds) expect(readlinkSync(`/proc/self/fd/${fd}`)).toMatch(/\(deleted\)$/);
    s.close();
    expect(descriptorsOf(name).length).toBe(fds.length - 1);
    expect(s.shm).toBeUndefined();
    await expect(s.attendStacked(0, ['x'], tensor('f32', [1, H, D], new Float32Array(H * D)))).rejects.toThrow(/closed/);
  });

  it('a refused attach rejects with KvrecallRequestError, removes its file and leaves the segment the stream had', async () => {
    await document();
    const names = await sessionsOf(2);
    const { q } = arrays(2);
    const s = await live.client().openStream();
    try {
      await s.attachShm({ bytes: 1 << 16 });
      const had = s.shm!.name;
      // Not the server's --shm-dir: the server finds no such file.
      const e = await s.attachShm({ bytes: 1 << 16, dir: scratch }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(KvrecallRequestError);
      expect(e).toMatchObject({ status: 422, code: 'invalid', message: expect.stringMatching(/does not exist/) });
      expect(readdirSync(scratch)).toEqual([]);
      await expect(s.attachShm({ bytes: 6 })).rejects.toThrow(TypeError);
      expect(s.shm!.name).toBe(had);
      const held = descriptorsOf(had).length;
      expect(held).toBeGreaterThanOrEqual(1);
      // The segment it had still serves: a stacked frame, answered as single attends.
      const sent = watch(s);
      const got = await s.attendStacked(0, names, q);
      expect(sent.mock.calls.map(([b]) => Array.isArray(b.sessions))).toEqual([true]);
      for (let i = 0; i < 2; i++) expect(rowOf(got.out, i, 2).equals(bytesOf((await s.attend(names[i], { layer: 0, q: row(q, i) })).out))).toBe(true);
      // A second attach replaces the first: its descriptor closes.
      await s.attachShm({ bytes: 1 << 16 });
      expect(s.shm!.name).not.toBe(had);
      expect(descriptorsOf(had).length).toBe(held - 1);
    } finally {
      s.close();
    }
  });
});

describe('shared memory off (--shm-dir off)', () => {
  const off = useServer({ shmDir: undefined });

  it('refuses the attach with the typed error that says so, removes the file; attendStacked goes in bytes', async () => {
    const client = off.client();
    const sid = (await client.createSession({ model })).id;
    const s = await client.openStream();
    try {
      const before = readdirSync(SHM).filter((f) => f.startsWith(`kvrecall-ts${process.pid}-`));
      const e = await s.attachShm({ bytes: 1 << 16 }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(KvrecallRequestError);
      expect(e).toMatchObject({ status: 422, code: 'invalid', message: expect.stringMatching(/shared memory is off/) });
      expect(readdirSync(SHM).filter((f) => f.startsWith(`kvrecall-ts${process.pid}-`))).toEqual(before);
      expect(s.shm).toBeUndefined();
      const q = tensor('f32', [1, H, D], Float32Array.from({ length: H * D }, () => rng.normal()));
      const got = await s.attendStacked(0, [sid], q);
      expect(got.errors).toEqual([]);
      expect(bytesOf(got.out).equals(bytesOf((await s.attend(sid, { layer: 0, q: row(q, 0) })).out))).toBe(true);
      // The out array follows outDtype, in type too (tsc -p tsconfig.test.json).
      const half = await s.attendStacked(0, [sid], q, undefined, undefined, undefined, { outDtype: 'f16' });
      expectTypeOf(half.out).toEqualTypeOf<Uint16Array>();
      expectTypeOf(got.out).toEqualTypeOf<Float32Array>();
      expect(bytesOf(half.out).equals(bytesOf((await s.attend(sid, { layer: 0, q: row(q, 0), outDtype: 'f16' })).out))).toBe(true);
    } finally {
      s.close();
    }
  });
});
