// `squeezed` and `squeezed-2l`: Squeezed Attention (Hooper et al., 2024).
//
// At seal, per (layer, kv head): k-means of the head's keys into ≈ tokens/32
// clusters; each centroid is the mean of its keys, so q·c is the mean logit
// of the cluster and size·e^{q·c·scale} estimates (a Jensen lower bound of)
// the cluster's share of the softmax numerator. The estimated attention mass
// of a cluster is
//     mass_c = size_c · e^{s_c} / Σ_c' size_c' · e^{s_c'},  s_c = scale · max_g q_g·c
// with scale = 1/√headDim (GQA: the group's score is the max over its query
// heads, as topk scores). A threshold table, calibrated at seal
// (calibration.ts), maps a target kept fraction to the mass threshold at
// which the kept clusters hold that fraction of the tokens on average, per
// GQA group size.
//
// At decode the session budget sets the target: k/tokens, rounded up to the
// table's next fraction. Clusters with mass ≥ threshold are emitted in order
// of mass until k ids (fewer when the kept clusters hold fewer: attention is
// concentrated); the cluster that crosses k is cut by exact scores of its
// members. With k ≥ tokens every token is returned. `scanned` counts the
// centroids scored plus the member keys scored to cut that cluster.
//
// Two-level (`squeezed-2l`): the fine clusters are grouped into ≈ √C coarse
// groups (coarse centroid = mean of the group's keys, size = its tokens). A
// search scores the coarse centroids, expands the coarse groups whose coarse
// mass passes a calibrated coarse threshold (set so that they hold ≈
// `expand` × the target fraction), then more in order of mass until at
// least max(k, ef) tokens and `minExpanded` groups, and scores only the
// expanded groups' fine centroids. A fine cluster's mass is normalised by the
// fine terms of the expanded groups plus the coarse terms of the others; its
// threshold is calibrated through the same two-level pipeline.
//
// Seal runs clustering.ts (k-means of kmeans.ts), then calibration.ts on the
// index exactly as it will load (head.ts), and stores artifact.ts's bytes.
import { kmeans as faissKmeans } from '../../addon/faiss.js';
import { narrowWords } from '../../addon/kernels.js';
import type { BuildInput, HeadIndexBuilder, HeadKeys } from '../method.js';
import { staticPlusRetrieved } from '../static-plus-retrieved.js';
import { corrupt, decode, encode, type Parts, SRC } from './artifact.js';
import { BLOCK_ROWS, calibrate, calibrationRows } from './calibration.js';
import { cluster, type Clustering } from './clustering.js';
import { SqueezedHead } from './head.js';
import type { KmeansFn } from './kmeans.js';
import { DEFAULTS, KEPT_FRACTIONS, type SqueezedOptions, TABLE_GROUPS } from './options.js';

export { SqueezedHead, type SearchStats } from './head.js';
export { KEPT_FRACTIONS, type SqueezedOptions, TABLE_GROUPS } from './options.js';

export interface BuildInfo {
  ms: number;
  kmeansMs: number;
  calibrationMs: number;
  clusters: number;
  coarse: number;
  twoStage: boolean;
  calibration: 'queries' | 'keys' | 'none';
  calibrationRows: number;
}

const F16_MAX = 65504;

/** Centroids are stored f16 (half the bytes); f32 only when one is out of f16 range. */
function toCentroidWords(c: Float32Array): { words: Uint16Array | Float32Array; dtype: 0 | 2 } {
  for (let i = 0; i < c.length; i++) if (Math.abs(c[i]) > F16_MAX) return { words: c, dtype: 2 };
  return { words: narrowWords(c, 'f16'), dtype: 0 };
}

export interface SqueezedBuilder extends HeadIndexBuilder {
  readonly options: Required<SqueezedOptions>;
  /** Timings and shape of the most recent build (for benchmarks). */
  lastBuild?: BuildInfo;
  load(bytes: Uint8Array, keys: HeadKeys): SqueezedHead;
}

