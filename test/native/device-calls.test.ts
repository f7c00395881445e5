// Where a GPU call waits (addon/device-calls.ts): on the event loop's thread
// when its expected time is known, fits what is left of the turn's cap and
// no other GPU call is on libuv's pool; on the pool otherwise. The calls
// here are stand-ins that record the `sync` they were given (the chooser's
// unit test); the native calls themselves are covered on a device by
// test/native/gpu-sync.test.ts and the GPU tests that run through them.
import { afterEach, describe, expect, it } from 'vitest';
import { deviceCall, deviceCallRuns, DeviceTimer, GPU_SYNC_US, gpuSyncUs, setGpuSyncUs } from '../../addon/device-calls.js';

const nextTurn = () => new Promise<void>((r) => setImmediate(r));

/** A call that settles at once (as a sync native call does) and logs where it was told to run. */
function settled(log: string[], value = 1) {
  return (sync: boolean) => {
    log.push(sync ? 'loop' : 'pool');
    return Promise.resolve(value);
  };
}

/** A call on the pool that settles when `finish` is called. */
function pending(log: string[]) {
  let finish!: () => void;
  const p = new Promise<number>((r) => (finish = () => r(0)));
  return {
    call: (sync: boolean) => {
      log.push(sync ? 'loop' : 'pool');
      return p;
    },
    finish: () => finish(),
  };
}

describe('deviceCall: the loop thread or the pool', () => {
  afterEach(async () => {
    setGpuSyncUs(GPU_SYNC_US);
    await nextTurn();
  });

  it('sends a call whose time is not known yet to the pool, and one that fits the cap to the loop', async () => {
    const log: string[] = [];
    await deviceCall(undefined, settled(log));
    await deviceCall(0.2, settled(log));
    expect(log).toEqual(['pool', 'loop']);
  });

  it('runs calls on the loop until the turn has spent its cap, then on the pool; the next turn starts afresh', async () => {
    setGpuSyncUs(1000);
    await nextTurn();
    const log: string[] = [];
    // Within one turn (no await between them: a step's calls chained by microtasks are in one turn too).
    const calls = [deviceCall(0.4, settled(log)), deviceCall(0.4, settled(log)), deviceCall(0.4, settled(log))];
    await Promise.all(calls);
    expect(log).toEqual(['loop', 'loop', 'pool']);
    await nextTurn();
    await deviceCall(0.9, settled(log));
    expect(log.at(-1)).toBe('loop');
    // A call expected past the whole cap never runs on the loop.
    await nextTurn();
    await deviceCall(1.2, settled(log));
    expect(log.at(-1)).toBe('pool');
  });

  it('counts microtask-chained calls of one step against the same turn', async () => {
    setGpuSyncUs(1000);
    await nextTurn();
    const log: string[] = [];
    await deviceCall(0.6, settled(log));
    await deviceCall(0.6, settled(log));
    expect(log).toEqual(['loop', 'pool']);
  });

  it('sends every call to the pool while another GPU call is there, and to the loop again once it ended', async () => {
    const log: string[] = [];
    const slow = pending(log);
    const first = deviceCall(undefined, slow.call);
    await nextTurn();
    await deviceCall(0.1, settled(log));
    expect(log).toEqual(['pool', 'pool']);
    slow.finish();
    await first;
    await nextTurn();
    await deviceCall(0.1, settled(log));
    expect(log.at(-1)).toBe('loop');
  });

  it('sends a call made beside the next one to the pool without keeping that next one off the loop', async () => {
    const log: string[] = [];
    const slow = pending(log);
    const first = deviceCall(0.1, slow.call, true);
    await deviceCall(0.1, settled(log));
    expect(log).toEqual(['pool', 'loop']);
    slow.finish();
    await first;
  });

  it('sends everything to the pool with a cap of 0', async () => {
    setGpuSyncUs(0);
    expect(gpuSyncUs()).toBe(0);
    const log: string[] = [];
    await deviceCall(0, settled(log));
    await deviceCall(0.001, settled(log));
    expect(log).toEqual(['pool', 'pool']);
  });

  it('counts where calls ran; a call that throws is thrown and not counted, a rejection comes back as it was', async () => {
    const before = deviceCallRuns();
    await deviceCall(0.1, settled([]));
    await deviceCall(undefined, settled([]));
    const mid = deviceCallRuns();
    expect(mid).toEqual({ loop: before.loop + 1, pool: before.pool + 1 });
    const refused = new RangeError('qHeads must be a multiple of kvHeads');
    for (const expected of [0.1, undefined])
      expect(() =>
        deviceCall(expected, () => {
          throw refused;
        }),
      ).toThrow(refused);
    expect(deviceCallRuns()).toEqual(mid);
    const failed = new Error('the step\'s rows exceed the cache');
    for (const expected of [0.1, undefined]) await expect(deviceCall(expected, () => Promise.reject(failed))).rejects.toBe(failed);
    // A rejected pool call no longer counts as on the pool: the next call may run on the loop.
    await nextTurn();
    const log: string[] = [];
    await deviceCall(0.1, settled(log));
    expect(log).toEqual(['loop']);
  });
});

describe('DeviceTimer', () => {
  it('expects nothing before a measurement, then the last one scaled by size', () => {
    const t = new DeviceTimer();
    expect(t.expect()).toBeUndefined();
    t.record(0.5);
    expect(t.expect()).toBe(0.5);
    t.record(2, 1000);
    expect(t.expect(500)).toBeCloseTo(1, 12);
    expect(t.expect(0)).toBeCloseTo(0.002, 12);
    // A value that is no time keeps the last one.
    t.record(NaN, 10);
    t.record(-1, 10);
    expect(t.expect(1000)).toBeCloseTo(2, 12);
  });
});
