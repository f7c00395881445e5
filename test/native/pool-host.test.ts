// The native block pool's host logic without a GPU: native/cuda/block_pool.cu
// and block_pool_ranges.cu compiled by nvcc and linked against a host
// stand-in for the CUDA runtime (pool-host/cuda_stub.cc: device memory is
// host memory, the table gather runs on the host, the decode kernel records
// the slots it would read), driven by pool-host/pool_ops.cc. Random
// sequences of uploads, pins, range holds and unholds, attends over held
// ranges and releases run through it and through PoolModel; the two must
// agree line for line: every counter after every op, every refusal, every
// slot an attend reads. So the device pool's page tables, eviction, parking
// and range tables are the model's, whose rules test/cache/pool-ranges.test.ts
// checks. Skipped without nvcc or the CUDA headers (the GPU run of the same
// agreement is test/cache/simulated-pool.test.ts's).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PoolModel } from '../../engine/cache/simulated-pool.js';
import { freshSeed, Rng } from '../helpers/random.js';

const ROOT = join(import.meta.dirname, '..', '..');
const cudaInclude = [process.env.CUDA_HOME && join(process.env.CUDA_HOME, 'include'), '/usr/local/cuda/include'].find(
  (d): d is string => !!d && existsSync(join(d, 'cuda_runtime.h')),
);
const nvcc = spawnSync('nvcc', ['--version']).status === 0;
const seed = freshSeed();

/** Random ops in pool_ops.cc's language, and PoolModel's answer to each in its output format. */
function modelRun(rng: Rng, slots: number, steps: number): { ops: string[]; lines: string[] } {
  const model = new PoolModel({ budgetBytes: slots * 64 * 64 * 2 * 2, blockSize: 64, headDim: 64, dtype: 'f16' });
  const kv = new Uint16Array(64 * 64 * 64);
  const ops: string[] = [], lines: string[] = [];
  const open: [number, number][] = [], pinned: [number, number[]][] = [];
  const emit = (op: string, f: () => string | void) => {
    let out: string;
    try {
      out = f() ?? '';
    } catch {
      out = ' THROW';
    }
    const s = model.stats();
    ops.push(op);
    lines.push(`${op[0]} used ${s.used} pinned ${s.pinned} hits ${s.hits} misses ${s.misses} evictions ${s.evictions} rangeHeld ${s.rangeHeld} reuses ${s.rangeReuses} patched ${s.rangePatched}${out}`);
    return out !== ' THROW';
  };
  for (let step = 0; step < steps; step++) {
    const c = 1 + rng.int(4), r = rng.next();
    if (step % 29 === 28) {
      // A client released once nothing holds it (GpuBackend waits for its readers).
      for (const [h] of open.splice(0)) emit(`X ${h}`, () => model.unholdRange({ hold: h, blocks: 0 }));
      for (const [cl, b] of pinned.splice(0)) emit(`P ${cl} 0 ${b.length} ${b.join(' ')}`, () => model.pin(cl, Int32Array.from(b), false));
      emit(`R ${c} ${c + 1}`, () => ` freed ${model.releaseRange(c, c + 1)}`);
    } else if (r < 0.35) {
      const first = rng.int(24), count = 1 + rng.int(16), cls = rng.int(3);
      let hold = 0;
      if (emit(`H ${c} ${first} ${count} ${cls}`, () => ` hold ${(hold = model.holdRange(c, first, count, kv, kv, cls).hold)}`)) open.push([hold, count]);
    } else if (r < 0.42) {
      // A part's kv heads in one call (GpuBackend's way): clients c and c + 1, all held or none.
      const first = rng.int(24), count = 1 + rng.int(16), cls = rng.int(3), cl = [c, c + 1];
      let got: { hold: number }[] = [];
      const op = `S ${first} ${count} ${cls} ${cl.join(' ')}`;
      if (emit(op, () => ` holds ${(got = model.holdRanges(cl, first, count, [kv, kv], [kv, kv], cls)).map((h) => h.hold).join(' ')}`)) for (const h of got) open.push([h.hold, count]);
    } else if (r < 0.55 && open.length > 0) {
      const picked = open.splice(rng.int(open.length), 1 + rng.int(2));
      emit(`X ${picked.map(([h]) => h).join(' ')}`, () => model.unholdRanges(picked.map(([hold]) => ({ hold, blocks: 0 }))));
    } else if (r < 0.65 && open.length > 0) {
      const pieces = [open[rng.int(open.length)], open[rng.int(open.length)]].slice(0, 1 + rng.int(2));
      emit(`A ${pieces.map(([h, n]) => `${h} ${n}`).join(' ')}`, () => ` read ${model.slotsRead({ tables: [pieces.map(([hold, blocks]) => ({ hold, blocks }))] })[0].join(' ')}`);
    } else if (r < 0.95) {
      const chosen = new Set<number>();
      while (chosen.size < 5) chosen.add(rng.int(48));
      const b = [...chosen], pr = b.map((y) => (y % 7 === 0 ? 1 : 0)), hold = step % 3 === 0;
      const ok = emit(`U ${c} ${hold ? 1 : 0} 5 ${b.join(' ')} ${pr.join(' ')}`, () => void model.uploadIndexed(c, Int32Array.from(b), kv, kv, { priorities: Uint8Array.from(pr), hold }));
      if (ok && hold) pinned.push([c, b]);
    } else if (pinned.length > 0) {
      const [cl, b] = pinned.shift()!;
      emit(`P ${cl} 0 ${b.length} ${b.join(' ')}`, () => model.pin(cl, Int32Array.from(b), false));
    }
  }
  expect(model.faults).toEqual({ changedUnderRead: 0, pinnedReleased: 0 });
  return { ops, lines };
}

