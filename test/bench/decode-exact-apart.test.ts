// bench:decode --exact apart (bench/decode/loop.ts decodeSteps with
// exactApart) against a real server: the exact sessions of the single-call
// lanes decode every step and layer first, alone, and only then do the
// other methods' sessions step, while a batch lane keeps exact in its
// batches; and every figure the loop derives from the answers (each
// method's output error against exact's reply, the lanes' bit-for-bit
// check) is what the interleaved order gives for the same steps.
import { describe, expect, it } from 'vitest';
import { Lane } from '../../bench/decode/lanes.js';
import type { LayerDecode } from '../../bench/decode/layer-data.js';
import { decodeSteps, type DecodePlan } from '../../bench/decode/loop.js';
import type { Via } from '../../bench/decode/options.js';
import { Run } from '../../bench/decode/run.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`decode-exact-apart: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const methods = ['exact', 'topk-blocks', 'wave'];
const vias: Via[] = ['stream', 'batch'];
const steps = 4, tokens = 701;
const live = useServer();

/** Each layer's decode data: per step a q and the new token's k, v as f16 words. */
function decodeData(): LayerDecode[] {
  const words = (t: { data: Uint8Array }) => new Uint16Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 2);
  return Array.from({ length: model.layers }, () => {
    const ld: LayerDecode = { q: [], k: [], v: [], needles: [] };
    for (let s = 0; s < steps; s++) {
      const c = randomKv(rng, 'f16', model.kvHeads, 1, model.headDim);
      ld.q.push(randomQ(rng, model.qHeads, model.headDim));
      ld.k.push(words(c.k));
      ld.v.push(words(c.v));
    }
    return ld;
  });
}

describe('bench:decode --exact apart', () => {
  it('decodes the single-call lanes\' exact sessions first and alone, and derives the same figures as interleaved', async () => {
    const client = live.client();
    await client.createDocument('doc', model, { methods: methods.filter((m) => m !== 'exact') });
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, tokens, model.headDim);
      await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
    }
    await client.sealDocument('doc');
    const plan: DecodePlan = { shape: model, tokens, steps, budgetTokens: 48, decodeData: decodeData(), samples: [] };
    const order: string[] = [];
    const decode = async (exactApart: boolean) => {
      const lanes: Lane[] = [];
      for (const via of vias) {
        const runs: Run[] = [];
        for (const method of methods) {
          const { id } = await client.createSession({ model, documents: ['doc'], method, budget: 48, sinks: 4, window: 16 });
          const run = new Run(method, id, steps, via);
          // The loop's sequence of calls, as recorded.
          const record = run.record.bind(run);
          run.record = (...a) => (order.push(`${via}:${method}`), record(...a));
          runs.push(run);
        }
        lanes.push(await Lane.open(via, runs, client, steps));
      }
      order.length = 0;
      try {
        await decodeSteps({ ...plan, exactApart }, lanes);
      } finally {
        for (const lane of lanes) lane.close();
      }
      return { lanes, order: [...order] };
    };
    const apart = await decode(true);
    const interleaved = await decode(false);
    const calls = steps * model.layers;
    // Apart: the stream lane's exact calls all come first; the batch lane's exact steps are in its batches, so after them.
    expect(apart.order.slice(0, calls)).toEqual(new Array(calls).fill('stream:exact'));
    expect(apart.order.filter((x) => x === 'stream:exact').length).toBe(calls);
    const rest = apart.order.slice(calls);
    expect(rest.filter((x) => x === 'batch:exact').length).toBe(calls);
    expect(rest.filter((x) => x.startsWith('stream:')).length).toBe(calls * (methods.length - 1));
    // Interleaved: the stream lane's exact calls are spread over the whole decode, as before.
    expect(interleaved.order.slice(0, calls).every((x) => x === 'stream:exact')).toBe(false);
    for (const [i, lane] of apart.lanes.entries())
      lane.runs.forEach((run, m) => {
        const other = interleaved.lanes[i].runs[m];
        expect(run.error ?? other.error, `${run.method} via ${run.via}`).toBeUndefined();
        expect(run.perToken().length, `${run.method} via ${run.via}`).toBe(steps);
        expect(run.calls.length).toBe(calls);
        // The answers are the same whatever the order, so is every error figure; and the lanes agreed bit for bit.
        expect(run.outErr, `${run.method} via ${run.via}`).toEqual(other.outErr);
        expect(run.outErr.length).toBe(m === 0 ? 0 : calls);
        expect(run.mismatches + other.mismatches, `${run.method} via ${run.via}`).toBe(0);
      });
    // The methods are not exact (an error of 0 would show nothing was compared).
    expect(Math.max(...apart.lanes[0].runs[1].outErr)).toBeGreaterThan(0);
  });
});
