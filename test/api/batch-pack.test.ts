// The batch answer packed straight into its frame (api/batch-pack.ts) is
// byte for byte what the generic packer makes of the same answer objects
// (packParts of {id, results: batchAnswer(...), stats: {ms}}; one attend's:
// of {id, ...attendAnswer(r)}), at every
// size boundary its forms cross (counts, shapes, numbers, data lengths and
// the tensor padding); answers it does not cover are left to packParts.
import { describe, expect, it } from 'vitest';
import { attendAnswer, batchAnswer } from '../../api/attend-answer.js';
import { packAttendAnswer, packBatchAnswer } from '../../api/batch-pack.js';
import { errorOf } from '../../api/errors.js';
import { joinParts, packParts } from '../../core/msgpack-parts.js';
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

function packed(id: unknown, results: PromiseSettledResult<AttendAnswer>[], ms: number): Buffer | undefined {
  const p = packBatchAnswer(id, results, ms);
  if (!p) return undefined;
  const buf = new Uint8Array(p.byteLength);
  p.fill(buf);
  return Buffer.from(buf);
}

describe('packBatchAnswer', () => {
  it('writes the bytes packParts writes for the same answer', () => {
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

  it('packs the HTTP answer (no id) as packParts packs it', () => {
    const results = [fulfilled(answer(32, 128, 'f16')), fulfilled(answer(32, 128, 'f32'))];
    const parts = packParts({ results: results.map((r) => batchAnswer(r, errorOf)), stats: { ms: 1.5 } });
    expect(packed(undefined, results, 1.5)!.equals(Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength))))).toBe(true);
  });

  it('leaves failed steps, selections, kv, nested stats and unusual ids to packParts', () => {
    const good = () => fulfilled(answer(4, 8, 'f32'));
    const rejected: PromiseSettledResult<AttendAnswer> = { status: 'rejected', reason: new Error('boom') };
    expect(packBatchAnswer(1, [good(), rejected], 1)).toBeUndefined();
    const withSelection = answer(4, 8, 'f32');
    withSelection.selection = [new Int32Array([1, 2])];
    expect(packBatchAnswer(1, [good(), fulfilled(withSelection)], 1)).toBeUndefined();
    const nested = answer(4, 8, 'f32');
    (nested.stats as unknown as Record<string, unknown>).gpu = { ms: 1 };
    expect(packBatchAnswer(1, [fulfilled(nested)], 1)).toBeUndefined();
    const unrounded = answer(4, 8, 'f16');
    delete unrounded.outWords;
    expect(packBatchAnswer(1, [fulfilled(unrounded)], 1)).toBeUndefined();
    expect(packBatchAnswer('é', [good()], 1)).toBeUndefined();
    expect(packBatchAnswer('x'.repeat(32), [good()], 1)).toBeUndefined();
    expect(packBatchAnswer({ a: 1 }, [good()], 1)).toBeUndefined();
    expect(packBatchAnswer(1, [good()], 1)).toBeDefined();
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
      const mine = packAttendAnswer(id, r);
      expect(mine, `trial ${trial}`).toBeDefined();
      expect(bytes(mine!).equals(generic1(id, r)), `trial ${trial}: ${qHeads}x${headDim}, id ${String(id)}`).toBe(true);
    }
  });

  it('leaves selections, kv, nested stats, unrounded 16-bit outs and unusual ids to packParts', () => {
    const withSelection = answer(4, 8, 'f32');
    withSelection.selection = [new Int32Array([1, 2])];
    expect(packAttendAnswer(1, withSelection)).toBeUndefined();
    const withKv = answer(4, 8, 'f32');
    withKv.kv = { k: [new Uint16Array(8)], v: [new Uint16Array(8)] };
    expect(packAttendAnswer(1, withKv)).toBeUndefined();
    const nested = answer(4, 8, 'f32');
    (nested.stats as unknown as Record<string, unknown>).blocks = { selected: 1, hits: 0, bytesIn: 0 };
    expect(packAttendAnswer(1, nested)).toBeUndefined();
    const unrounded = answer(4, 8, 'f16');
    delete unrounded.outWords;
    expect(packAttendAnswer(1, unrounded)).toBeUndefined();
    for (const id of ['é', 'x'.repeat(32), { a: 1 }, [1], null, true]) expect(packAttendAnswer(id, answer(4, 8, 'f32')), String(id)).toBeUndefined();
    expect(packAttendAnswer(1, answer(4, 8, 'f32'))).toBeDefined();
  });
});
