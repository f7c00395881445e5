// The native block pool's host logic without a GPU: native/cuda/block_pool.cu
// and block_pool_ranges.cu compiled by nvcc and linked against a host
// stand-in for the CUDA runtime (pool-host/cuda_stub.cc: device memory is
// host memory, the table gather runs on the host, the decode kernel records
// the slots it would read, the scatter writes the staged blocks into the
// pool), driven by pool-host/pool_ops.cc. Random sequences of uploads (one
// client a call, and a step's kv heads in one), pins, range holds and
// unholds, attends over held ranges and releases run through it and through
// PoolModel; the two must agree line for line: every counter after every
// op, every refusal, every slot an attend reads. So the device pool's page
// tables, eviction, parking and range tables are the model's, whose rules
// test/cache/pool-ranges.test.ts checks. And the bytes: every client's rows
// differ, and the slots uploads answer, attends read and held uploads keep
// must hold their blocks' K and V as copied through the staging, the
// host-to-device copy and the scatter (pool_ops appends " DATA ..." to the
// line otherwise). Skipped without nvcc or the CUDA headers (the GPU run of
// the same agreement is test/cache/simulated-pool.test.ts's).
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
  // n distinct block ids below 48, each with its class.
  const blockList = (n: number) => {
    const chosen = new Set<number>();
    while (chosen.size < n) chosen.add(rng.int(48));
    const b = [...chosen];
    return { b, pr: b.map((y) => (y % 7 === 0 ? 1 : 0)) };
  };
  for (let step = 0; step < steps; step++) {
    const c = 1 + rng.int(4), r = rng.next();
    if (step % 29 === 28) {
      // A client released once nothing holds it (GpuBackend waits for its readers).
      for (const [h] of open.splice(0)) emit(`X ${h}`, () => model.unholdRange({ hold: h, blocks: 0 }));
      // The held lists unpinned in one call (GpuBackend's way).
      const lists = pinned.splice(0);
      if (lists.length > 0)
        emit(`Y 0 ${lists.length} ${lists.map(([cl, b]) => `${cl} ${b.length} ${b.join(' ')}`).join(' ')}`, () => model.pinMany(lists.map(([client, b]) => ({ client, blocks: Int32Array.from(b) })), false));
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
    } else if (r < 0.85) {
      const { b, pr } = blockList(5), hold = step % 3 === 0;
      const ok = emit(`U ${c} ${hold ? 1 : 0} 5 ${b.join(' ')} ${pr.join(' ')}`, () => void model.uploadIndexed(c, Int32Array.from(b), kv, kv, { priorities: Uint8Array.from(pr), hold }));
      if (ok && hold) pinned.push([c, b]);
    } else if (r < 0.95) {
      // A step's block lists, its kv heads' (clients c, c + 1, ...; a client twice at times), in one call.
      const items = Array.from({ length: 2 + rng.int(3) }, (_, i) => ({ client: rng.next() < 0.2 ? c : c + i, ...blockList(1 + rng.int(4)) }));
      const hold = rng.next() < 0.6;
      const op = `W ${hold ? 1 : 0} ${items.length} ${items.map((x) => `${x.client} ${x.b.length} ${x.b.join(' ')} ${x.pr.join(' ')}`).join(' ')}`;
      const ok = emit(op, () => void model.uploadIndexedMany(items.map((x) => ({ client: x.client, blocks: Int32Array.from(x.b), k: kv, v: kv, priorities: Uint8Array.from(x.pr) })), { hold }));
      if (ok && hold) for (const x of items) pinned.push([x.client, x.b]);
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

  const run = (slots: number, input: string, env: NodeJS.ProcessEnv = {}) => {
    const r = spawnSync(bin, [String(slots)], { input, encoding: 'utf8', env: { ...process.env, ...env } });
    return { lines: r.stdout.trimEnd().split('\n'), checked: Number(/checked (\d+)/.exec(r.stderr)?.[1] ?? -1) };
  };
  const ops = (slots: number, input: string) => spawnSync(bin, [String(slots)], { input, encoding: 'utf8' }).stdout;

  for (const slots of [40, 80, 160])
    it(`${slots} slots: counters, refusals, the slots attends read and the bytes in them agree with PoolModel and the uploads, op for op`, () => {
      for (let k = 0; k < 3; k++) {
        const { ops: seq, lines } = modelRun(new Rng(seed + 97 * slots + k), slots, 1500);
        // The third with the stand-in's event queries finding every other copy in flight (staging chunks waited for).
        const { lines: native, checked } = run(slots, seq.join('\n') + '\n', k === 2 ? { KVR_STUB_EVENTS_BUSY: '1' } : {});
        expect(native.length).toBe(lines.length);
        const first = native.findIndex((l, i) => l !== lines[i]);
        expect(first, first < 0 ? '' : `seed ${seed + 97 * slots + k}, op ${first} (${seq[first]}): native "${native[first]}", model "${lines[first]}"`).toBe(-1);
        // The sequences did what they are for: reads, reuses, evictions, batched uploads held and refused; bytes checked.
        expect(lines.filter((l) => l.includes(' read ')).length).toBeGreaterThan(50);
        expect(lines.filter((l) => l.startsWith('S') && l.includes(' holds ')).length).toBeGreaterThan(20);
        expect(seq.filter((o) => o.startsWith('W 1')).length).toBeGreaterThan(30);
        expect(lines.filter((l) => l.startsWith('U') || l.startsWith('W')).some((l) => / evictions [1-9]/.test(l))).toBe(true);
        if (slots === 40) expect(lines.filter((l) => l.startsWith('S') && l.endsWith(' THROW')).length).toBeGreaterThan(0);
        if (slots === 40) expect(lines.filter((l) => l.startsWith('W') && l.endsWith(' THROW')).length).toBeGreaterThan(0);
        expect(checked).toBeGreaterThan(5_000);
      }
    }, 120_000);

  it('a scatter that leaves a block out is caught: the slot an upload answers does not hold its bytes', () => {
    const { ops: seq } = modelRun(new Rng(seed), 80, 300);
    const { lines } = run(80, seq.join('\n') + '\n', { KVR_STUB_SCATTER_SKIP: '1' });
    expect(lines.find((l) => l.includes(' DATA '))).toMatch(/^[UWHSA].* DATA client \d+ block \d+ slot \d+$/);
  });

  it("a step's kv heads uploaded in one call are copied by one host-to-device copy and one scatter (a call each: one each)", () => {
    // 8 clients (kv heads) x 2 new blocks of 16 KiB (K and V of 64 x 64 f16): a copy is the chunk's header (63 slot ids,
    // 256 bytes aligned) and the blocks; past a chunk (63 blocks) a batch takes a second.
    const heads = (base: number, n: number) => Array.from({ length: 8 }, (_, h) => `${base + h} ${n} ${Array.from({ length: n }, (_, i) => i).join(' ')} ${'0 '.repeat(n).trim()}`);
    const out = ops(160, [
      'F',
      ...heads(10, 2).map((x) => `U ${x.split(' ')[0]} 1 ${x.split(' ').slice(1).join(' ')}`),
      'F',
      `W 1 8 ${heads(20, 2).join(' ')}`,
      'F',
      `Y 0 8 ${Array.from({ length: 8 }, (_, h) => `${10 + h} 2 0 1`).join(' ')}`,
      `Y 0 8 ${Array.from({ length: 8 }, (_, h) => `${20 + h} 2 0 1`).join(' ')}`,
      'F',
      `W 1 8 ${heads(30, 9).join(' ')}`,
      'F',
      `W 0 3 ${heads(40, 2).slice(0, 3).join(' ')}`,
      'F',
      'S 4 2 3 50 51 52 53',
      'F',
    ].join('\n') + '\n').trimEnd().split('\n');
    const f = out.filter((l) => l.startsWith('F')).map((l) => / h2d (\d+) bytes (\d+) scatters (\d+) blocks (\d+)$/.exec(l)!.slice(1).map(Number));
    expect(out.filter((l) => l.includes(' DATA ') || l.endsWith(' THROW'))).toEqual([]);
    expect(f[1]).toEqual([8, 8 * (256 + 2 * 16384), 8, 16]); // a call a head
    expect(f[2]).toEqual([1, 256 + 16 * 16384, 1, 16]); // the 8 heads in one
    expect(f[4]).toEqual([2, 2 * 256 + 72 * 16384, 2, 72]); // 72 blocks: two chunks (and past the inline copy: ParallelFor)
    expect(f[5]).toEqual([3, 3 * (256 + 2 * 16384), 3, 6]); // not held: a flush an upload
    // Four kv heads' new ranges: one staging copy and one scatter, and each range's slot table (2 ids, 8 bytes).
    expect(f[6]).toEqual([5, 256 + 8 * 16384 + 4 * 8, 1, 8]);
  });

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
