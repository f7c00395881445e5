// The batch answer written straight into its frame as its steps finish, in
// any order (api/batch-pack.ts BatchFrame), is byte for byte what the
// generic packer makes of the same answer objects (packParts of {id,
// results: batchAnswer(...), stats: {ms}}; one attend's: of {id,
// ...attendAnswer(r)}), at every
// size boundary its forms cross (counts, shapes, numbers, data lengths and
// the tensor padding); answers it does not cover are left to packParts.
import { describe, expect, it } from 'vitest';
import { attendAnswer, batchAnswer } from '../../api/attend-answer.js';
import { BatchFrame, HEADER_ROOM, packAttendAnswer, packStackedAnswer } from '../../api/batch-pack.js';
import { errorOf } from '../../api/errors.js';
import { joinParts, packParts } from '../../core/msgpack-parts.js';
import type { AnswerRefs } from '../../api/shm.js';
import type { AttendAnswer } from '../../engine/sessions.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`batch-pack: seed ${seed}`);
const rng = new Rng(seed);

const NUMBERS = [0, 1, 31, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, 0.5, -2.25, 1e300, Number.NaN, 3.0000001];
const pick = <T>(xs: readonly T[]): T => xs[rng.int(xs.length)];

function answer(qHeads: number, headDim: number, dtype: 'f32' | 'f16' | 'bf16'): AttendAnswer {
  const out = Float32Array.from({ length: qHeads * headDim }, () => rng.normal());
  // Each array at a random offset of a larger buffer: the packed bytes are the view's, not the buffer's.
  const lseBuf = new Float32Array(qHeads + 3);
  const at = rng.int(4);
  const lse = lseBuf.subarray(at, at + qHeads);
  lse.set(Float32Array.from({ length: qHeads }, () => rng.normal()));
  const stats: Record<string, unknown> = { tokens: pick(NUMBERS), attended: pick(NUMBERS), scanned: pick(NUMBERS), ms: rng.next() * 90, backend: pick(['cpu', 'gpu', 'x'.repeat(31)]) };
  if (rng.next() < 0.3) stats.estimated = pick(NUMBERS);
  if (rng.next() < 0.3) stats.gone = undefined;
  const words = dtype === 'f32' ? undefined : Uint16Array.from({ length: out.length }, () => rng.int(65536));
  return { out, lse, stats, model: { layers: 1, qHeads, kvHeads: 1, headDim, dtype: 'f16' }, outDtype: dtype, ...(words && { outWords: words }) } as unknown as AttendAnswer;
}

const fulfilled = (value: AttendAnswer): PromiseSettledResult<AttendAnswer> => ({ status: 'fulfilled', value });

/** What the stream sends without the packer: the answer objects through packParts, joined. */
function generic(id: unknown, results: PromiseSettledResult<AttendAnswer>[], ms: number): Buffer {
  const parts = packParts({ id, results: results.map((r) => batchAnswer(r, errorOf)), stats: { ms } });
  return Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength)));
}

/** Where a step's out and lse went in shared memory (api/shm.ts), at offsets across the number forms. */
function refsOf(r: AttendAnswer): AnswerRefs {
  const at = pick([0, 4, 124, 128, 256, 65532, 65536, 2 ** 32 - 4, 2 ** 32, 16 * 2 ** 30 - 4]);
  return { out: { dtype: r.outDtype, shape: [r.model.qHeads, r.model.headDim], at }, lse: { dtype: 'f32', shape: [r.model.qHeads], at: at + 4 * r.out.length } };
}

/** Indices 0..n-1 in a random order: the order the steps finish in. */
function shuffled(n: number): number[] {
  const xs = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [xs[i], xs[j]] = [xs[j], xs[i]];
  }
  return xs;
}

