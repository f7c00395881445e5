// KvSegment.append, both of its copies: the word loop for a few tokens in
// the storage dtype from an even offset (a decode step's own token), and the
// views (.set, or a conversion) otherwise: rows land at the segment's end,
// head by head, across growth, and from a source that is itself a view into
// a larger buffer (as a msgpack frame's tensor is).
import { describe, expect, it } from 'vitest';
import { KvSegment } from '../../storage/kv-segment.js';

const H = 3, D = 8;

/** Row-major [H, n, D] f16-sized words with distinct values, laid at byte `offset` of a larger buffer. */
function words(n: number, seed: number, offset = 0): { bytes: Uint8Array; w: Uint16Array } {
  const w = new Uint16Array(H * n * D).map((_, i) => (seed * 7919 + i * 13) & 0x3bff);
  const buf = new Uint8Array(offset + w.byteLength + 4);
  buf.set(new Uint8Array(w.buffer), offset);
  return { bytes: buf.subarray(offset, offset + w.byteLength), w };
}

/** What rows [0, tokens) of head h must hold, from the appends in order. */
function expected(appends: { w: Uint16Array; n: number }[], h: number): number[] {
  const out: number[] = [];
  for (const a of appends) out.push(...a.w.subarray(h * a.n * D, (h + 1) * a.n * D));
  return out;
}

function check(seg: KvSegment, ks: { w: Uint16Array; n: number }[], vs: { w: Uint16Array; n: number }[]): void {
  for (let h = 0; h < H; h++) {
    const { k, v } = seg.rows(h, 0, seg.tokens);
    expect(Array.from(new Uint16Array(k.slice().buffer))).toEqual(expected(ks, h));
    expect(Array.from(new Uint16Array(v.slice().buffer))).toEqual(expected(vs, h));
  }
}

describe('KvSegment.append', () => {
  it('single tokens, a block, odd and even offsets, across growth: every row where it belongs', () => {
    const seg = new KvSegment(H, D, 'f16', 4);
    const ks: { w: Uint16Array; n: number }[] = [], vs: { w: Uint16Array; n: number }[] = [];
    // n: 1 (word loop), 40 (views: 320 words a head), 2 from odd offsets (views), 1s past the capacity.
    const plan: [number, number][] = [[1, 0], [1, 2], [40, 0], [2, 1], [1, 6], [1, 0], [3, 3], [1, 0]];
    plan.forEach(([n, offset], i) => {
      const k = words(n, 2 * i + 1, offset), v = words(n, 2 * i + 2, offset);
      seg.append(k.bytes, v.bytes, 'f16', n);
      ks.push({ w: k.w, n });
      vs.push({ w: v.w, n });
    });
    expect(seg.tokens).toBe(50);
    expect(seg.capacity).toBeGreaterThanOrEqual(50);
    check(seg, ks, vs);
  });

  it('a token in another dtype is converted, not copied as words', () => {
    const seg = new KvSegment(H, D, 'f16', 4);
    const k = new Float32Array(H * D).map((_, i) => i / 4 - 2), v = new Float32Array(H * D).map((_, i) => 1 + i / 8);
    seg.append(new Uint8Array(k.buffer), new Uint8Array(v.buffer), 'f32', 1);
    for (let h = 0; h < H; h++) {
      const { k: kr, v: vr } = seg.rows(h, 0, 1);
      const half = (b: Uint8Array) => Array.from(new Uint16Array(b.slice().buffer), f16ToNumber);
      // These values are exact in f16.
      expect(half(kr)).toEqual(Array.from(k.subarray(h * D, (h + 1) * D)));
      expect(half(vr)).toEqual(Array.from(v.subarray(h * D, (h + 1) * D)));
    }
  });
});

/** IEEE half to number, independent of the code under test. */
function f16ToNumber(w: number): number {
  const s = w & 0x8000 ? -1 : 1, e = (w >> 10) & 0x1f, m = w & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}
