// copyRanges / copyViews (addon/copy-ranges.ts): copies off the event loop
// land exactly where a JS copy puts them, at odd sizes and offsets, from
// views of several buffers (a SharedArrayBuffer among them); a range outside
// its arrays is refused before anything is copied.
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { copyRanges, copyViews } from '../../addon/copy-ranges.js';
import { nativeAddon } from '../../addon/addon.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`copy-ranges: seed ${seed}`);
const plan = nativeAddon<{ copyPlan(src: Uint8Array[], dst: Uint8Array, plan: Float64Array): Promise<void> }>().copyPlan;

describe('copies off the event loop', () => {
  it('copyViews puts every view at its offset, as a JS copy does', async () => {
    const rng = new Rng(seed);
    const buffers = [new Uint8Array(100_003), new Uint8Array(new SharedArrayBuffer(70_001)), new Uint8Array(5)];
    for (const b of buffers) randomFillSync(b);
    const views: Uint8Array[] = [], at: number[] = [];
    let end = 0;
    for (let i = 0; i < 300; i++) {
      const b = buffers[rng.int(buffers.length)];
      const from = rng.int(b.byteLength), len = rng.int(Math.min(b.byteLength - from, 3000) + 1);
      views.push(b.subarray(from, from + len));
      at.push(end + rng.int(7));
      end = at[i] + len;
    }
    const dst = new Uint8Array(end + 13), want = new Uint8Array(end + 13);
    randomFillSync(dst);
    want.set(dst);
    views.forEach((v, i) => want.set(v, at[i]));
    await copyViews(views, dst, at);
    expect(Buffer.from(dst).equals(Buffer.from(want))).toBe(true);
  });

  it('copyRanges copies pairs of equal size, and refuses unequal ones', async () => {
    const a = new Uint8Array(12_345), b = new Uint8Array(12_345);
    randomFillSync(a);
    await copyRanges([a.subarray(7), a.subarray(0, 7)], [b.subarray(0, 12_338), b.subarray(12_338)]);
    expect(Buffer.from(b).equals(Buffer.concat([a.subarray(7), a.subarray(0, 7)]))).toBe(true);
    expect(() => copyRanges([a], [b.subarray(1)])).toThrow(RangeError);
  });

  it('refuses a plan entry outside its arrays, copying nothing', () => {
    const src = [new Uint8Array(100)], dst = new Uint8Array(50);
    const bad = [
      [0, 0, 40, 11], // past dst
      [0, 95, 0, 6], // past src
      [1, 0, 0, 1], // no such src
      [0, -1, 0, 1],
      [0, 0.5, 0, 1],
    ];
    for (const e of bad) expect(() => plan(src, dst, Float64Array.from([0, 0, 0, 10, ...e])), JSON.stringify(e)).toThrow(RangeError);
    expect(dst.every((x) => x === 0)).toBe(true);
    expect(() => plan(src, dst, new Float64Array(3))).toThrow(RangeError);
  });
});
