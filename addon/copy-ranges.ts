// Copies between host arrays off the event loop, spread over the native
// pool (native/bindings/copy_binding.cc says why).
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type FloatDtype } from './kernels.js';

const addon = nativeAddon<{
  copyRanges(src: Uint8Array[], dst: Uint8Array[]): Promise<void>;
  copyPlan(src: Uint8Array[], dst: Uint8Array, plan: Float64Array): Promise<void>;
  copyChecked(src: Uint8Array[], dst: (Uint8Array | null)[], dtypes: number[]): Promise<number[]>;
}>();

/**
 * dst[i].set(src[i]) for every i (each pair the same size), on other
 * threads: neither side may be written, nor dst read, until it resolves.
 */
export function copyRanges(src: Uint8Array[], dst: Uint8Array[]): Promise<void> {
  return addon.copyRanges(src, dst);
}

/**
 * Copies every view of `from` to dst at its offset (`at[i]`), as
 * copyRanges does, but described by one plan of numbers over the views'
 * few distinct buffers: a batch of 1024 blocks' K and V views cost the
 * event loop ~0.3 ms as 2048 typed arrays handed over one by one.
 */
export function copyViews(from: Uint8Array[], dst: Uint8Array, at: number[]): Promise<void> {
  const buffers = new Map<ArrayBufferLike, number>();
  const src: Uint8Array[] = [];
  const plan = new Float64Array(from.length * 4);
  from.forEach((v, i) => {
    let b = buffers.get(v.buffer);
    if (b === undefined) {
      buffers.set(v.buffer, (b = src.length));
      src.push(new Uint8Array(v.buffer));
    }
    plan[i * 4] = b;
    plan[i * 4 + 1] = v.byteOffset;
    plan[i * 4 + 2] = at[i];
    plan[i * 4 + 3] = v.byteLength;
  });
  return addon.copyPlan(src, dst, plan);
}

/** One range of copyChecked: values of `dtype` in `src`, copied to `dst` (same size) unless it is null. */
export interface CheckedRange {
  src: Uint8Array;
  dst: Uint8Array | null;
  dtype: FloatDtype;
}

/**
 * As copyRanges, each range's values checked finite on the way, in the same
 * pass (native/bindings/copy_binding.cc says why): per range, the index of
 * its first NaN or infinite value, or -1. A range with one may be partly
 * copied: callers treat dst as unwritten until every range comes back -1.
 */
export function copyChecked(ranges: readonly CheckedRange[]): Promise<number[]> {
  return addon.copyChecked(
    ranges.map((r) => r.src),
    ranges.map((r) => r.dst),
    ranges.map((r) => DTYPE_CODE[r.dtype]),
  );
}
