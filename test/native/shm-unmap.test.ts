// A segment's mapping (addon/shm.ts) goes when the collector drops its last
// view, and not before: in a child node with --expose-gc (the built dist),
// /proc/self/maps counted after mapping a file 50 times and dropping every
// buffer, then with one view of a mapping kept. Or at once by unmapShared,
// which detaches the buffer (its views read as empty), with no collection,
// and whose finalizer later leaves alone a new mapping at the same address.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

const shm = pathToFileURL(join(import.meta.dirname, '..', '..', 'dist', 'addon', 'shm.js')).href;

const script = `
import { openSync, ftruncateSync, closeSync, unlinkSync, readFileSync } from 'node:fs';
const { mapShared } = await import(${JSON.stringify(shm)});
const path = '/dev/shm/kvrecall-unmap-' + process.pid;
const fd = openSync(path, 'w+', 0o600); ftruncateSync(fd, 1 << 20); closeSync(fd);
const mapped = () => readFileSync('/proc/self/maps', 'utf8').split('\\n').filter((l) => l.includes(path)).length;
const settle = async () => { for (let i = 0; i < 3; i++) { globalThis.gc(); await new Promise((r) => setTimeout(r, 20)); } };
try {
  // In a function of its own, so that nothing of its frame holds a buffer once it returns.
  const mapMany = () => {
    const held = [];
    for (let i = 0; i < 50; i++) {
      const a = new Uint8Array(mapShared(path, 1 << 20));
      a[5] = i; // through one mapping, seen through every other (the file's own page)
      held.push(a);
    }
    return mapped();
  };
  const before = mapMany();
  await settle();
  const after = mapped();
  const kept = new Uint8Array(mapShared(path, 1 << 20)).subarray(4, 8);
  await settle();
  console.log(JSON.stringify({ before, after, kept: mapped(), value: kept[1] }));
} finally { unlinkSync(path); }
`;

describe('shared-memory segments are unmapped by the collector', () => {
  it('drops mappings no view holds, keeps one a view holds', () => {
    const r = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const counts = JSON.parse(r.stdout.trim().split('\n').pop()!) as { before: number; after: number; kept: number; value: number };
    expect(counts.before).toBe(50);
    expect(counts.after).toBe(0);
    expect(counts.kept).toBe(1);
    expect(counts.value).toBe(49);
  });
});

const unmapScript = `
import { openSync, ftruncateSync, closeSync, unlinkSync, readFileSync } from 'node:fs';
const { mapShared, unmapShared, sharedMapped } = await import(${JSON.stringify(shm)});
const path = '/dev/shm/kvrecall-unmap-now-' + process.pid;
const fd = openSync(path, 'w+', 0o600); ftruncateSync(fd, 1 << 20); closeSync(fd);
const mapped = () => readFileSync('/proc/self/maps', 'utf8').split('\\n').filter((l) => l.includes(path)).length;
const settle = async () => { for (let i = 0; i < 3; i++) { globalThis.gc(); await new Promise((r) => setTimeout(r, 20)); } };
const out = {};
try {
  const counts = [];
  for (let i = 0; i < 50; i++) {
    const buf = mapShared(path, 1 << 20), view = new Uint8Array(buf);
    view[7] = i + 1;
    counts.push(mapped());
    out.first ??= unmapShared(buf);
    if (i > 0) unmapShared(buf);
    out.again ??= unmapShared(buf);
    out.viewLength ??= view.byteLength;
    out.read ??= view[7] ?? 'undefined';
  }
  out.counts = [...new Set(counts)];
  out.after = mapped();
  out.live = sharedMapped();
  // Their finalizers run now; a mapping made since (perhaps at an address one of them had) stays.
  const kept = new Uint8Array(mapShared(path, 1 << 20));
  await settle();
  out.kept = mapped();
  out.keptValue = kept[7];
  out.keptLive = sharedMapped();
  out.keptUnmap = unmapShared(kept.buffer);
  out.end = mapped();
} finally { unlinkSync(path); }
console.log(JSON.stringify(out));
`;

describe('unmapShared', () => {
  it('unmaps at once, with no collection: the buffer detached, the count back to none; a later finalizer spares a newer mapping', () => {
    const r = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', unmapScript], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as Record<string, unknown>;
    expect(out).toEqual({
      first: true,
      again: false,
      viewLength: 0,
      read: 'undefined',
      // One mapping at a time: each unmapped before the next is made.
      counts: [1],
      after: 0,
      live: { mappings: 0, bytes: 0 },
      kept: 1,
      keptValue: 50,
      keptLive: { mappings: 1, bytes: 1 << 20 },
      keptUnmap: true,
      end: 0,
    });
  });
});
