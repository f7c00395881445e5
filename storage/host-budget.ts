// Admission control for host memory: every KV segment reserves its bytes
// here before it allocates, so a request that would push the process past
// its budget is refused (503) before anything changes, instead of the
// process swapping itself to death.
import { KvrecallError } from '../core/errors.js';

export class HostBudget {
  private usedBytes = 0;

  constructor(readonly limit: number) {}

  get used(): number {
    return this.usedBytes;
  }

  reserve(bytes: number, what: string): void {
    if (this.usedBytes + bytes > this.limit)
      throw new KvrecallError(
        'over_budget',
        `${what} needs ${fmt(bytes)} more host memory; ${fmt(this.usedBytes)} of the ${fmt(this.limit)} budget is in use`,
      );
    this.usedBytes += bytes;
  }

  release(bytes: number): void {
    this.usedBytes = Math.max(0, this.usedBytes - bytes);
  }
}

/** A budget that admits everything (tools and benchmarks). */
export const UNLIMITED = new HostBudget(Number.MAX_SAFE_INTEGER);

function fmt(bytes: number): string {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}
