// Shared-memory tensors on the decode stream (GET /v1/stream): the client
// makes a file `kvrecall-<name>` in the server's --shm-dir, attaches it
// with `{id, shm: {name, bytes}}`, and then any tensor of a frame may be
// `{dtype, shape, at}`, its bytes the segment's [at, at + size), and an
// attend (or a batch step) with `into: offset` has its out and lse written
// there, answered as `{dtype, shape, at}` too. kvrecall runs beside the LLM
// server on its host: a batch of 32 steps' q, k, v and answers (0.5-1 MB)
// then crosses no socket, where a bare TCP round trip of those bytes alone
// was 5.9x one call's overhead on the H100 host (issue #14). DESIGN.md's
// "Wire protocol" has the rules and the lifetimes.
//
// Everything a frame names is checked here before the frame runs: a bad
// reference fails its frame (a batch's step: that step) and changes nothing.
import { join } from 'node:path';
import { mapShared, SHM_MAX_BYTES, unmapShared, type ShmProblem } from '../addon/shm.js';
import { invalid } from '../core/errors.js';
import { tensorSize } from '../core/tensor.js';
import type { AttendAnswer } from '../engine/sessions.js';
import { wireOut } from './attend-answer.js';

/** A segment's name: no slash, so it names a file in --shm-dir and nothing else. */
const SHM_NAME = /^[A-Za-z0-9_.-]{1,100}$/;
/** The segment file's name is this and the client's name. */
export const SHM_PREFIX = 'kvrecall-';

const NO_SEGMENT = 'no shared-memory segment is attached to this stream: send {shm: {name, bytes}} first, or send tensors as data';

const WHY: Record<ShmProblem, string> = {
  not_found: 'does not exist',
  symlink: 'is a symbolic link',
  not_regular: 'is not a regular file',
  too_small: 'is shorter than the bytes asked',
  not_owner: "is not owned by the server's user",
  no_access: 'cannot be opened for reading and writing by the server',
  map_failed: 'could not be mapped',
  open_failed: 'could not be opened',
};

/** A tensor in the segment, as an answer names it. */
export interface SharedRef {
  dtype: string;
  shape: number[];
  at: number;
}

/** Where a step's answer went: its out and lse. */
export interface AnswerRefs {
  out: SharedRef;
  lse: SharedRef;
}

/** The next multiple of 4 (exact past 2^31, where `& ~3` is not). */
export const align4 = (n: number) => Math.ceil(n / 4) * 4;

/**
 * The server's shared memory: its directory (undefined: off), its caps on
 * the bytes mapped for one stream and for all of them (--shm-stream-bytes,
 * --shm-total-bytes), and the bytes its streams hold mapped now.
 */
export class ShmPool {
  mapped = 0;

  constructor(
    readonly dir: string | undefined,
    readonly streamBytes: number,
    readonly totalBytes: number,
  ) {}
}

/**
 * One stream's segments: the one attached last, which frames resolve their
 * references in, and those it replaced that frames still use. A segment is
 * unmapped (unmapShared, not left to the collector) as soon as it is
 * replaced or the stream closes and no frame uses it: a client attaching
 * again and again holds one mapping, not one per attach until a collection.
 */
export class ShmStream {
  private current?: ShmSegment;
  /** Bytes of this stream's segments still mapped (the current and those replaced that frames use). */
  mapped = 0;

  constructor(private readonly pool: ShmPool) {}

  get segment(): ShmSegment | undefined {
    return this.current;
  }

  /**
   * Maps `kvrecall-<name>` in the pool's directory as `req` = {name, bytes}
   * asks and makes it the stream's segment; a refusal (a 422 that names
   * why: a bad name or size, over a cap, a file that cannot be mapped)
   * maps nothing and leaves the segment before in place.
   */
  attach(req: unknown): ShmSegment {
    const { dir, streamBytes, totalBytes } = this.pool;
    if (dir === undefined) throw invalid('shared memory is off on this server (--shm-dir off): send tensors as data');
    if (typeof req !== 'object' || req === null || Array.isArray(req) || req instanceof Uint8Array) throw invalid('shm must be a map {name, bytes}');
    const { name, bytes } = req as Record<string, unknown>;
    if (typeof name !== 'string' || !SHM_NAME.test(name)) throw invalid('shm.name must be 1 to 100 characters of A-Z a-z 0-9 _ . -');
    if (typeof bytes !== 'number' || !Number.isInteger(bytes) || bytes <= 0 || bytes % 4 !== 0 || bytes > SHM_MAX_BYTES)
      throw invalid(`shm.bytes must be a positive multiple of 4, at most ${SHM_MAX_BYTES}, got ${JSON.stringify(bytes)}`);
    // The segment replaced is unmapped at once when no frame uses it: its bytes do not count against the new one.
    const freed = this.current?.idle ? this.current.size : 0;
    if (this.mapped - freed + bytes > streamBytes)
      throw invalid(`shm.bytes ${bytes} would take this stream's mapped segments to ${this.mapped - freed + bytes} bytes, over the server's cap of ${streamBytes} a stream (--shm-stream-bytes; a segment replaced stays mapped while frames use it)`);
    if (this.pool.mapped - freed + bytes > totalBytes)
      throw invalid(`shm.bytes ${bytes} would take the streams' mapped segments to ${this.pool.mapped - freed + bytes} bytes, over the server's cap of ${totalBytes} (--shm-total-bytes): send tensors as data, or attach later`);
    const file = SHM_PREFIX + name;
    const mapped = mapShared(join(dir, file), bytes);
    if (typeof mapped === 'string') throw invalid(`shared-memory file ${file} in ${dir} ${WHY[mapped]}`);
    this.mapped += bytes;
    this.pool.mapped += bytes;
    const seg = new ShmSegment(mapped, () => {
      this.mapped -= bytes;
      this.pool.mapped -= bytes;
    });
    this.current?.retire();
    this.current = seg;
    return seg;
  }

