// Clustering of one head's keys into the CSR layout the artifact stores.
// Each centroid is recomputed as the exact float64 mean of its members'
// keys, so that q·c is the mean logit of the cluster (what the mass
// estimate assumes), whatever k-means converged to.
//
// Clustering cost is bounded: up to `flatMaxClusters` clusters, one flat
// k-means; above, two stages — k-means into P ≈ √C partitions, then k-means
// of each partition into clusters in proportion to its size — about
// 2·n·√C·d per iteration instead of n·C·d (the partitions are then the
// coarse groups of the two-level index).
import type { KvDtype } from '../../addon/kernels.js';
import type { HeadKeys } from '../method.js';
import { gather16, lut } from './key-rows.js';
import { Assigner, type KmeansFn, kmeansSampled, lloyd } from './kmeans.js';
import type { SqueezedOptions } from './options.js';
import { Rng } from './sampling.js';
import { ID_SPAN } from './search-scratch.js';
import { tick } from './tick.js';

const MAX_CLUSTERS = ID_SPAN - 1; // sort keys (search-scratch.ts) pack a cluster id into 21 bits

export interface Clustering {
  /** [C + 1] into members; clusters of one coarse group are contiguous. */
  offsets: Int32Array;
  /** [n] token ids grouped by cluster, ascending within one. */
  members: Int32Array;
  /** [C, d]: the mean of each cluster's keys. */
  centroids: Float32Array;
  /** Two-level: [P + 1] into clusters, and [P, d] means of each group's keys. */
  coarseOffsets?: Int32Array;
  coarseCentroids?: Float32Array;
  twoStage: boolean;
}

/** Groups ids by label (labels in [0, k)), dropping empty labels: CSR offsets and members. */
function groupBy(labels: Int32Array, k: number, ids?: Int32Array): { offsets: Int32Array; members: Int32Array; count: number } {
  const counts = new Int32Array(k + 1);
  for (let i = 0; i < labels.length; i++) counts[labels[i] + 1]++;
  for (let c = 0; c < k; c++) counts[c + 1] += counts[c];
  const members = new Int32Array(labels.length), at = counts.slice(0, k);
  for (let i = 0; i < labels.length; i++) members[at[labels[i]]++] = ids ? ids[i] : i;
  const offsets: number[] = [0];
  for (let c = 0; c < k; c++) if (counts[c + 1] > counts[c]) offsets.push(counts[c + 1]);
  return { offsets: Int32Array.from(offsets), members, count: offsets.length - 1 };
}

/** Means of clusters (CSR over token ids), in float64, from the 16-bit keys. */
function clusterMeans(keys: Uint16Array, d: number, dtype: KvDtype, offsets: Int32Array, members: Int32Array): Float32Array {
  const C = offsets.length - 1, out = new Float32Array(C * d), acc = new Float64Array(d), table = lut(dtype);
  for (let c = 0; c < C; c++) {
    acc.fill(0);
    for (let m = offsets[c]; m < offsets[c + 1]; m++) for (let j = 0, b = members[m] * d; j < d; j++) acc[j] += table[keys[b + j]];
    const size = offsets[c + 1] - offsets[c];
    for (let j = 0; j < d; j++) out[c * d + j] = acc[j] / size;
  }
  return out;
}

/** Size-weighted means of groups of clusters (offsets into clusters). */
function groupMeans(centroids: Float32Array, sizes: (c: number) => number, d: number, groupOffsets: Int32Array): Float32Array {
  const P = groupOffsets.length - 1, out = new Float32Array(P * d), acc = new Float64Array(d);
  for (let p = 0; p < P; p++) {
    acc.fill(0);
    let total = 0;
    for (let c = groupOffsets[p]; c < groupOffsets[p + 1]; c++) {
      const w = sizes(c);
      total += w;
      for (let j = 0; j < d; j++) acc[j] += w * centroids[c * d + j];
    }
    for (let j = 0; j < d; j++) out[p * d + j] = acc[j] / total;
  }
  return out;
}

