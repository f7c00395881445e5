// A decode step appends its token before it selects and attends; a step
// that fails after the append (a device or kernel error, here a method that
// throws) leaves the session as it was: its own tokens are the same, a
// retry at the same `position` is taken, and the session then answers as a
// twin that never saw the failure, equal to float64 attention.
import { describe, expect, it } from 'vitest';
import { decodeStep } from '../../engine/decode-step.js';
import { Session } from '../../engine/session.js';
import { DEFAULT_PARAMS } from '../../engine/sessions.js';
import { exact } from '../../index/exact.js';
import type { RetrievalMethod } from '../../index/method.js';
import { UNLIMITED } from '../../storage/host-budget.js';
import { parseModel } from '../../core/model.js';
import { asStep, concatValues, randomKv, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
const model = parseModel({ layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' });
type Request = Parameters<typeof decodeStep>[1];

describe(`a step that fails after its append (seed ${seed})`, () => {
  it('takes the token back: the retry at the same position is taken, and the answers are those of a twin', async () => {
    const rng = new Rng(seed);
    let failing = false;
    const flaky: RetrievalMethod = {
      name: 'exact',
      select: (ctx, q, p) => (failing ? Promise.reject(new Error('device error')) : exact.select(ctx, q, p)),
    };
    const open = (id: string, method: RetrievalMethod) => new Session({ id, model, documents: [], method, params: DEFAULT_PARAMS, documentIndexes: [], budget: UNLIMITED });
    const [s, twin] = [open('s', flaky), open('twin', exact)];
    const chunks: KvChunk[] = [];
    const request = (c: KvChunk, position: number): Request => {
      const { k, v } = asStep(c);
      return { layer: 1, q: Float32Array.from({ length: 64 }, () => rng.normal()), k: k as Request['k'], v: v as Request['v'], scale: 0.25, want: new Set(['out']), position };
    };
    for (let position = 0; position < 5; position++) {
      const c = randomKv(rng, 'f16', 2, 1, 16);
      const req = request(c, position);
      if (position === 3) {
        failing = true;
        await expect(decodeStep(s, req)).rejects.toThrow('device error');
        expect(s.own[1].tokens).toBe(3);
        failing = false;
      }
      chunks.push(c);
      const [a, b] = [await decodeStep(s, req), await decodeStep(twin, req)];
      expect(a.stats.tokens).toBe(position + 1);
      expect(Buffer.from(a.out.buffer)).toEqual(Buffer.from(b.out.buffer));
      const ref = referenceAttention(req.q, concatValues(chunks, 'kValues'), concatValues(chunks, 'vValues'), 4, 16, 0.25);
      expect(maxRelError(a.out, ref.out, 4)).toBeLessThan(1e-5);
    }
    expect(s.own.map((o) => o.tokens)).toEqual([0, 5]);
    expect(s.stats.steps).toBe(5);
  });
});
