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

const AXIS_MAX = 127;
const VAR_MAX = 255;

/** The float32 value a code decodes to (the native decode: one f32 product of exact operands). */
export const decodeAxis = (code: number, scale: number) => Math.fround(code * scale);
export const decodeVar = (code: number, scale: number) => Math.fround(code * code * scale);

/** Codes of `clusters` rows of `headDim` axes and variances (float32, as the summary computes them). */
export function encodeMoments(axes: Float32Array, vars: Float32Array, clusters: number, headDim: number): MomentCodes {
  const d = headDim;
  const out: MomentCodes = {
    keyAxes: new Int8Array(clusters * d),
    axisScales: new Float32Array(clusters),
    keyVars: new Uint8Array(clusters * d),
    varScales: new Float32Array(clusters),
  };
  for (let c = 0; c < clusters; c++) {
    const o = c * d;
    let ma = 0, mv = 0;
    for (let j = 0; j < d; j++) {
      const a = Math.abs(axes[o + j]), v = vars[o + j];
      // Finite keys can still overflow float32 here (bf16 keys past ~1e19): no scale codes them, so the seal is refused (422), not a 500.
      if (!Number.isFinite(a) || !Number.isFinite(v))
        throw invalid('the wave index cannot code these keys: a cluster\'s key variance or axis is not finite in float32 (keys past ~1e19 in magnitude)');
      if (a > ma) ma = a;
      if (v > mv) mv = v;
    }
    const sa = Math.fround(ma / AXIS_MAX), sv = Math.fround(mv / (VAR_MAX * VAR_MAX));
    out.axisScales[c] = sa;
    out.varScales[c] = sv;
    if (sa > 0)
      for (let j = 0; j < d; j++) out.keyAxes[o + j] = Math.max(-AXIS_MAX, Math.min(AXIS_MAX, Math.round(axes[o + j] / sa)));
    if (sv > 0)
      for (let j = 0; j < d; j++) {
        // The nearer of the two codes around the std, by the variance it decodes to.
        const v = Math.max(0, vars[o + j]), r = Math.sqrt(v / sv);
        const lo = Math.min(VAR_MAX, Math.floor(r)), hi = Math.min(VAR_MAX, lo + 1);
        out.keyVars[o + j] = Math.abs(decodeVar(hi, sv) - v) < Math.abs(decodeVar(lo, sv) - v) ? hi : lo;
      }
  }
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
