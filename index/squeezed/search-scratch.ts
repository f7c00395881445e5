// State shared by every loaded head's searches, and the sort keys that
// order clusters (or coarse groups) by mass: a plain Float64Array sort, no
// comparator, with the id recovered from the key.

export const ID_SPAN = 2 ** 21;
/** Sort key: ascending sort puts higher log-mass (then lower id) last. */
export const sortKey = (logMass: number, id: number) =>
  Math.floor((Math.min(Math.max(logMass, -2047), 0.5) + 2048) * 1048576) * ID_SPAN + (ID_SPAN - 1 - id);
export const keyId = (key: number) => ID_SPAN - 1 - (key % ID_SPAN);

/**
 * Per-search scratch shared by every head (searches are synchronous and
 * JavaScript runs one at a time; calibration holds nothing across awaits),
 * grown to the largest index seen.
 */
export const scratch = {
  logw: new Float64Array(0),
  clogw: new Float64Array(0),
  sortKeys: new Float64Array(0),
  expanded: new Int32Array(0),
  isExpanded: new Uint8Array(0),
  refineScores: new Float64Array(0),
  refineOrder: new Int32Array(0),
  words: new Uint16Array(0),
  rows: new Float32Array(0),
};
export function growScratch(C: number, P: number, maxSize: number): void {
  if (scratch.logw.length < C) scratch.logw = new Float64Array(C);
  if (scratch.clogw.length < P) {
    scratch.clogw = new Float64Array(P);
    scratch.expanded = new Int32Array(P);
    scratch.isExpanded = new Uint8Array(P);
  }
  if (scratch.sortKeys.length < Math.max(C, P)) scratch.sortKeys = new Float64Array(Math.max(C, P));
  if (scratch.refineScores.length < maxSize) {
    scratch.refineScores = new Float64Array(maxSize);
    scratch.refineOrder = new Int32Array(maxSize);
  }
}
