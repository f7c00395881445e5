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
    // Rounded up to a MiB, so that requests of similar sizes share buffers.
    return Buffer.allocUnsafeSlow(Math.max(1, Math.ceil(n / 2 ** 20)) * 2 ** 20);
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