export async function cluster(input: HeadKeys, o: Required<SqueezedOptions>, kmeans: KmeansFn): Promise<Clustering> {
  const { tokens: n, headDim: d, dtype, keys } = input;
  const C = Math.max(1, Math.min(n, MAX_CLUSTERS, Math.round(n / o.tokensPerCluster)));
  const run = (k: Uint16Array, tokens: number, clusters: number, seed: number) =>
    clusters === 1
      ? Promise.resolve({ assign: new Int32Array(tokens), sizes: Int32Array.of(tokens), centroids: new Float32Array(d) })
      : kmeansSampled(kmeans, { keys: k, tokens, headDim: d, dtype, clusters, iterations: o.iterations, seed });

  if (C <= o.flatMaxClusters) {
    const r = await run(keys, n, C, o.seed);
    const { offsets, members } = groupBy(r.assign, C);
    const centroids = clusterMeans(keys, d, dtype, offsets, members);
    if (o.levels === 1) return { offsets, members, centroids, twoStage: false };
    // Coarse: size-weighted k-means of the fine centroids into ≈ √C groups.
    const Cf = offsets.length - 1, P = Math.max(1, Math.min(Cf, Math.round(Math.sqrt(Cf))));
    const w = Float64Array.from({ length: Cf }, (_, c) => offsets[c + 1] - offsets[c]);
    const rng = new Rng(o.seed ^ 0x2c1b3c6d);
    let labels = new Int32Array(Cf);
    if (P > 1) {
      const cc = await lloyd(centroids, Cf, d, P, Math.max(o.iterations, 20), rng, w);
      const asg = new Assigner(P, d);
      asg.setCentroids(cc);
      for (let i = 0; i < Cf; i += 4) asg.assign4((r, dst, at) => dst.set(centroids.subarray((i + r) * d, (i + r + 1) * d), at), Math.min(4, Cf - i), labels, i);
    }
    const g = groupBy(labels, P);
    // Reorder fine clusters so that each coarse group's are contiguous.
    const order = g.members;
    const offs = new Int32Array(Cf + 1), mem = new Int32Array(n), cen = new Float32Array(Cf * d);
    for (let i = 0; i < Cf; i++) {
      const c = order[i], a = offsets[c], b = offsets[c + 1];
      mem.set(members.subarray(a, b), offs[i]);
      offs[i + 1] = offs[i] + b - a;
      cen.set(centroids.subarray(c * d, c * d + d), i * d);
    }
    const coarseCentroids = groupMeans(cen, (c) => offs[c + 1] - offs[c], d, g.offsets);
    return { offsets: offs, members: mem, centroids: cen, coarseOffsets: g.offsets, coarseCentroids, twoStage: false };
  }

  // Two stages: partitions, then clusters within each in proportion to its size.
  const P = Math.max(2, Math.round(Math.sqrt(C)));
  const part = await run(keys, n, P, o.seed);
  const parts = groupBy(part.assign, P);
  const offsets: number[] = [0], coarse: number[] = [0];
  const members = new Int32Array(n);
  let at = 0;
  for (let p = 0; p < parts.count; p++) {
    const ids = parts.members.subarray(parts.offsets[p], parts.offsets[p + 1]);
    const np = ids.length, Cp = Math.max(1, Math.min(np, Math.round((C * np) / n)));
    const r = await run(gather16(keys, d, ids), np, Cp, (o.seed + 1 + p) >>> 0);
    const g = groupBy(r.assign, Cp, ids);
    members.set(g.members, at);
    for (let c = 0; c < g.count; c++) offsets.push(at + g.offsets[c + 1]);
    at += np;
    coarse.push(offsets.length - 1);
    await tick();
  }
  const offs = Int32Array.from(offsets);
  const centroids = clusterMeans(keys, d, dtype, offs, members);
  if (o.levels === 1) return { offsets: offs, members, centroids, twoStage: true };
  const coarseOffsets = Int32Array.from(coarse);
  const coarseCentroids = groupMeans(centroids, (c) => offs[c + 1] - offs[c], d, coarseOffsets);
  return { offsets: offs, members, centroids, coarseOffsets, coarseCentroids, twoStage: true };
}
