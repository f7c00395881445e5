// bench/wave-paths.ts: the wave step's kernel paths by name. The checks that
// compare the device's ids with the host's bit for bit run the `plain` path,
// so it must turn off every tensor-core switch the native step reads
// (native/cuda/wave_paths.cuh), and setting a path must leave the
// environment as it found it.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { isPath, PATHS, setPath, withPath } from '../../bench/wave-paths.js';

const SWITCHES = ['KVRECALL_WAVE_MMA', 'KVRECALL_WAVE_MMA_TILES', 'KVRECALL_WAVE_MMA_RESCORE'];

describe('the wave step\'s paths', () => {
  const saved = SWITCHES.map((k) => process.env[k]);
  afterEach(() => SWITCHES.forEach((k, i) => (saved[i] === undefined ? delete process.env[k] : (process.env[k] = saved[i]))));

  it('name every tensor-core switch wave_paths.cuh reads, and plain turns each off', () => {
    const src = readFileSync(new URL('../../native/cuda/wave_paths.cuh', import.meta.url), 'utf8');
    const read = [...src.matchAll(/is\("(KVRECALL_WAVE_MMA[A-Z_]*)"/g)].map((m) => m[1]).sort();
    expect(read).toEqual([...SWITCHES].sort());
    for (const p of Object.values(PATHS)) expect(Object.keys(p).sort()).toEqual(read);
    expect(Object.values(PATHS.plain)).toEqual(['0', '0', '0']);
    expect(Object.values(PATHS.all)).toEqual(['1', '1', '1']);
  });

  it('setPath sets a path\'s switches and puts back what was there, set or not', () => {
    process.env.KVRECALL_WAVE_MMA = 'x';
    delete process.env.KVRECALL_WAVE_MMA_TILES;
    delete process.env.KVRECALL_WAVE_MMA_RESCORE;
    const restore = setPath('tiles');
    expect([process.env.KVRECALL_WAVE_MMA, process.env.KVRECALL_WAVE_MMA_TILES, process.env.KVRECALL_WAVE_MMA_RESCORE]).toEqual(['0', '1', '0']);
    restore();
    expect(process.env.KVRECALL_WAVE_MMA).toBe('x');
    expect('KVRECALL_WAVE_MMA_TILES' in process.env).toBe(false);
    expect('KVRECALL_WAVE_MMA_RESCORE' in process.env).toBe(false);
  });

  it('withPath restores the switches when its work throws', async () => {
    delete process.env.KVRECALL_WAVE_MMA;
    await expect(withPath('score', async () => {
      expect(process.env.KVRECALL_WAVE_MMA).toBe('1');
      throw new Error('boom');
    })).rejects.toThrow('boom');
    expect('KVRECALL_WAVE_MMA' in process.env).toBe(false);
  });

  it('isPath accepts the names and nothing else', () => {
    for (const n of Object.keys(PATHS)) expect(isPath(n)).toBe(true);
    for (const n of ['default', 'toString', 'constructor', '', undefined]) expect(isPath(n)).toBe(false);
  });
});
