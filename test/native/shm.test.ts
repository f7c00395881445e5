// addon/shm.ts over real files in /dev/shm: a mapping shares its bytes with
// the file both ways; bad arguments throw before any file is opened; a
// file that cannot be mapped is answered with why.
import { execFileSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdirSync, openSync, readSync, rmdirSync, symlinkSync, unlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { mapShared } from '../../addon/shm.js';

const base = join('/dev/shm', `kvrecall-native-${process.pid}`);
const made: string[] = [];
const file = (suffix: string, bytes: number) => {
  const path = `${base}-${suffix}`;
  const fd = openSync(path, 'wx+', 0o600);
  ftruncateSync(fd, bytes);
  made.push(path);
  return { path, fd };
};
afterAll(() => {
  for (const p of made.reverse())
    try {
      if (p.endsWith('-dir')) rmdirSync(p);
      else unlinkSync(p);
    } catch {
      // gone already
    }
});

describe('shmMap', () => {
  it('maps a file shared: writes through the buffer reach the file and the file reaches the buffer', () => {
    const { path, fd } = file('ok', 4096);
    const buf = mapShared(path, 1024);
    expect(buf).toBeInstanceOf(ArrayBuffer);
    const view = new Uint8Array(buf as ArrayBuffer);
    expect(view.byteLength).toBe(1024);
    view.set([1, 2, 3], 100);
    const back = Buffer.alloc(3);
    readSync(fd, back, 0, 3, 100);
    expect([...back]).toEqual([1, 2, 3]);
    writeSync(fd, Buffer.from([9, 8, 7, 6]), 0, 4, 1020);
    expect([...view.subarray(1020)]).toEqual([9, 8, 7, 6]);
    // Unlinked and closed, the mapping still holds the bytes.
    closeSync(fd);
    unlinkSync(path);
    expect(view[101]).toBe(2);
  });

  it('answers why a file does not map', () => {
    const small = file('small', 64);
    closeSync(small.fd);
    expect(mapShared(small.path, 128)).toBe('too_small');
    expect(mapShared(`${base}-missing`, 64)).toBe('not_found');
    const link = `${base}-link`;
    symlinkSync(small.path, link);
    made.push(link);
    expect(mapShared(link, 64)).toBe('symlink');
    const dir = `${base}-dir`;
    mkdirSync(dir);
    made.push(dir);
    // Refused by its type before it is opened (a directory cannot even be opened read-write).
    expect(mapShared(dir, 64)).toBe('not_regular');
    expect(mapShared('/dev/null', 64)).toBe('not_regular');
    const fifo = `${base}-fifo`;
    execFileSync('mkfifo', [fifo]);
    made.push(fifo);
    expect(mapShared(fifo, 64)).toBe('not_regular');
  });

  it('throws on bad arguments before touching any file', () => {
    const { path, fd } = file('args', 64);
    closeSync(fd);
    for (const bytes of [0, -4, 6, 2.5, Number.NaN, 2 ** 40, 17 * 2 ** 30]) expect(() => mapShared(path, bytes), String(bytes)).toThrow(RangeError);
    expect(() => mapShared('', 64)).toThrow(RangeError);
    expect(() => mapShared(`${path}\0x`, 64)).toThrow(RangeError);
    expect(() => mapShared(7 as unknown as string, 64)).toThrow(TypeError);
    expect(() => mapShared(path, '64' as unknown as number)).toThrow(TypeError);
  });
});
