// The wave layer-step of a GPU session whose document layer the device holds
// (engine/cache/device-wave.ts): one native call gives the document's share
// of the attention — the ids the host path would keep, the sinks and window,
// the estimate of everything else — and the session's own tokens are
// attended as any step's and merged by log-sum-exp. The answer, the ids and
// the estimate are the host path's (test/integration/gpu-wave.test.ts).
import type { LayerContext, SearchParams, Selection, SelectionPart } from '../index/method.js';
import { staticRanges, type Range } from '../index/static-plus-retrieved.js';
import { WAVE } from '../index/wave/wave.js';
import { waveGroupFits, type WaveGpuStepResult } from '../addon/wave-gpu.js';
import type { ClusterIndex } from '../index/wave/cluster-index.js';
import { pagedStepFits, rangeRows, stepDocument, type DocumentStepArgs } from './cache/device-wave.js';
import { mergeInto } from './cache/merge.js';
import type { Session } from './session.js';

export interface DeviceStep {
  /** The ranges and own tokens; the document's kept ids only when asked for (`wantIds`). */
  selection: Selection;
  /** Exact tokens per kv head: the ranges, the kept ids, the own tokens. */
  attended: number;
  /** Tokens the estimate covered, per kv head (when the layer estimates). */
  estimated?: number;
  /** The step's wall ms: the native call (selection, estimate, the document's attention), the own tokens attended on the host meanwhile. */
  deviceMs: number;
  /** The call on the device's stream, CUDA events. */
  kernelMs: number;
  /** The native call's host stages (addon/wave-gpu.ts WaveGpuStepResult.host) and the own tokens' attend, ms: built when asked (`return: ['timing']`). */
  host: () => Record<string, number>;
  /** The step's answer: the device call's own arrays (no copy), or, where the own tokens were attended beside it, their merge. */
  out: Float32Array;
  lse: Float32Array;
}

/**
 * Where the own tokens are attended: 'native' (the default), inside the
 * device call, on its thread while the device runs the step, merged there
 * (WaveGpuStepArgs.own): one native call, nothing on another thread;
 * 'beside', started on libuv's pool before the device call and merged here
 * (before 'native': in bench:decode on the H100 the pool's attend settled
 * 0.018 ms after the device call, which held the loop, and its dispatch and
 * merge were JS on the step's path, bench/results/decode-full-llama3.2-1b-h100-4layers-cs16-timing-ao.md);
 * 'after', after the device call on the loop's thread (the older order:
 * beside was faster from the first own token on, H100 host, llama3.2-1b
 * shape at 1M, bench/results/wave-step-host-own-ab-h100.md: a step 0.908 ->
 * 0.879 ms with 0-256 own tokens). bench/wave-step-host.ts --own-ab compares two.
 */
export type OwnAttend = 'native' | 'beside' | 'after';
let ownMode: OwnAttend = 'native';
export function setOwnAttend(mode: OwnAttend): void {
  ownMode = mode;
}

/**
 * The document's sinks and window of the last layer-step (staticRanges'
 * ranges, their rows, the rows as the device call takes them): every layer
 * of a token asks for the same (they depend on the context's and the
 * document's tokens, sinks and window only), so the layers after the first
 * reuse them instead of recomputing (bench/results/wave-step-host-js-vm.md).
 * Read, never written, by the steps that share them.
 */
interface DocumentRanges {
  tokens: number;
  docTokens: number;
  offset: number;
  sinks: number;
  window: number;
  ranges: Range[];
  covered: number;
  exact: Int32Array;
}
let lastRanges: DocumentRanges | undefined;

function documentRanges(ctx: LayerContext, p: SearchParams): DocumentRanges {
  const last = lastRanges, docTokens = ctx.segments[0].tokens, offset = ctx.offsets[0];
  if (last && last.tokens === ctx.tokens && last.docTokens === docTokens && last.offset === offset && last.sinks === p.sinks && last.window === p.window) return last;
  const ranges = staticRanges(ctx, 0, p);
  const covered = ranges.reduce((n, [a, b]) => n + b - a, 0);
  return (lastRanges = { tokens: ctx.tokens, docTokens, offset, sinks: p.sinks, window: p.window, ranges, covered, exact: rangeRows(ranges) });
}

const mean = (xs: number[]) => {
  let sum = 0;
  for (const x of xs) sum += x;
  return sum / xs.length;
};

/**
 * Runs the step on the device when it can: a `wave` session on the GPU,
 * one document, whose layer the device holds (or can be made to). Returns
 * undefined otherwise, having done nothing: the host path runs. The answer
 * is the device call's own arrays (no copy; the own tokens' 'beside' and
 * 'after' attends make their own).
 */
