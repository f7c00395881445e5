// One decode step of one layer, top to bottom:
//   check the request → append the current token → the method selects →
//   the selection is made resident (GPU pool) → attend over it (parts
//   combined by log-sum-exp) → estimate what it left out (when the session
//   estimates) and merge that in → answer. A wave session whose document
//   layer the GPU holds does the middle three in one device call; another
//   method's GPU session estimates there (engine/rest-on-device.ts).
// Nothing else here depends on which retrieval method the session uses.
import { budgetTokens, type LayerContext, type SearchParams, type Selection } from '../index/method.js';
import type { Residency } from './cache/residency.js';
import { waveOnDevice, type DeviceStep } from './wave-on-device.js';
import type { BlockStats } from './cache/block-stats.js';
import { attendedCount, rowsOf, selectedPositions } from './cache/selection-parts.js';
import type { AttendRequest } from './attend-request.js';
import type { Session } from './session.js';
import { conflict, invalid } from '../core/errors.js';
import { estimateRest } from './estimate.js';
import { mergeInto } from './cache/merge.js';
import { startRestOnDevice } from './rest-on-device.js';

export interface AttendResult {
  out: Float32Array; // [qHeads, headDim]
  lse: Float32Array; // [qHeads]
  /** Per kv head, the context positions attended (when asked). */
  selection?: Int32Array[];
  /** Per kv head, the selected K and V rows in storage dtype (when asked). */
  kv?: { k: Uint16Array[]; v: Uint16Array[] };
  /**
   * ms: the whole step; selectMs: the method's selection; attendMs: making
   * the selection resident and attending; backend: where the kernel ran;
   * blocks: the pool's work (measured with a GPU, simulated without); gpu:
   * of attendMs, making blocks resident and the kernel itself.
   */
  stats: {
    tokens: number;
    /** Tokens attended exactly, per kv head. */
    attended: number;
    /** Tokens covered by estimates, per kv head (sessions that estimate). */
    estimated?: number;
    scanned: number;
    /** Keys read as 4-bit codes, per kv head (a retrieval-attention session's code walk; those it then scored exactly are in scanned too). */
    codes?: number;
    ms: number;
    selectMs: number;
    attendMs: number;
    backend: 'cpu' | 'cuda';
    blocks?: BlockStats;
    /** host: with `return: ['timing']`, a device step's host stages (engine/wave-on-device.ts DeviceStep.host). */
    gpu?: { residentMs: number; kernelMs: number; host?: Record<string, number> };
  };
}

export async function decodeStep(session: Session, req: AttendRequest): Promise<AttendResult> {
  const t0 = performance.now();

  // Append the current token: the query is the last position and sees itself.
  const own = session.own[req.layer];
  if (req.position !== undefined && req.position !== own.tokens)
    throw conflict(`layer ${req.layer} of session ${session.id} holds ${own.tokens} own tokens: the next append is position ${own.tokens}, not ${req.position}`);
  const before = own.tokens;
  if (req.k && req.v) own.append(req.k.data, req.v.data, req.k.dtype, 1, req.v.dtype);
  // The step after its append (select, attend, estimate, answer) is this
  // function's rest, not an async function of its own: a device layer-step
  // awaits only the device call (bench/results/wave-step-host-js-vm.md).
  try {
    const ctx = session.context(req.layer);
    const t1 = performance.now();
    // The layer's own parameters (a session's per-layer policy may give each layer its budget), and
    // whether it estimates (session.clustersFor is defined), its clusters looked up on the host path only.
    // Copied, then set: V8 copies a spread followed by more keys (`{ ...p, budget, estimate }`) on a slow
    // path, ~0.7 µs against ~0.08 (the 2-core VM); the keys come out in the same order either way.
    const params: SearchParams = Object.assign({}, session.params);
    params.budget = budgetTokens(session.budgetFor(req.layer), ctx.tokens);
    params.estimate = session.estimates(req.layer);

    // A wave session whose document layer the device holds: one native call
    // selects, attends the document and estimates its rest; the own tokens
    // are merged in (engine/wave-on-device.ts). Otherwise hostStep.
    const wantIds = req.want.has('selection') || req.want.has('kv');
    const device = await waveOnDevice(session, ctx, params, req.q, req.scale, wantIds);
    if (device) return deviceAnswer(session, req, ctx, device, t0, t1, wantIds);
    return await hostStep(session, req, ctx, params, t0, t1, wantIds);
  } catch (e) {
    // A step that fails after its append (a device or kernel error) takes the token back, so the step
    // changed nothing: its retry appends it once, where it was refused with `position` or appended twice.
    own.setTokens(before);
    throw e;
  }
}

