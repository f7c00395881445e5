// Without question rows of its own, an infiniretri session's question is
// its decode steps' rows (the step memo). A step that fails after its
// select (here refused 422 for scores that overflow float32) leaves that
// memo as it was, so its retry counts the row once: the memo holds the same
// rows as a twin that never saw the failure, before and after the ring of
// STEP_ROWS rows wraps (the add then overwrote the oldest row, which the
// failure must restore), and the answers stay bit for bit the twin's.
import { describe, expect, it } from 'vitest';
import { decodeStep } from '../../engine/decode-step.js';
import { Session } from '../../engine/session.js';
import { DEFAULT_PARAMS } from '../../engine/sessions.js';
import { infiniretri, STEP_ROWS } from '../../index/infiniretri.js';
import { UNLIMITED } from '../../storage/host-budget.js';
import { parseModel } from '../../core/model.js';
import { asStep, randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
const model = parseModel({ layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' });
const G = model.qHeads / model.kvHeads;
type Request = Parameters<typeof decodeStep>[1];
// The memo's step rows as the method reads them: per kv head, [steps·G, headDim] f32.
type StepRows = { steps: number; question(group: number): (h: number) => { queries: Float32Array; queryCount: number } };

const open = (id: string) => new Session({ id, model, documents: [], method: infiniretri, params: DEFAULT_PARAMS, documentIndexes: [], budget: UNLIMITED });
const memoOf = (s: Session) => s.context(0).memo.get('infiniretri-steps') as StepRows;
const rowsOf = (s: Session) => {
  const rows = memoOf(s);
  const hex = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');
  return [rows.steps, ...Array.from({ length: model.kvHeads }, (_, h) => hex(rows.question(G)(h).queries))];
};

describe(`infiniretri: a failed step leaves the step memo as it was (seed ${seed})`, () => {
  it('the retry counts its row once, before and after the step rows wrap', async () => {
    const rng = new Rng(seed);
    const [s, twin] = [open('s'), open('twin')];
    const failAt = new Set([3, STEP_ROWS + 44]);
    for (let position = 0; position < STEP_ROWS + 50; position++) {
      const { k, v } = asStep(randomKv(rng, 'f16', model.kvHeads, 1, model.headDim));
      const req: Request = { layer: 0, q: Float32Array.from({ length: model.qHeads * model.headDim }, () => rng.normal()), k: k as Request['k'], v: v as Request['v'], scale: 0.25, want: new Set(['out']), position };
      if (failAt.has(position)) {
        const before = rowsOf(s);
        // q 10^4 times larger as well: at scale 1e38 a logit overflows unless every |q·k| < 3.4e-4 (a few keys: 1e38
        // alone left them all below 3.4 for seed 1033613195).
        await expect(decodeStep(s, { ...req, q: req.q.map((x) => x * 1e4), scale: 1e38 })).rejects.toThrow(/overflow/);
        expect(rowsOf(s)).toEqual(before);
        expect(s.own[0].tokens).toBe(position);
      }
      const [a, b] = [await decodeStep(s, req), await decodeStep(twin, req)];
      expect(Buffer.from(a.out.buffer)).toEqual(Buffer.from(b.out.buffer));
      expect(rowsOf(s)).toEqual(rowsOf(twin));
    }
    expect(memoOf(s).steps).toBe(STEP_ROWS + 50);
  });
});