export async function waveOnDevice(session: Session, ctx: LayerContext, p: SearchParams, q: Float32Array, scale: number,
                                   wantIds: boolean): Promise<DeviceStep | undefined> {
  const gpu = session.gpu, heads = ctx.indexes[0] as ClusterIndex[] | undefined;
  if (!gpu || session.method.name !== WAVE || ctx.segments.length !== 2 || !heads) return undefined;
  const doc = ctx.segments[0], own = ctx.segments[1];
  // A group the step cannot hold would be refused every step (after the layer's upload): the host path runs.
  if (doc.tokens === 0 || !waveGroupFits(ctx.qHeads, ctx.kvHeads, ctx.headDim)) return undefined;
  // Held at once where the layer's store is live (GpuBackend.waveLayer): no turn of the loop's microtasks before the call.
  const got = gpu.waveLayer(session.model, doc, ctx.layer, heads);
  const held = got instanceof Promise ? await got : got;
  if (!held) return undefined;
  try {
    // What staticPlusRetrieved asks of the index: the budget beyond the
    // static ranges, searched for with room for ids those ranges hold.
    const { ranges, covered, exact } = documentRanges(ctx, p);
    const keep = Math.max(0, Math.min(p.budget, doc.tokens - covered));
    // The decode step's own answer (params.estimate), so the device rescores as the host path would.
    const estimate = p.estimate ?? session.clustersFor(ctx.layer) !== undefined;
    const ownPart: SelectionPart | undefined = own.tokens > 0 ? { segment: own, begin: 0, end: own.tokens } : undefined;
    const native = ownPart !== undefined && ownMode === 'native';
    const args: DocumentStepArgs = { q, qHeads: ctx.qHeads, scale, searchK: keep + covered, keep, ranges, exact, estimate, ef: p.ef, ids: wantIds, own: native ? { k: own.k, v: own.v, tokens: own.tokens } : undefined };
    // A paged store whose cache could not hold this step's rows would fail it: the host path answers.
    if (!pagedStepFits(held, args, heads, doc.tokens)) {
      held.countOverCache();
      return undefined;
    }
    const t0 = performance.now();
    let r: WaveGpuStepResult, ownMs = 0, deviceMs: number, out: Float32Array, lse: Float32Array;
    if (native || !ownPart) {
      // One native call and nothing beside it (the default; the own tokens, with 'native', inside it): awaited as it
      // is, not through Promise.allSettled and an async wrapper (~1 µs a step); a refusal thrown at once leaves
      // through the finally below as its rejection did, and nothing else is running to wait for.
      r = await stepDocument(held.store, args);
      deviceMs = performance.now() - t0;
      ({ out, lse } = r);
    } else {
      // The own tokens, on the host as on every path (never pooled), beside the
      // device's work on the document: neither reads what the other writes.
      // 'beside': the own attend is started first, on libuv's pool, so it runs
      // while the device call waits for its stream, on the pool or on the event
      // loop's thread (a short call, addon/device-calls.ts); 'after': after the
      // device call. Both settle before the store is released (a failure of one
      // must not free it while the other reads it).
      const o = (out = new Float32Array(ctx.qHeads * ctx.headDim)), l = (lse = new Float32Array(ctx.qHeads));
      const hostOwn = (beside: boolean) =>
        session.cache.attend([ownPart], { layer: ctx.layer, q, scale, out: o, lse: l }, beside).then((x) => ((ownMs = performance.now() - t0), x));
      const ownAttend = ownMode === 'beside' ? hostOwn(true) : undefined;
      const [device, host] = await Promise.allSettled([
        // A refusal thrown at once is a rejection here, so the own attend already started is waited for all the same.
        (async () => stepDocument(held.store, args))(),
        ownAttend ?? hostOwn(false),
      ]);
      deviceMs = performance.now() - t0;
      if (device.status === 'rejected') throw device.reason;
      if (host.status === 'rejected') throw host.reason;
      r = device.value;
      mergeInto(o, l, r.out, r.lse, ctx.headDim);
    }
    const parts: SelectionPart[] = ranges.map(([begin, end]) => ({ segment: doc, begin, end }));
    if (r.ids) parts.push({ segment: doc, ids: r.ids });
    if (ownPart) parts.push(ownPart);
    const step: DeviceStep = {
      selection: { parts, scanned: mean(r.scanned) },
      attended: covered + mean(r.kept) + own.tokens,
      deviceMs,
      kernelMs: r.ms,
      // own: the own tokens' attend (native: its time inside the call; else when it settled), device: the call and it settled, from the step's start.
      host: () => ({ ...r.host, own: native ? r.host.overlap : ownMs, device: deviceMs }),
      out,
      lse,
    };
    if (estimate) step.estimated = mean(r.estimated);
    return step;
  } finally {
    held.release();
  }
}
