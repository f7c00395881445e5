// The answers' msgpack (api/codec.ts encodeMsgpack, what reply() writes):
// integers past 32 bits are msgpack integers (uint64 / int64), so a byte
// count such as health's memory budget reaches a Python client as an int;
// msgpackr wrote them as float64. The TS client's decoder reads them as the
// same numbers. Checked against the msgpack spec's byte forms, written out
// here by hand.
import { describe, expect, it } from 'vitest';
import { encodeMsgpack } from '../../api/codec.js';
import { unpackView } from '../../core/msgpack-parts-decode.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

describe('encodeMsgpack', () => {
  it('writes integers past 32 bits as uint64 / int64, the rest as before', () => {
    const cases: [number, string][] = [
      [2 ** 32 - 1, 'ceffffffff'],
      [2 ** 32, 'cf0000000100000000'],
      [5 * 2 ** 30 + 1, 'cf0000000140000001'],
      [2 ** 53 - 1, 'cf001fffffffffffff'],
      [-(2 ** 31), 'd280000000'],
      [-(2 ** 31) - 1, 'd3ffffffff7fffffff'],
      [-(2 ** 40), 'd3ffffff0000000000'],
      // Not integers, or past 2^53 (not exact as a JS number): float64, as JSON would give them.
      [0.5, 'cb3fe0000000000000'],
      [2 ** 60, 'cb43b0000000000000'],
    ];
    for (const [x, form] of cases) expect(hex(encodeMsgpack(x)), String(x)).toBe(form);
  });

  it("a health-like answer decodes to the same numbers with the TS client's decoder", () => {
    const value = { memory: { used: 3 * 2 ** 32 + 7, budget: 25 * 2 ** 30 }, gpu: { memory: 85_899_345_920, ratio: 0.25 }, name: 'x', list: [1, -(2 ** 40)] };
    const bytes = encodeMsgpack(value);
    expect(unpackView(bytes)).toEqual(value);
    // Each wide integer as a uint64 / int64 form; 0.25 as float64.
    expect(hex(bytes)).toContain('cf0000000300000007');
    expect(hex(bytes)).toContain('cf0000000640000000');
    expect(hex(bytes)).toContain('cf0000001400000000');
    expect(hex(bytes)).toContain('d3ffffff0000000000');
    expect(hex(bytes)).toContain('cb3fd0000000000000');
  });
});
