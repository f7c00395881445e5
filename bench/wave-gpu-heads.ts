// The wave GPU benches' kv heads (bench/wave-gpu.ts, bench/wave-gpu-rest.ts):
// random keys and values as storage words, clustered by the real builder.
import { bytesOf, convert, type KvDtype } from '../addon/kernels.js';
import type { WaveGpuHead } from '../addon/wave-gpu.js';
import { buildClusters } from '../index/wave/cluster-build.js';
import { decodeClusters, type ClusterArrays } from '../index/wave/cluster-codec.js';
import { ClusterIndex } from '../index/wave/cluster-index.js';
import type { Rng } from '../workload/index.js';

export function words(f: Float32Array, dt: KvDtype): Uint16Array {
  const w = new Uint16Array(f.length);
  convert(bytesOf(f), 'f32', bytesOf(w), dt, f.length);
  return w;
}

/** What caseHeads reads of a case (bench/wave-gpu.ts's WaveCase). */
export interface HeadsCase {
  dt: KvDtype;
  kvHeads: number;
  d: number;
  tokens: number;
  clusterSize: number;
  /** Keys drawn from this many distinct rows (ties). */
  distinctKeys?: number;
}

/** The case's kv heads: random keys (ties where asked) and values, clustered by the real builder (k-means). */
export async function caseHeads(c: HeadsCase, rng: Rng, seed: number): Promise<{ keysF: Float32Array[]; heads: ClusterIndex[]; gpuHeads: WaveGpuHead[] }> {
  const { dt, d, tokens: N, kvHeads: H } = c;
  const keysF: Float32Array[] = [], heads: ClusterIndex[] = [], gpuHeads: WaveGpuHead[] = [];
  for (let h = 0; h < H; h++) {
    const kf = Float32Array.from({ length: N * d }, () => rng.normal());
    // Ties: every row a copy of one of the first few.
    if (c.distinctKeys)
      for (let t = c.distinctKeys; t < N; t++) {
        const src = rng.int(c.distinctKeys) * d;
        kf.copyWithin(t * d, src, src + d);
      }
    const keys = words(kf, dt), values = words(Float32Array.from({ length: N * d }, () => rng.normal()), dt);
    const bytes = await buildClusters({ keys, values, tokens: N, headDim: d, dtype: dt, queries: new Float32Array(0), queryCount: 0 },
      { clusterSize: c.clusterSize, segmentTokens: 8192, iterations: 4, seed: seed + h });
    const arrays: ClusterArrays = decodeClusters(bytes);
    keysF.push(kf);
    const index = new ClusterIndex(arrays, keys, values);
    heads.push(index);
    // The head's share of the second-order term, where its artifact has one (else the whole term).
    const { varianceShare } = index.estimateArgs() as { varianceShare?: number };
    gpuHeads.push({ centroids: arrays.centroids, valueMeans: arrays.valueMeans, keyAxes: arrays.keyAxes, axisScales: arrays.axisScales,
      keyVars: arrays.keyVars, varScales: arrays.varScales, varianceShare,
      counts: arrays.counts, tokenCluster: arrays.tokenCluster, keys, values });
  }
  return { keysF, heads, gpuHeads };
}
