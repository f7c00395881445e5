// Typed wrapper of the addon's block representatives (native/kernels/block_reps.h):
// per block of keys, up to `reps` k-means sub-centroids (stored words), each
// with its members' radius and count. The block summaries rank blocks by
// them (index/block-summary.ts).
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

interface Addon {
  blockReps(a: {
    keys: Uint16Array;
    dtype: number;
    tokens: number;
    headDim: number;
    blockSize: number;
    reps: number;
    iterations: number;
    centroids: Uint16Array;
    radii: Float32Array;
    counts: Int32Array;
  }): Promise<void>;
}

const addon = nativeAddon<Addon>();

export interface BlockReps {
  /** [blocks * reps, headDim] storage words: block b's slot r at row b * reps + r. */
  centroids: Uint16Array;
  /** [blocks * reps] the largest distance of a member from its stored centroid (float32, not rounded up). */
  radii: Float32Array;
  /** [blocks * reps] members (a block's sum to its tokens); a slot a block could not fill has 0 and repeats another slot's centroid and radius. */
  counts: Int32Array;
}

/** Every block's representatives (off the event loop, multithreaded over blocks). */
export async function blockReps(keys: Uint16Array, dtype: KvDtype, tokens: number, headDim: number, blockSize: number, reps: number, iterations: number): Promise<BlockReps> {
  const slots = Math.ceil(tokens / blockSize) * reps;
  const out = { centroids: new Uint16Array(slots * headDim), radii: new Float32Array(slots), counts: new Int32Array(slots) };
  await addon.blockReps({ keys, dtype: DTYPE_CODE[dtype], tokens, headDim, blockSize, reps, iterations, ...out });
  return out;
}
