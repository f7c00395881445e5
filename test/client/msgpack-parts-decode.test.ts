// The decode path's msgpack decoder against msgpackr (an independent
// decoder, with the settings the server used before): the same values for
// every type and size boundary and for random nested bodies; binary fields
// as views of the message; tensors written by packParts with their data at
// offsets that are multiples of 4; bad messages refused with an error.
import { Packr, Unpackr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { MsgpackError, unpackView } from '../../core/msgpack-parts-decode.js';
import { joinParts, packParts } from '../../core/msgpack-parts.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`msgpack-parts-decode: seed ${seed}`);
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false, int64AsType: 'number' });
const packr = new Packr({ useRecords: false, variableMapSize: true });

/** Binaries as plain byte lists, so both decoders' results compare. */
function normalise(x: unknown): unknown {
  if (x instanceof Uint8Array) return Array.from(x);
  if (Array.isArray(x)) return x.map(normalise);
  if (x && typeof x === 'object') return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, normalise(v)]));
  return x;
}

const joined = (value: unknown) => {
  const p = packParts(value, 64);
  return joinParts(p, new Uint8Array(p.byteLength));
};
const bytes = (rng: Rng, n: number) => {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = rng.int(256);
  return b;
};

describe('unpackView', () => {
  it('reads every type at its size boundaries as msgpackr does (both encoders)', () => {
    const rng = new Rng(seed);
    const ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 53 - 1)];
    const floats = [0.5, -1.25e300, 1e-310, Math.PI, Infinity, -Infinity];
    const strings = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536].map((n) => 'é'.repeat(n >> 1) + 'x'.repeat(n & 1));
    const values: unknown[] = [...ints, ...floats, ...strings, true, false, null];
    for (const n of [0, 15, 16, 65535, 65536]) values.push(Array.from({ length: n }, (_, i) => i % 300), Object.fromEntries(Array.from({ length: Math.min(n, 70000) }, (_, i) => [`k${i}`, i])));
    for (const n of [0, 1, 255, 256, 65535, 65536]) values.push({ b: bytes(rng, n) });
    for (const v of values)
      for (const encoded of [joined(v), packr.pack(v)]) expect(normalise(unpackView(encoded))).toEqual(normalise(unpackr.unpack(encoded)));
    // float32 and 64-bit integers, which packParts does not write.
    const f32 = Uint8Array.of(0xca, 0x3f, 0xc0, 0x00, 0x00);
    expect(unpackView(f32)).toBe(1.5);
    expect(unpackView(Uint8Array.of(0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe))).toBe(-2);
    expect(unpackView(Uint8Array.of(0xcf, 0, 0, 0, 1, 0, 0, 0, 2))).toBe(2 ** 32 + 2);
  });

  it('reads random nested bodies as msgpackr does, binaries as views of the message', () => {
    const rng = new Rng(seed ^ 0x51);
    const value = (depth: number): unknown => {
      const pick = rng.int(depth > 2 ? 4 : 6);
      if (pick === 0) return rng.int(2 ** 31) - 2 ** 30;
      if (pick === 1) return rng.normal();
      if (pick === 2) return String.fromCharCode(...Array.from({ length: rng.int(40) }, () => 32 + rng.int(rng.int(4) === 0 ? 400 : 90)));
      if (pick === 3) return bytes(rng, rng.int(3) === 0 ? 5000 + rng.int(5000) : rng.int(100));
      if (pick === 4) return Array.from({ length: rng.int(6) }, () => value(depth + 1));
      return Object.fromEntries(Array.from({ length: rng.int(6) }, (_, i) => [rng.int(2) ? `f${i}` : `key-${'é'.repeat(rng.int(3))}${i}`, value(depth + 1)]));
    };
    for (let i = 0; i < 300; i++) {
      const v = { layer: rng.int(32), body: value(0) };
      const encoded = joined(v);
      const got = unpackView(encoded);
      expect(normalise(got)).toEqual(normalise(unpackr.unpack(encoded)));
      const walk = (x: unknown): void => {
        if (x instanceof Uint8Array) expect(x.buffer).toBe(encoded.buffer);
        else if (x && typeof x === 'object') Object.values(x).forEach(walk);
      };
      walk(got);
    }
  });

  it('finds each tensor packParts wrote with its data at an offset that is a multiple of 4', () => {
    const rng = new Rng(seed ^ 0x52);
    for (let i = 0; i < 150; i++) {
      // Prefixes of every length move the tensors to every offset; sizes cross the bin8/bin16/bin32 and inline boundaries.
      const n = [4, 64, 252, 256, 4096, 16384, 65532, 65536, 70000][rng.int(9)];
      const shape = rng.int(2) ? [n / 4] : [1, n / 4];
      const t = { dtype: 'f32', shape, data: bytes(rng, n) };
      const value = { id: rng.int(1000), pad: 'x'.repeat(rng.int(40)), out: t, more: [{ dtype: 'i32', shape: [3], data: bytes(rng, 12) }] };
      const p = packParts(value, rng.int(2) ? 4096 : 64);
      const whole = joinParts(p, new Uint8Array(p.byteLength));
      const got = unpackView(whole) as { out: { data: Uint8Array; shape: number[] }; more: { data: Uint8Array }[] };
      expect(got.out.data.byteOffset % 4).toBe(0);
      expect(got.more[0].data.byteOffset % 4).toBe(0);
      expect(Buffer.from(got.out.data).equals(t.data)).toBe(true);
      expect(got.out.shape).toEqual(shape);
      const other = unpackr.unpack(whole) as typeof got;
      expect(Buffer.from(other.out.data).equals(t.data)).toBe(true);
      expect(other.more[0].data).toEqual(value.more[0].data);
    }
  });

  it('keeps a __proto__ key as an own field', () => {
    const got = unpackView(packr.pack(JSON.parse('{"__proto__": {"polluted": 1}, "a": 2}'))) as Record<string, unknown>;
    expect(Object.getPrototypeOf(got)).toBe(Object.prototype);
    expect(Object.hasOwn(got, '__proto__')).toBe(true);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it('refuses cut, overlong, unsupported and too deeply nested messages', () => {
    const good = joined({ layer: 1, q: { dtype: 'f32', shape: [2], data: new Uint8Array(8) } });
    for (let cut = 0; cut < good.byteLength; cut++) expect(() => unpackView(good.subarray(0, cut))).toThrow(MsgpackError);
    expect(() => unpackView(Uint8Array.of(...good, 0xc0))).toThrow(/after the message/);
    expect(() => unpackView(Uint8Array.of(0xc1))).toThrow(/unsupported/);
    expect(() => unpackView(Uint8Array.of(0xd6, 0xff, 0, 0, 0, 0))).toThrow(/unsupported/); // a timestamp ext
    expect(() => unpackView(Uint8Array.of(0xdd, 0xff, 0xff, 0xff, 0xff))).toThrow(/ends/); // an array longer than the message
    expect(() => unpackView(Uint8Array.of(0x81, 0x90, 0x01))).toThrow(/map key/);
    expect(() => unpackView(new Uint8Array(100_000).fill(0x91))).toThrow(/nested deeper/);
  });

  it('names the top-level map entries read before the error, and only those', () => {
    const caught = (b: Uint8Array) => {
      try {
        unpackView(b);
      } catch (e) {
        return e as MsgpackError;
      }
      throw new Error('no error');
    };
    const good = joined({ id: 7, layer: 1, q: { dtype: 'f32', shape: [2], data: new Uint8Array(8) } });
    // A byte no msgpack value starts with, inside the third entry: the first two were read.
    const bad = good.slice();
    bad[bad.indexOf(0x91)] = 0xc1; // the shape array's header
    expect(caught(bad).partial).toEqual({ id: 7, layer: 1 });
    // Cut inside the second entry's key: the id; a map whose entries cannot fit what is left is not begun.
    expect(caught(good.subarray(0, 8)).partial).toEqual({ id: 7 });
    expect(caught(good.subarray(0, 5)).partial).toBeUndefined();
    // Bytes after a whole map: the map.
    expect(caught(Uint8Array.of(...good, 0xc0)).partial).toMatchObject({ id: 7, layer: 1 });
    // A map nested deeper is no top-level entry, and a message that is no map names none.
    expect(caught(Uint8Array.of(0x81, 0xa1, 0x61, 0x81, 0xa2, 0x69, 0x64, 0xc1)).partial).toEqual({});
    expect(caught(Uint8Array.of(0x92, 0x01, 0xc1)).partial).toBeUndefined();
  });
});
