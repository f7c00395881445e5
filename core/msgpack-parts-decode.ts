// The decoder beside msgpack-parts' encoder, for the decode path's messages
// (attend requests and answers): binary fields come back as views of the
// message's own bytes (no copy), maps as plain objects, every integer as a
// number. It reads only what those messages hold (no ext types, no
// timestamps): anything else is an error, as is a message cut short or
// followed by more bytes. msgpackr's decoder spent ~55 µs of CPU on a batch
// of 32 answers on the 2-core VM, mostly on the small maps of each step's
// stats; this one reads them in about a third of that.

const utf8 = new TextDecoder();
/** Deeper nesting than any body of the protocol, and shallow enough that the stack never runs out. */
const MAX_DEPTH = 256;

/** Short map keys seen lately, by a hash of their bytes (ASCII keys only: a string's char codes are then its bytes). */
const KEY_MAX = 16;
const KEY_SLOTS = 1024;
const keyText: (string | undefined)[] = new Array(KEY_SLOTS);

export class MsgpackError extends Error {
  /**
   * The top-level map's entries read before the error, when the message is a
   * map: a stream can still answer a malformed frame with the id it carried.
   */
  partial?: Record<string, unknown>;
}

class Reader {
  pos = 0;
  private readonly view: DataView;
  private readonly end: number;

  constructor(private readonly src: Uint8Array) {
    this.view = new DataView(src.buffer, src.byteOffset, src.byteLength);
    this.end = src.byteLength;
  }

  private need(n: number): void {
    if (this.pos + n > this.end) this.short(n);
  }

  private short(n: number): never {
    throw new MsgpackError(`message ends ${this.pos + n - this.end} bytes early`);
  }

  private u8(): number {
    if (this.pos + 1 > this.end) this.short(1);
    return this.src[this.pos++];
  }

  private u16(): number {
    if (this.pos + 2 > this.end) this.short(2);
    const x = this.view.getUint16(this.pos);
    this.pos += 2;
    return x;
  }

  private u32(): number {
    if (this.pos + 4 > this.end) this.short(4);
    const x = this.view.getUint32(this.pos);
    this.pos += 4;
    return x;
  }

  /** The `n`-byte field at pos (its bounds checked), pos moved past it. */
  private at(n: number): number {
    if (this.pos + n > this.end) this.short(n);
    const at = this.pos;
    this.pos += n;
    return at;
  }

  value(depth: number): unknown {
    if (this.pos >= this.end) this.short(1);
    const b = this.src[this.pos++];
    if (b < 0x80) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b < 0x90) return this.map(b & 0x0f, depth);
    if (b < 0xa0) return this.array(b & 0x0f, depth);
    if (b < 0xc0) return this.string(b & 0x1f);
    const v = this.view;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.bytes(this.u8());
      case 0xc5: return this.bytes(this.u16());
      case 0xc6: return this.bytes(this.u32());
      case 0xca: return v.getFloat32(this.at(4));
      case 0xcb: return v.getFloat64(this.at(8));
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: {
        const at = this.at(8);
        return v.getUint32(at) * 2 ** 32 + v.getUint32(at + 4);
      }
      case 0xd0: return v.getInt8(this.at(1));
      case 0xd1: return v.getInt16(this.at(2));
      case 0xd2: return v.getInt32(this.at(4));
      case 0xd3: {
        const at = this.at(8);
        return v.getInt32(at) * 2 ** 32 + v.getUint32(at + 4);
      }
      case 0xd9: return this.string(this.u8());
      case 0xda: return this.string(this.u16());
      case 0xdb: return this.string(this.u32());
      case 0xdc: return this.array(this.u16(), depth);
      case 0xdd: return this.array(this.u32(), depth);
      case 0xde: return this.map(this.u16(), depth);
      case 0xdf: return this.map(this.u32(), depth);
    }
    throw new MsgpackError(`unsupported msgpack type 0x${b.toString(16)} at byte ${this.pos - 1}`);
  }

  private bytes(n: number): Uint8Array {
    this.need(n);
    const out = this.src.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  private string(n: number): string {
    this.need(n);
    const src = this.src, at = this.pos;
    this.pos += n;
    if (n < 32) {
      let s = '';
      for (let i = at; i < at + n; i++) {
        const c = src[i];
        if (c >= 0x80) return utf8.decode(src.subarray(at, at + n));
        s += String.fromCharCode(c);
      }
      return s;
    }
    return utf8.decode(src.subarray(at, at + n));
  }

  /**
   * A short map key: the same string object each time its bytes recur (one
   * compare, no new string), so the maps of a message share one shape and
   * their stores stay fast.
   */
  private key(n: number): string {
    const src = this.src, at = this.pos + 1;
    this.need(1 + n);
    let h = n;
    for (let i = at; i < at + n; i++) h = (Math.imul(h, 31) + src[i]) | 0;
    const slot = (h ^ (h >>> 15)) & (KEY_SLOTS - 1);
    const hit = keyText[slot];
    if (hit !== undefined && hit.length === n) {
      let same = true;
      for (let i = 0; i < n && same; i++) same = hit.charCodeAt(i) === src[at + i];
      if (same) {
        this.pos = at + n;
        return hit;
      }
    }
    this.pos = at - 1;
    const k = this.value(0) as string;
    let ascii = true;
    for (let i = 0; i < k.length && ascii; i++) ascii = k.charCodeAt(i) < 0x80;
    if (ascii) keyText[slot] = k;
    return k;
  }

  private array(n: number, depth: number): unknown[] {
    // Each item is at least a byte: a length past the message's end is refused before anything is sized from it.
    this.need(n);
    if (depth >= MAX_DEPTH) throw new MsgpackError(`nested deeper than ${MAX_DEPTH}`);
    const out = new Array<unknown>(n);
    for (let i = 0; i < n; i++) out[i] = this.value(depth + 1);
    return out;
  }

  private map(n: number, depth: number): Record<string, unknown> {
    this.need(2 * n);
    if (depth >= MAX_DEPTH) throw new MsgpackError(`nested deeper than ${MAX_DEPTH}`);
    const out: Record<string, unknown> = {};
    try {
      for (let i = 0; i < n; i++) {
        const b = this.src[this.pos];
        const k = b >= 0xa0 && b < 0xa0 + KEY_MAX ? this.key(b & 0x1f) : this.value(depth + 1);
        if (typeof k !== 'string' && typeof k !== 'number') throw new MsgpackError('a map key is a string or a number');
        const value = this.value(depth + 1);
        // A key named __proto__ is an own field, never the object's prototype.
        if (k === '__proto__') Object.defineProperty(out, k, { value, enumerable: true, writable: true, configurable: true });
        else out[k] = value;
      }
    } catch (e) {
      if (depth === 0 && e instanceof MsgpackError) e.partial = out;
      throw e;
    }
    return out;
  }
}

/** One msgpack value, the whole of `src`; binary fields are views of `src`. Throws MsgpackError on anything else. */
export function unpackView(src: Uint8Array): unknown {
  const bytes = src.constructor === Uint8Array ? src : new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
  const r = new Reader(bytes);
  const value = r.value(0);
  if (r.pos !== bytes.byteLength) {
    const e = new MsgpackError(`${bytes.byteLength - r.pos} bytes after the message`);
    if (typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array)) e.partial = value as Record<string, unknown>;
    throw e;
  }
  return value;
}