  /** The stream is closed: its segment goes once the frames still running let go of it. */
  close(): void {
    this.current?.retire();
    this.current = undefined;
  }
}

/** A stream's mapped segment: mapped until it is retired and no frame uses it (or, failing that, until the collector drops it). */
export class ShmSegment {
  readonly bytes: Uint8Array;
  readonly size: number;
  private users = 0;
  private retired = false;
  private unmapped = false;

  constructor(
    private readonly buf: ArrayBuffer,
    private readonly gone: () => void = () => {},
  ) {
    this.bytes = new Uint8Array(buf);
    this.size = buf.byteLength;
  }

  get byteLength(): number {
    return this.size;
  }

  /** No frame uses it. */
  get idle(): boolean {
    return this.users === 0;
  }

  /** A frame uses the segment (its views of it read or written) until it calls what this returns (once; more calls do nothing). */
  use(): () => void {
    this.users++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      if (--this.users === 0 && this.retired) this.unmap();
    };
  }

  /** No new frame will use it: unmapped now, or when the last frame using it is done. */
  retire(): void {
    this.retired = true;
    if (this.users === 0) this.unmap();
  }

  private unmap(): void {
    if (this.unmapped) return;
    this.unmapped = true;
    unmapShared(this.buf);
    this.gone();
  }
}

/** A tensor of a frame read from the segment: its name and bytes [at, to). */
interface Span {
  name: string;
  at: number;
  to: number;
}

/** Refuses an answer's bytes [from, end) over any of the frame's own input spans. */
function refuseOver(spans: readonly Span[], from: number, end: number): void {
  for (const { name, at, to } of spans)
    if (at < end && from < to) throw invalid(`into's answer bytes [${from}, ${end}) overlap ${name}'s [${at}, ${to}) in the segment: the answer would overwrite the frame's own input; write it elsewhere`);
}

/**
 * One frame's view of the stream's segment (the one attached when the
 * frame came: a later attach does not move it): resolves its tensors given
 * by `at` and checks and writes its answers' `into`.
 */
export class SharedFrame {
  /** A batch's steps so far (claim): the spans their inputs are read from and their answers written to. */
  private readonly reads: { at: number; to: number; what: string }[] = [];
  private readonly writes: { at: number; to: number; step: number }[] = [];

  constructor(private readonly seg: ShmSegment | undefined) {}

  /**
   * Each of `body`'s tensors `names` given as {dtype, shape, at} becomes
   * {dtype, shape, data} with data a view of the segment's bytes; one
   * whose `at` is not a multiple of 4 in range is refused.
   */
  resolve(body: Record<string, unknown>, names: readonly string[]): void {
    for (const name of names) {
      const t = body[name];
      if (typeof t !== 'object' || t === null || !('at' in t) || (t as Record<string, unknown>).data !== undefined) continue;
      const seg = this.segment();
      const { dtype, shape, bytes } = tensorSize(t, name);
      const at = (t as Record<string, unknown>).at;
      if (typeof at !== 'number' || !Number.isInteger(at) || at < 0 || at % 4 !== 0 || at + bytes > seg.byteLength)
        throw invalid(`${name}.at must be a multiple of 4 with its ${bytes} bytes inside the segment's ${seg.byteLength}, got ${JSON.stringify(at)}`);
      body[name] = { dtype, shape, data: seg.bytes.subarray(at, at + bytes) };
    }
  }

  /**
   * The attend's `into` (undefined when it has none), checked: its out
   * (qHeads × headDim of the outDtype asked) and then its lse (qHeads f32,
   * at the next multiple of 4) must fit in the segment.
   */
  into(body: Record<string, unknown>, model: { qHeads: number; headDim: number }): number | undefined {
    return this.intoSpan(body, model)?.[0];
  }

