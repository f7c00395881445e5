// The event loop kept polling its sockets for a while after a stream's
// answer goes out (--poll-us): a decode client sends its next call (the next
// layer's) a fraction of a millisecond after reading an answer, and a loop
// asleep in epoll_wait, its core gone idle, takes longer to come back for it
// than one that polls. One setImmediate per loop turn makes libuv poll with
// a zero timeout instead of sleeping, so a frame is read as it lands; the
// cost is a core busy for up to the window after each answer, a trade for a
// GPU host with cores to spare: there a decode step is a fraction of a
// millisecond, the wake a tenth of it (bench/results/
// decode-full-llama3.2-1b-h100-16layers-cs16-poll-at.md: RPC 18.0% -> 13.8%
// of a 16-layer token), and a core is cheap beside the step; so it is on by
// default there (defaultPollUs) and off elsewhere. The TypeScript client's
// openStream({ spinMs }) and the Python one's spin_us are the same trick on
// the other side.

import { availableParallelism } from 'node:os';

/** --poll-us when it is not given: 1000 on the CUDA backend with 8 cores or more, else 0 (a small or CPU-bound host needs its cores). */
export function defaultPollUs(cuda: boolean, cores = availableParallelism()): number {
  return cuda && cores >= 8 ? 1000 : 0;
}

/** Keeps the loop polling until `windowMs` after the latest extend(); a window of 0 never polls. */
export class LoopPoller {
  private until = 0;
  private running = false;
  /** Loop turns polled so far (tests; a bench's question). */
  turns = 0;

  constructor(readonly windowMs: number) {}

  /** Whether a setImmediate chain is polling now. */
  get active(): boolean {
    return this.running;
  }

  /** Polls (on to) `windowMs` from now. */
  extend(): void {
    if (this.windowMs <= 0) return;
    this.until = performance.now() + this.windowMs;
    if (this.running) return;
    this.running = true;
    setImmediate(this.turn);
  }

  private readonly turn = (): void => {
    this.turns++;
    if (performance.now() < this.until) setImmediate(this.turn);
    else this.running = false;
  };
}