export function squeezedBuilder(options: SqueezedOptions): SqueezedBuilder {
  const o: Required<SqueezedOptions> = { ...DEFAULTS, ...options };
  const builder: SqueezedBuilder = {
    options: o,
    async build(input: BuildInput): Promise<Uint8Array> {
      const t0 = performance.now(), n = input.tokens, d = input.headDim;
      if (!Number.isInteger(n) || n < 0 || !Number.isInteger(d) || d < 1 || input.keys.length < n * d)
        throw new Error(`squeezed: keys hold ${input.keys.length} words, expected ${n} × ${d}`);
      if (input.queries.length < input.queryCount * d) throw new Error('squeezed: fewer query values than queryCount × headDim');
      const kmeans: KmeansFn = faissKmeans;
      const cl: Clustering =
        n === 0
          ? { offsets: Int32Array.of(0), members: new Int32Array(0), centroids: new Float32Array(0), twoStage: false, ...(o.levels === 2 ? { coarseOffsets: Int32Array.of(0), coarseCentroids: new Float32Array(0) } : {}) }
          : await cluster(input, o, kmeans);
      const t1 = performance.now();
      const fineW = toCentroidWords(cl.centroids), coarseW = toCentroidWords(cl.coarseCentroids ?? new Float32Array(0));
      const dtype: 0 | 2 = fineW.dtype === 2 || coarseW.dtype === 2 ? 2 : 0;
      const C = cl.offsets.length - 1;
      const maxBlocks = Math.max(8, Math.min(o.calibrationBlocks, Math.floor(2.5e9 / (BLOCK_ROWS * Math.max(1, C) * d))));
      const cal = calibrationRows(input, maxBlocks, o.seed);
      const parts: Parts = {
        levels: o.levels,
        tokens: n,
        headDim: d,
        centroidDtype: dtype,
        source: cal.source,
        calibrationRows: cal.blocks * cal.len,
        minExpanded: o.levels === 2 ? o.minExpanded : 0,
        fractions: Float32Array.from(KEPT_FRACTIONS),
        groups: Int32Array.from(TABLE_GROUPS),
        fineThr: new Float32Array(TABLE_GROUPS.length * KEPT_FRACTIONS.length),
        coarseThr: new Float32Array(o.levels === 2 ? TABLE_GROUPS.length * KEPT_FRACTIONS.length : 0),
        offsets: cl.offsets,
        members: cl.members,
        centroids: dtype === 0 ? fineW.words : cl.centroids,
        coarseOffsets: o.levels === 2 ? cl.coarseOffsets! : new Int32Array(0),
        coarseCentroids: dtype === 0 ? coarseW.words : (cl.coarseCentroids ?? new Float32Array(0)),
      };
      // Calibrate on the index exactly as load will see it (f16-rounded centroids).
      const head = new SqueezedHead(parts);
      await calibrate(head, input, o, cal);
      parts.fineThr = head.fineThr;
      parts.coarseThr = head.coarseThr;
      const t2 = performance.now();
      builder.lastBuild = {
        ms: t2 - t0,
        kmeansMs: t1 - t0,
        calibrationMs: t2 - t1,
        clusters: C,
        coarse: Math.max(0, parts.coarseOffsets.length - 1),
        twoStage: cl.twoStage,
        calibration: cal.source === SRC.queries ? 'queries' : cal.source === SRC.keys ? 'keys' : 'none',
        calibrationRows: cal.blocks * cal.len,
      };
      return encode(parts);
    },
    load(bytes: Uint8Array, keys: HeadKeys): SqueezedHead {
      const p = decode(bytes, keys);
      if (p.levels !== o.levels) corrupt(`a ${p.levels}-level index, this method loads ${o.levels}-level ones`);
      return new SqueezedHead(p, keys);
    },
  };
  return builder;
}

export const squeezedOneLevel = squeezedBuilder({ levels: 1 });
export const squeezedTwoLevel = squeezedBuilder({ levels: 2 });
export const squeezed = staticPlusRetrieved('squeezed', squeezedOneLevel);
export const squeezed2l = staticPlusRetrieved('squeezed-2l', squeezedTwoLevel);
