// A retrieval-attention session's code scan (codeScan: true; index/retrieval-attention.ts, walkOptions),
// through the real server on 127.0.0.1: its answer is float64 attention over what it selected; its first
// step's ids are the native code scan's at the session's options on the server's own graph, its scanned and
// codes those of the search (every key's code read, at most the exact cap scored); on random keys, where
// decode queries are unlike the prefill queries the graph was built from, it finds more of the exact top-k
// than the beam capped at the same share; bad values are refused (422) and create nothing. With one q head
// per kv head the ranking is q·k, so the float64 top-k is exact.
import { describe, expect, it } from 'vitest';
import type { RaGraph } from '../../addon/ra-graph.js';
import type { HeadKeys } from '../../index/method.js';
import { walkOptions } from '../../index/retrieval-attention.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { raCodeSession } from '../helpers/ra-code-session.js';

const { model, N, BUDGET, STEPS, d, live, kv, queries, isSteady, documentReady, session, attend, exactTop } = raCodeSession('retrieval-attention-code-scan');

describe('retrieval-attention session with codeScan', () => {
  it("answers as float64 attention over its selection; its first ids, scanned and codes are the native code scan's", async () => {
    await documentReady();
    const server = live.server();
    const sid = await session({ codeScan: true });
    const described = await live.client().getSession(sid);
    expect(described).toMatchObject({ codeScan: true });
    expect(described).not.toHaveProperty('codeShare');
    const documents = server.engine.documents;
    const [heads] = await documents.indexes(await documents.acquire('doc'), 'retrieval-attention');
    const graphs = heads.map((head) => head as unknown as { graph: RaGraph; keys: HeadKeys });
    const steady = Int32Array.from([...Array(N).keys()].filter(isSteady));
    // At 1% the default exact cap is 3% of the tokens, which is 3k here, the code walk's.
    const opts = walkOptions(0, BUDGET, steady.length, N, { codeScan: true });
    expect(opts).toEqual({ ef: BUDGET, aggregate: 'attention', codeScan: true, maxScanned: Math.ceil(0.03 * N) });
    for (let s = 0; s < STEPS; s++) {
      const r = await attend(sid, queries[s]);
      const rows = r.selection!.map((ids) => Array.from(ids));
      const ref = referenceAttention(queries[s], kv.kValues, kv.vValues, model.qHeads, d, 1 / Math.sqrt(d), rows);
      expect(maxRelError(r.out as Float32Array, ref.out, model.qHeads)).toBeLessThan(1e-5);
      for (const ids of rows) {
        expect(new Set(ids).size).toBe(ids.length);
        expect(ids.filter((t) => !isSteady(t)).length).toBe(BUDGET);
        expect(ids.filter(isSteady).length).toBe(steady.length);
      }
      // The scan scores at most its cap (the sample and the candidates; no list passes it) and reads every code.
      expect(r.stats.scanned).toBeLessThanOrEqual(opts.maxScanned!);
      expect(r.stats.scanned).toBeGreaterThan(0.9 * opts.maxScanned!);
      expect(r.stats.codes).toBe(N);
      if (s > 0) continue;
      // The first step starts from the entry points and the steady zone alone (no last ids yet): the native scan.
      const direct = graphs.map((g, h) => {
        const outIds = new Int32Array(BUDGET), outScores = new Float32Array(BUDGET);
        const res = g.graph.searchSync({ ...g.keys, q: queries[s].subarray(h * d, (h + 1) * d), group: 1, k: BUDGET, outIds, outScores, freeSeeds: steady, ...opts });
        return { ids: Array.from(outIds.subarray(0, res.count)), scanned: res.scanned };
      });
      direct.forEach((x, h) => expect(new Set(rows[h].filter((t) => !isSteady(t)))).toEqual(new Set(x.ids)));
      expect(r.stats.scanned).toBeCloseTo((direct[0].scanned + direct[1].scanned) / 2, 9);
    }
  });

  it('finds more of the exact top-k than the beam capped at the same share scored exactly', async () => {
    await documentReady();
    const scan = await session({ codeScan: true, scanShare: 0.03 });
    const capped = await session({ scanShare: 0.03 });
    let byScan = 0, byBeam = 0;
    for (let s = 0; s < STEPS; s++) {
      const [a, b] = [await attend(scan, queries[s]), await attend(capped, queries[s])];
      for (let h = 0; h < model.kvHeads; h++) {
        const top = exactTop(queries[s], h);
        byScan += Array.from(a.selection![h]).filter((t) => top.has(t)).length;
        byBeam += Array.from(b.selection![h]).filter((t) => top.has(t)).length;
      }
    }
    const of = STEPS * model.kvHeads * BUDGET;
    console.log(`top-${BUDGET} recall at 3% scored exactly: code scan ${(byScan / of).toFixed(3)}, beam capped ${(byBeam / of).toFixed(3)}`);
    expect(byScan).toBeGreaterThan(byBeam);
  });

  it('refuses bad values with 422 and creates nothing', async () => {
    await documentReady();
    const client = live.client();
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ codeScan: 'yes' }, /codeScan must be true or false/],
      [{ codeScan: 1 }, /codeScan must be true or false/],
      [{ codeScan: true, codeWalk: true }, /codeScan and codeWalk are two searches over the codes: set one/],
      [{ codeScan: true, ef: 100 }, /ef 100 sets the beam walk's width; the code scan has none/],
      [{ codeScan: true, codeShare: 0.2 }, /codeShare caps the code walk: set codeWalk: true/],
      [{ codeScan: true, scanShare: 0 }, /scanShare must be a share in \(0, 1\]/],
      [{ codeScan: true, method: 'hnsw' }, /codeScan is an option of retrieval-attention's graph search, not of method hnsw/],
    ];
    const before = (await client.health()).sessions;
    for (const [extra, message] of bad)
      await expect(session(extra)).rejects.toMatchObject({ status: 422, code: 'invalid', message: expect.stringMatching(message) });
    expect((await client.health()).sessions).toBe(before);
  });
});