/** The frame BatchFrame writes when the fulfilled steps finish in `order` (random unless given), or undefined when it leaves the answer to packParts. */
function packed(id: unknown, results: PromiseSettledResult<AttendAnswer>[], ms: number, order = shuffled(results.length), refs: (AnswerRefs | undefined)[] = []): Buffer | undefined {
  const frame = new BatchFrame(id);
  for (const i of order) {
    const r = results[i];
    if (r.status === 'fulfilled') frame.step(i, results.length, r.value, refs[i]);
  }
  const ready = frame.finish(results, ms);
  if (!ready) return undefined;
  const bytes = Buffer.from(ready.buf.subarray(HEADER_ROOM, HEADER_ROOM + ready.byteLength));
  ready.release();
  return bytes;
}

describe('BatchFrame', () => {
  it('writes the bytes packParts writes for the same answer, whatever order the steps finish in', () => {
    const shapes: [number, number][] = [[1, 1], [1, 3], [2, 5], [32, 128], [15, 16], [16, 17], [127, 2], [128, 3], [255, 1], [256, 1], [3, 300], [40, 1700], [2, 65536 / 2 + 1]];
    for (let trial = 0; trial < 80; trial++) {
      const [qHeads, headDim] = pick(shapes).map(Math.floor) as [number, number];
      const count = pick([1, 2, 15, 16, 17, 32]);
      const results = Array.from({ length: count }, () => fulfilled(answer(qHeads, headDim, pick(['f32', 'f16', 'bf16'] as const))));
      const id = pick([undefined, 1, 7, 127, 128, 70000, 2 ** 40, -5, 0.25, 'abc', '']);
      const ms = pick([rng.next() * 100, 3, 0]);
      const mine = packed(id, results, ms);
      expect(mine, `trial ${trial}`).toBeDefined();
      expect(mine!.equals(generic(id, results, ms)), `trial ${trial}: ${qHeads}x${headDim}, ${count} steps, id ${String(id)}`).toBe(true);
    }
  });

  it('writes steps answered into shared memory ({dtype, shape, at} for out and lse) as packParts writes them, beside steps answered with bytes', () => {
    for (let trial = 0; trial < 60; trial++) {
      const [qHeads, headDim] = pick([[1, 1], [8, 32], [32, 128], [16, 17], [128, 3], [40, 1700]] as [number, number][]);
      const count = pick([1, 2, 16, 17, 32]);
      const results = Array.from({ length: count }, () => fulfilled(answer(qHeads, headDim, pick(['f32', 'f16', 'bf16'] as const))));
      const refs = results.map((r) => (rng.next() < 0.7 ? refsOf((r as PromiseFulfilledResult<AttendAnswer>).value) : undefined));
      const id = pick([undefined, 1, 70000, 'abc']);
      const mine = packed(id, results, 1.25, shuffled(count), refs);
      const parts = packParts({ id, results: results.map((r, i) => ({ ...batchAnswer(r, errorOf), ...refs[i] })), stats: { ms: 1.25 } });
      expect(mine!.equals(Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength)))), `trial ${trial}`).toBe(true);
    }
  });

  it('grows its buffer when later steps are larger than the first (sessions of other shapes)', () => {
    for (let trial = 0; trial < 20; trial++) {
      const small = fulfilled(answer(1, 3, 'f16'));
      const results = [small, ...Array.from({ length: 1 + rng.int(16) }, () => fulfilled(answer(pick([32, 40]), pick([128, 1700]), pick(['f32', 'f16'] as const))))];
      const id = pick([undefined, 9, 'abc']);
      // The small step first: the frame's room, sized from it, is far too small for the rest.
      const mine = packed(id, results, 2.5, [0, ...shuffled(results.length - 1).map((i) => i + 1)]);
      expect(mine!.equals(generic(id, results, 2.5)), `trial ${trial}`).toBe(true);
    }
  });

  it('packs the HTTP answer (no id) as packParts packs it', () => {
    const results = [fulfilled(answer(32, 128, 'f16')), fulfilled(answer(32, 128, 'f32'))];
    const parts = packParts({ results: results.map((r) => batchAnswer(r, errorOf)), stats: { ms: 1.5 } });
    expect(packed(undefined, results, 1.5)!.equals(Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength))))).toBe(true);
  });

  it('leaves failed steps, selections, kv, nested stats and unusual ids to packParts', () => {
    const good = () => fulfilled(answer(4, 8, 'f32'));
    const rejected: PromiseSettledResult<AttendAnswer> = { status: 'rejected', reason: new Error('boom') };
    expect(packed(1, [good(), rejected], 1)).toBeUndefined();
    expect(packed(1, [rejected, good(), good()], 1)).toBeUndefined();
    const withSelection = answer(4, 8, 'f32');
    withSelection.selection = [new Int32Array([1, 2])];
    expect(packed(1, [good(), fulfilled(withSelection)], 1)).toBeUndefined();
    const nested = answer(4, 8, 'f32');
    (nested.stats as unknown as Record<string, unknown>).gpu = { ms: 1 };
    expect(packed(1, [fulfilled(nested)], 1)).toBeUndefined();
    const unrounded = answer(4, 8, 'f16');
    delete unrounded.outWords;
    expect(packed(1, [fulfilled(unrounded)], 1)).toBeUndefined();
    // Stats are read with for...in: a key inherited from a prototype (which packParts, by Object.keys, leaves out) must not be written.
    const inherited = answer(4, 8, 'f32');
    inherited.stats = Object.assign(Object.create({ inherited: 1 }) as object, inherited.stats) as AttendAnswer['stats'];
    expect(packed(1, [good(), fulfilled(inherited)], 1)).toBeUndefined();
    const longString = answer(4, 8, 'f32');
    (longString.stats as unknown as Record<string, unknown>).backend = 'x'.repeat(32);
    expect(packed(1, [fulfilled(longString)], 1)).toBeUndefined();
    expect(packed('é', [good()], 1)).toBeUndefined();
    expect(packed('x'.repeat(32), [good()], 1)).toBeUndefined();
    expect(packed({ a: 1 }, [good()], 1)).toBeUndefined();
    expect(packed(1, [good()], 1)).toBeDefined();
  });
});

