// A retrieval-attention session's code scan with a PQ first pass (codeScan: true, scanKeep; index/retrieval-attention.ts,
// walkOptions), through the real server on 127.0.0.1: its answer is float64 attention over what it selected, every
// step's selection the steady zone plus `budget` distinct other keys; its first step's ids are the native two-pass
// scan's at the session's options on the server's own graph (which differ from the one-pass scan's somewhere, so
// the option reaches the search); a key scanner (the device's) is handed the share below 1 (at 1, every key kept: the
// one pass's answer, checked on the host, so none), and where it declines the host searches; bad values are refused
// (422, as the other walk options) and create nothing.
import { describe, expect, it } from 'vitest';
import type { RaGraph } from '../../addon/ra-graph.js';
import type { HeadIndex, HeadKeys, KeyScanner, SearchResult } from '../../index/method.js';
import { retrievalAttentionBuilder, walkOptions } from '../../index/retrieval-attention.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { raCodeSession } from '../helpers/ra-code-session.js';

const { model, N, BUDGET, STEPS, d, live, kv, queries, isSteady, documentReady, session, attend } = raCodeSession('retrieval-attention-scan-keep');
// At 8192 keys the exact cap (3%) is 246 keys: a first pass keeping 5% (410) leaves the 4-bit codes a short list.
const KEEP = 0.05;

async function serverHeads(): Promise<HeadIndex[]> {
  const documents = live.server().engine.documents;
  const [heads] = await documents.indexes(await documents.acquire('doc'), 'retrieval-attention');
  return heads;
}

