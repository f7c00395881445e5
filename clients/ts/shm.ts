// The client's side of a stream's shared-memory segment (DESIGN.md "Shared-
// memory tensors on the stream"): a file `kvrecall-<name>` in the server's
// --shm-dir, which the server maps MAP_SHARED. Node has no mmap, so this
// end writes and reads the same file with positional I/O (pwritev/preadv on
// the descriptor): on tmpfs the file's pages are the server's mapped pages,
// so what is written is what the server reads, and what it writes `into`
// the segment is what is read back. Each tensor crosses once, between the
// caller's array and those pages: the copy a mapped client makes too.
//
// Synchronous calls on purpose: a tmpfs write or read is a memcpy that
// never waits on a disk, and the caller waits on it anyway; the async forms
// run the same memcpy on libuv's pool and add two thread hand-offs to every
// call: on the 2-core VM a 32-step f32 batch's inputs took 51 µs p50 to
// write and its answer 27 µs to read in sync, 76 and 51 µs async
// (bench/results/shm-io-vm.md).
import { randomBytes } from 'node:crypto';
import { closeSync, constants, ftruncateSync, openSync, readvSync, unlinkSync, writevSync } from 'node:fs';
import { join } from 'node:path';

/** Where segments are made unless told otherwise: the server's default --shm-dir (the Python client's too). */
export const SHM_DIR = '/dev/shm';
/** The segment file's name is this and the segment's name (api/shm.ts). */
const PREFIX = 'kvrecall-';

/** The next multiple of 4 (the segment's tensors and answers start at multiples of 4). */
export const align4 = (n: number) => Math.ceil(n / 4) * 4;

/** A segment's file, made O_EXCL with mode 0600, written and read by offset. */
export class ShmFile {
  readonly name: string;
  readonly path: string;
  private fd: number;
  private linked = true;

  private constructor(
    readonly bytes: number,
    dir: string,
  ) {
    // The server takes 1-100 of [A-Za-z0-9_.-]: pid and 64 random bits, no guessable or reused name.
    this.name = `ts${process.pid}-${randomBytes(8).toString('hex')}`;
    this.path = join(dir, PREFIX + this.name);
    // libuv opens with O_CLOEXEC: a child process does not inherit the segment.
    this.fd = openSync(this.path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
    try {
      ftruncateSync(this.fd, bytes);
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /** A fresh file of `bytes` (a positive multiple of 4) in `dir`; a TypeError for a bad size, the fs error where the file cannot be made. */
  static create(bytes: number, dir: string = SHM_DIR): ShmFile {
    if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes % 4 !== 0) throw new TypeError(`a segment's size is a positive multiple of 4, not ${bytes}`);
    return new ShmFile(bytes, dir);
  }

  get closed(): boolean {
    return this.fd < 0;
  }

  /** The descriptor (tests: what /proc/self/fd shows). */
  get descriptor(): number {
    return this.fd;
  }

  /** Writes `parts` one after another from `at`, in one pwritev. */
  write(parts: NodeJS.ArrayBufferView[], at: number): void {
    const n = writevSync(this.open(), parts, at);
    if (n !== total(parts)) throw new Error(`shared memory: wrote ${n} of ${total(parts)} bytes`);
  }

  /** Fills `parts` one after another from the segment's bytes at `at`, in one preadv. */
  read(parts: NodeJS.ArrayBufferView[], at: number): void {
    const n = readvSync(this.open(), parts, at);
    if (n !== total(parts)) throw new Error(`shared memory: read ${n} of ${total(parts)} bytes`);
  }

  /** Removes the file's name (the server's mapping and this descriptor keep its pages). */
  unlink(): void {
    if (!this.linked) return;
    this.linked = false;
    try {
      unlinkSync(this.path);
    } catch {
      // gone already (someone else's cleanup of the directory): nothing is left to remove
    }
  }

  /** Unlinks and closes the descriptor; later reads and writes throw. */
  close(): void {
    this.unlink();
    if (this.fd < 0) return;
    const fd = this.fd;
    // Marked first: a descriptor number is reused by the next open, and no call may touch another file through it.
    this.fd = -1;
    closeSync(fd);
  }

  private open(): number {
    if (this.fd < 0) throw new Error('shared memory: the segment is closed');
    return this.fd;
  }
}

function total(parts: NodeJS.ArrayBufferView[]): number {
  let n = 0;
  for (const p of parts) n += p.byteLength;
  return n;
}

/** The requests after a refused attach before it is tried again: at first, and at most (the wait doubles at each refusal). */
export const ATTACH_RETRY_FIRST = 8;
export const ATTACH_RETRY_LAST = 1024;

/**
 * When a stream tries again the attach it was refused: a refusal need not
 * last (over --shm-total-bytes while other streams held it, a full tmpfs),
 * and a stream refused once stayed on bytes for the rest of its life. Not
 * at every call: an attempt costs making the file and a round trip
 * answered by an error frame. Counted in the stream's requests (no clock:
 * an idle stream tries nothing), ATTACH_RETRY_FIRST after the refusal,
 * the wait doubling at each refusal up to ATTACH_RETRY_LAST: at ~1 ms a
 * decode request, a cap that frees is noticed within about a second, and
 * where the refusal lasts (another host, --shm-dir off) one wasted round
 * trip per 1024 requests is all it costs. An attach of at least the size
 * refused ends it.
 */
export class AttachRetry {
  /** The attach refused last, if it is still wanted. */
  private want?: { bytes: number; dir: string };
  /** The request number from which it is tried again. */
  private at = 0;
  private wait = 0;

  refused(bytes: number, dir: string, now: number): void {
    this.wait = Math.min(ATTACH_RETRY_LAST, Math.max(ATTACH_RETRY_FIRST, 2 * this.wait));
    this.want = { bytes, dir };
    this.at = now + this.wait;
  }

  attached(bytes: number): void {
    if (this.want && bytes < this.want.bytes) return;
    this.want = undefined;
    this.wait = 0;
  }

  /** The attach to try now (taken: no other until refused() or attached() settles it), or undefined; `have`: the bytes of the segment attached (0: none). */
  due(now: number, have: number): { bytes: number; dir: string } | undefined {
    const w = this.want;
    if (!w || now < this.at || have >= w.bytes) return undefined;
    this.at = Infinity;
    return w;
  }
}
