// One decode step of one layer, top to bottom:
//   check the request → append the current token → the method selects →
//   the selection is made resident → attend over it (parts combined by
//   log-sum-exp) → answer.
// Nothing here depends on which retrieval method the session uses.
import { attend, type AttendSegment } from '../native/index.js';
import type { BlockStats, LayerContext, Selection } from '../index/method.js';
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
  /** ms: the whole step; selectMs: the method's selection; attendMs: the attention kernel. */
  stats: { tokens: number; attended: number; scanned: number; ms: number; selectMs: number; attendMs: number; blocks?: BlockStats };
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
  if (req.k && req.v) session.own[req.layer].append(req.k.data, req.v.data, req.k.dtype, 1);

  // The method selects.
  const ctx = session.context(req.layer);
  const t1 = performance.now();
  const selection = await session.method.select(ctx, req.q, session.params);
  const t2 = performance.now();

  // Make the selection resident. On the CPU backend the host arrays already are.

  // Attend over every part; the kernel combines the parts by log-sum-exp.
  const out = new Float32Array(m.qHeads * m.headDim);
  const lse = new Float32Array(m.qHeads);
  await attend({
    q: req.q,
    qHeads: m.qHeads,
    kvHeads: m.kvHeads,
    headDim: m.headDim,
    dtype: m.dtype,
    scale: req.scale,
    segments: selection.parts.map(toAttendSegment),
    out,
    lse,
  });
  const t3 = performance.now();

  // Answer.
  const attended = attendedCount(selection, m.kvHeads);
  const stats = { tokens: ctx.tokens, attended, scanned: selection.scanned, ms: 0, selectMs: t2 - t1, attendMs: t3 - t2, ...(selection.blocks && { blocks: selection.blocks }) };
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

function toAttendSegment(p: Selection['parts'][number]): AttendSegment {
  return { k: p.segment.k, v: p.segment.v, tokens: p.segment.tokens, begin: p.begin, end: p.end, ids: p.ids };
}

/** Tokens attended per kv head, averaged over heads. */
function attendedCount(sel: Selection, kvHeads: number): number {
  let n = 0;
  for (const p of sel.parts) {
    if (p.ids) n += p.ids.reduce((a, ids) => a + ids.length, 0) / kvHeads;
    else n += (p.end ?? p.segment.tokens) - (p.begin ?? 0);
  }
  return n;
}

function rowsOf(p: Selection['parts'][number], head: number): Int32Array {
  if (p.ids) return p.ids[head];
  const begin = p.begin ?? 0, end = p.end ?? p.segment.tokens;
  return Int32Array.from({ length: end - begin }, (_, i) => begin + i);
}

function selectedPositions(sel: Selection, ctx: LayerContext): Int32Array[] {
  return Array.from({ length: ctx.kvHeads }, (_, h) => {
    const chunks = sel.parts.map((p) => {
      const base = ctx.offsets[ctx.segments.indexOf(p.segment)];
      return rowsOf(p, h).map((r) => r + base);
    });
    const all = new Int32Array(chunks.reduce((n, c) => n + c.length, 0));
    let at = 0;
    for (const c of chunks) {
      all.set(c, at);
      at += c.length;
    }
    return all;
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
