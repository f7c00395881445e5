// What the index artifacts laid out as a header and then sections share
// (index/wave/cluster-codec.ts, index/squeezed/artifact.ts): every section
// starts at a 4-byte-aligned offset, so a load is typed views of the stored
// buffer, and the header's checksum is checksum64's low 32 bits.
import { bytesOf, checksum64 } from '../addon/kernels.js';

/** n rounded up to a multiple of 4. */
export const pad4 = (n: number): number => (n + 3) & ~3;

/** The project's one checksum (native/common/checksum.h), its low 32 bits: what a header word has room for. */
export function checksum32(bytes: Uint8Array): number {
  return Number(checksum64(bytes) & 0xffffffffn);
}

/** `header` zero bytes (the caller's to fill), then each part's bytes from a 4-aligned offset. */
export function packSections(header: number, parts: readonly ArrayBufferView[]): Uint8Array {
  const out = new Uint8Array(header + parts.reduce((n, p) => n + pad4(p.byteLength), 0));
  let at = header;
  for (const p of parts) {
    out.set(bytesOf(p), at);
    at += pad4(p.byteLength);
  }
  return out;
}

/**
 * Views of packSections' sections, in order, from byte `at` of a 4-aligned
 * buffer; a section reaching past `end` throws `truncated()`.
 */
export class SectionReader {
  constructor(
    private readonly buffer: ArrayBuffer,
    private at: number,
    private readonly end: number,
    private readonly truncated: () => Error,
  ) {}

  /** The next section: n elements of `width` bytes, as make views them. */
  take<T>(make: (buf: ArrayBuffer, off: number, n: number) => T, n: number, width: number): T {
    if (this.at + n * width > this.end) throw this.truncated();
    const v = make(this.buffer, this.at, n);
    this.at += pad4(n * width);
    return v;
  }
}
