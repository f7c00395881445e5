// Keys whose channels differ in offset and spread, as retrieval-attention's
// code tests need them: a few loud channels (large offsets), one constant
// channel, the rest of various spreads; as storage words and exact values.
import { bitsOf, valueOf, type Dt } from './half.js';
import type { Rng } from './random.js';

/** Keys as storage words and their exact values: N(0, 1) scaled and shifted per channel (outlier channels included). */
export function channelKeys(rng: Rng, dt: Dt, n: number, d: number): { bits: Uint16Array; values: Float64Array } {
  const bits = new Uint16Array(n * d), values = new Float64Array(n * d);
  const mean = Array.from({ length: d }, (_, j) => (j % 5 === 0 ? 6 : 0.3) * rng.normal());
  const sd = Array.from({ length: d }, (_, j) => (j === 1 ? 0 : 0.2 + 2 * rng.next()));
  for (let i = 0; i < n * d; i++) {
    bits[i] = bitsOf(dt)(mean[i % d] + sd[i % d] * rng.normal());
    values[i] = valueOf(dt)(bits[i]);
  }
  return { bits, values };
}
