// What a stream's shared-memory segments hold mapped (api/shm.ts
// ShmStream), through the real server on 127.0.0.1 with real files in
// /dev/shm, counted by the addon's live mappings (addon/shm.ts
// sharedMapped) and /proc/self/maps, with no collection forced: a segment
// an attach replaces, or a closed stream's, is unmapped as soon as no
// frame uses it (a frame already running keeps the one it came with until
// its answer is sent), so attaching again and again holds one mapping; the
// server's caps on mapped bytes (--shm-stream-bytes, --shm-total-bytes)
// refuse an attach with an error frame that names the cap, mapping nothing.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sharedMapped } from '../../addon/shm.js';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { errorOf, RawStream, removeShmFiles, Segment } from '../helpers/shm-stream.js';

const seed = freshSeed();
console.log(`stream-shm-bounds: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const KIB = 1024;
const tmp = tempDataDir();
let server: RunningServer;
const servers: RunningServer[] = [];

beforeAll(async () => {
  server = await startInProcess(tmp.dir, { shmStreamBytes: 256 * KIB, shmTotalBytes: 384 * KIB });
  servers.push(server);
});
afterAll(async () => {
  for (const s of servers) await s.close();
  removeShmFiles();
  tmp.cleanup();
});

const portOf = (s: RunningServer) => Number(new URL(s.url).port);
const qT = () => tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim));
const qRef = (at: number) => ({ dtype: 'f32', shape: [model.qHeads, model.headDim], at });
const outOf = (a: Record<string, unknown>) => Buffer.from((a.out as { data: Uint8Array }).data);
/** Lines of /proc/self/maps that map `path`. */
const mapsOf = (path: string) => readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes(path)).length;
/** Until `ok()`, polling (no collection forced), at most 5 s. */
async function until(ok: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !ok(); i++) await new Promise((r) => setTimeout(r, 10));
}

describe('a stream attaching again and again', () => {
  it('holds one mapping: each replaced segment is unmapped at the attach, not at a collection', async () => {
    const sid = (await new KvrecallClient({ url: server.url }).createSession({ model })).id;
    const [one, two] = [new Segment(64 * KIB), new Segment(64 * KIB)];
    const s = await RawStream.open(portOf(server));
    try {
      const base = sharedMapped();
      for (let i = 0; i < 200; i++) {
        const seg = i % 2 === 0 ? one : two;
        expect(await s.call({ shm: { name: seg.name, bytes: seg.bytes } })).toMatchObject({ shm: { bytes: seg.bytes } });
        expect(sharedMapped()).toEqual({ mappings: base.mappings + 1, bytes: base.bytes + seg.bytes });
        expect(mapsOf(one.path) + mapsOf(two.path)).toBe(1);
        if (i % 40 === 0) {
          // The segment attached is the one read.
          const q = qT();
          seg.put(q, 4 * KIB);
          const [shared, bytes] = [await s.call({ session: sid, layer: 0, q: qRef(4 * KIB) }), await s.call({ session: sid, layer: 0, q })];
          expect(outOf(shared).equals(outOf(bytes))).toBe(true);
        }
      }
    } finally {
      s.close();
    }
    // A closed stream's segment goes too.
    await until(() => mapsOf(one.path) + mapsOf(two.path) === 0);
    expect(mapsOf(one.path) + mapsOf(two.path)).toBe(0);
  });

  it('a frame running when an attach replaces its segment reads it to the end; the segment goes once its answer is sent', async () => {
    const sid = (await new KvrecallClient({ url: server.url }).createSession({ model })).id;
    const [one, two] = [new Segment(64 * KIB), new Segment(64 * KIB)];
    const [q1, q2] = [qT(), qT()];
    one.put(q1, 0);
    two.put(q2, 0);
    const s = await RawStream.open(portOf(server));
    try {
      const want = [outOf(await s.call({ session: sid, layer: 0, q: q1 })), outOf(await s.call({ session: sid, layer: 0, q: q2 }))];
      await s.call({ shm: { name: one.name, bytes: one.bytes } });
      // One write: the first attend is under way on `one` when the attach replaces it.
      const [a1, attach, a2] = await s.calls([{ session: sid, layer: 0, q: qRef(0) }, { shm: { name: two.name, bytes: two.bytes } }, { session: sid, layer: 0, q: qRef(0) }]);
      expect(errorOf(attach).code).toBe('ok');
      expect(outOf(a1).equals(want[0])).toBe(true);
      expect(outOf(a2).equals(want[1])).toBe(true);
      expect([mapsOf(one.path), mapsOf(two.path)]).toEqual([0, 1]);
    } finally {
      s.close();
    }
  });
});

describe("the server's caps on mapped segment bytes", () => {
  it('refuse an attach past a stream\'s or all streams\' cap with an error frame, mapping nothing; the segment before serves on', async () => {
    const sid = (await new KvrecallClient({ url: server.url }).createSession({ model })).id;
    const [a, b] = [await RawStream.open(portOf(server)), await RawStream.open(portOf(server))];
    const big = new Segment(256 * KIB + 4), full = new Segment(256 * KIB), other = new Segment(256 * KIB), half = new Segment(128 * KIB);
    const q = qT();
    full.put(q, 0);
    other.put(q, 0);
    const want = outOf(await a.call({ session: sid, layer: 0, q }));
    try {
      // The streams closed before have let go of theirs.
      await until(() => sharedMapped().mappings === 0);
      const base = sharedMapped();
      const attach = (s: RawStream, seg: Segment) => s.call({ shm: { name: seg.name, bytes: seg.bytes } });
      expect(errorOf(await attach(a, full)).code).toBe('ok');
      // Past the stream's 256 KiB: refused, nothing mapped, `full` still serves.
      expect(errorOf(await attach(a, big))).toMatchObject({ code: 'invalid', message: expect.stringMatching(/over the server's cap of 262144 a stream \(--shm-stream-bytes/) });
      expect(sharedMapped()).toEqual({ mappings: base.mappings + 1, bytes: base.bytes + 256 * KIB });
      expect(mapsOf(big.path)).toBe(0);
      expect(outOf(await a.call({ session: sid, layer: 0, q: qRef(0) })).equals(want)).toBe(true);
      // Replacing it with as much is within the cap: the one replaced goes first.
      expect(errorOf(await attach(a, other)).code).toBe('ok');
      expect(sharedMapped()).toEqual({ mappings: base.mappings + 1, bytes: base.bytes + 256 * KIB });
      // Past all streams' 384 KiB: refused on the other stream, nothing mapped; less fits.
      expect(errorOf(await attach(b, full))).toMatchObject({ code: 'invalid', message: expect.stringMatching(/over the server's cap of 393216 \(--shm-total-bytes\)/) });
      expect(sharedMapped()).toEqual({ mappings: base.mappings + 1, bytes: base.bytes + 256 * KIB });
      expect(errorOf(await attach(b, half)).code).toBe('ok');
      expect(sharedMapped()).toEqual({ mappings: base.mappings + 2, bytes: base.bytes + 384 * KIB });
      // Once the first stream closes, its bytes are free for the other.
      a.close();
      await until(() => sharedMapped().bytes === base.bytes + 128 * KIB);
      expect(errorOf(await attach(b, full)).code).toBe('ok');
      expect(sharedMapped()).toEqual({ mappings: base.mappings + 1, bytes: base.bytes + 256 * KIB });
      expect(outOf(await b.call({ session: sid, layer: 0, q: qRef(0) })).equals(want)).toBe(true);
    } finally {
      a.close();
      b.close();
    }
  });
});
