// One loaded (layer, kv head) index and its search at decode. Centroids are
// scored synchronously (HeadIndex.search is synchronous; the native kernels
// are async) with the WebAssembly SIMD kernel of simd-dot.ts, from f32
// copies widened at load. The mass computations are public because
// calibration (calibration.ts) runs the very same ones, so that thresholds
// are calibrated on exactly the masses a search compares them with.
import { bytesOf, convert } from '../../addon/kernels.js';
import type { HeadIndex, HeadKeys, SearchResult } from '../method.js';
import { DotKernel, paddedStride } from '../simd-dot.js';
import { type Parts, SRC } from './artifact.js';
import { bin } from './mass-histogram.js';
import { growScratch, keyId, scratch, sortKey } from './search-scratch.js';

const Q_CAP = 64; // query rows the kernel holds at once
const REFINE_ROWS = 512; // member keys the kernel scores at once when cutting a cluster

export interface SearchStats {
  /** The table fraction used (1 = keep all clusters, by mass). */
  fraction: number;
  /** Centroids scored (coarse + fine). */
  centroids: number;
  /** Two-level: coarse groups expanded. */
  expanded: number;
  clustersKept: number;
  /** Tokens in the kept clusters (before truncation at k). */
  tokensKept: number;
  /** Member keys scored exactly to cut the last cluster. */
  keysScored: number;
  returned: number;
}

export class SqueezedHead implements HeadIndex {
  readonly levels: 1 | 2;
  readonly tokens: number;
  readonly headDim: number;
  readonly clusters: number;
  readonly coarse: number;
  readonly fractions: Float32Array;
  readonly groups: Int32Array;
  fineThr: Float32Array;
  coarseThr: Float32Array;
  readonly calibration: 'queries' | 'keys' | 'none';
  readonly minExpanded: number;
  lastSearch: SearchStats = { fraction: 0, centroids: 0, expanded: 0, clustersKept: 0, tokensKept: 0, keysScored: 0, returned: 0 };

  private readonly offsets: Int32Array;
  private readonly members: Int32Array;
  private readonly coarseOffsets: Int32Array;
  private readonly scale: number;
  private readonly stride: number;
  private readonly kernel: DotKernel;
  // kernel float offsets: fine rows, coarse rows, query rows, fine scores, coarse scores
  private readonly fineOff = 0;
  private readonly coarseOff: number;
  private readonly qOff: number;
  private readonly outOff: number;
  private readonly coarseOutOff: number;
  private readonly memberOff: number;
  private readonly memberOutOff: number;
  private readonly logSize: Float64Array;
  private readonly coarseLogSize: Float64Array;
  private readonly coarseTokens: Int32Array;
  private readonly tableOf = new Map<number, number>();

  constructor(p: Parts, private readonly keys?: HeadKeys) {
    this.levels = p.levels;
    this.tokens = p.tokens;
    this.headDim = p.headDim;
    this.clusters = p.offsets.length - 1;
    this.coarse = p.levels === 2 ? p.coarseOffsets.length - 1 : 0;
    this.fractions = p.fractions;
    this.groups = p.groups;
    this.fineThr = p.fineThr;
    this.coarseThr = p.coarseThr;
    this.minExpanded = p.minExpanded;
    this.calibration = p.source === SRC.queries ? 'queries' : p.source === SRC.keys ? 'keys' : 'none';
    this.offsets = p.offsets;
    this.members = p.members;
    this.coarseOffsets = p.coarseOffsets;
    const d = p.headDim, C = this.clusters, P = this.coarse, s = (this.stride = paddedStride(d));
    this.scale = 1 / Math.sqrt(d);
    this.coarseOff = (C + 1) * s;
    this.qOff = this.coarseOff + (P + 1) * s;
    this.outOff = this.qOff + Q_CAP * s;
    this.coarseOutOff = this.outOff + 4 * (C + 2);
    this.memberOff = this.coarseOutOff + 4 * (P + 2);
    this.memberOutOff = this.memberOff + (REFINE_ROWS + 1) * s;
    this.kernel = new DotKernel(this.memberOutOff + REFINE_ROWS + 2);
    this.putRows(p.centroids, C, this.fineOff, p.centroidDtype);
    this.putRows(p.coarseCentroids, P, this.coarseOff, p.centroidDtype);
    this.logSize = new Float64Array(C);
    let maxSize = 0;
    for (let c = 0; c < C; c++) {
      const size = p.offsets[c + 1] - p.offsets[c];
      this.logSize[c] = Math.log(size);
      maxSize = Math.max(maxSize, size);
    }
    this.coarseLogSize = new Float64Array(P);
    this.coarseTokens = new Int32Array(P);
    for (let g = 0; g < P; g++) {
      this.coarseTokens[g] = p.offsets[p.coarseOffsets[g + 1]] - p.offsets[p.coarseOffsets[g]];
      this.coarseLogSize[g] = Math.log(this.coarseTokens[g]);
    }
    growScratch(C, P, maxSize);
  }

