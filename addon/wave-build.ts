// Typed wrapper of the wave build's native loops (native/kernels/wave_build.h):
// the moments' 8-bit codes and the variance-share calibration's float64 sums,
// each bit for bit what the TypeScript loops they replace gave
// (index/wave/moment-code.ts, variance-share.ts). Synchronous, the main
// thread working with the native pool: a few milliseconds each.
import { nativeAddon } from './addon.js';

export interface MomentCodeArrays {
  keyAxes: Int8Array;
  axisScales: Float32Array;
  keyVars: Uint8Array;
  varScales: Float32Array;
}

interface Addon {
  encodeMoments(a: { axes: Float32Array; vars: Float32Array; clusters: number; headDim: number } & MomentCodeArrays): number;
  rowDots(a: { q: Float64Array; rows: number; headDim: number; x: Float32Array; n: number; stride: number; scale: number; out: Float64Array }): void;
  weightedRowSums(a: { w: Float64Array; mask?: Uint8Array; rows: number; n: number; x: Float32Array; stride: number; headDim: number; out: Float64Array }): void;
}

const addon = nativeAddon<Addon>();

/** Codes `clusters` rows of headDim axes and variances into `out`; returns a cluster with a non-finite value (the codes then incomplete), or -1. */
export function encodeMomentRows(axes: Float32Array, vars: Float32Array, clusters: number, headDim: number, out: MomentCodeArrays): number {
  return addon.encodeMoments({ axes, vars, clusters, headDim, ...out });
}

/** out[r·n + t] = scale · Σ_j q[r·d + j]·x[t·stride + j], each sum over j in order (float64). */
export function rowDots(q: Float64Array, rows: number, headDim: number, x: Float32Array, n: number, stride: number, scale: number, out: Float64Array): void {
  addon.rowDots({ q, rows, headDim, x, n, stride, scale, out });
}

/** out[r·d + j] += Σ_t w[r·n + t]·x[t·stride + j] over t in order, where mask[r·n + t] (if given) is not 0 (float64). */
export function weightedRowSums(
  w: Float64Array, mask: Uint8Array | undefined, rows: number, n: number, x: Float32Array, stride: number, headDim: number, out: Float64Array,
): void {
  addon.weightedRowSums({ w, mask, rows, n, x, stride, headDim, out });
}
