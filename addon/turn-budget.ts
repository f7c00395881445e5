// The per-loop-turn budget that decides whether a native call runs on the
// event loop's own thread or on libuv's pool, shared by exact attention
// (addon/kernels.ts attend: work units) and GPU calls (addon/device-calls.ts:
// expected ms). Why either runs on the loop at all is said there; what they
// share is the rule: a call takes the loop while its cost fits what is left
// of this turn's cap and no call of its kind is on the pool (calls of
// different sessions overlap there), and the turn's spending is forgotten at
// the next turn (a setImmediate set at the turn's first charge).

export class TurnBudget {
  /** Cost run on the loop's thread this turn, and whether its reset is due. */
  private spent = 0;
  private resetDue = false;
  /** Calls of this kind on libuv's pool now. */
  private inPool = 0;
  private readonly counts = { loop: 0, pool: 0 };
  private readonly reset = () => {
    this.spent = 0;
    this.resetDue = false;
  };

  /** `cap`: the cost a turn may run on the loop's thread (0: every call on the pool). */
  constructor(public cap: number) {}

  /** Whether any call may take the loop now: a cap, and none of this kind on the pool. */
  open(): boolean {
    return this.cap > 0 && this.inPool === 0;
  }

  /** Whether a call of `cost` may take the loop now. */
  fits(cost: number): boolean {
    return this.open() && this.spent + cost <= this.cap;
  }

  /** Charges `cost` to this turn's cap. */
  charge(cost: number): void {
    if (!this.resetDue) {
      this.resetDue = true;
      setImmediate(this.reset);
    }
    this.spent += cost;
  }

  /** Counts a call run on the loop's thread. */
  ranOnLoop(): void {
    this.counts.loop++;
  }

  /** Counts a call sent to the pool; one `held` keeps the loop closed to others until it settles. */
  pooled<T>(p: Promise<T>, held = true): Promise<T> {
    this.counts.pool++;
    if (held) {
      this.inPool++;
      const done = () => void this.inPool--;
      p.then(done, done);
    }
    return p;
  }

  /** Calls run so far on the loop's thread and on the pool. */
  runs(): { loop: number; pool: number } {
    return { ...this.counts };
  }
}