describe('packAttendAnswer', () => {
  const bytes = (p: { byteLength: number; fill: (t: Uint8Array) => void }) => {
    const buf = new Uint8Array(p.byteLength);
    p.fill(buf);
    return Buffer.from(buf);
  };
  const generic1 = (id: unknown, r: AttendAnswer) => {
    const parts = packParts({ id, ...attendAnswer(r) });
    return Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength)));
  };

  it('writes the bytes packParts writes for the same answer', () => {
    const shapes: [number, number][] = [[1, 1], [1, 3], [2, 5], [32, 128], [15, 16], [16, 17], [127, 2], [128, 3], [255, 1], [256, 1], [3, 300], [40, 1700], [2, 65536 / 2 + 1]];
    for (let trial = 0; trial < 120; trial++) {
      const [qHeads, headDim] = pick(shapes);
      const r = answer(qHeads, headDim, pick(['f32', 'f16', 'bf16'] as const));
      const id = pick([undefined, 1, 7, 127, 128, 70000, 2 ** 40, -5, 0.25, Number.NaN, 'abc', '', 'x'.repeat(31)]);
      // A quality-sampled call's selection (heads and lengths across the array and bin size forms), and the GPU
      // backend's or a block pool's nested stats.
      if (rng.next() < 0.5) r.selection = Array.from({ length: pick([1, 2, 8, 15, 16, 17]) }, () => Int32Array.from({ length: pick([0, 1, 63, 64, 16383, 16384, 20000]) }, () => rng.int(2 ** 31) - 2 ** 30));
      const st = r.stats as unknown as Record<string, unknown>;
      if (rng.next() < 0.5) st.gpu = { residentMs: rng.next(), copies: pick(NUMBERS), device: 'x'.repeat(rng.int(32)), gone: undefined };
      if (rng.next() < 0.5) st.blocks = { selected: pick(NUMBERS), hits: pick(NUMBERS), bytesIn: pick(NUMBERS), deep: { deeper: { n: pick(NUMBERS) } } };
      if (rng.next() < 0.3) st.flag = rng.next() < 0.5;
      const mine = packAttendAnswer(id, r);
      expect(mine, `trial ${trial}`).toBeDefined();
      expect(bytes(mine!).equals(generic1(id, r)), `trial ${trial}: ${qHeads}x${headDim}, id ${String(id)}, ${r.selection?.length ?? 0} selection heads`).toBe(true);
      // Answered into shared memory: out and lse as {dtype, shape, at}, the rest as before.
      const refs = refsOf(r);
      const parts = packParts({ id, ...attendAnswer(r), ...refs });
      expect(bytes(packAttendAnswer(id, r, refs)!).equals(Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength)))), `trial ${trial} refs`).toBe(true);
    }
  });

  it('leaves kv, stats nested too deep or holding other things, unrounded 16-bit outs and unusual ids to packParts', () => {
    const withKv = answer(4, 8, 'f32');
    withKv.kv = { k: [new Uint16Array(8)], v: [new Uint16Array(8)] };
    expect(packAttendAnswer(1, withKv)).toBeUndefined();
    const tooDeep = answer(4, 8, 'f32');
    (tooDeep.stats as unknown as Record<string, unknown>).a = { b: { c: { d: { e: 1 } } } };
    expect(packAttendAnswer(1, tooDeep)).toBeUndefined();
    for (const odd of [[1, 2], { data: 1 }, { dtype: 'f32', shape: [1], data: new Uint8Array(4) }, { s: 'é' }, null, new Float32Array(2)]) {
      const r = answer(4, 8, 'f32');
      (r.stats as unknown as Record<string, unknown>).odd = odd;
      expect(packAttendAnswer(1, r), JSON.stringify(odd)).toBeUndefined();
    }
    const unrounded = answer(4, 8, 'f16');
    delete unrounded.outWords;
    expect(packAttendAnswer(1, unrounded)).toBeUndefined();
    const inherited = answer(4, 8, 'f32');
    inherited.stats = Object.assign(Object.create({ inherited: 1 }) as object, inherited.stats) as AttendAnswer['stats'];
    expect(packAttendAnswer(1, inherited)).toBeUndefined();
    for (const id of ['é', 'x'.repeat(32), { a: 1 }, [1], null, true]) expect(packAttendAnswer(id, answer(4, 8, 'f32')), String(id)).toBeUndefined();
    expect(packAttendAnswer(1, answer(4, 8, 'f32'))).toBeDefined();
  });
});

