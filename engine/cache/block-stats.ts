// What the block pool did for one step: the numbers a decode answer reports
// under stats.blocks, measured by the GPU pool or modelled by the simulated one.
export interface BlockStats {
  /** Blocks selected. */
  selected: number;
  /** Selected blocks already resident in the pool. */
  hits: number;
  /** Host→device bytes to bring the misses in. */
  bytesIn: number;
}
