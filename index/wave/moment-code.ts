// The wave index's key moments in 8 bits (native/common/moment_code.h
// decodes them, on the host and the device alike): a cluster's scaled
// principal axis as int8 codes, its per-channel key variances as uint8
// codes of their square root, each row with one f32 scale.
//   axis_j = f32(code_j · scale)      scale = f32(max_j |axis_j| / 127)
//   var_j  = f32(code_j² · scale)     scale = f32(max_j var_j / 255²)
// Against f16 words (2 bytes a channel) the two arrays take half the bytes
// of memory and of the device's scoring reads, with the decode error
// bounded by half a step: |axis - decoded| <= scale / 2, and a variance
// within (code ± 1/2)² · scale of its decode (test/index/moment-code.test.ts).
import { encodeMomentRows } from '../../addon/wave-build.js';
import { invalid } from '../../core/errors.js';

export interface MomentCodes {
  /** [clusters, headDim]. */
  keyAxes: Int8Array;
  /** [clusters]. */
  axisScales: Float32Array;
  /** [clusters, headDim]. */
  keyVars: Uint8Array;
  /** [clusters]. */
  varScales: Float32Array;
}

/** The float32 value a code decodes to (the native decode: one f32 product of exact operands). */
export const decodeAxis = (code: number, scale: number) => Math.fround(code * scale);
export const decodeVar = (code: number, scale: number) => Math.fround(code * code * scale);

/**
 * Codes of `clusters` rows of `headDim` axes and variances (float32, as the
 * summary computes them), by the addon (native/kernels/wave_build.h: per row
 *   scale = f32(max_j |axis_j| / 127), code_j = clamp(round(axis_j / scale), ±127)   (halves up, as Math.round)
 *   scale = f32(max_j var_j / 255²), code_j = the nearer of floor(sqrt(var_j / scale)) and the next, by the variance each decodes to (the lower on a tie)
 * in float64 where not said): the loop took a quarter of a 1M-token seal's main thread in TypeScript.
 */
export function encodeMoments(axes: Float32Array, vars: Float32Array, clusters: number, headDim: number): MomentCodes {
  const d = headDim;
  const out: MomentCodes = {
    keyAxes: new Int8Array(clusters * d),
    axisScales: new Float32Array(clusters),
    keyVars: new Uint8Array(clusters * d),
    varScales: new Float32Array(clusters),
  };
  // Finite keys can still overflow float32 here (bf16 keys past ~1e19): no scale codes them, so the seal is refused (422), not a 500.
  if (encodeMomentRows(axes, vars, clusters, d, out) >= 0)
    throw invalid('the wave index cannot code these keys: a cluster\'s key variance or axis is not finite in float32 (keys past ~1e19 in magnitude)');
  return out;
}

/** The decoded rows, as the native decode gives them (tests, the build's calibration, benches). */
export function decodeMoments(m: MomentCodes, headDim: number): { axes: Float32Array; vars: Float32Array } {
  const C = m.axisScales.length, d = headDim;
  const axes = new Float32Array(C * d), vars = new Float32Array(C * d);
  for (let c = 0; c < C; c++)
    for (let j = 0; j < d; j++) {
      axes[c * d + j] = decodeAxis(m.keyAxes[c * d + j], m.axisScales[c]);
      vars[c * d + j] = decodeVar(m.keyVars[c * d + j], m.varScales[c]);
    }
  return { axes, vars };
}

/** The decoded variances of clusters [c0, c1) alone (the build's calibration reads a few segments' rows). */
export function decodeVarRows(m: MomentCodes, headDim: number, c0: number, c1: number): Float32Array {
  const d = headDim, vars = new Float32Array((c1 - c0) * d);
  for (let c = c0; c < c1; c++) {
    const scale = m.varScales[c];
    for (let j = 0, o = c * d; j < d; j++) vars[o - c0 * d + j] = decodeVar(m.keyVars[o + j], scale);
  }
  return vars;
}
