// concat / concatInto: parts back to back, checked element by element
// against a plain-array reference, at odd lengths and with empty parts.
import { describe, expect, it } from 'vitest';
import { concat, concatInto } from '../../addon/typed-concat.js';

const ramp = (n: number, from: number) => Array.from({ length: n }, (_, i) => from + i * 0.5);

describe('concat', () => {
  it('joins parts in order into a new array of the kind asked, empty parts included', () => {
    const lengths = [3, 0, 7, 1, 0, 5];
    const parts = lengths.map((n, i) => new Float32Array(ramp(n, 100 * i)));
    const all = concat(Float32Array, parts);
    expect(all).toBeInstanceOf(Float32Array);
    expect(Array.from(all)).toEqual(parts.flatMap((p) => Array.from(p)));
    expect(parts.some((p) => p.buffer === all.buffer)).toBe(false);
  });

  it('gives the one part itself when there is one, and an empty array for none', () => {
    const one = new Int32Array([4, -2, 9]);
    expect(concat(Int32Array, [one])).toBe(one);
    const none = concat(Int32Array, []);
    expect(none).toBeInstanceOf(Int32Array);
    expect(none.length).toBe(0);
  });
});

describe('concatInto', () => {
  it('writes from the offset given, leaves the rest, and returns the end', () => {
    const buf = new ArrayBuffer(4 * 16);
    const out = new Int32Array(buf, 8, 13).fill(-1);
    const parts = [new Int32Array([1, 2, 3]), new Int32Array(0), new Int32Array([4, 5, 6, 7, 8])];
    expect(concatInto(out, parts, 2)).toBe(10);
    expect(Array.from(out)).toEqual([-1, -1, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1, -1]);
    expect(Array.from(new Int32Array(buf, 0, 2))).toEqual([0, 0]);
  });

  it('throws when out has no room for the parts', () => {
    expect(() => concatInto(new Int32Array(4), [new Int32Array(3), new Int32Array(2)])).toThrow(RangeError);
  });
});