/** The answer of a step the device ran (waveOnDevice): the host path's stats, keys in its order. */
function deviceAnswer(session: Session, req: AttendRequest, ctx: LayerContext, device: DeviceStep, t0: number, t1: number, wantIds: boolean): AttendResult {
  const m = session.model;
  const { selection, out, lse } = device;
  refuseOverflow(lse, selection, m.qHeads / m.kvHeads, req.scale);
  const t2 = t1 + device.deviceMs;
  const t3 = performance.now();
  const gpu: NonNullable<AttendResult['stats']['gpu']> = { residentMs: 0, kernelMs: device.kernelMs };
  if (req.want.has('timing')) gpu.host = device.host();
  const { attended, estimated } = device, scanned = selection.scanned, tokens = ctx.tokens, selectMs = t2 - t1, attendMs = t3 - t2;
  // Two literals rather than a spread of { estimated } (an object a step): the keys in the host path's order either way.
  const stats: AttendResult['stats'] = estimated === undefined
    ? { tokens, attended, scanned, ms: 0, selectMs, attendMs, backend: 'cuda', gpu }
    : { tokens, attended, scanned, estimated, ms: 0, selectMs, attendMs, backend: 'cuda', gpu };
  return answer(session, req, ctx, { out, lse, stats }, selection, wantIds, t0);
}

/** The step on the host path: the method selects, the cache attends, the rest is estimated. */
async function hostStep(session: Session, req: AttendRequest, ctx: LayerContext, params: SearchParams, t0: number, t1: number, wantIds: boolean): Promise<AttendResult> {
  const m = session.model;
  // The clusters this layer estimates from (undefined: it does not), looked up once for the step.
  const clusters = session.clustersFor(req.layer);
  const out = new Float32Array(m.qHeads * m.headDim);
  const lse = new Float32Array(m.qHeads);
  const selection = await session.method.select(ctx, req.q, params);
  const t2 = performance.now();
  let residency: Residency, estimated: number | undefined, scanned: number;
  try {
    // What the method left out of the documents is estimated from their clusters (when this layer
    // estimates): on the device where it holds the document layer's clusters (engine/rest-on-device.ts),
    // while the cache makes the selection resident (GPU pool or host) and attends over every part
    // (parts combined by log-sum-exp); else on the host, after. Both settle before either error is
    // thrown: the device call holds its store until it ends.
    const estimating = clusters !== undefined && ctx.segments.length > 1;
    // The device's call is queued (awaited here: the layer's store) before the attend starts: the
    // attend's residency work and a short attend (the pool's or the host kernel's) run on the event
    // loop's thread to their end, so a call queued after them did not overlap them (rest-on-device.ts).
    const started = estimating ? await startRestOnDevice(session, ctx, selection, clusters, req.q, req.scale) : undefined;
    const [attended, onDevice] = await Promise.allSettled([session.cache.attend(selection.parts, { layer: req.layer, q: req.q, scale: req.scale, out, lse }), started?.estimate]);
    if (attended.status === 'rejected') throw attended.reason;
    if (onDevice.status === 'rejected') throw onDevice.reason;
    residency = attended.value;
    scanned = selection.scanned;
    if (estimating) {
      const est = onDevice.value ?? (await estimateRest(ctx, selection, clusters, req.q, req.scale));
      mergeInto(out, lse, est.out, est.lse, m.headDim);
      estimated = est.estimated.reduce((a, b) => a + b, 0) / m.kvHeads;
      scanned += est.scanned.reduce((a, b) => a + b, 0) / m.kvHeads;
    }
    // Scores past float32 leave their heads' lse NaN, +Inf or (heads that attended rows) -Inf: refused,
    // and the token taken back (decodeStep), rather than answered with NaN or a silently wrong out.
    refuseOverflow(lse, selection, m.qHeads / m.kvHeads, req.scale);
  } catch (e) {
    // What the method kept of this step goes back with the token, so the retry counts it once.
    selection.undo?.();
    throw e;
  }
  const t3 = performance.now();
  const { backend, blocks, gpu } = residency;

  const attended = attendedCount(selection, m.kvHeads);
  const stats = { tokens: ctx.tokens, attended, scanned, ...(selection.codes !== undefined && { codes: selection.codes }), ...(estimated !== undefined && { estimated }), ms: 0, selectMs: t2 - t1, attendMs: t3 - t2, backend, ...(blocks && { blocks }), ...(gpu && { gpu }) };
  return answer(session, req, ctx, { out, lse, stats }, selection, wantIds, t0);
}

