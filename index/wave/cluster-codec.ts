// The wave index's artifact: the bytes stored with a document per (layer, kv
// head). Arrays are stored raw, aligned to 4 bytes, so a load is a few views
// of the stored buffer (plus the member lists, derived once).
import { widenWords, type KvDtype } from '../../addon/kernels.js';
import { checksum32, packSections, SectionReader } from '../artifact-sections.js';
import { encodeMoments } from './moment-code.js';

const MAGIC = 0x4b565756; // "KVWV"
/**
 * 1: no key variances or axes, 2: no variance share, 3: outlier keys inside
 * k-means clusters (all stale: rebuilt at attach); 4: outliers alone, key
 * axes and variances as f16/bf16 words (read: coded at load, as 5 codes
 * them); 5: the axes and variances in 8 bits with a scale per cluster
 * (moment-code.ts).
 */
const VERSION = 5;
const WORD_MOMENTS = 4;
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
  /**
   * [clusters, headDim]: each channel's key variance over the members (the
   * estimate's second-order term), uint8 codes of its square root with a
   * scale per cluster (moment-code.ts).
   */
  keyVars: Uint8Array;
  /** [clusters]. */
  varScales: Float32Array;
  /** [clusters, headDim]: the principal axis of the members' keys, scaled by their standard deviation along it (ranking), int8 codes. */
  keyAxes: Int8Array;
  /** [clusters]. */
  axisScales: Float32Array;
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

export function encodeClusters(a: ClusterArrays): Uint8Array {
  return pack(a, VERSION, [a.centroids, a.valueMeans, a.keyVars, a.keyAxes, a.varScales, a.axisScales, a.counts, a.tokenCluster]);
}

function pack(a: ClusterArrays, version: number, parts: ArrayBufferView[]): Uint8Array {
  const out = packSections(HEADER_WORDS * 4, parts);
  const header = new Uint32Array([MAGIC, version, a.tokens, a.headDim, a.counts.length, a.clusterSize, a.dtype === 'f16' ? 0 : 1, 0, 0]);
  new Float32Array(header.buffer, 8 * 4, 1)[0] = a.varianceShare;
  out.set(new Uint8Array(header.buffer), 0);
  new DataView(out.buffer).setUint32(CHECKSUM_AT, checksum32(out), true);
  return out;
}

/**
 * Views of a stored artifact; throws on a foreign or truncated one. A
 * version 4 artifact (f16/bf16 moments) is read too: its axes and variances
 * are coded as a build codes them now, from their stored words (the rest
 * is the same).
 */
export function decodeClusters(bytes: Uint8Array): ClusterArrays {
  // Typed views need aligned offsets: copy once when the store's buffer is not.
  const b = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  const header = new Uint32Array(b.buffer, b.byteOffset, HEADER_WORDS);
  if (header[0] !== MAGIC) throw new Error('not a wave cluster artifact');
  const version = header[1];
  if (version !== VERSION && version !== WORD_MOMENTS) throw new Error(`wave cluster artifact version ${version} is stale (this build reads ${WORD_MOMENTS} and ${VERSION})`);
  const sum = header[7];
  const zeroed = b.slice();
  new DataView(zeroed.buffer).setUint32(CHECKSUM_AT, 0, true);
  if (checksum32(zeroed) !== sum) throw new Error('wave cluster artifact: checksum mismatch');
  const [, , tokens, headDim, C, clusterSize, dt] = header;
  const varianceShare = new Float32Array(header.buffer, header.byteOffset + 8 * 4, 1)[0];
  const stride = centroidStride(headDim);
  const sections = new SectionReader(b.buffer as ArrayBuffer, b.byteOffset + HEADER_WORDS * 4, b.byteOffset + b.byteLength, () => new Error('wave cluster artifact is truncated'));
  const take = sections.take.bind(sections);
  const u16 = (buf: ArrayBuffer, off: number, n: number) => new Uint16Array(buf, off, n);
  const i32 = (buf: ArrayBuffer, off: number, n: number) => new Int32Array(buf, off, n);
  const f32 = (buf: ArrayBuffer, off: number, n: number) => new Float32Array(buf, off, n);
  const dtype: KvDtype = dt === 0 ? 'f16' : 'bf16';
  const centroids = take(u16, C * stride, 2), valueMeans = take(u16, C * headDim, 2);
  let moments: Pick<ClusterArrays, 'keyVars' | 'varScales' | 'keyAxes' | 'axisScales'>;
  if (version === WORD_MOMENTS) {
    const vars = take(u16, C * headDim, 2), axes = take(u16, C * headDim, 2);
    try {
      moments = encodeMoments(widenWords(axes, dtype), widenWords(vars, dtype), C, headDim);
    } catch (e) {
      // A version 4 f16 variance past 65504 was stored as infinity: rebuilt from the keys (in float32) instead.
      throw new Error(`wave cluster artifact version ${version} is stale: its moments cannot be coded (${e instanceof Error ? e.message : String(e)})`);
    }
  } else {
    const keyVars = take((buf, off, n) => new Uint8Array(buf, off, n), C * headDim, 1);
    const keyAxes = take((buf, off, n) => new Int8Array(buf, off, n), C * headDim, 1);
    moments = { keyVars, keyAxes, varScales: take(f32, C, 4), axisScales: take(f32, C, 4) };
  }
  return {
    tokens,
    headDim,
    clusterSize,
    dtype,
    centroids,
    valueMeans,
    ...moments,
    counts: take(i32, C, 4),
    varianceShare,
    tokenCluster: take(i32, tokens, 4),
  };
}

/**
 * The version 5 form of a version 4 artifact (its moments coded as
 * decodeClusters codes them at load: the same arrays, so the same answers),
 * for the store to keep in its place so that the next load codes nothing;
 * undefined for an artifact of this version. Throws as decodeClusters does.
 */
export function upgradeClusters(bytes: Uint8Array): Uint8Array | undefined {
  if (bytes.byteLength < 8 || new DataView(bytes.buffer, bytes.byteOffset, 8).getUint32(4, true) !== WORD_MOMENTS) return undefined;
  return encodeClusters(decodeClusters(bytes));
}

/** A version 4 artifact (f16/bf16 moments) of the same clusters: what documents sealed before version 5 hold (tests). */
export function encodeWordMoments(a: ClusterArrays, keyVars: Uint16Array, keyAxes: Uint16Array): Uint8Array {
  return pack(a, WORD_MOMENTS, [a.centroids, a.valueMeans, keyVars, keyAxes, a.counts, a.tokenCluster]);
}
