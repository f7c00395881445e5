// A stream keeps the stacked frames' forms it ran (api/stacked.ts,
// StackedForms): a frame sent again, the same bytes but the id, runs on the
// form kept. Through the real server on 127.0.0.1 with real files in
// /dev/shm: the same frame per layer, round after round, with new q, k, v
// and positions written into the segment each time, answers as the byte
// form's single attends on twin sessions, bit for bit (a form that kept a
// round's positions would be refused 409 by the next append); after another
// segment is attached the same frame reads and writes that one, and the
// first is left as it was. StackedForms alone: a frame matches the form
// kept for its bytes but the id, in any width, on the segment kept for,
// and no other; a form with tensors sent as data (views of its message,
// whose buffer may be reused) is not kept; past 4096 rows kept, all are
// dropped and learned again.
import { Packr } from 'msgpackr';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tensor } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';
import { errorOf as err, RawStream, removeShmFiles, Segment } from '../helpers/shm-stream.js';
import { StackedForms, type StackedForm } from '../../api/stacked.js';

const seed = freshSeed();
console.log(`stream-stacked-forms: seed ${seed}`);
const model = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const { qHeads: H, kvHeads: KVH, headDim: D } = model;
const rng = new Rng(seed);
const packr = new Packr({ useRecords: false });
const live = useServer();
const N = 3;
// Where the frame's tensors and answers lie in a segment (the same for every frame).
const [qAt, kAt] = [0, N * H * D * 4];
const vAt = kAt + N * KVH * D * 2, posAt = vAt + N * KVH * D * 2, into = 16_384, lseAt = into + N * H * D * 4;
const ref = (dtype: string, shape: number[], at: number) => ({ dtype, shape, at });
const frameOf = (layer: number, sessions: string[]) => ({
  layer, sessions, q: ref('f32', [N, H, D], qAt), k: ref('f16', [N, KVH, D], kAt), v: ref('f16', [N, KVH, D], vAt), positions: ref('i32', [N], posAt), into,
});

beforeAll(async () => {
  const client = live.client();
  await client.createDocument('doc', model, {});
  for (let layer = 0; layer < model.layers; layer++) {
    const c = randomKv(rng, 'f16', model.kvHeads, 301, model.headDim);
    await client.uploadDocumentKv('doc', { layer, start: 0, k: c.k, v: c.v });
  }
  await client.sealDocument('doc');
});
afterAll(() => removeShmFiles());

const sessionsOf = (n: number) => Promise.all(Array.from({ length: n }, async () => (await live.client().createSession({ model, documents: ['doc'], method: 'exact' })).id));

/** New steps written into `seg` where the frame reads them (positions all `position`); the steps. */
function writeSteps(seg: Segment, position: number) {
  const steps = Array.from({ length: N }, () => ({ q: tensor('f32', [H, D], randomQ(rng, H, D)), ...asStep(randomKv(rng, 'f16', KVH, 1, D)) }));
  const join = (name: 'q' | 'k' | 'v') => Buffer.concat(steps.map((st) => Buffer.from((st[name] as Tensor).data)));
  seg.put(tensor('f32', [N, H, D], join('q')), qAt);
  seg.put(tensor('f16', [N, KVH, D], join('k')), kAt);
  seg.put(tensor('f16', [N, KVH, D], join('v')), vAt);
  seg.put(tensor('i32', [N], new Uint8Array(new Int32Array(N).fill(position).buffer)), posAt);
  return steps;
}

/** The twin sessions' single attends over HTTP match the stacked answer in `seg`, bit for bit. */
async function expectAnswered(seg: Segment, answer: Record<string, unknown>, twins: string[], layer: number, position: number, steps: ReturnType<typeof writeSteps>) {
  expect(err(answer).code, err(answer).message).toBe('ok');
  expect(answer.errors).toBeUndefined();
  for (let i = 0; i < N; i++) {
    const r = await live.client().attend(twins[i], { layer, ...steps[i], position });
    expect(seg.read(into + i * H * D * 4, H * D * 4).equals(Buffer.from(r.out.buffer, r.out.byteOffset, r.out.byteLength)), `step ${i}`).toBe(true);
    expect(seg.read(lseAt + i * H * 4, H * 4).equals(Buffer.from(r.lse.buffer, r.lse.byteOffset, r.lse.byteLength)), `step ${i}`).toBe(true);
  }
}

