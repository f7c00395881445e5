// Where an attend runs (addon/kernels.ts): a short one on the calling
// (event-loop) thread, the rest, and any while another runs on libuv's pool,
// on the pool; the answers are the same bits either way.
import { afterEach, describe, expect, it } from 'vitest';
import { ATTEND_SYNC_WORK, attend, attendRuns, attendWork, setAttendSyncWork, type AttendArgs, type AttendSegment } from '../../addon/kernels.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';

const seed = freshSeed();
console.log(`attend thread tests: seed ${seed}`);

function problem(rng: Rng, qHeads: number, kvHeads: number, d: number, n: number, withIds: boolean) {
  const k: Uint16Array[] = [], v: Uint16Array[] = [], kf: Float64Array[] = [], vf: Float64Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const kb = new Uint16Array(n * d), vb = new Uint16Array(n * d), kd = new Float64Array(n * d), vd = new Float64Array(n * d);
    for (let i = 0; i < n * d; i++) {
      kb[i] = bitsOf('f16')(rng.normal());
      vb[i] = bitsOf('f16')(rng.normal());
      kd[i] = valueOf('f16')(kb[i]);
      vd[i] = valueOf('f16')(vb[i]);
    }
    k.push(kb);
    v.push(vb);
    kf.push(kd);
    vf.push(vd);
  }
  const rows = withIds ? Array.from({ length: kvHeads }, (_, h) => Array.from({ length: 50 + 31 * h }, () => rng.int(n))) : undefined;
  const segments: AttendSegment[] = rows ? [{ k, v, tokens: n, ids: rows.map((r) => Int32Array.from(r)) }] : [{ k, v, tokens: n, begin: 0, end: n }];
  const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
  const args = (): AttendArgs => ({ q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: 1 / Math.sqrt(d), segments, out: new Float32Array(qHeads * d), lse: new Float32Array(qHeads) });
  return { args, ref: () => referenceAttention(q, kf, vf, qHeads, d, 1 / Math.sqrt(d), rows) };
}

/** Whether `out` holds an answer (an attend over rows leaves no head all zero here). */
const filled = (a: AttendArgs) => a.lse.every((x) => x !== 0);
const nextTurn = () => new Promise<void>((r) => setImmediate(r));
/** Where each of `calls` ran: 'loop' or 'pool', in order (from attendRuns' counts around each call). */
function where(calls: (() => unknown)[]): string[] {
  return calls.map((f) => {
    const before = attendRuns();
    f();
    const after = attendRuns();
    return after.loop === before.loop + 1 && after.pool === before.pool ? 'loop' : after.pool === before.pool + 1 && after.loop === before.loop ? 'pool' : 'neither';
  });
}

