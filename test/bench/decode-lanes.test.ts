// bench:decode's transports (bench/decode/lanes.ts) against a real server:
// stream, batch, http and stream-spin lanes, each with sessions of its own, sent the
// same steps (new k/v appended every step, selections asked on one layer)
// answer bit for bit alike, method by method; and sameAnswer, the bench's
// check, notices one bit changed in out, lse or a selection; each call is
// recorded by where it stood (back to back, or first after the loop's
// fidelity work), and that first call falls to every session in turn.
import { describe, expect, it } from 'vitest';
import { tensor, type AttendReply } from '../../clients/ts/client.js';
import { Lane, sameAnswer, turnOrder } from '../../bench/decode/lanes.js';
import { turnOf } from '../../bench/decode/loop.js';
import type { Via } from '../../bench/decode/options.js';
import { Run } from '../../bench/decode/run.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`decode-lanes: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const methods = ['exact', 'topk-blocks', 'wave'];
const live = useServer();

describe('bench:decode lanes', () => {
  it('stream, batch, http and stream-spin lanes answer the same steps bit for bit, each session its own', async () => {
    const client = live.client();
    await client.createDocument('doc', model, { methods: methods.filter((m) => m !== 'exact') });
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, 701, model.headDim);
      await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
    }
    await client.sealDocument('doc');
    const steps = 5;
    const vias: Via[] = ['stream', 'batch', 'http', 'stream-spin'];
    const lanes: Lane[] = [];
    for (const via of vias) {
      const runs: Run[] = [];
      for (const method of methods) {
        const { id } = await client.createSession({ model, documents: ['doc'], method, budget: 48, sinks: 4, window: 16 });
        runs.push(new Run(method, id, steps, via));
      }
      lanes.push(await Lane.open(via, runs, client, steps));
    }
    try {
      let compared = 0;
      for (let s = 0; s < steps; s++)
        for (let layer = 0; layer < model.layers; layer++) {
          const kv = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
          const body = { layer, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)), ...kv };
          const replies: Map<Run, AttendReply>[] = [];
          // Layer 1's first exchange stands for the one after layer 0's fidelity work.
          for (const lane of lanes) replies.push(await lane.step(s, body, turnOf(s, layer), (run) => (layer === 0 && run.method !== 'exact' ? ['out', 'selection'] : ['out']), layer === 1));
          for (const [i, lane] of lanes.entries())
            lane.runs.forEach((run, m) => {
              expect(run.error, `${run.method} via ${run.via}`).toBeUndefined();
              const a = replies[0].get(lanes[0].runs[m])!, b = replies[i].get(run)!;
              expect(b.selection?.length ?? 0, `${run.method} via ${run.via} step ${s} layer ${layer}`).toBe(layer === 0 && m > 0 ? model.kvHeads : 0);
              expect(sameAnswer(a, b), `${run.method} via ${run.via} step ${s} layer ${layer}`).toBeUndefined();
              compared++;
            });
          // The methods differ from each other (a lane that mixed up its sessions' answers would not pass the check above).
          expect(sameAnswer(replies[0].get(lanes[0].runs[0])!, replies[0].get(lanes[0].runs[1])!)).toBeDefined();
        }
      expect(compared).toBe(steps * model.layers * vias.length * methods.length);
      for (const lane of lanes)
        for (const run of lane.runs) {
          expect(run.perToken().length, `${run.method} via ${run.via}`).toBe(steps);
          // Each call's wall time holds its server time (via batch: its own plus the batch's RPC).
          for (let s = 0; s < steps; s++) expect(run.wall[s]).toBeGreaterThanOrEqual(run.server[s]);
        }
      // Each call is recorded by where it stood: on layer 1 the first session in the turn's order came after
      // the work (every session of a batch lane: one exchange), the rest back to back; layer 0 asked the selection.
      for (const lane of lanes)
        lane.runs.forEach((run) => {
          const kinds = run.calls.map((c) => c.kind);
          const want = [...Array(steps).keys()].flatMap((s) => {
            const first = turnOrder(lane.runs, turnOf(s, 1))[0] === run;
            return [run.method === 'exact' ? 'plain' : 'sampled', first || lane.via === 'batch' ? 'afterWork' : 'plain'];
          });
          expect(kinds, `${run.method} via ${run.via}`).toEqual(want);
          const calls = run.result(1, model.layers).latency.calls!;
          expect(calls.afterWork.calls + calls.plain.calls + calls.sampled.calls).toBe(steps * model.layers);
          for (const k of ['plain', 'sampled', 'afterWork'] as const)
            if (calls[k].calls > 0) expect(calls[k].rpcP50Ms, `${run.method} via ${run.via} ${k}`).toBeGreaterThanOrEqual(0);
        });
      const batch = lanes[1].summary()!;
      expect(batch.size).toBe(methods.length);
      expect(batch.perTokenMs.length).toBe(steps);
      expect(batch.rpcMs).toBeGreaterThan(0);
      expect(lanes[0].summary()).toBeUndefined();
    } finally {
      for (const lane of lanes) lane.close();
    }
  });

  it('gives the call after a sampled layer\'s fidelity work to every session in turn, whatever the layers and sessions', () => {
    // With s × layers + l, 2 layers and 2 sessions gave it to the second session every step (the H100 run of
    // session 16: every plain wave call came cold). Counted over the loop's sequence of (step, layer).
    for (let layers = 1; layers <= 6; layers++)
      for (let sessions = 1; sessions <= 5; sessions++)
        for (const sampled of new Set([0, layers - 1])) {
          const ids = [...Array(sessions).keys()], count = new Array<number>(sessions).fill(0);
          let afterWork = false;
          for (let s = 0; s < 4 * sessions + 1; s++)
            for (let l = 0; l < layers; l++) {
              if (afterWork) count[turnOrder(ids, turnOf(s, l))[0]]++;
              afterWork = l === sampled;
            }
          const what = `${layers} layers, ${sessions} sessions, layer ${sampled} sampled: ${count.join(' ')}`;
          expect(Math.min(...count), what).toBeGreaterThanOrEqual(4);
          expect(Math.max(...count) - Math.min(...count), what).toBeLessThanOrEqual(1);
        }
    expect(turnOrder(['a', 'b', 'c'], 0)).toEqual(['a', 'b', 'c']);
    expect(turnOrder(['a', 'b', 'c'], 4)).toEqual(['b', 'c', 'a']);
  });

  it('sameAnswer notices one bit changed in out, lse or a selection', () => {
    const reply = (): AttendReply => ({
      out: Float32Array.from({ length: 64 }, (_, i) => Math.sin(i + 1)),
      outDtype: 'f32',
      lse: Float32Array.from({ length: 8 }, (_, i) => i + 0.5),
      selection: [Int32Array.from([3, 9, 27]), Int32Array.from([1, 2])],
      stats: { tokens: 30, attended: 3, scanned: 30, ms: 1, selectMs: 0, attendMs: 0, backend: 'cpu' },
    });
    const flip = (a: ArrayBufferView, at: number) => void (new Uint8Array(a.buffer, a.byteOffset, a.byteLength)[at] ^= 1);
    expect(sameAnswer(reply(), reply())).toBeUndefined();
    const out = reply();
    flip(out.out, 255);
    expect(sameAnswer(reply(), out)).toMatch(/^out differs/);
    const lse = reply();
    flip(lse.lse, 0);
    expect(sameAnswer(reply(), lse)).toBe('lse differs');
    const sel = reply();
    flip(sel.selection![1], 4);
    expect(sameAnswer(reply(), sel)).toBe('selection of kv head 1 differs');
    const none = reply();
    delete none.selection;
    expect(sameAnswer(reply(), none)).toBe('selection returned by one only');
  });
});
