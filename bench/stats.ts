// Summary statistics shared by the benchmarks. Quantiles never interpolate:
// every reported latency is one that was measured. The benchmarks grew three
// rank rules for which sample a quantile reads; each is kept (as `rule`) so
// that no published table changes, rather than silently moving a p99 by one
// rank:
//   'nearest'  index ⌈q·n⌉ − 1, the nearest-rank definition (p50 is the
//              lower median): attend, decode, retrieval;
//   'high'     index ⌊q·n⌋ (p50 is the upper median): faiss, gpu (kernel
//              median), workload-report;
//   'low'      index ⌊q·(n − 1)⌋ (p50 is the lower median; p99 can sit a rank
//              below 'nearest'): gpu-decode.
// Relative errors of outputs live with the other quality metrics
// (bench/quality.ts, relativeErrors).

export type RankRule = 'nearest' | 'high' | 'low';

/** Arithmetic mean; NaN for an empty sample (an empty column reads as missing, not as 0). */
export function mean(xs: readonly number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN;
}

/** The q-quantile (q in [0, 1]) of an unsorted sample under `rule`; NaN for an empty sample. */
export function quantile(xs: readonly number[], q: number, rule: RankRule = 'nearest'): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b), n = s.length;
  const i = rule === 'nearest' ? Math.ceil(q * n) - 1 : rule === 'high' ? Math.floor(q * n) : Math.floor(q * (n - 1));
  return s[Math.min(n - 1, Math.max(0, i))];
}

/** Nearest-rank percentile (p in [0, 100]) of an unsorted sample; NaN when empty. */
export function percentile(xs: readonly number[], p: number): number {
  return quantile(xs, p / 100);
}

/** Lower median (the nearest-rank 50th percentile); NaN when empty. */
export function median(xs: readonly number[]): number {
  return quantile(xs, 0.5);
}
