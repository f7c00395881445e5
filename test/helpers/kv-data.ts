// Random K/V/Q in wire layout plus their exact decoded values for references.
import type { Tensor } from '../../core/tensor.js';
import { bitsOf, valueOf, type Dt } from './half.js';
import type { Rng } from './random.js';

export interface KvChunk {
  k: Tensor; // [kvHeads, n, d]
  v: Tensor;
  /** Decoded values per kv head, [n, d] each. */
  kValues: Float64Array[];
  vValues: Float64Array[];
}

/** Keys and values drawn N(0, sd²), stored as dtype; `n` tokens. */
export function randomKv(rng: Rng, dt: Dt, kvHeads: number, n: number, d: number, sd = 1): KvChunk {
  const toBits = bitsOf(dt), toValue = valueOf(dt);
  const make = () => {
    const bits = new Uint16Array(kvHeads * n * d);
    const values: Float64Array[] = [];
    for (let h = 0; h < kvHeads; h++) {
      const vals = new Float64Array(n * d);
      for (let i = 0; i < n * d; i++) {
        const b = toBits(rng.normal() * sd);
        bits[h * n * d + i] = b;
        vals[i] = toValue(b);
      }
      values.push(vals);
    }
    return { t: { dtype: dt, shape: [kvHeads, n, d], data: new Uint8Array(bits.buffer) } as Tensor, values };
  };
  const k = make(), v = make();
  return { k: k.t, v: v.t, kValues: k.values, vValues: v.values };
}

/** One token's k/v as [kvHeads, d] (the attend route's shape). */
export function asStep(c: KvChunk): { k: Tensor; v: Tensor } {
  const [h, , d] = c.k.shape;
  return { k: { ...c.k, shape: [h, d] }, v: { ...c.v, shape: [h, d] } };
}

/** Per kv head, the chunks' values concatenated in order. */
export function concatValues(chunks: KvChunk[], which: 'kValues' | 'vValues'): Float64Array[] {
  const heads = chunks[0][which].length;
  return Array.from({ length: heads }, (_, h) => {
    const total = chunks.reduce((n, c) => n + c[which][h].length, 0);
    const out = new Float64Array(total);
    let at = 0;
    for (const c of chunks) {
      out.set(c[which][h], at);
      at += c[which][h].length;
    }
    return out;
  });
}

export function randomQ(rng: Rng, qHeads: number, d: number, sd = 1.5): Float32Array {
  return Float32Array.from({ length: qHeads * d }, () => rng.normal() * sd);
}

export function f32Tensor(shape: number[], a: Float32Array): Tensor {
  return { dtype: 'f32', shape, data: new Uint8Array(a.buffer, a.byteOffset, a.byteLength) };
}

/** Keys around `centres` random centres (structure for k-means to find, and ties to break), as f16 or bf16 words. */
export function clusteredKeys(rng: Rng, n: number, d: number, dt: Dt, centres = 6): Uint16Array {
  const cs = Array.from({ length: centres }, () => Float64Array.from({ length: d }, () => 2 * rng.normal()));
  const bits = new Uint16Array(n * d);
  for (let i = 0; i < n; i++) {
    const c = cs[rng.int(cs.length)];
    for (let j = 0; j < d; j++) bits[i * d + j] = bitsOf(dt)(c[j] + rng.normal());
  }
  return bits;
}
