// Large scratch buffers kept warm between uses: a buffer allocated fresh is
// paid for again in page faults each time (on the machines measured, a
// first touch costs several times a copy into memory already mapped). At
// most `maxKept` buffers are kept, and all are dropped after `idleMs`
// without a return.
export class BufferPool {
  private readonly kept: Buffer[] = [];
  private idle?: NodeJS.Timeout;

  constructor(
    private readonly maxKept = 4,
    private readonly idleMs = 10_000,
  ) {}

  /** A buffer of at least n bytes (contents undefined); give it back when done. */
  take(n: number): Buffer {
    let best = -1;
    for (let i = 0; i < this.kept.length; i++)
      if (this.kept[i].byteLength >= n && (best < 0 || this.kept[i].byteLength < this.kept[best].byteLength)) best = i;
    if (best >= 0) return this.kept.splice(best, 1)[0];
    return Buffer.allocUnsafeSlow(sizeClass(n));
  }

  give(buf: Buffer): void {
    this.kept.push(buf);
    if (this.kept.length > this.maxKept) {
      this.kept.sort((a, b) => b.byteLength - a.byteLength);
      this.kept.length = this.maxKept;
    }
    clearTimeout(this.idle);
    this.idle = setTimeout(() => (this.kept.length = 0), this.idleMs).unref();
  }

  /** Bytes held while idle (for tests). */
  get keptBytes(): number {
    return this.kept.reduce((n, b) => n + b.byteLength, 0);
  }
}

/**
 * `n` rounded up to one of 8 steps per power of two (4 KiB at least), so
 * that requests of similar sizes share buffers while a buffer is at most
 * 1/4 larger than asked: rounding to a whole MiB made a 70 KB answer hold
 * 1 MiB (15x) until it was sent.
 */
export function sizeClass(n: number): number {
  const step = 2 ** Math.max(12, Math.ceil(Math.log2(Math.max(n, 1))) - 3);
  return Math.ceil(n / step) * step;
}
