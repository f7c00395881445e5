// What the decode and its judging keep of each generated layer: the decode
// steps' queries and new tokens, and the sampled kv heads' full K/V.
//
// The generator has no K/V for the generated tokens, so the new token of
// step s is token tokens − steps + s moved to position tokens + s: its key
// rotated by RoPE through `steps` more positions (pre-RoPE content is
// position-free in the generator, so this is the same content at the new
// position), its value copied.
import { bytesOf, convert } from '../../addon/kernels.js';
import { ropeFrequencies, type Needle, type Workload } from '../../workload/index.js';
import type { Options } from './options.js';

export interface LayerDecode {
  /** Per step: q [qHeads, d] f32, new token k, v [kvHeads, d] f16. */
  q: Float32Array[];
  k: Uint16Array[];
  v: Uint16Array[];
  needles: Needle[];
}

export interface Sample {
  layer: number;
  head: number;
  /** [tokens + steps, d] f16 of that kv head. */
  keys: Uint16Array;
  values: Uint16Array;
}

/**
 * Rows [n, d] of f16 keys (post-RoPE, rotate-half pairs (p, p + d/2)) moved
 * `shift` positions later: R(shift)·k, so R(p)·x becomes R(p + shift)·x.
 */
function shiftKeys(rows: Uint16Array, d: number, shift: number, freq: Float64Array): Uint16Array {
  const n = rows.length / d, half = d >> 1;
  const x = new Float32Array(rows.length);
  convert(bytesOf(rows), 'f16', bytesOf(x), 'f32', rows.length);
  const cs = Float64Array.from(freq, (w) => Math.cos(shift * w)), sn = Float64Array.from(freq, (w) => Math.sin(shift * w));
  for (let i = 0; i < n; i++)
    for (let p = 0; p < half; p++) {
      const a = x[i * d + p], b = x[i * d + p + half];
      x[i * d + p] = a * cs[p] - b * sn[p];
      x[i * d + p + half] = b * cs[p] + a * sn[p];
    }
  return toF16(x);
}

/** Elementwise f32 → f16 words. */
function toF16(x: Float32Array): Uint16Array {
  const out = new Uint16Array(x.length);
  if (x.length) convert(bytesOf(x), 'f32', bytesOf(out), 'f16', x.length);
  return out;
}

const halfCache = new WeakMap<Workload, Uint16Array[]>();

/** A workload's prefill query rows as f16 per kv head, converted once (shared layers reuse them). */
export function halfQueries(wl: Workload): Uint16Array[] {
  let half = halfCache.get(wl);
  if (!half) halfCache.set(wl, (half = wl.prefillQ.map(toF16)));
  return half;
}

/** What decode and fidelity need of a layer: its steps' queries and new tokens, and the sampled heads. */
export function keepForDecode(o: Options, l: number, wl: Workload, tokens: number, steps: number, decodeData: LayerDecode[], samples: Sample[]): void {
  const { kvHeads: K, headDim: d } = o.shape;
  // The generated tokens' K/V: tokens − steps.. moved `steps` positions on (see the top of this file).
  const freq = ropeFrequencies(d, wl.knobs.ropeBase, wl.knobs.ropeScaling);
  const src = tokens - steps;
  const newK = wl.keys.map((kh) => shiftKeys(kh.subarray(src * d, tokens * d), d, steps, freq));
  const newV = wl.values.map((vh) => vh.slice(src * d, tokens * d));
  if (o.layerData === 'shared' && l > 0) decodeData.push(decodeData[0]);
  else {
    const ld: LayerDecode = { q: [], k: [], v: [], needles: wl.needles.filter((n) => n.step < steps) };
    for (let s = 0; s < steps; s++) {
      ld.q.push(wl.decodeQ[s]);
      const k = new Uint16Array(K * d), v = new Uint16Array(K * d);
      for (let h = 0; h < K; h++) {
        k.set(newK[h].subarray(s * d, (s + 1) * d), h * d);
        v.set(newV[h].subarray(s * d, (s + 1) * d), h * d);
      }
      ld.k.push(k);
      ld.v.push(v);
    }
    decodeData.push(ld);
  }
  if (o.sampleLayers.includes(l))
    for (const head of [...new Set([0, K - 1])]) {
      const keys = new Uint16Array((tokens + steps) * d), values = new Uint16Array((tokens + steps) * d);
      keys.set(wl.keys[head].subarray(0, tokens * d));
      keys.set(newK[head], tokens * d);
      values.set(wl.values[head].subarray(0, tokens * d));
      values.set(newV[head], tokens * d);
      samples.push({ layer: l, head, keys, values });
    }
}