describe('packStackedAnswer', () => {
  it('writes the bytes packParts writes for a stacked batch answer (api/stacked.ts)', () => {
    for (let trial = 0; trial < 300; trial++) {
      const id = pick([undefined, ...NUMBERS.filter(Number.isSafeInteger), 'a', 'x'.repeat(31)]);
      const n = pick([1, 15, 16, 127, 128, 4096]), heads = pick([1, 8, 32, 128]), d = pick([64, 128, 256]);
      const at = pick([0, 4, 124, 128, 65532, 65536, 2 ** 32 - 4, 2 ** 32]);
      const out = { dtype: pick(['f32', 'f16', 'bf16']), shape: [n, heads, d], at };
      const lse = { dtype: 'f32', shape: [n, heads], at: at + pick([4, 1 << 20, 2 ** 33]) };
      const ms = pick([...NUMBERS, rng.next() * 90]);
      const frame = packStackedAnswer(id, out, lse, ms)!;
      const parts = packParts({ id, out, lse, stats: { ms } });
      const want = Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength)));
      const got = new Uint8Array(frame.byteLength);
      frame.fill(got);
      expect(Buffer.from(got).equals(want), JSON.stringify({ id, out, lse, ms })).toBe(true);
    }
    for (const id of ['é', 'x'.repeat(32), { a: 1 }, null]) expect(packStackedAnswer(id, { dtype: 'f32', shape: [1, 1, 1], at: 0 }, { dtype: 'f32', shape: [1, 1], at: 4 }, 1)).toBeUndefined();
  });
});
