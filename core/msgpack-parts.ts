// A msgpack encoder that does not copy large binary fields: the encoding is
// a list of parts, small ones written here and every Uint8Array of
// `inlineLimit` bytes or more passed through as the caller's own view, so a
// request body of tensors goes to the socket without being assembled.
// Concatenated, the parts are ordinary msgpack (any decoder reads them).
// The server writes an answer's parts to the socket as they are (HTTP) or
// joins them into one warm buffer (a WebSocket frame): msgpackr's packer
// grows a fresh buffer several times for a large message, and a fresh
// buffer costs its page faults again (0.75 ms for a batch of 32 answers on
// the 2-core VM, against 0.05 ms for one copy into memory already mapped).
//
// A wire tensor ({dtype, shape, data}) is written with its data at an
// offset of the message that is a multiple of 4 (see Writer.tensor), so the
// receiver can read f32 data in place.
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

/** Small bytes are written into one scratch buffer; each part of them is a view of a stretch of it (a new scratch only when full). */
const SCRATCH = 4096;

/** packInto's target is full: the message does not fit. */
class NoRoom {}
const NO_ROOM = new NoRoom();

class Writer {
  readonly parts: Uint8Array[] = [];
  byteLength = 0;
  private buf: Uint8Array;
  private view: DataView;
  /** The unflushed stretch is buf[from, at). */
  private from: number;
  private at: number;

  /** `into`: write every byte into this target from `offset` (packInto), never past its end; else parts of scratch and the caller's views. */
  constructor(
    private readonly inlineLimit: number,
    private readonly into?: Uint8Array,
    offset = 0,
  ) {
    this.buf = into ?? new Uint8Array(SCRATCH);
    this.view = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.from = this.at = offset;
  }

  /** Where the next byte goes in the target (packInto). */
  get end(): number {
    return this.at;
  }

  private room(n: number): void {
    if (this.at + n <= this.buf.length) return;
    if (this.into) throw NO_ROOM;
    this.flush();
    this.buf = new Uint8Array(Math.max(SCRATCH, n));
    this.view = new DataView(this.buf.buffer);
    this.from = this.at = 0;
  }

