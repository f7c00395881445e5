// A minimal safetensors reader: an 8-byte little-endian header length, a
// JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
// Tensors are read by row ranges with positioned reads, never whole.
import { closeSync, fstatSync, openSync, read, readSync } from 'node:fs';
import { invalid } from '../../core/errors.js';
import type { WireDtype } from '../../core/tensor.js';

export interface SafetensorInfo {
  dtype: WireDtype;
  shape: number[];
  begin: number; // absolute file offset
  end: number;
}

const DTYPES: Record<string, WireDtype> = { F16: 'f16', BF16: 'bf16', F32: 'f32', I32: 'i32' };
const BYTES: Record<WireDtype, number> = { f16: 2, bf16: 2, f32: 4, i32: 4 };

export class SafetensorsFile {
  readonly tensors = new Map<string, SafetensorInfo>();
  readonly metadata: Record<string, string> = {};
  private readonly fd: number;

  constructor(path: string) {
    this.fd = openSync(path, 'r');
    const size = fstatSync(this.fd).size;
    const head = Buffer.alloc(8);
    readSync(this.fd, head, 0, 8, 0);
    const n = Number(head.readBigUInt64LE(0));
    if (n <= 0 || 8 + n > size || n > 100 * 1024 * 1024) throw invalid(`${path}: not a safetensors file (header length ${n})`);
    const json = Buffer.alloc(n);
    readSync(this.fd, json, 0, n, 8);
    const header = JSON.parse(json.toString('utf8')) as Record<string, unknown>;
    for (const [name, raw] of Object.entries(header)) {
      if (name === '__metadata__') {
        Object.assign(this.metadata, raw);
        continue;
      }
      const t = raw as { dtype: string; shape: number[]; data_offsets: [number, number] };
      const dtype = DTYPES[t.dtype];
      if (!dtype) throw invalid(`${path}: tensor ${name} has unsupported dtype ${t.dtype}`);
      const begin = 8 + n + t.data_offsets[0], end = 8 + n + t.data_offsets[1];
      if (end > size || end - begin !== t.shape.reduce((a, b) => a * b, 1) * BYTES[dtype])
        throw invalid(`${path}: tensor ${name} does not fit its shape or the file`);
      this.tensors.set(name, { dtype, shape: t.shape, begin, end });
    }
  }

  /**
   * Rows [from, to) of dimension 1 of a [heads, tokens, dim] tensor, as
   * contiguous [heads, to - from, dim] bytes: in `into` when given and
   * large enough (a buffer reused chunk after chunk is not paid for again
   * in page faults), else in a new buffer.
   */
  readTokens(name: string, from: number, to: number, into?: Buffer): Uint8Array {
    const { out, reads } = this.plan(name, from, to, into);
    for (const r of reads) readSync(this.fd, out, r.at, r.length, r.position);
    return out;
  }

  /**
   * readTokens off the event loop: the heads' reads run on libuv's pool at
   * once, so a reader can fetch the next chunk while the socket still takes
   * this one (the CLI's preload: its reads had stalled the uploads).
   */
  async readTokensAsync(name: string, from: number, to: number, into?: Buffer): Promise<Uint8Array> {
    const { out, reads } = this.plan(name, from, to, into);
    // Every read settles before the first failure is thrown: none still runs when the caller closes the file.
    const settled = await Promise.allSettled(reads.map((r) => new Promise<void>((resolve, reject) => {
      read(this.fd, out, r.at, r.length, r.position, (e, n) => (e ? reject(e) : n !== r.length ? reject(invalid(`tensor ${name}: the file ended inside its rows`)) : resolve()));
    })));
    const failed = settled.find((r) => r.status === 'rejected');
    if (failed) throw failed.reason;
    return out;
  }

  /** Where each head's rows [from, to) lie in the file and go in the output. */
  private plan(name: string, from: number, to: number, into?: Buffer): { out: Buffer; reads: { at: number; length: number; position: number }[] } {
    const t = this.tensors.get(name);
    if (!t || t.shape.length !== 3) throw invalid(`tensor ${name} missing or not [heads, tokens, dim]`);
    const [heads, tokens, dim] = t.shape;
    if (!(Number.isInteger(from) && Number.isInteger(to) && 0 <= from && from <= to && to <= tokens)) throw invalid(`tensor ${name}: rows [${from}, ${to}) outside its ${tokens}`);
    const row = dim * BYTES[t.dtype];
    const bytes = heads * (to - from) * row;
    const out = into && into.byteLength >= bytes ? into.subarray(0, bytes) : Buffer.allocUnsafe(bytes);
    const reads = Array.from({ length: heads }, (_, h) => ({ at: h * (to - from) * row, length: (to - from) * row, position: t.begin + (h * tokens + from) * row }));
    return { out, reads };
  }

  close(): void {
    closeSync(this.fd);
  }
}
