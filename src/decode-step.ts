// One decode step of one layer, top to bottom:
//   check the request → append the current token → the method selects →
//   the selection is made resident (GPU pool) → attend over it (parts
//   combined by log-sum-exp) → answer.
// Nothing here depends on which retrieval method the session uses.
import { attend } from '../native/index.js';
import type { BlockStats, Selection, SelectionPart } from '../index/method.js';
import { POOL_BLOCK, RANGE_PRIORITY } from './gpu-backend.js';
import { attendedCount, rowsOf, selectedPositions, splitForPool, toAttendSegment } from './selection-parts.js';
import { invalid } from './errors.js';
import type { Session } from './session.js';
import { expectFinite, expectShape, parseFloatTensor, toF32, type FloatTensor } from './tensor.js';

export type ReturnPart = 'out' | 'kv' | 'selection';

export interface AttendRequest {
  layer: number;
  q: Float32Array;
  /** The current token's k and v, [kvHeads, headDim]; appended before attending. */
  k?: FloatTensor;
  v?: FloatTensor;
  scale: number;
  want: Set<ReturnPart>;
}

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
    attended: number;
    scanned: number;
    ms: number;
    selectMs: number;
    attendMs: number;
    backend: 'cpu' | 'cuda';
    blocks?: BlockStats;
    gpu?: { residentMs: number; kernelMs: number };
  };
}

/** Checks an attend body against the session's model (the edge of the decode path). */
export function parseAttendRequest(body: Record<string, unknown>, session: Session): AttendRequest {
  const m = session.model;
  const layer = body.layer;
  if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= m.layers)
    throw invalid(`layer must be an integer in [0, ${m.layers - 1}], got ${JSON.stringify(layer)}`);
  const q = parseFloatTensor(body.q, 'q');
  expectShape(q, [m.qHeads, m.headDim], 'q');
  expectFinite(q, 'q');
  let k: FloatTensor | undefined, v: FloatTensor | undefined;
  if ((body.k === undefined) !== (body.v === undefined)) throw invalid('k and v come together or not at all');
  if (body.k !== undefined) {
    k = parseFloatTensor(body.k, 'k');
    v = parseFloatTensor(body.v, 'v');
    expectShape(k, [m.kvHeads, m.headDim], 'k');
    expectShape(v, [m.kvHeads, m.headDim], 'v');
    expectFinite(k, 'k');
    expectFinite(v, 'v');
  }
  const scale = body.scale ?? 1 / Math.sqrt(m.headDim);
  if (typeof scale !== 'number' || !Number.isFinite(scale) || scale <= 0) throw invalid('scale must be a positive number');
  const ret = body.return ?? ['out'];
  if (!Array.isArray(ret) || ret.some((r) => r !== 'out' && r !== 'kv' && r !== 'selection'))
    throw invalid('return must be a list of "out", "kv", "selection"');
  return { layer, q: toF32(q), k, v, scale, want: new Set(ret as ReturnPart[]) };
}

export async function decodeStep(session: Session, req: AttendRequest): Promise<AttendResult> {
  const t0 = performance.now();
  const m = session.model;

  // Append the current token: the query is the last position and sees itself.
  const own = session.own[req.layer];
  if (req.k && req.v) own.append(req.k.data, req.v.data, req.k.dtype, 1);

  // The method selects.
  const ctx = session.context(req.layer);
  const t1 = performance.now();
  const selection = await session.method.select(ctx, req.q, session.params);
  const t2 = performance.now();

  // Make the selection resident and attend over every part; parts are
  // combined by log-sum-exp. With a GPU, whole blocks of documents are read
  // from the device pool (misses copied in) and the rest (own tokens, partial
  // blocks, row ids) on the host, merged into the kernel's answer.
  const out = new Float32Array(m.qHeads * m.headDim);
  const lse = new Float32Array(m.qHeads);
  const gpu = session.gpu;
  const split = gpu ? splitForPool(selection.parts, (seg) => seg !== own, POOL_BLOCK, m.kvHeads, RANGE_PRIORITY) : undefined;
  let blocks = selection.blocks, backend: 'cpu' | 'cuda' = 'cpu', device: AttendResult['stats']['gpu'];
  if (gpu && split && split.poolBlocks > 0 && gpu.fits(m, split.poolBlocks)) {
    const host = split.host.length > 0 ? { out: new Float32Array(out.length), lse: new Float32Array(lse.length) } : undefined;
    if (host) await attendOnHost(session, req, split.host, host.out, host.lse);
    const { kernelMs, residentMs, ...pool } = await gpu.attend(m, req.layer, split.pool, req.q, req.scale, out, lse, host);
    blocks = pool;
    backend = 'cuda';
    device = { residentMs, kernelMs };
  } else {
    await attendOnHost(session, req, selection.parts, out, lse);
  }
  const t3 = performance.now();

  // Answer.
  const attended = attendedCount(selection, m.kvHeads);
  const stats = { tokens: ctx.tokens, attended, scanned: selection.scanned, ms: 0, selectMs: t2 - t1, attendMs: t3 - t2, backend, ...(blocks && { blocks }), ...(device && { gpu: device }) };
  const result: AttendResult = { out, lse, stats };
  if (req.want.has('selection') || req.want.has('kv')) {
    const positions = selectedPositions(selection, ctx);
    if (req.want.has('selection')) result.selection = positions;
    if (req.want.has('kv')) result.kv = gatherKv(selection, m.kvHeads, m.headDim);
  }
  result.stats.ms = performance.now() - t0;
  session.stats.steps++;
  session.stats.attendMs += result.stats.ms;
  session.stats.selected += attended;
  session.stats.scanned += selection.scanned;
  session.stats.contextTokens = ctx.tokens;
  return result;
}

function attendOnHost(session: Session, req: AttendRequest, parts: SelectionPart[], out: Float32Array, lse: Float32Array): Promise<void> {
  const m = session.model;
  return attend({
    q: req.q,
    qHeads: m.qHeads,
    kvHeads: m.kvHeads,
    headDim: m.headDim,
    dtype: m.dtype,
    scale: req.scale,
    segments: parts.map(toAttendSegment),
    out,
    lse,
  });
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
