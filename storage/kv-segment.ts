// The K and V of one layer for one stretch of context (a document or a
// session's own tokens), held in host memory as one growable array per kv
// head: k[h] is [capacity, headDim] 16-bit words, the first `tokens` rows
// valid. Appends copy each head's rows once, converting dtype if needed.
// A shared segment keeps its arrays in SharedArrayBuffers, so that a worker
// thread can fill them (the Redis store reads blocks straight into them).
import { copyChecked, copyRanges, type CheckedRange } from '../addon/copy-ranges.js';
import { bytesOf, convert, prefault, type FloatDtype, type KvDtype } from '../addon/kernels.js';
import { UNLIMITED, type HostBudget } from './host-budget.js';

const MIN_CAPACITY = 256;
/** Rows ahead of the fill are faulted in off the event loop from this many bytes per array up (fewer fault cheaply). */
const PREFAULT_BYTES = 256 << 10;
// Appends of at most this many words a head copy word by word (append): a
// token or a few, where typed-array views cost more than the copy.
const SMALL_APPEND_WORDS = 256;
/** One fault-in at a time, in order: one libuv thread, the others free for the store's writes. */
let prefaulting: Promise<boolean> = Promise.resolve(true);

/** Where the first NaN or infinite value of an append was: its tensor, and the flat index in it. */
export interface NonFinite {
  tensor: 'k' | 'v' | 'also';
  at: number;
}

export class KvSegment {
  k: Uint16Array[];
  v: Uint16Array[];
  tokens = 0;

  constructor(
    readonly kvHeads: number,
    readonly headDim: number,
    readonly dtype: KvDtype,
    capacity = MIN_CAPACITY,
    private readonly budget: HostBudget = UNLIMITED,
    readonly shared = false,
  ) {
    budget.reserve(this.bytesFor(capacity), 'KV');
    this.k = Array.from({ length: kvHeads }, () => this.alloc(capacity * headDim));
    this.v = Array.from({ length: kvHeads }, () => this.alloc(capacity * headDim));
  }

  get capacity(): number {
    return this.k[0].length / this.headDim;
  }

  get bytes(): number {
    return this.tokens * this.headDim * 2 * 2 * this.kvHeads;
  }

  /** Host bytes held (capacity, K and V, every head). */
  get heldBytes(): number {
    return this.bytesFor(this.capacity);
  }

  /** Returns the held bytes to the budget; the segment must not be used after. */
  release(): void {
    this.budget.release(this.heldBytes);
  }

  /**
   * Appends n tokens from row-major [kvHeads, n, headDim] bytes of `dtype`
   * (v's: `vDtype`, the same unless given). Callers have already checked
   * shapes and finiteness.
   */
  append(k: Uint8Array, v: Uint8Array, dtype: FloatDtype, n: number, vDtype: FloatDtype = dtype): void {
    this.reserve(this.tokens + n);
    const perHead = n * this.headDim;
    if (dtype === this.dtype && vDtype === this.dtype && perHead <= SMALL_APPEND_WORDS && (k.byteOffset & 1) === 0 && (v.byteOffset & 1) === 0) {
      // A decode step's own token (n = 1): a word loop per head, where the
      // views below (six a head) cost more than the copy (~10 us a token of
      // 16 layers on the dev VM, bench/results/wave-step-host-js-vm.md).
      const k16 = new Uint16Array(k.buffer, k.byteOffset, this.kvHeads * perHead);
      const v16 = new Uint16Array(v.buffer, v.byteOffset, this.kvHeads * perHead);
      const at = this.tokens * this.headDim;
      for (let h = 0; h < this.kvHeads; h++) {
        const dk = this.k[h], dv = this.v[h], from = h * perHead;
        for (let i = 0; i < perHead; i++) {
          dk[at + i] = k16[from + i];
          dv[at + i] = v16[from + i];
        }
      }
      this.tokens += n;
      return;
    }
    const kBytes = perHead * (dtype === 'f32' ? 4 : 2), vBytes = perHead * (vDtype === 'f32' ? 4 : 2);
    for (let h = 0; h < this.kvHeads; h++) {
      this.copyInto(this.k[h], k.subarray(h * kBytes, (h + 1) * kBytes), dtype, perHead);
      this.copyInto(this.v[h], v.subarray(h * vBytes, (h + 1) * vBytes), vDtype, perHead);
    }
    this.tokens += n;
    this.prefaultAhead(n);
  }

