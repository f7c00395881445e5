// The estimation zone of a GPU session whose method is not wave (nosa,
// topk-blocks, ...) on the device: where the device holds the document
// layer's wave store (engine/cache/device-wave.ts, as a wave session's step
// uses it), the tokens the method's selection leaves out are estimated there
// (WaveGpuStore.rest) instead of by estimateRest on the host, from the same
// clusters and with the same semantics; the selection itself is attended as
// before (the block pool, the host kernel). At 1M tokens the host's estimate
// was ~30 ms a layer on the H100 host's 16 threads against a ~1.3 ms device
// step (bench/results/estimate-host-vm.md).
import type { BlockList, LayerContext, Selection } from '../index/method.js';
import { WAVE } from '../index/wave/wave.js';
import { waveGroupFits, type WaveGpuRestResult } from '../addon/wave-gpu.js';
import type { ClusterIndex } from '../index/wave/cluster-index.js';
import type { KvSegment } from '../storage/kv-segment.js';
import type { Estimate } from './estimate.js';
import { concatRows } from './cache/selection-parts.js';
import type { Session } from './session.js';

/**
 * Rows a head's selection may list for the device (1M): the call keeps a
 * number per 512 of them and of the clusters in shared memory
 * (native/cuda/wave_rest.cuh). A larger selection is estimated on the host.
 */
export const REST_MAX_ROWS = 1 << 20;
/** Clusters a head may have for the device call, for the same reason (1M). */
export const REST_MAX_CLUSTERS = 1 << 20;

/** A selection's rows of one segment as the device call takes them: per kv head, ranges, blocks, ids. */
export interface RestRows {
  ranges: Int32Array[];
  blocks?: { size: number; ids: Int32Array[] };
  ids?: Int32Array[];
}

/**
 * The rows `selection` attends of `segment`, per kv head, without listing
 * the rows of ranges or blocks (a step's host-to-device bytes stay a few KiB
 * for the block methods). Undefined where the segment is attended whole
 * (nothing to estimate: estimateRest skips it too) or the parts take a shape
 * the call does not (block lists of two sizes, more than REST_MAX_ROWS rows
 * a head).
 */
export function restRows(selection: Selection, segment: KvSegment, kvHeads: number): RestRows | undefined {
  const n = segment.tokens;
  const flat: number[] = [];
  const blockLists: BlockList[] = [];
  const idLists: Int32Array[][] = [];
  for (const p of selection.parts) {
    if (p.segment !== segment) continue;
    if (p.blocks) blockLists.push(p.blocks);
    else if (p.ids) idLists.push(p.ids);
    else {
      const begin = Math.max(0, p.begin ?? 0), end = Math.min(n, p.end ?? n);
      if (begin === 0 && end >= n) return undefined;
      if (end > begin) flat.push(begin, end);
    }
  }
  if (blockLists.some((b) => b.size !== blockLists[0].size)) return undefined;
  // Rows listed per head at most (their count, not the rows): past REST_MAX_ROWS the call refuses.
  let ranged = 0;
  for (let i = 0; i < flat.length; i += 2) ranged += flat[i + 1] - flat[i];
  for (let h = 0; h < kvHeads; h++) {
    let count = ranged;
    for (const b of blockLists) count += b.ids[h].length * b.size;
    for (const ids of idLists) count += ids[h].length;
    if (count > REST_MAX_ROWS) return undefined;
  }
  const shared = Int32Array.from(flat);
  const rows: RestRows = { ranges: Array.from({ length: kvHeads }, () => shared) };
  if (blockLists.length > 0)
    rows.blocks = { size: blockLists[0].size, ids: Array.from({ length: kvHeads }, (_, h) => concatRows(blockLists.map((b) => b.ids[h]))) };
  if (idLists.length > 0) rows.ids = Array.from({ length: kvHeads }, (_, h) => concatRows(idLists.map((ids) => ids[h])));
  return rows;
}

/**
 * A device estimate under way: its call already handed to the device (on
 * libuv's pool), the layer's store held until the call ends.
 */
export interface DeviceRest {
  /** The estimate; settles once the call has ended and the store is released. */
  readonly estimate: Promise<Estimate>;
}

/**
 * Starts the estimate of what `selection` leaves out of the session's one
 * document on the device; undefined, having done nothing, where the device
 * cannot (no GPU, a wave session, not one document, the layer's store not
 * held, the document attended whole): the host estimates.
 *
 * What it awaits (the layer's store) comes before the call: when it
 * resolves, the call is queued, so a caller that starts its next GPU work
 * after it (the pool's attend, which runs on the event loop's thread and
 * holds it to its stream's end) has the two on the device together. As one
 * promise that awaited the store inside, the call was queued only after that
 * attend had returned: nosa + estimate 1.98 ms a step against nosa 1.00 and
 * the estimate's ~0.91 on an H100 (bench/results/gpu-decode-wave-nosa-estimate-nosa-h100.md).
 */
export async function startRestOnDevice(session: Session, ctx: LayerContext, selection: Selection, clusters: ClusterIndex[][], q: Float32Array,
                                        scale: number): Promise<DeviceRest | undefined> {
  const gpu = session.gpu;
  // A wave session here is one whose step the device declined (engine/wave-on-device.ts): so would this.
  if (!gpu || session.method.name === WAVE || ctx.segments.length !== 2 || clusters.length !== 1) return undefined;
  // Paged stores (--gpu-wave-cache) refuse rest: the rows it reads (every given row's cluster) can exceed
  // any cache sized for the wave step. The host estimates, without making the layer's store for nothing.
  if ((gpu.options?.waveCacheShare ?? 0) > 0) return undefined;
  const doc = ctx.segments[0];
  // A group the call cannot hold would be refused every step (after the layer's upload): the host estimates it.
  if (doc.tokens === 0 || !waveGroupFits(ctx.qHeads, ctx.kvHeads, ctx.headDim) || clusters[0].some((c) => c.clusters > REST_MAX_CLUSTERS)) return undefined;
  const rows = restRows(selection, doc, ctx.kvHeads);
  if (!rows) return undefined;
  const held = await gpu.waveLayer(session.model, doc, ctx.layer, clusters[0]);
  if (!held) return undefined;
  if (held.cacheRows > 0) {
    held.release();
    return undefined;
  }
  // WaveGpuStore.rest queues the native call before its first await (beside: on libuv's pool, never the loop).
  let call: Promise<WaveGpuRestResult>;
  try {
    call = held.store.rest({ q, qHeads: ctx.qHeads, scale, ...rows, order: 'rows', stages: false, beside: true });
  } catch (e) {
    held.release();
    throw e;
  }
  const estimate = call
    .then((r): Estimate => {
      held.countRest();
      return { out: r.out, lse: r.lse, estimated: Float32Array.from(r.estimated), scanned: Float32Array.from(r.scanned) };
    })
    .finally(() => held.release());
  return { estimate };
}
