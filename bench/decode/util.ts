// Small shared pieces of bench:decode: clocks, stderr logging and progress,
// number formats.

export const now = () => performance.now();
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/**
 * After long synchronous work: let timers that came due meanwhile run. In
 * process, the server's keep-alive timer (5 s) otherwise fires in the same
 * turn as the next request is written on that socket, and fetch fails with
 * ECONNRESET.
 */
export const settle = () => sleep(20);
export const log = (msg: string) => void process.stderr.write(`[bench:decode] ${msg}\n`);
export const GiB = 2 ** 30, MiB = 2 ** 20;
export const fmtBytes = (b: number) => (b >= GiB ? `${(b / GiB).toFixed(2)} GiB` : `${(b / MiB).toFixed(1)} MiB`);
export const fmtTokens = (t: number) => (t % 1048576 === 0 ? `${t / 1048576}M` : t % 1024 === 0 ? `${t / 1024}K` : `${t}`);
export const round = (x: number, digits = 3) => (Number.isFinite(x) ? Number(x.toFixed(digits)) : x);

/** A one-line progress bar on stderr (redrawn in place on a TTY, every ~10% otherwise). */
export class Progress {
  private readonly t0 = now();
  private lastPrinted = -1;
  private lastDraw = 0;
  constructor(
    private readonly label: string,
    private readonly total: number,
  ) {}

  update(done: number, extra = ''): void {
    const f = this.total > 0 ? Math.min(1, done / this.total) : 1;
    const elapsed = (now() - this.t0) / 1000;
    const eta = f > 0 && f < 1 ? ` eta ${((elapsed * (1 - f)) / f).toFixed(0)}s` : '';
    const width = 24, full = Math.round(f * width);
    const line = `[bench:decode] ${this.label} [${'#'.repeat(full)}${'-'.repeat(width - full)}] ${(f * 100).toFixed(0).padStart(3)}% ${elapsed.toFixed(1)}s${eta}${extra ? ' ' + extra : ''}`;
    if (process.stderr.isTTY) {
      if (now() - this.lastDraw < 100 && f < 1) return;
      this.lastDraw = now();
      process.stderr.write(`\r${line.slice(0, (process.stderr.columns || 120) - 1).padEnd((process.stderr.columns || 120) - 1)}`);
    } else {
      const decile = Math.floor(f * 10);
      if (decile === this.lastPrinted) return;
      this.lastPrinted = decile;
      process.stderr.write(line + '\n');
    }
  }

  finish(extra = ''): void {
    this.update(this.total, extra);
    if (process.stderr.isTTY) process.stderr.write('\n');
  }
}
