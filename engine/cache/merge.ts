// One part's attention folded into another's by log-sum-exp: each (out, lse)
// pair is softmax attention over its own rows, and the merge is attention over
// the union (rows disjoint). Where the host attends part of a step (own
// tokens, partial blocks, an estimate) and the device the rest.

/** Merges (partOut, partLse) into (out, lse) in place, per q head; a part with lse −∞ (no rows) leaves it as it is. */
export function mergeInto(out: Float32Array, lse: Float32Array, partOut: Float32Array, partLse: Float32Array, headDim: number): void {
  for (let h = 0; h < lse.length; h++) {
    const a = lse[h], b = partLse[h];
    if (b === -Infinity) continue;
    const m = Math.max(a, b), wa = Math.exp(a - m), wb = Math.exp(b - m), l = m + Math.log(wa + wb);
    const ca = wa / (wa + wb), cb = wb / (wa + wb);
    for (let i = h * headDim; i < (h + 1) * headDim; i++) out[i] = ca * out[i] + cb * partOut[i];
    lse[h] = l;
  }
}
