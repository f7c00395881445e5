// The estimation zone of a step: the document tokens the method did not
// select are estimated from the documents' cluster summaries (native
// estimateClusters) instead of dropped, and merged into the exact answer by
// log-sum-exp. The session's own tokens are never clustered: the methods
// always attend them exactly.
import { estimateClusters, type ClusterHeadArgs } from '../addon/estimate.js';
import type { LayerContext, Selection } from '../index/method.js';
import type { ClusterIndex } from '../index/wave/cluster-index.js';
import { concatRows, rowsOf } from './cache/selection-parts.js';

export interface Estimate {
  out: Float32Array;
  lse: Float32Array;
  /** Per kv head: tokens covered by the estimate. */
  estimated: Float32Array;
  /** Per kv head: keys it read (the rows partly attended clusters have left, weighed by their own logits). */
  scanned: Float32Array;
}

/** Estimates what `selection` leaves out of the documents; `clusters[s]` are document s's heads for this layer. */
export async function estimateRest(ctx: LayerContext, selection: Selection, clusters: ClusterIndex[][], q: Float32Array, scale: number): Promise<Estimate> {
  const d = ctx.headDim;
  const est: Estimate = { out: new Float32Array(ctx.qHeads * d), lse: new Float32Array(ctx.qHeads).fill(-Infinity), estimated: new Float32Array(ctx.kvHeads), scanned: new Float32Array(ctx.kvHeads) };
  const segments: ClusterHeadArgs[][] = [];
  clusters.forEach((heads, s) => {
    const segment = ctx.segments[s];
    const parts = selection.parts.filter((p) => p.segment === segment);
    // A document attended whole leaves nothing to estimate: skip it rather than list every row.
    if (parts.some((p) => !p.ids && !p.blocks && (p.begin ?? 0) === 0 && (p.end ?? segment.tokens) >= segment.tokens)) return;
    segments.push(heads.map((index, h) => index.estimateArgs(concatRows(parts.map((p) => rowsOf(p, h))))));
  });
  if (segments.length === 0) return est;
  const h0 = clusters[0][0];
  await estimateClusters({
    q,
    qHeads: ctx.qHeads,
    kvHeads: ctx.kvHeads,
    headDim: d,
    centroidStride: h0.stride,
    dtype: h0.arrays.dtype,
    scale,
    segments,
    ...est,
  });
  return est;
}

