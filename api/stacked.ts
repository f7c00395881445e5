// A stacked batch on the decode stream, through its shared-memory segment:
// the common case of an LLM server's running batch (every step one dtype
// and shape, one layer) as one frame whose tensors are whole arrays
//
//   {id, layer, sessions: [s0, ..., sn-1], q: {dtype, shape: [n, qHeads, d], at},
//    k?, v?: {dtype, shape: [n, kvHeads, d], at}, positions?: {dtype: 'i32', shape: [n], at},
//    outDtype?, into}
//
// answered `{id, out: {dtype, shape: [n, qHeads, d], at: into}, lse: {dtype:
// 'f32', shape: [n, qHeads], at}, errors?: [[index, code, message], ...],
// stats: {ms}}`: out's rows one after another from `into`, lse's after them
// at the next multiple of 4. A step that fails is named in `errors` (its
// rows are left as they were); the others are answered. Each step runs as
// the batch's step {session, q: q[i], k: k[i], v: v[i], position:
// positions[i], outDtype} (Sessions.attendBatch): the same answers, bit for
// bit.
//
// Why: the batch form `{layer, steps: [...]}` costs per step a map of refs
// to parse (client: to pack) and an answer map with stats to pack (client:
// to decode); with 32 steps through the segment most of a batch's overhead
// on the 2-core VM was that work on the client (bench/results/transport-vm-
// python-stacked.md). Here a frame's size does not grow with its steps but
// by their session ids, and the answer not at all.
import { invalid } from '../core/errors.js';
import { tensorSize } from '../core/tensor.js';
import type { AttendAnswer, Sessions } from '../engine/sessions.js';
import { MAX_BATCH } from '../engine/sessions.js';
import { wireOut } from './attend-answer.js';
import { errorOf } from './errors.js';
import { packStackedAnswer, type PackedFrame } from './batch-pack.js';
import type { Metrics } from './metrics.js';
import { align4, type SharedFrame } from './shm.js';

