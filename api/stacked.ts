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
//
// A stream keeps the forms it ran (StackedForms): a frame sent again, the
// same bytes but the id, is run on its form, neither decoded nor checked
// again (the server's side of the client's StackedPlan).
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

/**
 * A stacked frame checked: its steps' parts (views of the segment, or of the
 * frame for tensors sent as data) and where its answers go. `cached` when
 * every tensor is in the segment: the same frame bytes (but the id) on the
 * same segment then make the same form, which StackedForms keeps.
 */
export interface StackedForm {
  layer: unknown;
  names: string[];
  qs: Resolved[];
  ks?: Resolved[];
  vs?: Resolved[];
  positions?: Int32Array;
  /** outDtype and scale as the frame gave them (each step carries them when given). */
  outDtype?: unknown;
  scale?: unknown;
  wireDtype: 'f32' | 'f16' | 'bf16';
  seg: Uint8Array;
  into: number;
  lseAt: number;
  outRow: number;
  qHeads: number;
  d: number;
  cached: boolean;
}

/** The form of a stacked batch frame (`body`), its tensors resolved in the frame's segment; a bad frame throws 422. */
function stackedForm(body: Record<string, unknown>, shared: SharedFrame): StackedForm {
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
  // Tensors sent as data are views of this message, whose buffer is reused once it is answered: such a form is not kept.
  const cached = [q, k, v, pos].every((t) => !t || t.data.buffer === seg.buffer);
  return { layer: body.layer, names: names as string[], qs: rows(q, n)!, ks: rows(k, n), vs: rows(v, n), positions, outDtype: body.outDtype, scale: body.scale, wireDtype: outDtype, seg, into, lseAt, outRow, qHeads, d, cached };
}

/** The answer of a stacked batch frame (`body`, its id `id`) run on `sessions`, its tensors in the frame's segment; `keep` is given its form. */
export function attendStacked(sessions: Sessions, body: Record<string, unknown>, id: unknown, metrics: Metrics, shared: SharedFrame, keep?: (form: StackedForm) => void): Promise<Record<string, unknown> | PackedFrame> {
  const form = stackedForm(body, shared);
  keep?.(form);
  return runStacked(sessions, form, id, metrics);
}

/** Runs a stacked form's steps (each the batch's step; positions read from the segment now) and makes the answer. */
export async function runStacked(sessions: Sessions, form: StackedForm, id: unknown, metrics: Metrics): Promise<Record<string, unknown> | PackedFrame> {
  const { names, qs, ks, vs, positions, seg, into, lseAt, outRow, qHeads, d } = form;
  const n = names.length;
  // The steps, built field by field (spreads of optional parts cost a few objects a step).
  const steps: Record<string, unknown>[] = new Array<Record<string, unknown>>(n);
  for (let i = 0; i < n; i++) {
    const step: Record<string, unknown> = { session: names[i], q: qs[i] };
    if (ks && vs) {
      step.k = ks[i];
      step.v = vs[i];
    }
    if (positions) step.position = positions[i];
    if (form.outDtype !== undefined) step.outDtype = form.outDtype;
    if (form.scale !== undefined) step.scale = form.scale;
    steps[i] = step;
  }
  const { results, ms } = await sessions.attendBatch({ layer: form.layer, steps }, (i: number, _count: number, r: AttendAnswer) => {
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
  const outRef = { dtype: form.wireDtype, shape: [n, qHeads, d], at: into }, lseRef = { dtype: 'f32', shape: [n, qHeads], at: lseAt };
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

/**
 * What a stream keeps at most: frame bytes, and rows (each three views and a
 * session id, ~0.5 KB of heap): a 32-layer model's forms for a running batch
 * of 128. Past either they are all dropped and learned again.
 */
const MAX_FORM_BYTES = 1 << 20;
const MAX_FORM_ROWS = 4096;

/**
 * A stream's stacked forms by their frame's bytes but the id: an LLM
 * server sends its running batch's frame again for every layer and step,
 * the same bytes but the id (and the layer, per layer), its tensors where
 * they were. Such a frame is run on the form kept for those bytes: not
 * decoded again (its 32 session ids), nor its tensors resolved, checked
 * and split into rows again (the same views of the segment), as the
 * client's StackedPlan packs it once. Only frames `{id: <uint>, ...}` (as
 * both clients pack them) whose tensors are all in the segment are kept,
 * for the segment they were checked against: attaching another drops them.
 */
export class StackedForms {
  /** By the length of the bytes after the id: the bytes before and after it (own copies) and the form. */
  private readonly byLength = new Map<number, { head: Uint8Array; tail: Uint8Array; form: StackedForm }[]>();
  private bytes = 0;
  private rows = 0;
  private segment?: object;

  /** The form kept for `data` on `segment`, and the frame's id; undefined when there is none. */
  match(data: Uint8Array, segment: object): { id: number; form: StackedForm } | undefined {
    if (segment !== this.segment) return undefined;
    const at = idAt(data);
    const kept = at && this.byLength.get(data.byteLength - at.end);
    if (!at || !kept) return undefined;
    const head = data.subarray(0, at.start), tail = data.subarray(at.end);
    for (const k of kept) if (Buffer.compare(k.head, head) === 0 && Buffer.compare(k.tail, tail) === 0) return { id: at.id, form: k.form };
    return undefined;
  }

  /** Keeps the form of `data`, a frame just checked on `segment`, where it can be kept. */
  keep(data: Uint8Array, segment: object, form: StackedForm): void {
    const at = form.cached ? idAt(data) : undefined;
    if (!at) return;
    const rows = form.names.length;
    if (segment !== this.segment || this.bytes + data.byteLength > MAX_FORM_BYTES || this.rows + rows > MAX_FORM_ROWS) {
      this.byLength.clear();
      this.bytes = this.rows = 0;
      this.segment = segment;
    }
    const length = data.byteLength - at.end;
    const kept = this.byLength.get(length) ?? [];
    // Copies: the message's buffer is reused once it is answered.
    kept.push({ head: new Uint8Array(data.subarray(0, at.start)), tail: new Uint8Array(data.subarray(at.end)), form });
    this.byLength.set(length, kept);
    this.bytes += data.byteLength;
    this.rows += rows;
  }
}

/**
 * Where the id of a frame `{id: <uint>, ...}` (a map of up to 65535
 * entries, id its first key) lies, from its type byte to its end, and the
 * id; undefined for another frame. Frames differing only there (the id,
 * in any width) are of one form.
 */
function idAt(data: Uint8Array): { start: number; end: number; id: number } | undefined {
  const h = data[0];
  const at = (h & 0xf0) === 0x80 ? 1 : h === 0xde ? 3 : 0;
  if (at === 0 || data.byteLength < at + 4 || data[at] !== 0xa2 || data[at + 1] !== 0x69 || data[at + 2] !== 0x64) return undefined;
  const start = at + 3, t = data[start], v = start + 1;
  if (t < 0x80) return { start, end: v, id: t };
  if (t === 0xcc && data.byteLength >= v + 1) return { start, end: v + 1, id: data[v] };
  if (t === 0xcd && data.byteLength >= v + 2) return { start, end: v + 2, id: (data[v] << 8) | data[v + 1] };
  if (t === 0xce && data.byteLength >= v + 4) return { start, end: v + 4, id: ((data[v] << 24) | (data[v + 1] << 16) | (data[v + 2] << 8) | data[v + 3]) >>> 0 };
  return undefined;
}
