// Making a selection resident and attending over it: the one place that
// decides where a step's parts are read from. With a GPU pool, whole blocks
// of documents are read from the device (misses copied in) and the rest (own
// tokens, partial blocks, row ids) is attended on the host and merged into
// the kernel's answer by log-sum-exp; without one, everything is attended on
// the host and the simulated pool reports what the device pool would move.
import { attend, type KvDtype } from '../../addon/kernels.js';
import type { DeviceRows, SelectionPart } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';
import { POOL_BLOCK, RANGE_PRIORITY, type GpuBackend } from './gpu-pool.js';
import type { BlockStats } from './block-stats.js';
import { mergeInto } from './merge.js';
import { splitForPool, toAttendSegment } from './selection-parts.js';
import { SimulatedPool } from './simulated-pool.js';
import type { ModelShape } from '../../core/model.js';

export interface Residency {
  backend: 'cpu' | 'cuda';
  /** The pool's work: measured with a GPU, simulated without. */
  blocks?: BlockStats;
  /** Of the step's attend time: making blocks resident, and the kernel (host: a device wave step's host stages, asked for with `return: ['timing']`). */
  gpu?: { residentMs: number; kernelMs: number; host?: Record<string, number> };
}

export interface AttendInput {
  layer: number;
  q: Float32Array;
  scale: number;
  out: Float32Array;
  lse: Float32Array;
}

/** Per session: the GPU pool it was admitted to, or one simulated pool per layer. */
export class SessionCache {
  private readonly simulated: SimulatedPool[];

  constructor(
    private readonly model: ModelShape,
    /** The session's own segments: never pooled (they grow every step). */
    private readonly own: readonly KvSegment[],
    readonly gpu?: GpuBackend,
  ) {
    this.simulated = gpu ? [] : Array.from({ length: model.layers }, () => new SimulatedPool(model.kvHeads));
  }

  /** `beside`: parts attended on the host run on libuv's pool, beside a call that holds the loop's thread (addon/kernels.ts attend). */
  async attend(parts: SelectionPart[], a: AttendInput, beside = false): Promise<Residency> {
    const m = this.model, gpu = this.gpu;
    // Parts whose rows a device store holds (a key scanner's: index/method.ts DeviceRows) are attended there with
    // the ranges of the same segment (sinks, window: the store holds every row of it), started first and merged in
    // after the rest (the own tokens); a store that no longer holds them leaves them to the host.
    if (parts.some((p) => p.device)) {
      const { groups, rest } = deviceGroups(parts);
      const started = groups.map((g) => g.rows.attend(g.ids, a.q, m.qHeads / m.kvHeads, a.scale, g.ranges));
      const [others, ...got] = await Promise.allSettled([this.attend(rest, a, beside), ...started]);
      if (others.status === 'rejected') throw others.reason;
      const left: SelectionPart[] = [];
      let onDevice = false;
      got.forEach((r, i) => {
        if (r.status === 'fulfilled' && r.value) {
          mergeInto(a.out, a.lse, r.value.out, r.value.lse, m.headDim);
          onDevice = true;
        } else left.push(...groups[i].parts.map((p): SelectionPart => (p.ids ? { segment: p.segment, ids: p.ids } : p)));
      });
      if (left.length > 0) {
        const host = { out: new Float32Array(a.out.length), lse: new Float32Array(a.lse.length) };
        await attendOnHost(m, left, { ...a, out: host.out, lse: host.lse }, beside);
        mergeInto(a.out, a.lse, host.out, host.lse, m.headDim);
      }
      // A step whose document rows the device attended ran there, whatever attended the own tokens.
      return onDevice ? { ...others.value, backend: 'cuda' } : others.value;
    }
    if (gpu) {
      const own = this.own[a.layer];
      const split = splitForPool(parts, (seg) => seg !== own, POOL_BLOCK, m.kvHeads, RANGE_PRIORITY);
      if (split.poolBlocks > 0 && gpu.fits(m, split.poolBlocks)) {
        // The host's parts (own tokens, partial blocks) on libuv's pool, started first: they run while the
        // pool makes the blocks resident and its kernel runs (on the loop's thread where the call is short,
        // addon/device-calls.ts), and are merged after. Before, they ran first, on the loop, and the pool's
        // kernel merged them: the step waited for both one after the other.
        const host = split.host.length > 0 ? { out: new Float32Array(a.out.length), lse: new Float32Array(a.lse.length) } : undefined;
        const onHost = host && attendOnHost(m, split.host, { ...a, out: host.out, lse: host.lse }, true);
        const [pool, side] = await Promise.allSettled([(async () => gpu.attend(m, a.layer, split.pool, a.q, a.scale, a.out, a.lse))(), onHost]);
        if (pool.status === 'rejected') throw pool.reason;
        if (side.status === 'rejected') throw side.reason;
        if (host) mergeInto(a.out, a.lse, host.out, host.lse, m.headDim);
        const { kernelMs, residentMs, ...blocks } = pool.value;
        return { backend: 'cuda', blocks, gpu: { residentMs, kernelMs } };
      }
      await attendOnHost(m, parts, a, beside);
      return { backend: 'cpu' };
    }
    await attendOnHost(m, parts, a, beside);
    const blocks = this.simulated[a.layer].step(parts, m.headDim);
    return { backend: 'cpu', ...(blocks && { blocks }) };
  }
}

/** A device store's share of a step: its listed rows (a list a kv head) and the same segment's ranges. */
export interface DeviceGroup {
  rows: DeviceRows;
  ids: readonly Int32Array[];
  /** [begin, end) pairs every kv head attends besides its ids (sinks, window). */
  ranges: Int32Array;
  parts: SelectionPart[];
}

/**
 * The parts a device store attends, grouped by store: its listed rows and the range parts of the same segment
 * (disjoint from them: a method's parts never overlap); `rest`: every other part.
 */
export function deviceGroups(parts: SelectionPart[]): { groups: DeviceGroup[]; rest: SelectionPart[] } {
  const groups: DeviceGroup[] = [];
  const taken = new Set<SelectionPart>();
  for (const p of parts) {
    if (!p.device || !p.ids) continue;
    const ranges = parts.filter((r) => r.segment === p.segment && !r.device && !r.ids && !r.blocks && !taken.has(r));
    // The ranges as pairs and the ids as they are: the store expands and gathers them into its stage (a step's
    // ~86K ids at 1M were concatenated with the ranges here, then copied again by the binding).
    const pairs = Int32Array.from(ranges.flatMap((r) => [r.begin ?? 0, r.end ?? r.segment.tokens]));
    groups.push({ rows: p.device, ids: p.ids, ranges: pairs, parts: [p, ...ranges] });
    taken.add(p);
    for (const r of ranges) taken.add(r);
  }
  return { groups, rest: parts.filter((p) => !taken.has(p)) };
}

/** The host kernel over every part, combined by log-sum-exp (`beside`: on libuv's pool, addon/kernels.ts attend). */
export function attendOnHost(m: { qHeads: number; kvHeads: number; headDim: number; dtype: KvDtype }, parts: SelectionPart[], a: AttendInput, beside = false): Promise<void> {
  return attend({
    q: a.q,
    qHeads: m.qHeads,
    kvHeads: m.kvHeads,
    headDim: m.headDim,
    dtype: m.dtype,
    scale: a.scale,
    segments: parts.map(toAttendSegment),
    out: a.out,
    lse: a.lse,
  }, beside);
}