describe('attend: the loop thread or the pool', () => {
  afterEach(() => setAttendSyncWork(ATTEND_SYNC_WORK));

  for (const [qHeads, kvHeads, d, n, withIds] of [
    [32, 8, 64, 1500, false],
    [12, 3, 67, 777, true],
    [8, 2, 128, 2053, false],
  ] as const)
    it(`answers the same bits on either, within 1e-5 of float64 (${qHeads}q/${kvHeads}kv, d=${d}, n=${n}${withIds ? ', ids' : ''})`, async () => {
      const p = problem(new Rng(seed + n), qHeads, kvHeads, d, n, withIds);
      setAttendSyncWork(0);
      const pooled = p.args();
      let done: Promise<void> = Promise.resolve();
      expect(where([() => (done = attend(pooled))])).toEqual(['pool']);
      await done;
      setAttendSyncWork(2 ** 40);
      await nextTurn();
      const onLoop = p.args();
      expect(where([() => (done = attend(onLoop))])).toEqual(['loop']);
      expect(filled(onLoop)).toBe(true); // done before attend returned
      await done;
      expect(Buffer.from(onLoop.out.buffer).equals(Buffer.from(pooled.out.buffer))).toBe(true);
      expect(Buffer.from(onLoop.lse.buffer).equals(Buffer.from(pooled.lse.buffer))).toBe(true);
      const ref = p.ref();
      expect(maxRelError(pooled.out, ref.out, qHeads)).toBeLessThan(1e-5);
      expect(maxRelErrorScalar(pooled.lse, ref.lse)).toBeLessThan(1e-5);
    });

  it('runs on the pool past the per-turn cap, and again on the loop in the next turn', async () => {
    const p = problem(new Rng(seed + 7), 32, 8, 64, 300, false);
    const work = attendWork(p.args());
    expect(work).toBe(300 * 8 * 4 * 64);
    setAttendSyncWork(Math.floor(2.5 * work));
    await nextTurn();
    const args = [p.args(), p.args(), p.args(), p.args()];
    const done: Promise<void>[] = [];
    // Two fit in this turn's cap; the third goes to the pool, and the fourth with it (one is there).
    expect(where(args.map((a) => () => done.push(attend(a))))).toEqual(['loop', 'loop', 'pool', 'pool']);
    await Promise.all(done);
    for (const a of args.slice(1)) expect(Buffer.from(a.out.buffer).equals(Buffer.from(args[0].out.buffer))).toBe(true);
    await nextTurn();
    const c = p.args();
    expect(where([() => done.push(attend(c))])).toEqual(['loop']);
    expect(filled(c)).toBe(true);
  });

  it('runs on the pool when over the cap alone, and a short one while another runs there', async () => {
    const p = problem(new Rng(seed + 8), 32, 8, 64, 300, false);
    setAttendSyncWork(attendWork(p.args()) - 1);
    await nextTurn();
    const done: Promise<void>[] = [];
    const [a, b] = [p.args(), p.args()];
    expect(where([() => done.push(attend(a))])).toEqual(['pool']);
    setAttendSyncWork(2 ** 40);
    expect(where([() => done.push(attend(b))])).toEqual(['pool']); // steps of other sessions overlap there
    await Promise.all(done);
    expect(filled(a) && filled(b)).toBe(true);
    await nextTurn();
    expect(where([() => done.push(attend(p.args()))])).toEqual(['loop']); // none left on the pool
  });

  it('runs a beside attend on the pool however short, with the same bits, and counts it there', async () => {
    const p = problem(new Rng(seed + 10), 32, 8, 64, 40, false);
    setAttendSyncWork(2 ** 40);
    await nextTurn();
    const inline = p.args(), beside = p.args();
    let done: Promise<void> = Promise.resolve();
    expect(where([() => (done = attend(inline))])).toEqual(['loop']);
    await done;
    expect(where([() => (done = attend(beside, true))])).toEqual(['pool']);
    await done;
    expect(Buffer.from(beside.out.buffer).equals(Buffer.from(inline.out.buffer))).toBe(true);
    expect(Buffer.from(beside.lse.buffer).equals(Buffer.from(inline.lse.buffer))).toBe(true);
    await nextTurn();
    expect(where([() => (done = attend(p.args()))])).toEqual(['loop']); // none left on the pool
    await done;
  });

  it('refuses bad arguments on either way before touching memory', async () => {
    const p = problem(new Rng(seed + 9), 8, 2, 16, 64, true);
    for (const cap of [0, 2 ** 40]) {
      setAttendSyncWork(cap);
      await nextTurn();
      const a = p.args();
      a.segments = [{ ...a.segments[0], ids: [Int32Array.of(0, 64), Int32Array.of(1)] }]; // 64 is past the last row
      expect(() => attend(a)).toThrow(/outside/);
      expect(a.out.every((x) => x === 0)).toBe(true);
      // Nothing was left counted on the pool: a short attend runs on the loop again.
      if (cap > 0) {
        let done: Promise<void> = Promise.resolve();
        expect(where([() => (done = attend(p.args()))])).toEqual(['loop']);
        await done;
      }
    }
  });
});