  // scratch views (see `scratch`), grown for this head at construction
  private get logw(): Float64Array {
    return scratch.logw;
  }
  private get clogw(): Float64Array {
    return scratch.clogw;
  }
  private get sortKeys(): Float64Array {
    return scratch.sortKeys;
  }
  private get expanded(): Int32Array {
    return scratch.expanded;
  }
  private get isExpanded(): Uint8Array {
    return scratch.isExpanded;
  }

  private putRows(src: Uint16Array | Float32Array, count: number, off: number, dtype: 0 | 2): void {
    const d = this.headDim, s = this.stride, f = this.kernel.f32;
    let rows: Float32Array;
    if (dtype === 0) {
      rows = new Float32Array(count * d);
      if (rows.length) convert(bytesOf(src), 'f16', bytesOf(rows), 'f32', rows.length);
    } else rows = src as Float32Array;
    if (s === d) f.set(rows, off);
    else for (let i = 0; i < count; i++) f.set(rows.subarray(i * d, i * d + d), off + i * s);
  }

  /** Index of the calibration table for a GQA group. */
  private table(group: number): number {
    let t = this.tableOf.get(group);
    if (t === undefined) {
      t = 0;
      for (let i = 0; i < this.groups.length; i++) if (this.groups[i] <= group) t = i;
      this.tableOf.set(group, t);
    }
    return t;
  }

  /** The smallest table fraction that covers k of the tokens (one token of slack for rounding). */
  private fractionIndex(k: number): number {
    const F = this.fractions.length;
    for (let i = 0; i < F - 1; i++) if (this.fractions[i] * this.tokens + 1 >= k) return i;
    return F - 1;
  }

  /** Copies query rows [g0, g0 + m) into the kernel. */
  private loadQuery(q: Float32Array, g0: number, m: number): void {
    const d = this.headDim, s = this.stride, f = this.kernel.f32;
    for (let r = 0; r < m; r++) f.set(q.subarray((g0 + r) * d, (g0 + r + 1) * d), this.qOff + r * s);
  }

  /**
   * Scores rows [0, n) at float offset `rows` into `out`: max over the group's query rows.
   * Groups up to Q_CAP rows are loaded once per search (by search()); larger ones chunk by chunk here.
   */
  private score(q: Float32Array, group: number, rows: number, n: number, out: number): void {
    if (group <= Q_CAP) return this.kernel.maxDots(rows, n, this.stride, this.qOff, group, out);
    for (let g0 = 0; g0 < group; g0 += Q_CAP) {
      const m = Math.min(Q_CAP, group - g0);
      this.loadQuery(q, g0, m);
      this.kernel.maxDots(rows, n, this.stride, this.qOff, m, out, g0 > 0);
    }
  }

  /** Per-row dots of `len` f32 rows (from row `first` of `rows`) with the fine or coarse centroids: out [len][count]. */
  rowDots(rows: Float32Array, first: number, len: number, level: 'fine' | 'coarse', out: Float32Array): void {
    const d = this.headDim, s = this.stride, f = this.kernel.f32;
    const rowsOff = level === 'fine' ? this.fineOff : this.coarseOff, count = level === 'fine' ? this.clusters : this.coarse;
    for (let r0 = 0; r0 < len; r0 += 4) {
      for (let r = 0; r < 4; r++) {
        const src = first + Math.min(r0 + r, len - 1);
        f.set(rows.subarray(src * d, (src + 1) * d), this.qOff + r * s);
      }
      this.kernel.dots4(rowsOff, count, s, this.qOff, this.outOff);
      for (let r = 0; r < 4 && r0 + r < len; r++) {
        const o = (r0 + r) * count;
        for (let c = 0, x = this.outOff + r; c < count; c++, x += 4) out[o + c] = f[x];
      }
    }
  }

  // --- masses (shared by search and calibration; raw scores are unscaled max_g q_g·c) ---

  /** One level: log-weights of every cluster; returns log Z. */
  massesOne(raw: Float32Array, ro: number): number {
    const { logw, logSize, scale } = this, C = this.clusters;
    let M = -Infinity;
    for (let c = 0; c < C; c++) {
      const w = logSize[c] + scale * raw[ro + c];
      logw[c] = w;
      if (w > M) M = w;
    }
    let z = 0;
    for (let c = 0; c < C; c++) z += Math.exp(logw[c] - M);
    return M + Math.log(z);
  }

