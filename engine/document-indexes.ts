// Builds and loads the per-(layer, kv head) indexes of a document for the
// retrieval methods that search one.
import type { HeadIndex, HeadIndexBuilder, HeadKeys } from '../index/method.js';
import type { KvSegment } from '../storage/kv-segment.js';
import type { ArtifactReplace, DocumentStore } from '../storage/document-store.js';
import type { ArtifactWrite } from '../storage/store.js';
import type { ModelShape } from '../core/model.js';
import { concat } from '../addon/typed-concat.js';

const NO_ROWS = new Float32Array(0);

/** Prefill query rows kept per (layer, kv head), for attention-aware indexes. */
export class PrefillQueries {
  private readonly chunks: Float32Array[][][];
  private readonly counts: number[][];

  constructor(
    private readonly model: ModelShape,
    /** Keep the queries of one token in `stride` (bounds memory and build time). */
    readonly stride: number,
  ) {
    this.chunks = Array.from({ length: model.layers }, () => Array.from({ length: model.kvHeads }, () => []));
    this.counts = Array.from({ length: model.layers }, () => new Array<number>(model.kvHeads).fill(0));
  }

  /** q: [qHeads, n, headDim] f32 for tokens [start, start + n) of a layer; keeps the tokens t with t % stride == 0. */
  add(layer: number, start: number, q: Float32Array, n: number): void {
    const kept: number[] = [];
    for (let i = 0; i < n; i++) if ((start + i) % this.stride === 0) kept.push(i);
    this.keep(layer, q, n, kept);
  }

  /** q: [qHeads, count, headDim] f32, the rows of the kept tokens only (in token order), as add would keep them. */
  addKept(layer: number, q: Float32Array, count: number): void {
    this.keep(layer, q, count, Array.from({ length: count }, (_, i) => i));
  }

  /** Keeps token rows `kept` of q [qHeads, n, headDim], grouped by kv head. */
  private keep(layer: number, q: Float32Array, n: number, kept: number[]): void {
    const { qHeads, kvHeads, headDim: d } = this.model;
    const G = qHeads / kvHeads;
    if (kept.length === 0) return;
    for (let h = 0; h < kvHeads; h++) {
      const rows = new Float32Array(kept.length * G * d);
      let at = 0;
      for (const i of kept)
        for (let g = 0; g < G; g++) {
          const head = h * G + g;
          rows.set(q.subarray((head * n + i) * d, (head * n + i + 1) * d), at);
          at += d;
        }
      this.chunks[layer][h].push(rows);
      this.counts[layer][h] += kept.length * G;
    }
  }

  /**
   * One (layer, kv head)'s rows, [queryCount, headDim]. Chunks added since
   * the last call are joined into one array, kept in their place: later
   * calls (a method reads the count every step) copy nothing. The array is
   * never written again, so it stays valid, with the rows of its time,
   * after later adds.
   */
  rows(layer: number, head: number): { queries: Float32Array; queryCount: number } {
    const chunks = this.chunks[layer][head], queryCount = this.counts[layer][head];
    if (chunks.length > 1) chunks.splice(0, chunks.length, concat(Float32Array, chunks));
    return { queries: chunks[0] ?? NO_ROWS, queryCount };
  }
}

export function headKeys(seg: KvSegment, head: number): HeadKeys {
  const n = seg.tokens * seg.headDim;
  return { keys: seg.k[head].subarray(0, n), values: seg.v[head].subarray(0, n), tokens: seg.tokens, headDim: seg.headDim, dtype: seg.dtype };
}

export async function buildArtifacts(
  method: string,
  builder: HeadIndexBuilder,
  layers: KvSegment[],
  queries: PrefillQueries | undefined,
  onProgress: (done: number) => void,
  clusterSize?: number,
  device = false,
): Promise<ArtifactWrite[]> {
  const jobs = layers.flatMap((seg, layer) => Array.from({ length: seg.kvHeads }, (_, head) => ({ layer, head })));
  const out = new Array<ArtifactWrite>(jobs.length);
  let next = 0, done = 0;
  // Up to the builder's concurrency at once, each worker taking the next
  // (layer, head); the artifacts keep their (layer, head) order.
  const worker = async () => {
    while (next < jobs.length) {
      const i = next++, { layer, head } = jobs[i];
      const q = queries?.rows(layer, head) ?? { queries: new Float32Array(0), queryCount: 0 };
      let bytes: Uint8Array;
      try {
        bytes = await builder.build({ ...headKeys(layers[layer], head), ...q, clusterSize, device });
      } catch (e) {
        // Keys the index cannot hold (native RangeError: beyond what f32 k-means clusters): the seal is refused (422), naming where.
        throw e instanceof RangeError ? new RangeError(`${method} index of layer ${layer}, kv head ${head}: ${e.message}`) : e;
      }
      out[i] = { method, layer, head, bytes };
      onProgress(++done);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(builder.concurrency ?? 1, jobs.length)) }, worker));
  return out;
}

export function loadIndexes(builder: HeadIndexBuilder, layers: KvSegment[], artifacts: Uint8Array[][]): HeadIndex[][] {
  return layers.map((seg, layer) => artifacts[layer].map((bytes, head) => builder.load(bytes, headKeys(seg, head))));
}

/**
 * Replaces in `artifacts` each that `builder` reads in an older format by
 * its current form (HeadIndexBuilder.upgrade), and returns those rewrites
 * for the store: converted once here, not at every load. Throws as a load
 * of a stale artifact does.
 */
export function upgradeArtifacts(method: string, builder: HeadIndexBuilder, artifacts: Uint8Array[][]): ArtifactReplace[] {
  const out: ArtifactReplace[] = [];
  if (!builder.upgrade) return out;
  artifacts.forEach((row, layer) =>
    row.forEach((was, head) => {
      const bytes = builder.upgrade!(was);
      if (bytes) out.push({ method, layer, head, bytes, was }), (row[head] = bytes);
    }),
  );
  return out;
}

/**
 * Stores `upgraded` (upgradeArtifacts') in place of the bytes they were read
 * as, where the store can: how many it wrote. A failed rewrite is logged and
 * writes none: the indexes are loaded already, and the older bytes stay
 * readable (the next load converts them again), so it fails no attach.
 */
export async function storeUpgraded(store: Pick<DocumentStore, 'name' | 'replaceArtifacts'>, id: string, method: string, upgraded: ArtifactReplace[]): Promise<number> {
  if (upgraded.length === 0 || !store.replaceArtifacts) return 0;
  try {
    return await store.replaceArtifacts(id, method, upgraded);
  } catch (e) {
    console.error(`kvrecall: document ${id}: storing its ${method} artifacts converted from an older format in ${store.name} failed (${(e as Error).message}); they stay as they were`);
    return 0;
  }
}
