// Calibration counts tokens by the log-mass of their cluster in a fixed
// histogram rather than sorting every sample, then reads each threshold off
// it. SqueezedHead fills the histograms (it holds the masses) and
// calibration solves them; the binning both must agree on lives here.

export const LOG_MIN = -48; // calibration histogram over log-mass in [LOG_MIN, 0]
export const BINS = 4096;

/** Calibration histogram bin of a log-mass. */
export const bin = (logMass: number) => (logMass <= LOG_MIN ? 0 : logMass >= 0 ? BINS - 1 : Math.floor(((logMass - LOG_MIN) / -LOG_MIN) * BINS));

/** Log-mass threshold at which the kept tokens average `f` of all (histogram of kept tokens by log-mass). */
export function solve(hist: Float64Array, total: number, f: number): number {
  if (f >= 1 || total <= 0) return -Infinity;
  const want = f * total;
  let above = 0;
  for (let b = BINS - 1; b >= 0; b--) {
    if (above + hist[b] >= want) {
      if (b === 0) return -Infinity;
      const width = -LOG_MIN / BINS, top = LOG_MIN + (b + 1) * width;
      return top - (width * (want - above)) / hist[b];
    }
    above += hist[b];
  }
  return -Infinity;
}