  /** Coarse log-weights; returns log Z over the coarse groups. */
  massesCoarse(raw: Float32Array, ro: number): number {
    const { clogw, coarseLogSize, scale } = this, P = this.coarse;
    let M = -Infinity;
    for (let g = 0; g < P; g++) {
      const w = coarseLogSize[g] + scale * raw[ro + g];
      clogw[g] = w;
      if (w > M) M = w;
    }
    let z = 0;
    for (let g = 0; g < P; g++) z += Math.exp(clogw[g] - M);
    return M + Math.log(z);
  }

  /** Coarse groups to expand, in order of mass: those ≥ thr, then more until `floor` tokens and minExpanded groups. Returns how many. */
  expand(lzc: number, thr: number, floor: number): number {
    const P = this.coarse, keys = this.sortKeys, cut = thr + lzc;
    for (let g = 0; g < P; g++) keys[g] = sortKey(this.clogw[g] - lzc, g);
    keys.subarray(0, P).sort();
    let ne = 0, tokens = 0;
    for (let i = P - 1; i >= 0; i--) {
      const g = keyId(keys[i]);
      if (this.clogw[g] < cut && tokens >= floor && ne >= this.minExpanded) break;
      this.expanded[ne++] = g;
      tokens += this.coarseTokens[g];
    }
    return ne;
  }

  /** Two levels: log-weights of the expanded groups' clusters; returns log Z (the other groups by their coarse term). */
  massesTwo(raw: Float32Array, ro: number, ne: number): number {
    const { logw, logSize, scale, clogw, expanded, isExpanded, coarseOffsets } = this, P = this.coarse;
    let M = -Infinity;
    for (let e = 0; e < ne; e++) {
      const g = expanded[e];
      isExpanded[g] = 1;
      for (let c = coarseOffsets[g]; c < coarseOffsets[g + 1]; c++) {
        const w = logSize[c] + scale * raw[ro + c];
        logw[c] = w;
        if (w > M) M = w;
      }
    }
    for (let g = 0; g < P; g++) if (!isExpanded[g] && clogw[g] > M) M = clogw[g];
    let z = 0;
    for (let e = 0; e < ne; e++) {
      const g = expanded[e];
      for (let c = coarseOffsets[g]; c < coarseOffsets[g + 1]; c++) z += Math.exp(logw[c] - M);
    }
    for (let g = 0; g < P; g++) if (!isExpanded[g]) z += Math.exp(clogw[g] - M);
    for (let e = 0; e < ne; e++) isExpanded[expanded[e]] = 0;
    return M + Math.log(z);
  }

  private nk = 0;
  private tokensKept = 0;
  /** Clusters [c0, c1) with log-weight ≥ cut: appends their sort keys (this.nk) and tokens (this.tokensKept). */
  private keepRange(c0: number, c1: number, cut: number, lz: number): void {
    const { logw, offsets, sortKeys } = this;
    let nk = this.nk, tokens = this.tokensKept;
    for (let c = c0; c < c1; c++)
      if (logw[c] >= cut) {
        sortKeys[nk++] = sortKey(logw[c] - lz, c);
        tokens += offsets[c + 1] - offsets[c];
      }
    this.nk = nk;
    this.tokensKept = tokens;
  }

  /** Calibration: adds the tokens of the clusters considered by the last masses call to a histogram by log-mass. */
  histogram(h: Float64Array, lz: number, ne: number): void {
    const { logw, offsets } = this;
    const add = (c0: number, c1: number) => {
      for (let c = c0; c < c1; c++) h[bin(logw[c] - lz)] += offsets[c + 1] - offsets[c];
    };
    if (this.levels === 1) add(0, this.clusters);
    else for (let e = 0; e < ne; e++) add(this.coarseOffsets[this.expanded[e]], this.coarseOffsets[this.expanded[e] + 1]);
  }

  /** Calibration: adds the coarse groups' tokens to a histogram by coarse log-mass. */
  coarseHistogram(h: Float64Array, lzc: number): void {
    for (let g = 0; g < this.coarse; g++) h[bin(this.clogw[g] - lzc)] += this.coarseTokens[g];
  }