  /**
   * As append for bytes in the storage dtype, checked finite as they are
   * copied, off the event loop (a document upload's 16 MiB: the scan alone
   * held the loop ~2 ms on the 16-core host, the next body unread
   * meanwhile; bench/results/preload-ab-vm-overlap.md). `also` (an upload's q)
   * is checked beside them. Resolves to the first NaN or infinite value (in
   * k, else v, else also; its flat index there), the segment as it was
   * (rows past `tokens` may have been written: they hold nothing yet); else
   * the rows count and it resolves undefined. Nothing else may append to
   * this segment, nor the sources change, until then (a document's uploads
   * run one at a time).
   */
  async appendStored(k: Uint8Array, v: Uint8Array, n: number, also?: { data: Uint8Array; dtype: FloatDtype }): Promise<NonFinite | undefined> {
    // Growing takes memory from the budget: only for rows that will count, so a bad upload reserves nothing.
    const grow = this.tokens + n > this.capacity;
    const bytes = n * this.headDim * 2, at = this.tokens * this.headDim * 2;
    const dst = (a: Uint16Array) => (grow ? null : bytesOf(a).subarray(at, at + bytes));
    const ranges: CheckedRange[] = [];
    for (let h = 0; h < this.kvHeads; h++) ranges.push({ src: k.subarray(h * bytes, (h + 1) * bytes), dst: dst(this.k[h]), dtype: this.dtype });
    for (let h = 0; h < this.kvHeads; h++) ranges.push({ src: v.subarray(h * bytes, (h + 1) * bytes), dst: dst(this.v[h]), dtype: this.dtype });
    if (also) ranges.push({ src: also.data, dst: null, dtype: also.dtype });
    const first = await copyChecked(ranges);
    const bad = first.findIndex((i) => i >= 0);
    if (bad >= 0) {
      const H = this.kvHeads, perHead = n * this.headDim;
      return bad < H ? { tensor: 'k', at: bad * perHead + first[bad] } : bad < 2 * H ? { tensor: 'v', at: (bad - H) * perHead + first[bad] } : { tensor: 'also', at: first[bad] };
    }
    if (grow) {
      this.reserve(this.tokens + n);
      const heads = [...this.k, ...this.v];
      await copyRanges(
        ranges.slice(0, 2 * this.kvHeads).map((r) => r.src),
        heads.map((a) => bytesOf(a).subarray(at, at + bytes)),
      );
    }
    this.tokens += n;
    this.prefaultAhead(n);
    return undefined;
  }

  /**
   * A fresh array's first fill faults every page on the event loop: most of
   * a document upload's copy time (bench/results/preload-vm.md). The rows
   * the next append of this size will fill are faulted in on a libuv thread
   * now, while its body arrives. Faulting the whole capacity at once slowed
   * the store's writes for the length of the upload on the 2-core VM.
   */
  private prefaultAhead(n: number): void {
    const d = this.headDim, from = this.tokens * d, to = Math.min(this.capacity, this.tokens + n) * d;
    if ((to - from) * 2 < PREFAULT_BYTES) return;
    const arrays = [...this.k, ...this.v].map((a) => a.subarray(from, to));
    prefaulting = prefaulting.then(() => prefault(arrays)).catch(() => false);
  }

  /**
   * Writes n tokens of one head at row `at` from storage-dtype bytes; used
   * when loading blocks into a segment constructed with enough capacity.
   */
  writeHead(head: number, k: Uint8Array, v: Uint8Array, n: number, at: number): void {
    if (at + n > this.capacity) throw new RangeError(`rows ${at}..${at + n} exceed capacity ${this.capacity}`);
    const off = at * this.headDim * 2;
    bytesOf(this.k[head]).set(k, off);
    bytesOf(this.v[head]).set(v, off);
  }

  /** Marks `tokens` rows valid after writeHead calls filled them. */
  setTokens(tokens: number): void {
    this.tokens = tokens;
  }

  /** Bytes of rows [from, to) of one head, as views (valid until the next append). */
  rows(head: number, from: number, to: number): { k: Uint8Array; v: Uint8Array } {
    const d = this.headDim;
    return {
      k: bytesOf(this.k[head].subarray(from * d, to * d)),
      v: bytesOf(this.v[head].subarray(from * d, to * d)),
    };
  }

  /** Releases unused capacity (documents are immutable once sealed). */
  shrinkToFit(): void {
    const n = Math.max(1, this.tokens) * this.headDim;
    if (this.k[0].length === n) return;
    this.budget.release(this.heldBytes - this.bytesFor(n / this.headDim));
    const cut = (a: Uint16Array) => {
      if (!this.shared) return a.slice(0, n);
      const b = this.alloc(n);
      b.set(a.subarray(0, n));
      return b;
    };
    this.k = this.k.map(cut);
    this.v = this.v.map(cut);
  }

  private alloc(words: number): Uint16Array {
    return this.shared ? new Uint16Array(new SharedArrayBuffer(words * 2)) : new Uint16Array(words);
  }

  private bytesFor(tokens: number): number {
    return tokens * this.headDim * 2 * 2 * this.kvHeads;
  }

  private copyInto(dst: Uint16Array, src: Uint8Array, dtype: FloatDtype, count: number): void {
    const at = bytesOf(dst).subarray(this.tokens * this.headDim * 2);
    if (dtype === this.dtype) at.set(src);
    else convert(src, dtype, at, this.dtype, count);
  }

  private reserve(tokens: number): void {
    const cap = this.capacity;
    if (tokens <= cap) return;
    const nextTokens = Math.max(tokens, cap * 2, MIN_CAPACITY);
    this.budget.reserve(this.bytesFor(nextTokens) - this.heldBytes, 'KV');
    const next = nextTokens * this.headDim;
    const grow = (a: Uint16Array) => {
      const b = this.alloc(next);
      b.set(a.subarray(0, this.tokens * this.headDim));
      return b;
    };
    this.k = this.k.map(grow);
    this.v = this.v.map(grow);
  }
}
