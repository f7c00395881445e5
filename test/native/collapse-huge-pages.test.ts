// collapseHugePages (addon/kernels.ts; bench/ra-search-layer.ts --huge-keys):
// an array's 2 MiB-aligned part moved into 2 MiB pages must keep every word,
// and the bytes it reports are whole 2 MiB pages of that part (0 where the
// kernel cannot collapse).
import { Buffer } from 'node:buffer';
import { describe, expect, it } from 'vitest';
import { collapseHugePages } from '../../addon/kernels.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`collapse-huge-pages: seed ${seed}`);
const HUGE = 2 << 20;

describe('collapseHugePages', () => {
  it('keeps every word of the arrays it collapses', async () => {
    const rng = new Rng(seed);
    const a = new Uint16Array(9 << 20); // 18 MiB: at least 8 whole 2 MiB pages
    for (let i = 0; i < a.length; i++) a[i] = rng.int(0x10000);
    const b = new Float32Array(1 << 10).map(() => rng.int(1000) / 7); // under a page: nothing to collapse
    const wantA = a.slice(), wantB = b.slice();
    const bytes = await collapseHugePages([a.subarray(3), b]);
    expect(bytes % HUGE).toBe(0);
    expect(bytes).toBeGreaterThanOrEqual(0);
    expect(bytes).toBeLessThanOrEqual(a.byteLength);
    // Byte for byte (toEqual over 9M elements takes ~45 s).
    expect(Buffer.compare(Buffer.from(a.buffer), Buffer.from(wantA.buffer))).toBe(0);
    expect(Buffer.compare(Buffer.from(b.buffer), Buffer.from(wantB.buffer))).toBe(0);
  });

  it('refuses anything but an array of typed arrays', () => {
    expect(() => collapseHugePages([new ArrayBuffer(8) as unknown as Uint8Array])).toThrow(TypeError);
    expect(() => collapseHugePages('keys' as unknown as Uint8Array[])).toThrow(TypeError);
  });
});