describe('retrieval-attention session with codeScan and scanKeep', () => {
  it("answers as float64 attention over a valid selection; its first ids are the native two-pass scan's", async () => {
    await documentReady();
    const sid = await session({ codeScan: true, scanKeep: KEEP });
    const plain = await session({ codeScan: true });
    expect(await live.client().getSession(sid)).toMatchObject({ codeScan: true, scanKeep: KEEP });
    expect(await live.client().getSession(plain)).not.toHaveProperty('scanKeep');
    const graphs = (await serverHeads()).map((head) => head as unknown as { graph: RaGraph; keys: HeadKeys });
    const steady = Int32Array.from([...Array(N).keys()].filter(isSteady));
    const opts = walkOptions(0, BUDGET, steady.length, N, { codeScan: true, scanKeep: KEEP });
    expect(opts).toEqual({ ef: BUDGET, aggregate: 'attention', codeScan: true, maxScanned: Math.ceil(0.03 * N), scanKeep: KEEP });
    let differ = 0;
    for (let s = 0; s < STEPS; s++) {
      const [r, p] = [await attend(sid, queries[s]), await attend(plain, queries[s])];
      const rows = r.selection!.map((ids) => Array.from(ids));
      const ref = referenceAttention(queries[s], kv.kValues, kv.vValues, model.qHeads, d, 1 / Math.sqrt(d), rows);
      expect(maxRelError(r.out as Float32Array, ref.out, model.qHeads)).toBeLessThan(1e-5);
      rows.forEach((ids, h) => {
        expect(new Set(ids).size).toBe(ids.length);
        expect(ids.every((t) => Number.isInteger(t) && t >= 0 && t < N)).toBe(true);
        expect(ids.filter((t) => !isSteady(t)).length).toBe(BUDGET);
        expect(ids.filter(isSteady).length).toBe(steady.length);
        const other = new Set(p.selection![h]);
        if (ids.some((t) => !other.has(t))) differ++;
      });
      // At most the exact cap scored; every key's PQ code read.
      expect(r.stats.scanned).toBeLessThanOrEqual(opts.maxScanned!);
      expect(r.stats.codes).toBe(N);
      if (s > 0) continue;
      // The first step starts from the entry points and the steady zone alone (no last ids yet): the native scan.
      graphs.forEach((g, h) => {
        const search = (o: typeof opts) => {
          const outIds = new Int32Array(BUDGET), outScores = new Float32Array(BUDGET);
          const res = g.graph.searchSync({ ...g.keys, q: queries[s].subarray(h * d, (h + 1) * d), group: 1, k: BUDGET, outIds, outScores, freeSeeds: steady, ...o });
          return { ids: new Set(outIds.subarray(0, res.count)), scanned: res.scanned };
        };
        const twoPass = search(opts);
        expect(new Set(rows[h].filter((t) => !isSteady(t)))).toEqual(twoPass.ids);
        expect(twoPass.ids.size).toBe(BUDGET);
      });
    }
    // The first pass loses some of the one pass's keys on random keys: the sessions' selections are not all the same.
    console.log(`scanKeep ${KEEP}: ${differ} of ${STEPS * model.kvHeads} head-steps differ from the one-pass scan's`);
    expect(differ).toBeGreaterThan(0);
  });

  it("hands a key scanner the session's scanKeep below 1 (absent or 1: the one pass), the host's answer where it declines", async () => {
    await documentReady();
    const heads = await serverHeads();
    const steady = Int32Array.from([...Array(N).keys()].filter(isSteady));
    const k = BUDGET + steady.length;
    const marker: SearchResult[] = heads.map(() => ({ ids: Int32Array.of(N / 2), scanned: 1 }));
    const asked: (number | undefined)[] = [];
    const scanner: KeyScanner = { scan: async (...args) => (asked.push(args[7]), marker.map((r) => ({ ...r }))) };
    const search = (walk: { scanKeep?: number }, sc?: KeyScanner) =>
      retrievalAttentionBuilder.searchHeads!(heads, queries[0], 1, [k, k], 0, { steady }, false, { codeScan: true, ...walk }, sc);
    for (const walk of [{}, { scanKeep: 1 }, { scanKeep: KEEP }])
      expect((await search(walk, scanner)).map((r) => Array.from(r.ids))).toEqual([[N / 2], [N / 2]]);
    expect(asked).toEqual([undefined, undefined, KEEP]);
    // A scanner that cannot take these heads now: the host's two-pass search.
    const declines: KeyScanner = { scan: async () => undefined };
    const viaHost = await search({ scanKeep: KEEP }, declines);
    const host = await search({ scanKeep: KEEP });
    expect(viaHost.map((r) => Array.from(r.ids))).toEqual(host.map((r) => Array.from(r.ids)));
    expect(host.every((r) => r.ids.length === BUDGET)).toBe(true);
    // scanKeep 1 keeps every key for the 4-bit codes: the one pass's answer, which the device scan gives as well.
    const [all, one] = [await search({ scanKeep: 1 }), await search({})];
    expect(all.map((r) => new Set(r.ids))).toEqual(one.map((r) => new Set(r.ids)));
  });

  it('refuses bad values with 422 and creates nothing', async () => {
    await documentReady();
    const client = live.client();
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ codeScan: true, scanKeep: 0 }, /scanKeep must be a share in \(0, 1\]/],
      [{ codeScan: true, scanKeep: -0.1 }, /scanKeep must be a share in \(0, 1\]/],
      [{ codeScan: true, scanKeep: 1.5 }, /scanKeep must be a share in \(0, 1\]/],
      [{ codeScan: true, scanKeep: '0.08' }, /scanKeep must be a share in \(0, 1\]/],
      [{ codeScan: true, scanKeep: null }, /scanKeep must be a share in \(0, 1\]/],
      [{ scanKeep: 0.08 }, /scanKeep is the code scan's PQ first pass: set codeScan: true/],
      [{ codeScan: false, scanKeep: 0.08 }, /scanKeep is the code scan's PQ first pass: set codeScan: true/],
      [{ codeWalk: true, scanKeep: 0.08 }, /scanKeep is the code scan's PQ first pass: set codeScan: true/],
      [{ scanKeep: 0.08, method: 'hnsw' }, /scanKeep is an option of retrieval-attention's graph search, not of method hnsw/],
    ];
    const before = (await client.health()).sessions;
    for (const [extra, message] of bad)
      await expect(session(extra)).rejects.toMatchObject({ status: 422, code: 'invalid', message: expect.stringMatching(message) });
    expect((await client.health()).sessions).toBe(before);
  });
});
