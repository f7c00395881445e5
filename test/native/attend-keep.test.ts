// An async native call holds the arrays it reads and writes until it
// settles (native/common/binding_args.h, PromiseWorker's keep), and lets go
// of them then. Each array of a pool attend here is a view of its own
// shared-memory mapping (addon/shm.ts), which goes only when the collector
// drops its last view: in a child node with --expose-gc (the built dist)
// and one libuv thread, kept busy (a long pbkdf2) so that the attend waits
// in the pool's queue, the mappings are counted in /proc/self/maps after
// the call is made and every JS reference to its q, k and v dropped and
// collected (all still mapped: nothing but the call holds them), and again
// once it settled and a collection ran (only out's and lse's, which the
// script still holds). The answer is checked against attendSync's on
// copies, bit for bit.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

const dist = (f: string) => pathToFileURL(join(import.meta.dirname, '..', '..', 'dist', 'addon', f)).href;

const script = `
import { openSync, ftruncateSync, closeSync, unlinkSync, readFileSync } from 'node:fs';
import { pbkdf2 } from 'node:crypto';
const { mapShared } = await import(${JSON.stringify(dist('shm.js'))});
const { attend, DTYPE_CODE } = await import(${JSON.stringify(dist('kernels.js'))});
const { nativeAddon } = await import(${JSON.stringify(dist('addon.js'))});
const tag = '/dev/shm/kvrecall-keep-' + process.pid + '-';
const paths = [];
const mapped = () => readFileSync('/proc/self/maps', 'utf8').split('\\n').filter((l) => l.includes(tag)).length;
const settle = async () => { for (let i = 0; i < 3; i++) { globalThis.gc(); await new Promise((r) => setTimeout(r, 20)); } };
// A typed array of n elements that is a view of a mapping of its own.
const own = (Type, n) => {
  const path = tag + paths.length;
  paths.push(path);
  const fd = openSync(path, 'w+', 0o600); ftruncateSync(fd, 1 << 16); closeSync(fd);
  return new Type(mapShared(path, 1 << 16), 0, n);
};
const [qHeads, kvHeads, d, tokens] = [6, 3, 20, 37];
let seed = 7;
const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) - 0.5;
const out = {};
try {
  // Made and called in a function of its own, so that nothing of its frame holds an array once it returns.
  const call = () => {
    const q = own(Float32Array, qHeads * d);
    q.forEach((_, i) => (q[i] = rnd()));
    // f16 bits of values in (-1, 1): sign, an exponent below 15, any mantissa.
    const half = (n) => { const a = own(Uint16Array, n); a.forEach((_, i) => (a[i] = ((rnd() < 0 ? 0x8000 : 0) | (Math.floor((rnd() + 0.5) * 14) << 10) | Math.floor((rnd() + 0.5) * 1024)))); return a; };
    const k = Array.from({ length: kvHeads }, () => half(tokens * d)), v = Array.from({ length: kvHeads }, () => half(tokens * d));
    const args = { q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale: 0.25, segments: [{ k, v, tokens, begin: 0, end: tokens }], out: own(Float32Array, qHeads * d), lse: own(Float32Array, qHeads) };
    // The reference on copies (plain arrays), on this thread.
    const copy = (a) => a.slice();
    const ref = { ...args, dtype: DTYPE_CODE.f16, q: copy(q), segments: [{ k: k.map(copy), v: v.map(copy), tokens, begin: 0, end: tokens }], out: new Float32Array(qHeads * d), lse: new Float32Array(qHeads) };
    const failed = nativeAddon().attendSync(ref);
    if (failed) throw failed;
    // beside: to libuv's pool, through PromiseWorker.
    const p = attend(args, true);
    const { out: o, lse } = args;
    return { p, o, lse, ref };
  };
  // The pool's one thread busy for a while: the attend below waits behind it.
  let blocked = true;
  pbkdf2('kvrecall', 'keep', 3e6, 64, 'sha512', () => (blocked = false));
  const { p, o, lse, ref } = call();
  await settle();
  out.pending = mapped();
  out.blocked = blocked;
  await p;
  out.same = o.every((x, i) => Object.is(x, ref.out[i])) && lse.every((x, i) => Object.is(x, ref.lse[i]));
  out.views = 3 + 2 * kvHeads;
  await settle();
  // out and lse still held here: their two mappings stay.
  out.settled = mapped();
} finally { for (const p of paths) unlinkSync(p); }
console.log(JSON.stringify(out));
`;

describe('an async native call keeps its arrays alive until it settles', () => {
  it('holds every array of a pool attend while it runs, none after', () => {
    const r = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, UV_THREADPOOL_SIZE: '1' } });
    expect(r.status, r.stderr).toBe(0);
    const got = JSON.parse(r.stdout.trim().split('\n').pop()!) as { pending: number; blocked: boolean; same: boolean; views: number; settled: number };
    // Counted while the attend still waited (else this run tells nothing).
    expect(got.blocked).toBe(true);
    expect(got.pending).toBe(got.views);
    expect(got.same).toBe(true);
    expect(got.settled).toBe(2);
  });
});
