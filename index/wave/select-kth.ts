// The k-th largest of a typed array's values without sorting them all: the
// wave build's cuts (outlierKeys' score cut over a head's keys, the
// calibration's top logits) need one value, not an order. A sort with a JS
// comparator took most of the build's main-thread time at 1M tokens
// (bench/results/wave-build-vm.md).

/**
 * The k-th largest (1 <= k <= n) of the first n values of `a`, none of them
 * NaN, in the numeric order (-0 and +0 equal: either may come back).
 * Reorders `a`'s first n values.
 */
export function kthLargest(a: Float64Array | Float32Array, n: number, k: number): number {
  if (!(k >= 1 && k <= n && n <= a.length)) throw new RangeError(`kthLargest: k = ${k} out of [1, ${n}]`);
  // Ascending rank r; three-way partitions (a run of equal values ends the search at once).
  const r = n - k;
  let lo = 0, hi = n - 1, rounds = 0;
  while (hi > lo) {
    if (++rounds > 64) {
      // Pivots that keep missing (not met on real scores): finish by sorting what is left.
      const rest = a.subarray(lo, hi + 1).sort();
      return rest[r - lo];
    }
    const mid = lo + ((hi - lo) >> 1);
    const x = a[lo], y = a[mid], z = a[hi];
    const p = x < y ? (y < z ? y : x < z ? z : x) : x < z ? x : y < z ? z : y;
    let lt = lo, i = lo, gt = hi;
    while (i <= gt) {
      const v = a[i];
      if (v < p) (a[i] = a[lt]), (a[lt] = v), lt++, i++;
      else if (v > p) (a[i] = a[gt]), (a[gt] = v), gt--;
      else i++;
    }
    if (r < lt) hi = lt - 1;
    else if (r > gt) lo = gt + 1;
    else return p;
  }
  return a[lo];
}
