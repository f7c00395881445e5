// A msgpack encoder that does not copy large binary fields: the encoding is
// a list of parts, small ones written here and every Uint8Array of
// `inlineLimit` bytes or more passed through as the caller's own view, so a
// request body of tensors goes to the socket without being assembled.
// Concatenated, the parts are ordinary msgpack (any decoder reads them).
//
// Covers what request bodies hold: maps with string keys (undefined values
// left out, as JSON does), arrays, strings, booleans, null, numbers (safe
// integers in their smallest form, other numbers as float64) and binary.

const INLINE_LIMIT = 4096;
const utf8 = new TextEncoder();

export interface Parts {
  parts: Uint8Array[];
  byteLength: number;
}

class Writer {
  readonly parts: Uint8Array[] = [];
  byteLength = 0;
  private buf = new Uint8Array(256);
  private view = new DataView(this.buf.buffer);
  private at = 0;

  constructor(private readonly inlineLimit: number) {}

  private room(n: number): void {
    if (this.at + n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(this.buf.length * 2, this.at + n));
    next.set(this.buf.subarray(0, this.at));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  private flush(): void {
    if (this.at === 0) return;
    this.parts.push(this.buf.subarray(0, this.at));
    this.byteLength += this.at;
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.at = 0;
  }

  finish(): Parts {
    this.flush();
    return { parts: this.parts, byteLength: this.byteLength };
  }

  private u8(x: number): void {
    this.room(1);
    this.buf[this.at++] = x;
  }

  private tagged(tag: number, bytes: 1 | 2 | 4 | 8, x: number | bigint, signed = false, float = false): void {
    this.room(1 + bytes);
    this.buf[this.at++] = tag;
    const v = this.view, at = this.at;
    if (float) v.setFloat64(at, x as number);
    else if (bytes === 1) signed ? v.setInt8(at, x as number) : v.setUint8(at, x as number);
    else if (bytes === 2) signed ? v.setInt16(at, x as number) : v.setUint16(at, x as number);
    else if (bytes === 4) signed ? v.setInt32(at, x as number) : v.setUint32(at, x as number);
    else signed ? v.setBigInt64(at, BigInt(x)) : v.setBigUint64(at, BigInt(x));
    this.at += bytes;
  }

  private raw(bytes: Uint8Array): void {
    if (bytes.byteLength >= this.inlineLimit) {
      this.flush();
      this.parts.push(bytes);
      this.byteLength += bytes.byteLength;
      return;
    }
    this.room(bytes.byteLength);
    this.buf.set(bytes, this.at);
    this.at += bytes.byteLength;
  }

  private length(n: number, fix: number | undefined, fixMax: number, tag8: number | undefined, tag16: number, tag32: number): void {
    if (fix !== undefined && n <= fixMax) this.u8(fix | n);
    else if (tag8 !== undefined && n < 0x100) this.tagged(tag8, 1, n);
    else if (n < 0x10000) this.tagged(tag16, 2, n);
    else this.tagged(tag32, 4, n);
  }

  value(x: unknown): void {
    if (x === null || x === undefined) this.u8(0xc0);
    else if (x === false) this.u8(0xc2);
    else if (x === true) this.u8(0xc3);
    else if (typeof x === 'number') this.number(x);
    else if (typeof x === 'string') {
      const bytes = utf8.encode(x);
      this.length(bytes.byteLength, 0xa0, 31, 0xd9, 0xda, 0xdb);
      this.raw(bytes);
    } else if (ArrayBuffer.isView(x)) {
      const bytes = new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
      this.length(bytes.byteLength, undefined, 0, 0xc4, 0xc5, 0xc6);
      this.raw(bytes);
    } else if (Array.isArray(x)) {
      this.length(x.length, 0x90, 15, undefined, 0xdc, 0xdd);
      for (const item of x) this.value(item);
    } else if (typeof x === 'object') {
      const entries = Object.entries(x as Record<string, unknown>).filter(([, v]) => v !== undefined);
      this.length(entries.length, 0x80, 15, undefined, 0xde, 0xdf);
      for (const [k, v] of entries) {
        this.value(k);
        this.value(v);
      }
    } else throw new TypeError(`cannot encode a ${typeof x} as msgpack`);
  }

  private number(x: number): void {
    if (!Number.isSafeInteger(x)) return this.tagged(0xcb, 8, x, false, true);
    if (x >= 0) {
      if (x < 0x80) this.u8(x);
      else if (x < 0x100) this.tagged(0xcc, 1, x);
      else if (x < 0x10000) this.tagged(0xcd, 2, x);
      else if (x < 0x100000000) this.tagged(0xce, 4, x);
      else this.tagged(0xcf, 8, x);
    } else if (x >= -32) this.u8(x & 0xff);
    else if (x >= -0x80) this.tagged(0xd0, 1, x, true);
    else if (x >= -0x8000) this.tagged(0xd1, 2, x, true);
    else if (x >= -0x80000000) this.tagged(0xd2, 4, x, true);
    else this.tagged(0xd3, 8, x, true);
  }
}

/** The msgpack encoding of `value` as parts; binary fields of `inlineLimit` bytes or more are the caller's views (keep them unchanged until sent). */
export function packParts(value: unknown, inlineLimit = INLINE_LIMIT): Parts {
  const w = new Writer(inlineLimit);
  w.value(value);
  return w.finish();
}
