// Where a GPU call waits for its stream: on libuv's pool (the old way) or on
// the event loop's own thread. Both wait the same way (the call ends in a
// cudaStreamSynchronize on whichever thread runs it), but the pool adds two
// cross-thread wake-ups, the pool thread's and then the loop's: 17 µs back to
// back and 50-95 µs after 1-25 ms idle on the 2-core VM, and on the H100 host
// a step's server time grew 0.33 -> 0.77 ms after a 25 ms idle (57ebcc1). A
// call run on the loop's thread holds the loop for about its device time,
// the trade addon/kernels.ts's attend makes for short host work: here each
// loop turn may spend up to --gpu-sync-us of expected device calls so, and a
// call goes to the pool as before when its time is not known yet (a store's
// first call), past the turn's cap, or while another GPU call is on the
// pool (steps of several sessions overlap there). The native call is the same
// either way (common/binding_args.h's RunNowOrAsync): the same answers, bit for
// bit, and the same errors (refused arguments throw, a failure in the work
// rejects). The per-turn cap's bookkeeping is addon/turn-budget.ts's, as
// for attend.
import { TurnBudget } from './turn-budget.js';

/** Microseconds of expected GPU calls a loop turn runs on its own thread by default (0: every call on libuv's pool). */
export const GPU_SYNC_US = 1000;
/** Expected ms of GPU calls run on the loop's thread a turn. */
const budget = new TurnBudget(GPU_SYNC_US / 1000);

/** Sets the per-turn cap, microseconds of expected device time (0: every GPU call on libuv's pool; default GPU_SYNC_US). */
export function setGpuSyncUs(us: number): void {
  budget.cap = us / 1000;
}

/** The per-turn cap now, microseconds. */
export function gpuSyncUs(): number {
  return budget.cap * 1000;
}

/** GPU calls run so far on the event loop's thread and on libuv's pool, in this process. */
export function deviceCallRuns(): { loop: number; pool: number } {
  return budget.runs();
}

/**
 * Runs a GPU call `call(sync)` on the loop's thread (sync true) when its
 * expected work (ms; undefined: not known yet) fits what is left of this
 * turn's cap and no other GPU call is on the pool; otherwise on the pool.
 * `call` must settle the same either way (a native call through
 * RunNowOrAsync does); what it throws is thrown, uncounted.
 *
 * `beside`: the caller runs this call beside its next GPU call (a block
 * method's device estimate beside the pool's attend, engine/decode-step.ts),
 * so it goes to the pool, where the two overlap on their own streams, and
 * does not keep that next call off the loop. On the loop the two ran one
 * after the other: nosa + estimate 1.48 -> 1.94 ms a step at 1M on an H100
 * (bench/results/gpu-decode-wave-nosa-estimate-nosa-sync-ab-h100.md). Only
 * a call made before the next one starts overlaps it: a call on the loop, and
 * the host work before it, hold the thread to their end, so one made after
 * them (an await in between) still ran after them (1.98 ms, visit R;
 * engine/rest-on-device.ts startRestOnDevice).
 */
export function deviceCall<T>(expectedMs: number | undefined, call: (sync: boolean) => Promise<T>, beside = false): Promise<T> {
  if (beside) return budget.pooled(call(false), false);
  if (expectedMs !== undefined && budget.fits(expectedMs)) {
    const p = call(true);
    budget.charge(expectedMs);
    budget.ranOnLoop();
    return p;
  }
  return budget.pooled(call(false));
}

/**
 * A kind of GPU call's last work time (one store's steps, one pool's
 * attends), per unit of its size (rows attended, or 1 for a call whose shape
 * does not change from step to step): the next call's expectation.
 */
export class DeviceTimer {
  private msPerUnit?: number;

  /** The expected ms of a call of `size` units (undefined before the first was measured). */
  expect(size = 1): number | undefined {
    return this.msPerUnit === undefined ? undefined : this.msPerUnit * Math.max(1, size);
  }

  record(ms: number, size = 1): void {
    if (Number.isFinite(ms) && ms >= 0) this.msPerUnit = ms / Math.max(1, size);
  }
}