/** Either path's end: the ids and rows asked for, the step's ms, the session's counts. */
function answer(session: Session, req: AttendRequest, ctx: LayerContext, result: AttendResult, selection: Selection, wantIds: boolean, t0: number): AttendResult {
  const m = session.model;
  if (wantIds) {
    const positions = selectedPositions(selection, ctx);
    if (req.want.has('selection')) result.selection = positions;
    if (req.want.has('kv')) result.kv = gatherKv(selection, m.kvHeads, m.headDim);
  }
  const stats = result.stats;
  stats.ms = performance.now() - t0;
  session.stats.steps++;
  session.stats.attendMs += stats.ms;
  session.stats.selected += stats.attended;
  session.stats.scanned += stats.scanned;
  if (stats.codes !== undefined) session.stats.codes = (session.stats.codes ?? 0) + stats.codes;
  session.stats.contextTokens = ctx.tokens;
  return result;
}

/**
 * Throws 422 where a head's lse is not finite though the head attended
 * rows (an empty selection's -Inf is an answer). One pass over qHeads
 * floats; the selection is read only for a -Inf head.
 */
function refuseOverflow(lse: Float32Array, selection: Selection, group: number, scale: number): void {
  for (let h = 0; h < lse.length; h++) {
    const x = lse[h];
    if (x > -Infinity && x < Infinity) continue;
    if (x === -Infinity && !selection.parts.some((p) => rowsOf(p, Math.floor(h / group)).length > 0)) continue;
    throw invalid(`the attention scores of query head ${h} overflow float32: scale·q·k (scale ${scale}) is past ±3.4e38 for this q and the context's keys; send a smaller scale or q`);
  }
}

function gatherKv(sel: Selection, kvHeads: number, d: number): { k: Uint16Array[]; v: Uint16Array[] } {
  const k: Uint16Array[] = [], v: Uint16Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const rows = sel.parts.map((p) => rowsOf(p, h));
    const n = rows.reduce((a, r) => a + r.length, 0);
    const kh = new Uint16Array(n * d), vh = new Uint16Array(n * d);
    let at = 0;
    sel.parts.forEach((p, i) => {
      for (const r of rows[i]) {
        kh.set(p.segment.k[h].subarray(r * d, (r + 1) * d), at * d);
        vh.set(p.segment.v[h].subarray(r * d, (r + 1) * d), at * d);
        at++;
      }
    });
    k.push(kh);
    v.push(vh);
  }
  return { k, v };
}