  private flush(): void {
    if (this.at === this.from) return;
    this.parts.push(this.buf.subarray(this.from, this.at));
    this.byteLength += this.at - this.from;
    this.from = this.at;
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

  /** Bytes written so far: the next byte's offset in the whole message. */
  private get position(): number {
    return this.byteLength + this.at - this.from;
  }

  value(x: unknown): void {
    if (x === null || x === undefined) this.u8(0xc0);
    else if (x === false) this.u8(0xc2);
    else if (x === true) this.u8(0xc3);
    else if (typeof x === 'number') this.number(x);
    else if (typeof x === 'string') this.string(x);
    else if (ArrayBuffer.isView(x)) this.binary(x, 0);
    else if (Array.isArray(x)) {
      this.length(x.length, 0x90, 15, undefined, 0xdc, 0xdd);
      for (const item of x) this.value(item);
    } else if (typeof x === 'object') {
      const map = x as Record<string, unknown>;
      const keys = Object.keys(map);
      if (keys.length === 3 && keys[0] === 'dtype' && keys[1] === 'shape' && keys[2] === 'data' && this.tensor(map)) return;
      let n = 0;
      for (const k of keys) if (map[k] !== undefined) n++;
      this.length(n, 0x80, 15, undefined, 0xde, 0xdf);
      for (const k of keys) {
        const v = map[k];
        if (v === undefined) continue;
        this.key(k, 0);
        this.value(v);
      }
    } else throw new TypeError(`cannot encode a ${typeof x} as msgpack`);
  }

  /** A binary: its header `wider` bytes longer than the smallest (0, 1 or 2: bin8 → bin16 → bin32). */
  private binary(x: ArrayBufferView, wider: number): void {
    const bytes = x instanceof Uint8Array ? x : new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
    const n = bytes.byteLength;
    const form = Math.min(2, (n < 0x100 ? 0 : n < 0x10000 ? 1 : 2) + wider);
    if (form === 0) this.tagged(0xc4, 1, n);
    else if (form === 1) this.tagged(0xc5, 2, n);
    else this.tagged(0xc6, 4, n);
    this.raw(bytes);
  }

  /**
   * A wire tensor {dtype, shape, data} with its data's first byte at an
   * offset of the message that is a multiple of 4: the receiver can read
   * an f32 or i32 tensor in place (a Float32Array over the message's own
   * bytes) instead of copying it out. The padding is in the headers, not
   * beside them (a str8 key where a fixstr would do): any msgpack decoder
   * reads the same map. False when the map is not a tensor of this shape.
   */
  private tensor(map: Record<string, unknown>): boolean {
    const { dtype, shape, data } = map;
    if (typeof dtype !== 'string' || !Array.isArray(shape) || shape.length > 15 || !ArrayBuffer.isView(data)) return false;
    let shapeBytes = 1;
    for (const s of shape) {
      if (typeof s !== 'number' || !Number.isSafeInteger(s) || s < 0 || s >= 0x100000000) return false;
      shapeBytes += s < 0x80 ? 1 : s < 0x100 ? 2 : s < 0x10000 ? 3 : 5;
    }
    this.u8(0x83);
    this.key('dtype', 0);
    this.string(dtype);
    // Bytes from here to the data with the smallest headers: 'shape', the shape, 'data', the bin header.
    const n = data.byteLength;
    const before = this.position + 6 + shapeBytes + 5 + (n < 0x100 ? 2 : n < 0x10000 ? 3 : 5);
    const pad = (4 - (before % 4)) % 4;
    // pad 1 and 2 widen the 'data' key (str8, str16); 3 is the 'shape' key one wider and 'data' two.
    this.key('shape', pad === 3 ? 1 : 0);
    this.value(shape);
    this.key('data', (pad === 3 ? 2 : pad) as 0 | 1 | 2);
    this.binary(data, 0);
    return true;
  }

  /** A map key; `wider` widens its header (0 smallest, 1 str8, 2 str16; ASCII keys only). */
  private key(k: string, wider: 0 | 1 | 2): void {
    if (wider === 0) return this.string(k);
    if (wider === 1) this.tagged(0xd9, 1, k.length);
    else this.tagged(0xda, 2, k.length);
    this.room(k.length);
    for (let i = 0; i < k.length; i++) this.buf[this.at++] = k.charCodeAt(i);
  }

  /** Short ASCII strings (keys, ids, dtypes) written char by char; others through TextEncoder. */
  private string(x: string): void {
    const n = x.length;
    if (n < 64) {
      let ascii = true;
      for (let i = 0; i < n && ascii; i++) ascii = x.charCodeAt(i) < 0x80;
      if (ascii) {
        this.length(n, 0xa0, 31, 0xd9, 0xda, 0xdb);
        this.room(n);
        const buf = this.buf;
        let at = this.at;
        for (let i = 0; i < n; i++) buf[at++] = x.charCodeAt(i);
        this.at = at;
        return;
      }
    }
    const bytes = utf8.encode(x);
    this.length(bytes.byteLength, 0xa0, 31, 0xd9, 0xda, 0xdb);
    this.raw(bytes);
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

/**
 * The msgpack encoding of `value` written into `target` from `offset`, every
 * byte inline (the same bytes packParts makes, joined; tensor data aligned
 * as there, counting from `offset`): the end offset, or -1 when it does not
 * fit (target's bytes past `offset` are then undefined). For a message
 * packed straight into a warm frame buffer: no scratch, no parts, no join.
 */
export function packInto(value: unknown, target: Uint8Array, offset: number): number {
  const w = new Writer(Infinity, target, offset);
  try {
    w.value(value);
  } catch (e) {
    if (e === NO_ROOM) return -1;
    throw e;
  }
  return w.end;
}

/** Copies the parts, in order, into `target` (at least byteLength bytes); returns the filled view. */
export function joinParts({ parts, byteLength }: Parts, target: Uint8Array): Uint8Array {
  let at = 0;
  for (const p of parts) {
    target.set(p, at);
    at += p.byteLength;
  }
  return target.subarray(0, byteLength);
}
