// KeyedQueue: operations on one key run one at a time in arrival order,
// whatever each does (resolve, reject, throw); runNow starts an operation
// in the caller's turn when nothing is queued on its key, and otherwise
// waits its turn like run.
import { describe, expect, it } from 'vitest';
import { KeyedQueue } from '../../core/serial.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`serial: seed ${seed}`);
const settle = () => new Promise((r) => setImmediate(r));

describe('KeyedQueue', () => {
  it('runs a key\'s operations one at a time in arrival order, run and runNow mixed, failures included', async () => {
    const rng = new Rng(seed);
    const q = new KeyedQueue();
    for (let trial = 0; trial < 20; trial++) {
      const log: string[] = [];
      const active = new Map<string, number>();
      const results: Promise<[string, unknown]>[] = [];
      const want: Record<string, number[]> = {};
      for (let i = 0; i < 60; i++) {
        const key = `k${rng.int(3)}`;
        (want[key] ??= []).push(i);
        const kind = rng.int(4);
        const op = async () => {
          active.set(key, (active.get(key) ?? 0) + 1);
          expect(active.get(key), `${key} has one operation at a time`).toBe(1);
          log.push(`${key}:${i}`);
          for (let t = rng.int(3); t > 0; t--) await settle();
          active.set(key, active.get(key)! - 1);
          if (kind === 1) throw new Error(`op ${i}`);
          return i;
        };
        // kind 2: a plain function that throws at once (no promise of its own).
        const plain = () => {
          active.set(key, 1);
          log.push(`${key}:${i}`);
          active.set(key, 0);
          throw new Error(`op ${i}`);
        };
        const f = kind === 2 ? plain : op;
        const p = rng.int(2) ? q.run(key, f) : q.runNow(key, f);
        results.push(p.then((v): [string, unknown] => ['ok', v], (e: Error): [string, unknown] => ['err', e.message]));
        if (rng.int(4) === 0) await settle();
      }
      const settled = await Promise.all(results);
      for (const [key, ids] of Object.entries(want)) expect(log.filter((l) => l.startsWith(`${key}:`))).toEqual(ids.map((i) => `${key}:${i}`));
      settled.forEach((s, i) => expect(s[0] === 'ok' ? s[1] : Number((s[1] as string).split(' ')[1])).toBe(i));
    }
  });

  it('runNow starts at once on an idle key, and after the queued operations on a busy one', async () => {
    const q = new KeyedQueue();
    let ran = false;
    const p = q.runNow('a', () => {
      ran = true;
      return 1;
    });
    expect(ran).toBe(true);
    await expect(p).resolves.toBe(1);
    let release!: () => void;
    const first = q.run('b', () => new Promise<void>((r) => (release = r)));
    await settle();
    let second = false;
    const next = q.runNow('b', () => {
      second = true;
    });
    await settle();
    expect(second).toBe(false);
    release();
    await first;
    await next;
    expect(second).toBe(true);
    // Once everything on it has settled the key is idle again: runNow starts at once.
    await settle();
    let third = false;
    void q.runNow('b', () => void (third = true));
    expect(third).toBe(true);
    // A synchronous throw is the promise's rejection, and the key goes on.
    await expect(q.runNow('c', () => { throw new Error('sync'); })).rejects.toThrow('sync');
    await expect(q.runNow('c', () => 2)).resolves.toBe(2);
  });
});
