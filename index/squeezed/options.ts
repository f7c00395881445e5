// The knobs of a squeezed index and the axes of its threshold tables. The
// axes are written into every artifact, so a change here reaches new
// artifacts only; old ones keep the tables they were calibrated with.

/** Target kept fractions of the threshold table. The last must be 1. */
export const KEPT_FRACTIONS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1];
/** GQA group sizes a table is calibrated for; a search uses the largest ≤ its group. */
export const TABLE_GROUPS = [1, 2, 3, 4, 5, 6, 7, 8, 16];

export interface SqueezedOptions {
  levels: 1 | 2;
  /** Clusters ≈ tokens / tokensPerCluster (default 32). */
  tokensPerCluster?: number;
  /** Lloyd iterations (default 12). */
  iterations?: number;
  seed?: number;
  /** One flat k-means up to this many clusters, two stages above (default 256). */
  flatMaxClusters?: number;
  /** Two-level: expanded coarse groups hold ≈ expand × the target fraction (default 4). */
  expand?: number;
  /** Two-level: expand at least this many coarse groups (default 3). */
  minExpanded?: number;
  /** Calibration blocks of 16 query rows, at most (default 64; fewer for large C). */
  calibrationBlocks?: number;
}

export const DEFAULTS: Omit<Required<SqueezedOptions>, 'levels'> = {
  tokensPerCluster: 32,
  iterations: 12,
  seed: 0x5eed,
  flatMaxClusters: 256,
  expand: 4,
  minExpanded: 3,
  calibrationBlocks: 64,
};
