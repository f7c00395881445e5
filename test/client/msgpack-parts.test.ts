// The client's part-wise msgpack encoder: concatenated, its parts decode
// (with the server's decoder settings) to the value encoded, at every size
// boundary of the format; binary fields at or above the inline limit are
// the caller's own bytes, not copies. packInto writes the same bytes into
// a target from an offset, or reports that they do not fit.
import { Unpackr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { joinParts, packInto, packParts } from '../../clients/ts/msgpack-parts.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`msgpack-parts: seed ${seed}`);
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false, int64AsType: 'number' });

function decode(value: unknown, inlineLimit?: number): unknown {
  const { parts, byteLength } = packParts(value, inlineLimit);
  const whole = Buffer.concat(parts);
  expect(whole.byteLength).toBe(byteLength);
  return normalise(unpackr.unpack(whole));
}

/** Decoded binaries are Buffers: compare them as plain bytes. */
function normalise(x: unknown): unknown {
  if (x instanceof Uint8Array) return Array.from(x);
  if (Array.isArray(x)) return x.map(normalise);
  if (x && typeof x === 'object') return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, normalise(v)]));
  return x;
}

const bytes = (rng: Rng, n: number) => Uint8Array.from({ length: n }, () => rng.int(256));

describe('packParts', () => {
  it('encodes integers, floats, strings, arrays, maps and binary at every size boundary', () => {
    const rng = new Rng(seed);
    const ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 53 - 1)];
    const floats = [0.5, -1.25e300, 1e-310, Math.PI, 2 ** 53, -(2 ** 60), Infinity, -Infinity];
    const strings = [0, 1, 31, 32, 255, 256, 65535, 65536].map((n) => 'é'.repeat(n >> 1) + 'x'.repeat(n & 1));
    for (const x of [...ints, ...floats, ...strings, true, false, null]) expect(decode(x)).toEqual(x);
    expect(decode(NaN)).toBeNaN();
    for (const n of [0, 15, 16, 65535, 65536]) {
      const arr = Array.from({ length: n }, (_, i) => i % 300);
      expect(decode(arr)).toEqual(arr);
      const map = Object.fromEntries(arr.slice(0, Math.min(n, 70000)).map((v, i) => [`k${i}`, v]));
      expect(decode(map)).toEqual(map);
    }
    for (const n of [0, 1, 255, 256, 4095, 4096, 65535, 65536, 100_000]) {
      const b = bytes(rng, n);
      expect(decode({ b })).toEqual({ b: Array.from(b) });
    }
    // undefined fields are left out, as JSON does; a typed array is its bytes.
    expect(decode({ a: undefined, b: 1 })).toEqual({ b: 1 });
    const f = Float32Array.of(1.5, -2);
    expect(decode({ f })).toEqual({ f: Array.from(new Uint8Array(f.buffer)) });
  });

  it('decodes random nested bodies like a one-piece encoding', () => {
    const rng = new Rng(seed ^ 0x77);
    const value = (depth: number): unknown => {
      const pick = rng.int(depth > 2 ? 4 : 6);
      if (pick === 0) return rng.int(2 ** 31) - 2 ** 30;
      if (pick === 1) return rng.normal();
      if (pick === 2) return 'k'.repeat(rng.int(40));
      if (pick === 3) return bytes(rng, rng.int(3) === 0 ? 5000 + rng.int(5000) : rng.int(100));
      if (pick === 4) return Array.from({ length: rng.int(6) }, () => value(depth + 1));
      return Object.fromEntries(Array.from({ length: rng.int(6) }, (_, i) => [`f${i}`, value(depth + 1)]));
    };
    for (let i = 0; i < 200; i++) {
      const v = { layer: rng.int(32), body: value(0) };
      expect(decode(v, 1 + rng.int(8000))).toEqual(normalise(v));
    }
  });

  it('passes large binary fields through as the caller\'s views, in order', () => {
    const rng = new Rng(seed ^ 0x78);
    const backing = bytes(rng, 3 * 8192);
    const k = backing.subarray(100, 100 + 8000), v = backing.subarray(9000, 9000 + 4096);
    const small = bytes(rng, 4095);
    const { parts } = packParts({ layer: 3, k: { dtype: 'f16', shape: [2, 2000, 1], data: k }, v: { data: v }, s: small });
    const big = parts.filter((p) => p.buffer === backing.buffer);
    expect(big.map((p) => [p.byteOffset, p.byteLength])).toEqual([[100, 8000], [9000, 4096]]);
    expect(parts.some((p) => p.buffer === small.buffer)).toBe(false);
  });
});

describe('packInto', () => {
  it('writes the joined parts of packParts from the offset given, tensor padding counted from there, or -1 when they do not fit', () => {
    const rng = new Rng(seed ^ 0x79);
    const value = (depth: number): unknown => {
      const pick = rng.int(depth > 2 ? 5 : 7);
      if (pick === 0) return rng.int(2 ** 33) - 2 ** 32;
      if (pick === 1) return rng.normal();
      if (pick === 2) return (rng.int(2) ? 'é' : 'k').repeat(rng.int(80));
      if (pick === 3) return bytes(rng, rng.int(3) === 0 ? 5000 + rng.int(5000) : rng.int(300));
      if (pick === 4) return { dtype: 'f32', shape: [1 + rng.int(3), 1 + rng.int(300)], data: bytes(rng, 4 * rng.int(700)) };
      if (pick === 5) return Array.from({ length: rng.int(6) }, () => value(depth + 1));
      return Object.fromEntries(Array.from({ length: rng.int(6) }, (_, i) => [`f${i}`, value(depth + 1)]));
    };
    for (let i = 0; i < 300; i++) {
      const v = { id: rng.int(1000), layer: rng.int(32), body: value(0) };
      const parts = packParts(v);
      const want = Buffer.from(joinParts(parts, new Uint8Array(parts.byteLength)));
      const offset = rng.int(20);
      const target = new Uint8Array(offset + want.byteLength + rng.int(3)).fill(0xee);
      const end = packInto(v, target, offset);
      expect(end).toBe(offset + want.byteLength);
      expect(Buffer.from(target.subarray(offset, end)).equals(want), `value ${i}`).toBe(true);
      expect(target.subarray(0, offset).every((b) => b === 0xee)).toBe(true);
      // One byte short anywhere in the message: it does not fit, and nothing is written before the offset.
      const short = new Uint8Array(offset + want.byteLength - 1 - rng.int(Math.min(want.byteLength, 50))).fill(0xee);
      expect(packInto(v, short, offset)).toBe(-1);
      expect(short.subarray(0, offset).every((b) => b === 0xee)).toBe(true);
    }
  });

  it('refuses what packParts refuses', () => {
    expect(() => packInto({ f: () => 1 }, new Uint8Array(64), 0)).toThrow(TypeError);
  });
});