  /** into()'s check, giving the answer's whole span [into, end); `spans`: the body's segment spans, when the caller has them. */
  private intoSpan(body: Record<string, unknown>, model: { qHeads: number; headDim: number }, spans = this.spansOf(body)): [number, number] | undefined {
    const into = body.into;
    if (into === undefined) return undefined;
    const seg = this.segment();
    const half = body.outDtype === 'f16' || body.outDtype === 'bf16';
    const end = align4(Number(into) + model.qHeads * model.headDim * (half ? 2 : 4)) + 4 * model.qHeads;
    if (typeof into !== 'number' || !Number.isInteger(into) || into < 0 || into % 4 !== 0 || end > seg.byteLength)
      throw invalid(`into must be a multiple of 4 with the answer's ${end - Number(into)} bytes (out, then lse at a multiple of 4) inside the segment's ${seg.byteLength}, got ${JSON.stringify(into)}`);
    refuseOver(spans, into, end);
    return [into, end];
  }

  /**
   * A batch's step i (its tensors resolved): into() as for an attend alone,
   * and against the batch's steps before it, whose answers are written as
   * each finishes while others may still read their inputs: its answer over
   * an earlier step's input or answer, or its input under an earlier step's
   * answer, is refused (the step fails alone, nothing of it written). Then
   * its spans join the batch's. Returns its into.
   */
  claim(step: Record<string, unknown>, i: number, model: () => { qHeads: number; headDim: number }): number | undefined {
    const spans = this.spansOf(step);
    const span = step.into === undefined ? undefined : this.intoSpan(step, model(), spans);
    if (span) {
      const [at, to] = span;
      const hit = this.reads.find((r) => r.at < to && at < r.to);
      if (hit) throw invalid(`into's answer bytes [${at}, ${to}) overlap ${hit.what}'s [${hit.at}, ${hit.to}) in the segment: it would overwrite another step's input; write it elsewhere`);
      const other = this.writes.find((w) => w.at < to && at < w.to);
      if (other) throw invalid(`into's answer bytes [${at}, ${to}) overlap step ${other.step}'s answer [${other.at}, ${other.to}) in the segment: one would overwrite the other; write it elsewhere`);
    }
    for (const r of spans) {
      const hit = this.writes.find((w) => w.at < r.to && r.at < w.to);
      if (hit) throw invalid(`step ${i}'s ${r.name}'s [${r.at}, ${r.to}) lies under step ${hit.step}'s answer [${hit.at}, ${hit.to}) in the segment: that answer would overwrite it; put it elsewhere`);
    }
    for (const r of spans) this.reads.push({ at: r.at, to: r.to, what: `step ${i}'s ${r.name}` });
    if (span) this.writes.push({ at: span[0], to: span[1], step: i });
    return span?.[0];
  }

  /**
   * Refuses an answer's bytes [from, end) that meet any tensor of `body`
   * read from the segment (resolve() made each a view of it): the answer,
   * written as steps finish, would overwrite inputs that steps still read.
   */
  refuseOverlap(body: Record<string, unknown>, from: number, end: number): void {
    refuseOver(this.spansOf(body), from, end);
  }

  /** The spans of `body`'s tensors read from the segment (none without one). */
  private spansOf(body: Record<string, unknown>): Span[] {
    if (!this.seg) return [];
    const buf = this.seg.bytes.buffer, out: Span[] = [];
    for (const [name, t] of Object.entries(body)) {
      const data = typeof t === 'object' && t !== null ? (t as { data?: unknown }).data : undefined;
      if (data instanceof Uint8Array && data.buffer === buf) out.push({ name, at: data.byteOffset, to: data.byteOffset + data.byteLength });
    }
    return out;
  }

  /** Writes the step's out (its wire dtype) at `into` and its lse after it; where they went. */
  write(into: number, r: AttendAnswer): AnswerRefs {
    const seg = this.segment();
    const { qHeads, headDim } = r.model;
    const out = wireOut(r);
    seg.bytes.set(new Uint8Array(out.buffer, out.byteOffset, out.byteLength), into);
    const lseAt = align4(into + out.byteLength);
    seg.bytes.set(new Uint8Array(r.lse.buffer, r.lse.byteOffset, r.lse.byteLength), lseAt);
    return { out: { dtype: r.outDtype, shape: [qHeads, headDim], at: into }, lse: { dtype: 'f32', shape: [qHeads], at: lseAt } };
  }

  /** The segment's bytes (refused without a segment). */
  bytes(): Uint8Array {
    return this.segment().bytes;
  }

  private segment(): ShmSegment {
    if (!this.seg) throw invalid(NO_SEGMENT);
    return this.seg;
  }
}

/**
 * Refuses an attend (or a batch step) that asks its answer `into` shared
 * memory where no segment can be (the HTTP routes): ignored, the caller
 * would wait on a segment nothing writes.
 */
export function refuseInto(step: Record<string, unknown>): void {
  if (step.into !== undefined) throw invalid('into names shared memory, which only a stream with a segment attached carries (GET /v1/stream); leave it out here');
}
