// The wave index's artifact: the bytes stored with a document per (layer, kv
// head). Arrays are stored raw, aligned to 4 bytes, so a load is a few views
// of the stored buffer (plus the member lists, derived once).
import { checksum64, type KvDtype } from '../../addon/kernels.js';

const MAGIC = 0x4b565756; // "KVWV"
/**
 * 1: no key variances or axes, 2: no variance share, 3: outlier keys inside
 * k-means clusters (all stale: rebuilt at attach); 4: outliers alone.
 */
const VERSION = 4;
const HEADER_WORDS = 9;

export interface ClusterArrays {
  tokens: number;
  headDim: number;
  clusterSize: number;
  dtype: KvDtype;
  /** [clusters, centroidStride(headDim)]: centroid, then the radius, then padding. */
  centroids: Uint16Array;
  /** [clusters, headDim]. */
  valueMeans: Uint16Array;
  /** [clusters, headDim]: each channel's key variance over the members (the estimate's second-order term). */
  keyVars: Uint16Array;
  /** [clusters, headDim]: the principal axis of the members' keys, scaled by their standard deviation along it (ranking). */
  keyAxes: Uint16Array;
  counts: Int32Array;
  /** The share of the estimate's second-order term this head takes (calibrated at build: index/wave/variance-share.ts). */
  varianceShare: number;
  /** [tokens]. */
  tokenCluster: Int32Array;
}

/** The centroid row's extra columns: column headDim holds the radius, the rest pad to a multiple of 8 (SIMD rows). */
export const centroidStride = (headDim: number) => headDim + 8;

/** Header byte of the checksum: checksum64's low word over the artifact with this word 0. */
const CHECKSUM_AT = 28;
const checksumOf = (b: Uint8Array) => Number(checksum64(b) & 0xffffffffn);

const pad4 = (n: number) => (n + 3) & ~3;

export function encodeClusters(a: ClusterArrays): Uint8Array {
  const C = a.counts.length;
  const parts: ArrayBufferView[] = [a.centroids, a.valueMeans, a.keyVars, a.keyAxes, a.counts, a.tokenCluster];
  const size = HEADER_WORDS * 4 + parts.reduce((n, p) => n + pad4(p.byteLength), 0);
  const out = new Uint8Array(size);
  const header = new Uint32Array([MAGIC, VERSION, a.tokens, a.headDim, C, a.clusterSize, a.dtype === 'f16' ? 0 : 1, 0, 0]);
  new Float32Array(header.buffer, 8 * 4, 1)[0] = a.varianceShare;
  out.set(new Uint8Array(header.buffer), 0);
  let at = HEADER_WORDS * 4;
  for (const p of parts) {
    out.set(new Uint8Array(p.buffer, p.byteOffset, p.byteLength), at);
    at += pad4(p.byteLength);
  }
  new DataView(out.buffer).setUint32(CHECKSUM_AT, checksumOf(out), true);
  return out;
}

/** Views of a stored artifact; throws on a foreign or truncated one. */
export function decodeClusters(bytes: Uint8Array): ClusterArrays {
  // Typed views need aligned offsets: copy once when the store's buffer is not.
  const b = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  const header = new Uint32Array(b.buffer, b.byteOffset, HEADER_WORDS);
  if (header[0] !== MAGIC) throw new Error('not a wave cluster artifact');
  if (header[1] !== VERSION) throw new Error(`wave cluster artifact version ${header[1]} is stale (this build reads ${VERSION})`);
  const sum = header[7];
  const zeroed = b.slice();
  new DataView(zeroed.buffer).setUint32(CHECKSUM_AT, 0, true);
  if (checksumOf(zeroed) !== sum) throw new Error('wave cluster artifact: checksum mismatch');
  const [, , tokens, headDim, C, clusterSize, dt] = header;
  const varianceShare = new Float32Array(header.buffer, header.byteOffset + 8 * 4, 1)[0];
  const stride = centroidStride(headDim);
  let at = b.byteOffset + HEADER_WORDS * 4;
  const take = <T>(make: (buf: ArrayBuffer, off: number, n: number) => T, n: number, width: number): T => {
    if (at + n * width > b.byteOffset + b.byteLength) throw new Error('wave cluster artifact is truncated');
    const v = make(b.buffer as ArrayBuffer, at, n);
    at += pad4(n * width);
    return v;
  };
  const u16 = (buf: ArrayBuffer, off: number, n: number) => new Uint16Array(buf, off, n);
  const i32 = (buf: ArrayBuffer, off: number, n: number) => new Int32Array(buf, off, n);
  return {
    tokens,
    headDim,
    clusterSize,
    dtype: dt === 0 ? 'f16' : 'bf16',
    centroids: take(u16, C * stride, 2),
    valueMeans: take(u16, C * headDim, 2),
    keyVars: take(u16, C * headDim, 2),
    keyAxes: take(u16, C * headDim, 2),
    counts: take(i32, C, 4),
    varianceShare,
    tokenCluster: take(i32, tokens, 4),
  };
}