describe("a stream's stacked forms", () => {
  it('the same frame again, per layer and round, runs on what the segment holds now; another segment attached is read instead', async () => {
    const [a, b] = [new Segment(1 << 16), new Segment(1 << 16)];
    const s = await RawStream.open(live.port());
    try {
      await s.call({ shm: { name: a.name, bytes: a.bytes } });
      const [stacked, twins] = [await sessionsOf(N), await sessionsOf(N)];
      for (let position = 0; position < 3; position++)
        for (let layer = 0; layer < model.layers; layer++) {
          const steps = writeSteps(a, position);
          await expectAnswered(a, await s.call(frameOf(layer, stacked)), twins, layer, position, steps);
        }
      await s.call({ shm: { name: b.name, bytes: b.bytes } });
      const before = a.read(0, a.bytes);
      for (let layer = 0; layer < model.layers; layer++) {
        const steps = writeSteps(b, 3);
        await expectAnswered(b, await s.call(frameOf(layer, stacked)), twins, layer, 3, steps);
      }
      expect(a.read(0, a.bytes).equals(before)).toBe(true);
    } finally {
      s.close();
    }
  });

  it('matches the bytes but the id (in any width) on the segment kept for; not another layer, segment or frame', () => {
    const forms = new StackedForms();
    const pack = (body: Record<string, unknown>) => new Uint8Array(packr.pack(body));
    const body = (id: number, layer = 0) => ({ id, ...frameOf(layer, ['s0', 's1', 's2']) });
    const [segA, segB] = [{}, {}];
    // As runStacked reads it: only `cached` matters to the keeping.
    const form = { cached: true, names: ['s0', 's1', 's2'] } as StackedForm;
    forms.keep(pack(body(1)), segA, form);
    for (const id of [0, 5, 200, 60_000, 4_000_000_000]) expect(forms.match(pack(body(id)), segA)).toEqual({ id, form });
    expect(forms.match(pack(body(1, 1)), segA)).toBeUndefined();
    expect(forms.match(pack(body(1)), segB)).toBeUndefined();
    expect(forms.match(pack({ ...body(1), outDtype: 'f16' }), segA)).toBeUndefined();
    // The id not first, or not an unsigned integer: neither kept nor matched.
    const { id: _, ...rest } = body(1);
    forms.keep(pack({ ...rest, id: 1 }), segA, form);
    expect(forms.match(pack({ ...rest, id: 1 }), segA)).toBeUndefined();
    expect(forms.match(pack({ ...body(1), id: -1 }), segA)).toBeUndefined();
    // A form with tensors sent as data (views of its message) is not kept.
    const fresh = new StackedForms();
    fresh.keep(pack(body(1)), segA, { cached: false } as StackedForm);
    expect(fresh.match(pack(body(2)), segA)).toBeUndefined();
    // Kept for another segment: those of the first are dropped.
    forms.keep(pack(body(1, 1)), segB, form);
    expect(forms.match(pack(body(2)), segA)).toBeUndefined();
    expect(forms.match(pack(body(2, 1)), segB)).toEqual({ id: 2, form });
    // Past 4096 rows kept, all are dropped and learned again: 1365 forms of 3 rows, then one more.
    const capped = new StackedForms();
    for (let layer = 0; layer < 1365; layer++) capped.keep(pack(body(1, layer)), segA, form);
    expect(capped.match(pack(body(2, 0)), segA)).toEqual({ id: 2, form });
    capped.keep(pack(body(1, 1365)), segA, form);
    expect(capped.match(pack(body(2, 0)), segA)).toBeUndefined();
    expect(capped.match(pack(body(2, 1365)), segA)).toEqual({ id: 2, form });
  });
});