describe.skipIf(!nvcc || !cudaInclude)('the native pool on a host stand-in for CUDA', () => {
  let dir: string, bin: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'kvr-pool-host-'));
    bin = join(dir, 'pool_ops');
    const run = (cmd: string, args: string[]) => {
      const r = spawnSync(cmd, args, { cwd: ROOT, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
    };
    const objs: string[] = [];
    for (const f of ['block_pool', 'block_pool_ranges']) {
      objs.push(join(dir, `${f}.o`));
      run('nvcc', ['-std=c++17', '-O1', '-arch=sm_90', '-Xcompiler', '-fPIC', '-Inative', '-c', `native/cuda/${f}.cu`, '-o', objs.at(-1)!]);
    }
    for (const f of ['test/native/pool-host/cuda_stub.cc', 'test/native/pool-host/pool_ops.cc', 'native/common/thread_pool.cc']) {
      objs.push(join(dir, `${objs.length}.o`));
      run('g++', ['-std=c++17', '-O1', '-Inative', `-I${cudaInclude}`, '-c', f, '-o', objs.at(-1)!]);
    }
    run('g++', ['-o', bin, ...objs, '-lpthread']);
  }, 600_000);
  afterAll(() => dir && rmSync(dir, { recursive: true, force: true }));

  const ops = (slots: number, input: string) => spawnSync(bin, [String(slots)], { input, encoding: 'utf8' }).stdout;

  for (const slots of [40, 80, 160])
    it(`${slots} slots: counters, refusals and the slots attends read agree with PoolModel, op for op`, () => {
      for (let k = 0; k < 3; k++) {
        const { ops: seq, lines } = modelRun(new Rng(seed + 97 * slots + k), slots, 1500);
        const native = ops(slots, seq.join('\n') + '\n').trimEnd().split('\n');
        expect(native.length).toBe(lines.length);
        const first = native.findIndex((l, i) => l !== lines[i]);
        expect(first, first < 0 ? '' : `seed ${seed + 97 * slots + k}, op ${first} (${seq[first]}): native "${native[first]}", model "${lines[first]}"`).toBe(-1);
        // The sequences did what they are for: reads, reuses, evictions.
        expect(lines.filter((l) => l.includes(' read ')).length).toBeGreaterThan(50);
        expect(lines.filter((l) => l.startsWith('S') && l.includes(' holds ')).length).toBeGreaterThan(20);
        if (slots === 40) expect(lines.filter((l) => l.startsWith('S') && l.endsWith(' THROW')).length).toBeGreaterThan(0);
      }
    }, 120_000);

  it('a pool whose construction fails at any allocation frees what it had allocated (and a made one frees all at its end)', () => {
    // The pool makes 10 allocations (K, V, 4 staging chunks host and device); past them, construction succeeds.
    for (let k = 1; k <= 12; k++) {
      const out = spawnSync(bin, ['40', String(k)], { encoding: 'utf8' }).stdout.trim();
      expect(out, `allocation ${k} failing`).toBe(`ctor ${k <= 10 ? 'THROW' : 'ok'} live 0 0`);
    }
  });

  it('ranges made and dropped every step (ten for one client: past eight, each new one drops the least recent) allocate and free no device or pinned memory once warm', () => {
    const seq: string[] = [];
    let id = 1;
    for (let round = 0; round < 3; round++) {
      for (let f = 0; f < 10; f++) seq.push(`H 1 ${f} 4 0`, `X ${id++}`);
      seq.push('L');
    }
    const out = ops(80, seq.join('\n') + '\n').trimEnd().split('\n');
    const marks = out.filter((l) => l.startsWith('L'));
    const patched = marks.map((l) => Number(/ patched (\d+)/.exec(l)![1]));
    // Each hold of rounds 2 and 3 made its range again (built whole: 4 entries), dropping another.
    expect(patched[2] - patched[1]).toBe(40);
    expect(marks[2].slice(marks[2].indexOf(' live '))).toBe(marks[1].slice(marks[1].indexOf(' live ')));
  });

  it("an attend over a hold whose client was released refuses (its slots may be another client's by then)", () => {
    const out = ops(40, ['H 1 0 4 0', 'R 1 2', 'U 2 0 4 0 1 2 3 0 0 0 0', 'A 1 4', 'X 1'].join('\n') + '\n').trimEnd().split('\n');
    expect(out[1]).toMatch(/ freed 4$/);
    expect(out[3]).toMatch(/ THROW$/);
    expect(out[4]).toMatch(/ rangeHeld 0 /);
  });

  it('the attend reads a host table as given (the per-block path) and pieces back to back (a held range between host slots)', () => {
    const out = ops(80, ['O 1 4 3 9 1 7', 'H 1 2 5 3', 'M 1 5 30 31 32', 'H 1 3 2 0', 'M 2 3 1 2 3', 'M 2 2 7 8 9'].join('\n') + '\n').trimEnd().split('\n');
    expect(out[0]).toMatch(/ old-path ok$/);
    // Blocks 3, 9, 1, 7 took slots 0..3; the range [2, 7) has 3 (slot 0) and takes 4..7 for 2, 4, 5, 6: read
    // between the host slots 30 and 31; head 1 reads 32.
    expect(out[2]).toMatch(/ read \| 30 4 0 5 6 7 31 \| 32$/);
    // [3, 5) is served by the clean [2, 7) at an offset; a hold's count must match.
    expect(out[3]).toMatch(/ reuses 1 patched 5 hold 2$/);
    expect(out[4]).toMatch(/ THROW$/);
    expect(out[5]).toMatch(/ read \| 7 0 5 8 \| 9$/);
  });
});