  // --- search ---

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = this.tokens, d = this.headDim, C = this.clusters, P = this.coarse;
    k = Math.min(Math.floor(k), n);
    if (n === 0 || !(k > 0) || group < 1) {
      this.lastSearch = { fraction: 0, centroids: 0, expanded: 0, clustersKept: 0, tokensKept: 0, keysScored: 0, returned: 0 };
      return { ids: new Int32Array(0), scanned: 0 };
    }
    if (q.length < group * d) throw new Error(`squeezed: query has ${q.length} values, expected ${group} × ${d}`);
    const F = this.fractions.length, t = this.table(group);
    const fi = k >= n ? F - 1 : this.fractionIndex(k);
    const last = fi === F - 1;
    const f = this.kernel.f32;
    if (group <= Q_CAP) this.loadQuery(q, 0, group);
    let lz: number, ne = 0, centroids: number;
    if (this.levels === 1) {
      this.score(q, group, this.fineOff, C, this.outOff);
      lz = this.massesOne(f, this.outOff);
      centroids = C;
    } else {
      this.score(q, group, this.coarseOff, P, this.coarseOutOff);
      const lzc = this.massesCoarse(f, this.coarseOutOff);
      const floor = last ? n : Math.min(n, Math.max(k, ef || 0));
      ne = this.expand(lzc, last ? -Infinity : this.coarseThr[t * F + fi], floor);
      centroids = P;
      for (let e = 0; e < ne; e++) {
        const g = this.expanded[e], c0 = this.coarseOffsets[g], c1 = this.coarseOffsets[g + 1];
        this.score(q, group, this.fineOff + c0 * this.stride, c1 - c0, this.outOff + c0);
        centroids += c1 - c0;
      }
      lz = this.massesTwo(f, this.outOff, ne);
    }
    // Keep clusters with log-mass ≥ threshold; order by mass.
    const cut = (last ? -Infinity : this.fineThr[t * F + fi]) + lz;
    const keys = this.sortKeys;
    this.nk = this.tokensKept = 0;
    if (this.levels === 1) this.keepRange(0, C, cut, lz);
    else
      for (let e = 0; e < ne; e++) {
        const g = this.expanded[e];
        this.keepRange(this.coarseOffsets[g], this.coarseOffsets[g + 1], cut, lz);
      }
    const { nk, tokensKept } = this;
    keys.subarray(0, nk).sort();
    // Emit members until k; the crossing cluster is cut by exact member scores.
    const ids = new Int32Array(Math.min(k, tokensKept));
    let pos = 0, keysScored = 0;
    for (let i = nk - 1; i >= 0 && pos < k; i--) {
      const c = keyId(keys[i]), a = this.offsets[c], b = this.offsets[c + 1];
      if (pos + b - a <= k) {
        ids.set(this.members.subarray(a, b), pos);
        pos += b - a;
      } else {
        keysScored += this.refine(a, b, k - pos, ids, pos, q, group);
        pos = k;
      }
    }
    this.lastSearch = { fraction: this.fractions[fi], centroids, expanded: ne, clustersKept: nk, tokensKept, keysScored, returned: pos };
    return { ids, scanned: centroids + keysScored };
  }

  /** Writes the `want` best members of [a, b) (max over the group of q·k) at ids[pos…]; returns the keys scored. */
  private refine(a: number, b: number, want: number, ids: Int32Array, pos: number, q: Float32Array, group: number): number {
    const members = this.members;
    if (!this.keys) {
      ids.set(members.subarray(a, a + want), pos);
      return 0;
    }
    const d = this.headDim, s = this.stride, kw = this.keys.keys, f = this.kernel.f32;
    const sc = scratch.refineScores, order = scratch.refineOrder, m = b - a;
    if (scratch.words.length < REFINE_ROWS * d) {
      scratch.words = new Uint16Array(REFINE_ROWS * d);
      scratch.rows = new Float32Array(REFINE_ROWS * d);
    }
    const words = scratch.words;
    for (let i0 = 0; i0 < m; i0 += REFINE_ROWS) {
      const rows = Math.min(REFINE_ROWS, m - i0);
      // Gather the members' 16-bit rows, widen them natively into the kernel.
      for (let i = 0; i < rows; i++) {
        const src = members[a + i0 + i] * d;
        words.set(kw.subarray(src, src + d), i * d);
      }
      const wb = bytesOf(words.subarray(0, rows * d));
      if (s === d) convert(wb, this.keys.dtype, bytesOf(f.subarray(this.memberOff, this.memberOff + rows * d)), 'f32', rows * d);
      else {
        convert(wb, this.keys.dtype, bytesOf(scratch.rows), 'f32', rows * d);
        for (let i = 0; i < rows; i++) f.set(scratch.rows.subarray(i * d, i * d + d), this.memberOff + i * s);
      }
      this.score(q, group, this.memberOff, rows, this.memberOutOff);
      for (let i = 0; i < rows; i++) {
        sc[i0 + i] = f[this.memberOutOff + i];
        order[i0 + i] = i0 + i;
      }
    }
    const o = order.subarray(0, m).sort((x, y) => sc[y] - sc[x] || members[a + x] - members[a + y]);
    for (let i = 0; i < want; i++) ids[pos + i] = members[a + o[i]];
    return m;
  }
}
