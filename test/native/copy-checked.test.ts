// copyChecked (addon/copy-ranges.ts): an upload's NaN/Inf scan fused with
// its copy, off the event loop. Per range it must name the first non-finite
// value exactly as a plain scan of the bytes does (ranges longer than the
// native pieces and chunks, several hits, every dtype's NaN and both
// infinities), copy a clean range byte for byte, never write a check-only
// range's missing dst, and refuse malformed ranges before touching anything.
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { copyChecked, type CheckedRange } from '../../addon/copy-ranges.js';
import type { FloatDtype } from '../../addon/kernels.js';
import { nativeAddon } from '../../addon/addon.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`copy-checked: seed ${seed}`);
const raw = nativeAddon<{ copyChecked(src: Uint8Array[], dst: (Uint8Array | null)[], dtypes: number[]): Promise<number[]> }>().copyChecked;

const SIZE: Record<FloatDtype, number> = { f16: 2, bf16: 2, f32: 4 };

/** Independent of the native masks: the value decoded from its bits by its IEEE fields. */
function isFinite(bytes: Uint8Array, at: number, dtype: FloatDtype): boolean {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  if (dtype === 'f32') return Number.isFinite(view.getFloat32(at * 4, true));
  const w = view.getUint16(at * 2, true);
  const exp = dtype === 'f16' ? (w >> 10) & 0x1f : (w >> 7) & 0xff;
  return exp !== (dtype === 'f16' ? 0x1f : 0xff);
}

function firstNonFinite(bytes: Uint8Array, dtype: FloatDtype): number {
  for (let i = 0; i < bytes.byteLength / SIZE[dtype]; i++) if (!isFinite(bytes, i, dtype)) return i;
  return -1;
}

/** Random finite values of dtype (exponents kept below all-ones). */
function finiteBytes(dtype: FloatDtype, count: number): Uint8Array {
  const b = new Uint8Array(count * SIZE[dtype]);
  randomFillSync(b);
  const view = new DataView(b.buffer);
  for (let i = 0; i < count; i++) {
    if (dtype === 'f32') view.setUint32(i * 4, view.getUint32(i * 4, true) & 0xbfffffff, true);
    else view.setUint16(i * 2, view.getUint16(i * 2, true) & 0xbfff, true);
  }
  expect(firstNonFinite(b, dtype)).toBe(-1);
  return b;
}

/** Writes a NaN, +Inf or -Inf of dtype at element i. */
function poison(b: Uint8Array, dtype: FloatDtype, i: number, kind: number): void {
  const view = new DataView(b.buffer, b.byteOffset);
  const sign = kind === 2 ? 1 : 0;
  if (dtype === 'f32') view.setUint32(i * 4, kind === 0 ? 0x7fc00001 : (sign << 31) | 0x7f800000, true);
  else if (dtype === 'f16') view.setUint16(i * 2, kind === 0 ? 0x7e01 : (sign << 15) | 0x7c00, true);
  else view.setUint16(i * 2, kind === 0 ? 0x7fc1 : (sign << 15) | 0x7f80, true);
}

describe('copyChecked', () => {
  it('names each range\'s first non-finite value as a plain scan does, and copies the clean ranges exactly', async () => {
    const rng = new Rng(seed);
    for (const dtype of ['f16', 'bf16', 'f32'] as const) {
      // Lengths across the 64 KiB chunks and 1 MiB pieces, some odd counts.
      const counts = [1, 3, 32_767, 32_768 + 5, (3 << 20) / SIZE[dtype] + 7, rng.int(200_000) + 1];
      const ranges: CheckedRange[] = [];
      const want: number[] = [];
      for (const [r, count] of counts.entries()) {
        const src = finiteBytes(dtype, count);
        // Every other range gets one to three hits anywhere in it.
        if (r % 2 === 1) {
          const hits = 1 + rng.int(3);
          for (let h = 0; h < hits; h++) poison(src, dtype, rng.int(count), rng.int(3));
        }
        const checkOnly = r === 2 || r === 3;
        const dst = checkOnly ? null : new Uint8Array(src.byteLength);
        if (dst) randomFillSync(dst);
        ranges.push({ src, dst, dtype });
        want.push(firstNonFinite(src, dtype));
      }
      const got = await copyChecked(ranges);
      expect(got, dtype).toEqual(want);
      ranges.forEach((r, i) => {
        if (r.dst && want[i] < 0) expect(Buffer.from(r.dst).equals(Buffer.from(r.src)), `${dtype} range ${i} copied`).toBe(true);
      });
    }
  });

  it('finds a hit in the last piece of a long range, and only the first of several', async () => {
    for (const dtype of ['f16', 'f32'] as const) {
      const count = (5 << 20) / SIZE[dtype];
      const src = new Uint8Array(count * SIZE[dtype]);
      poison(src, dtype, count - 1, 1);
      expect(await copyChecked([{ src, dst: null, dtype }])).toEqual([count - 1]);
      poison(src, dtype, (3 << 20) / SIZE[dtype] + 11, 0);
      poison(src, dtype, (1 << 20) / SIZE[dtype] + 3, 2);
      expect(await copyChecked([{ src, dst: new Uint8Array(src.byteLength), dtype }])).toEqual([(1 << 20) / SIZE[dtype] + 3]);
    }
  });

  it('refuses ranges of unequal size, a partial value, a bad dtype or mismatched lists, before copying', () => {
    const src = new Uint8Array(64), dst = new Uint8Array(64);
    expect(() => raw([src], [dst.subarray(2)], [0])).toThrow(RangeError);
    expect(() => raw([src.subarray(1)], [null], [0])).toThrow(RangeError);
    expect(() => raw([src.subarray(2)], [null], [2])).toThrow(RangeError);
    expect(() => raw([src], [dst], [3])).toThrow(RangeError);
    expect(() => raw([src], [dst, dst], [0])).toThrow(RangeError);
    expect(() => raw([src], [new Uint16Array(32) as unknown as Uint8Array], [0])).toThrow(TypeError);
    expect(dst.every((x) => x === 0)).toBe(true);
  });
});
