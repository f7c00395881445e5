// Rows of a head's 16-bit keys (f16 or bf16) read as f32 one row set at a
// time: k-means and calibration touch only some rows, so the head is never
// widened whole, and the per-dtype table keeps native calls out of the
// inner loops.
import { widenWords, type KvDtype } from '../../addon/kernels.js';

const luts: Partial<Record<KvDtype, Float32Array>> = {};
/** f32 value of every 16-bit code of a dtype. */
export function lut(dtype: KvDtype): Float32Array {
  let t = luts[dtype];
  if (!t) {
    const codes = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) codes[i] = i;
    t = widenWords(codes, dtype);
    luts[dtype] = t;
  }
  return t;
}

/** Rows `ids` of [*, d] 16-bit keys, as f32 [ids.length, d]. */
export function gatherF32(keys: Uint16Array, d: number, dtype: KvDtype, ids: Int32Array): Float32Array {
  return widenWords(gather16(keys, d, ids), dtype);
}

export function gather16(keys: Uint16Array, d: number, ids: Int32Array): Uint16Array {
  const out = new Uint16Array(ids.length * d);
  for (let i = 0; i < ids.length; i++) out.set(keys.subarray(ids[i] * d, ids[i] * d + d), i * d);
  return out;
}
