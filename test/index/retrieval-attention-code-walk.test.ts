// A retrieval-attention session's code walk (codeWalk: true; index/retrieval-attention.ts,
// walkOptions), through the real server on 127.0.0.1: its answer is float64 attention over
// what it selected; its first step's ids are the native code walk's at the session's options
// on the server's own graph, its scanned and codes those of the search and within its caps;
// on random keys, where decode queries are unlike the prefill queries the graph was built
// from, it finds more of the exact top-k than the beam capped at the same share scored
// exactly; bad values are refused (422) and create nothing. With one q head per kv head the
// ranking is q·k, so the float64 top-k is exact.
import { describe, expect, it } from 'vitest';
import type { RaGraph } from '../../addon/ra-graph.js';
import type { HeadKeys } from '../../index/method.js';
import { DEFAULT_CODE_ADAPT, DEFAULT_CODE_DELTA, DEFAULT_CODE_QUANTILE, DEFAULT_CODE_SHARE, walkOptions } from '../../index/retrieval-attention.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { raCodeSession } from '../helpers/ra-code-session.js';

const { model, N, BUDGET, STEPS, d, live, kv, queries, isSteady, documentReady, session, attend, exactTop } = raCodeSession('retrieval-attention-code-walk');

describe('retrieval-attention session with codeWalk', () => {
  it('answers as float64 attention over its selection; its first ids, scanned and codes are the native code walk\'s within its caps', async () => {
    await documentReady();
    const server = live.server();
    const sid = await session({ codeWalk: true });
    expect(await live.client().getSession(sid)).toMatchObject({ codeWalk: true, codeShare: DEFAULT_CODE_SHARE });
    const documents = server.engine.documents;
    const [heads] = await documents.indexes(await documents.acquire('doc'), 'retrieval-attention');
    const graphs = heads.map((head) => head as unknown as { graph: RaGraph; keys: HeadKeys });
    const steady = Int32Array.from([...Array(N).keys()].filter(isSteady));
    // At 1% the default exact cap is 3% of the tokens, which is 3k here; the codes' 40%.
    const opts = walkOptions(0, BUDGET, steady.length, N, { codeWalk: true, codeShare: DEFAULT_CODE_SHARE });
    expect(opts).toMatchObject({ codeWalk: true, maxScanned: Math.ceil(0.03 * N), maxCodes: Math.ceil(0.4 * N) });
    // The session's cutoff is passed explicitly, at the defaults bench/results/retrieval-code-cut-*-vm.md chose.
    expect(opts).toMatchObject({ codeQuantile: 1, codeDelta: 1, codeAdapt: 2 });
    expect([DEFAULT_CODE_QUANTILE, DEFAULT_CODE_DELTA, DEFAULT_CODE_ADAPT]).toEqual([1, 1, 2]);
    // Either cap may be passed by one round's lists: 16 candidates (codeWidth's default) of at most maxDegree each.
    const slack = 16 * Math.max(...graphs.map((g) => g.graph.maxDegree));
    let total = 0;
    for (let s = 0; s < STEPS; s++) {
      const r = await attend(sid, queries[s]);
      const rows = r.selection!.map((ids) => Array.from(ids));
      const ref = referenceAttention(queries[s], kv.kValues, kv.vValues, model.qHeads, d, 1 / Math.sqrt(d), rows);
      expect(maxRelError(r.out as Float32Array, ref.out, model.qHeads)).toBeLessThan(1e-5);
      for (const ids of rows) {
        expect(new Set(ids).size).toBe(ids.length);
        expect(ids.filter((t) => !isSteady(t)).length).toBeLessThanOrEqual(BUDGET);
        expect(ids.filter(isSteady).length).toBe(steady.length);
      }
      expect(r.stats.scanned).toBeLessThanOrEqual(opts.maxScanned! + slack);
      expect(r.stats.codes).toBeGreaterThan(0);
      expect(r.stats.codes!).toBeLessThanOrEqual(opts.maxCodes! + slack);
      total += r.stats.codes!;
      if (s > 0) continue;
      // The first step starts from the entry points and the steady zone alone (no last ids yet): the native walk.
      const direct = graphs.map((g, h) => {
        const outIds = new Int32Array(BUDGET), outScores = new Float32Array(BUDGET);
        const res = g.graph.searchSync({ ...g.keys, q: queries[s].subarray(h * d, (h + 1) * d), group: 1, k: BUDGET, outIds, outScores, freeSeeds: steady, ...opts });
        return { ids: Array.from(outIds.subarray(0, res.count)), scanned: res.scanned, codes: res.codesRead! };
      });
      direct.forEach((x, h) => expect(new Set(rows[h].filter((t) => !isSteady(t)))).toEqual(new Set(x.ids)));
      expect(r.stats.scanned).toBeCloseTo((direct[0].scanned + direct[1].scanned) / 2, 9);
      expect(r.stats.codes).toBeCloseTo((direct[0].codes + direct[1].codes) / 2, 9);
    }
    const described = await live.client().getSession(sid);
    expect((described as { stats: { codes?: number } }).stats.codes).toBeCloseTo(total, 6);
    // The beam walk reports no codes.
    const beam = await attend(await session({}), queries[0]);
    expect(beam.stats.codes).toBeUndefined();
  });

  it('finds more of the exact top-k than the beam capped at the same share scored exactly', async () => {
    await documentReady();
    const codes = await session({ codeWalk: true, scanShare: 0.03 });
    const capped = await session({ scanShare: 0.03 });
    let byCodes = 0, byBeam = 0, scannedCodes = 0, scannedBeam = 0;
    for (let s = 0; s < STEPS; s++) {
      const [a, b] = [await attend(codes, queries[s]), await attend(capped, queries[s])];
      scannedCodes += a.stats.scanned / STEPS;
      scannedBeam += b.stats.scanned / STEPS;
      for (let h = 0; h < model.kvHeads; h++) {
        const top = exactTop(queries[s], h);
        byCodes += Array.from(a.selection![h]).filter((t) => top.has(t)).length;
        byBeam += Array.from(b.selection![h]).filter((t) => top.has(t)).length;
      }
    }
    const of = STEPS * model.kvHeads * BUDGET;
    console.log(`top-${BUDGET} recall: code walk ${(byCodes / of).toFixed(3)} at ${scannedCodes.toFixed(0)} scanned, beam capped ${(byBeam / of).toFixed(3)} at ${scannedBeam.toFixed(0)}`);
    expect(byCodes).toBeGreaterThanOrEqual(byBeam);
  });

  it('refuses bad values with 422 and creates nothing', async () => {
    await documentReady();
    const client = live.client();
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ codeWalk: 'yes' }, /codeWalk must be true or false/],
      [{ codeWalk: 1 }, /codeWalk must be true or false/],
      [{ codeWalk: true, codeShare: 0 }, /codeShare must be a share in \(0, 1\]/],
      [{ codeWalk: true, codeShare: 1.5 }, /codeShare must be a share/],
      [{ codeWalk: true, codeShare: '0.4' }, /codeShare must be a share/],
      [{ codeShare: 0.2 }, /codeShare caps the code walk: set codeWalk: true/],
      [{ codeWalk: false, codeShare: 0.2 }, /codeShare caps the code walk/],
      [{ scanShare: -0.1 }, /scanShare must be a share in \(0, 1\]/],
      [{ codeWalk: true, scanShare: Number.NaN }, /scanShare must be a share/],
      [{ codeWalk: true, ef: 100 }, /ef 100 sets the beam walk's width/],
      [{ codeWalk: true, method: 'hnsw' }, /codeWalk is an option of retrieval-attention's graph search, not of method hnsw/],
      [{ scanShare: 0.03, method: 'exact', documents: [] }, /scanShare is an option of retrieval-attention/],
    ];
    const before = (await client.health()).sessions;
    for (const [extra, message] of bad)
      await expect(session(extra)).rejects.toMatchObject({ status: 422, code: 'invalid', message: expect.stringMatching(message) });
    expect((await client.health()).sessions).toBe(before);
  });
});