/** A resolved tensor (SharedFrame.resolve): its bytes a view of the segment. */
interface Resolved {
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** The stacked tensors named: q, and k and v and positions when given. */
const STACKED = ['q', 'k', 'v', 'positions'] as const;

/** A stacked tensor's rows as steps' tensors, each a view of its bytes (the rows' shape one array for all: read only). */
function rows(t: Resolved | undefined, n: number): Resolved[] | undefined {
  if (!t) return undefined;
  const bytes = t.data.byteLength / n, shape = t.shape.slice(1), out: Resolved[] = new Array<Resolved>(n);
  for (let i = 0; i < n; i++) out[i] = { dtype: t.dtype, shape, data: t.data.subarray(i * bytes, (i + 1) * bytes) };
  return out;
}

function stacked(body: Record<string, unknown>, name: string, n: number, dims: number): Resolved | undefined {
  const t = body[name] as Resolved | undefined;
  if (t === undefined) return undefined;
  const { bytes } = tensorSize(t, name);
  if (!(t.data instanceof Uint8Array) || t.data.byteLength !== bytes) throw invalid(`${name} must hold ${bytes} bytes`);
  if (t.shape.length !== dims || t.shape[0] !== n) throw invalid(`${name}.shape must be [${n}${', _'.repeat(dims - 1)}] (one row per session), got [${t.shape.join(', ')}]`);
  return t;
}

/** The answer of a stacked batch frame (`body`, its id `id`) run on `sessions`, its tensors in the frame's segment. */
export async function attendStacked(sessions: Sessions, body: Record<string, unknown>, id: unknown, metrics: Metrics, shared: SharedFrame): Promise<Record<string, unknown> | PackedFrame> {
  const names = body.sessions;
  if (!Array.isArray(names) || names.length === 0 || names.length > MAX_BATCH || !names.every((s) => typeof s === 'string'))
    throw invalid(`sessions must be a list of 1 to ${MAX_BATCH} session ids`);
  if (body.steps !== undefined) throw invalid('a frame has sessions (stacked) or steps, not both');
  const n = names.length;
  if (typeof body.q !== 'object' || body.q === null) throw invalid('a stacked batch has q {dtype, shape: [n, qHeads, d], at}');
  if ((body.k === undefined) !== (body.v === undefined)) throw invalid('k and v come together');
  if (body.positions !== undefined && body.k === undefined) throw invalid('positions are those of appended k and v: give k and v');
  shared.resolve(body, STACKED);
  const q = stacked(body, 'q', n, 3)!;
  const k = stacked(body, 'k', n, 3);
  const v = stacked(body, 'v', n, 3);
  const pos = stacked(body, 'positions', n, 1);
  if (pos && pos.dtype !== 'i32') throw invalid(`positions.dtype must be i32, got ${JSON.stringify(pos.dtype)}`);
  const outDtype = body.outDtype ?? 'f32';
  if (outDtype !== 'f32' && outDtype !== 'f16' && outDtype !== 'bf16') throw invalid(`outDtype must be f32, f16 or bf16, got ${JSON.stringify(outDtype)}`);
  const [qHeads, d] = [q.shape[1], q.shape[2]];
  const outRow = qHeads * d * (outDtype === 'f32' ? 4 : 2);
  const into = body.into;
  const seg = shared.bytes();
  const lseAt = align4(Number(into) + n * outRow);
  if (typeof into !== 'number' || !Number.isInteger(into) || into < 0 || into % 4 !== 0 || lseAt + 4 * n * qHeads > seg.byteLength)
    throw invalid(`into must be a multiple of 4 with the answers' ${lseAt + 4 * n * qHeads - Number(into)} bytes (out's rows, then lse's at a multiple of 4) inside the segment's ${seg.byteLength}, got ${JSON.stringify(into)}`);
  shared.refuseOverlap(body, into, lseAt + 4 * n * qHeads);
  // In the segment `at` is a multiple of 4; positions sent as data sit wherever the frame put them, read through a copy.
  const positions = pos && (pos.data.byteOffset % 4 === 0 ? new Int32Array(pos.data.buffer, pos.data.byteOffset, n) : new Int32Array(pos.data.slice().buffer));
  // The steps, built field by field (spreads of optional parts cost a few objects a step).
  const [qs, ks, vs] = [rows(q, n)!, rows(k, n), rows(v, n)];
  const steps: Record<string, unknown>[] = new Array<Record<string, unknown>>(n);
  for (let i = 0; i < n; i++) {
    const step: Record<string, unknown> = { session: names[i], q: qs[i] };
    if (ks && vs) {
      step.k = ks[i];
      step.v = vs[i];
    }
    if (positions) step.position = positions[i];
    if (body.outDtype !== undefined) step.outDtype = outDtype;
    if (body.scale !== undefined) step.scale = body.scale;
    steps[i] = step;
  }
  const { results, ms } = await sessions.attendBatch({ layer: body.layer, steps }, (i: number, _count: number, r: AttendAnswer) => {
    metrics.observeAttend(r.stats.ms);
    // Written as the step finishes, while its out is fresh in cache.
    const out = wireOut(r);
    seg.set(new Uint8Array(out.buffer, out.byteOffset, out.byteLength), into + i * outRow);
    seg.set(new Uint8Array(r.lse.buffer, r.lse.byteOffset, r.lse.byteLength), lseAt + i * 4 * qHeads);
  });
  const errors: [number, string, string][] = [];
  results.forEach((r, i) => {
    if (r.status === 'rejected') {
      const { code, message } = errorOf(r.reason);
      errors.push([i, code, message]);
    }
  });
  const outRef = { dtype: outDtype, shape: [n, qHeads, d], at: into }, lseRef = { dtype: 'f32', shape: [n, qHeads], at: lseAt };
  return (
    (errors.length === 0 && packStackedAnswer(id, outRef, lseRef, ms)) || {
      ...(id !== undefined && { id }),
      out: outRef,
      lse: lseRef,
      ...(errors.length > 0 && { errors }),
      stats: { ms },
    }
  );
}
