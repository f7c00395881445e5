// The bytes a squeezed index is stored as (in LMDB, per layer and kv head).
// Artifacts outlive the process that wrote them, so the layout is pinned by
// VERSION (load rejects any other), and load trusts nothing else in the
// bytes either: they come from disk.
//
// Artifact (little-endian): a 56-byte header — magic "KVSQ", version, levels,
// tokens, headDim, clusters C, coarse groups P, fractions F, tables T,
// centroid dtype (f16, or f32 when out of f16 range), calibration source and
// rows, a checksum of the whole artifact (low 32 bits of checksum64), its length, minExpanded —
// then 4-byte-aligned sections: fractions f32[F], table groups i32[T], fine
// thresholds f32[T·F] and (two levels) coarse thresholds f32[T·F] as log
// mass (−∞ keeps all), cluster offsets i32[C+1], members i32[n] (token ids
// grouped by cluster; a coarse group's clusters are contiguous), centroids
// [C, d], (two levels) coarse offsets i32[P+1] into clusters and coarse
// centroids [P, d]. Load checks lengths, checksum, offsets, that members are
// a permutation of the tokens, and finite centroids; it throws on anything else.
import { bytesOf, firstNonFinite } from '../../addon/kernels.js';
import { checksum32, packSections, pad4, SectionReader } from '../artifact-sections.js';
import type { HeadKeys } from '../method.js';

const MAGIC = 0x5153564b; // "KVSQ"
const VERSION = 2; // 2: the checksum is checksum64's low word (1: FNV-1a)
const HEADER = 56;
/** Where the thresholds were calibrated from, as the header stores it. */
export const SRC = { none: 0, queries: 1, keys: 2 } as const;

export interface Parts {
  levels: 1 | 2;
  tokens: number;
  headDim: number;
  /** 0: f16, 2: f32 (when a centroid is out of f16 range). */
  centroidDtype: 0 | 2;
  source: number;
  calibrationRows: number;
  /** Two-level: coarse groups always expanded. */
  minExpanded: number;
  fractions: Float32Array;
  groups: Int32Array;
  /** [T, F] log-mass thresholds (−∞: keep all). */
  fineThr: Float32Array;
  coarseThr: Float32Array;
  offsets: Int32Array;
  members: Int32Array;
  /** 16-bit (f16) or f32 words, [C, d]. */
  centroids: Uint16Array | Float32Array;
  coarseOffsets: Int32Array;
  coarseCentroids: Uint16Array | Float32Array;
}


function sections(p: Parts): ArrayBufferView[] {
  return [p.fractions, p.groups, p.fineThr, p.coarseThr, p.offsets, p.members, p.centroids, p.coarseOffsets, p.coarseCentroids];
}

export function encode(p: Parts): Uint8Array {
  const out = packSections(HEADER, sections(p));
  const total = out.byteLength;
  const v = new DataView(out.buffer);
  v.setUint32(0, MAGIC, true);
  v.setUint16(4, VERSION, true);
  v.setUint16(6, p.levels, true);
  v.setUint32(8, p.tokens, true);
  v.setUint32(12, p.headDim, true);
  v.setUint32(16, p.offsets.length - 1, true);
  v.setUint32(20, Math.max(0, p.coarseOffsets.length - 1), true);
  v.setUint32(24, p.fractions.length, true);
  v.setUint32(28, p.groups.length, true);
  v.setUint16(32, p.centroidDtype, true);
  v.setUint16(34, p.source, true);
  v.setUint32(36, p.calibrationRows, true);
  v.setUint32(44, total, true);
  v.setUint32(48, p.minExpanded, true);
  v.setUint32(40, checksum32(out), true); // over everything, this word as 0
  return out;
}

export function corrupt(why: string): never {
  throw new Error(`squeezed: corrupt index artifact: ${why}`);
}

export function decode(bytes: Uint8Array, keys: HeadKeys): Parts {
  if (!(bytes instanceof Uint8Array) || bytes.byteLength < HEADER) corrupt(`${bytes?.byteLength ?? 0} bytes, shorter than the ${HEADER}-byte header`);
  bytes = new Uint8Array(bytes); // a copy (Buffer#slice would share): aligned for typed views, ours to keep
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (v.getUint32(0, true) !== MAGIC) corrupt('bad magic');
  if (v.getUint16(4, true) !== VERSION) corrupt(`version ${v.getUint16(4, true)}, expected ${VERSION}`);
  const levels = v.getUint16(6, true), n = v.getUint32(8, true), d = v.getUint32(12, true);
  const C = v.getUint32(16, true), P = v.getUint32(20, true), F = v.getUint32(24, true), T = v.getUint32(28, true);
  const centroidDtype = v.getUint16(32, true), source = v.getUint16(34, true), calibrationRows = v.getUint32(36, true);
  const minExpanded = v.getUint32(48, true);
  if (v.getUint32(52, true) !== 0) corrupt('reserved header word is not 0');
  if (levels !== 1 && levels !== 2) corrupt(`levels ${levels}`);
  if (n !== keys.tokens || d !== keys.headDim) corrupt(`built for ${n} tokens × ${d}, the keys have ${keys.tokens} × ${keys.headDim}`);
  if (n > 0 ? C < 1 || C > n : C !== 0) corrupt(`${C} clusters for ${n} tokens`);
  if (levels === 1 ? P !== 0 : n > 0 ? P < 1 || P > C : P !== 0) corrupt(`${P} coarse groups for ${C} clusters`);
  if (F < 1 || F > 64 || T < 1 || T > 64) corrupt(`table ${T} × ${F}`);
  if (centroidDtype !== 0 && centroidDtype !== 2) corrupt(`centroid dtype ${centroidDtype}`);
  const cw = centroidDtype === 0 ? 2 : 4;
  const lengths = [F * 4, T * 4, T * F * 4, levels === 2 ? T * F * 4 : 0, (C + 1) * 4, n * 4, C * d * cw, levels === 2 ? (P + 1) * 4 : 0, P * d * cw];
  const total = HEADER + lengths.reduce((s, l) => s + pad4(l), 0);
  if (v.getUint32(44, true) !== total || bytes.byteLength !== total) corrupt(`${bytes.byteLength} bytes, the header implies ${total}`);
  const sum = v.getUint32(40, true);
  v.setUint32(40, 0, true);
  if (checksum32(bytes) !== sum) corrupt('checksum mismatch');
  const sections = new SectionReader(bytes.buffer as ArrayBuffer, bytes.byteOffset + HEADER, bytes.byteOffset + total, () => corrupt('truncated'));
  const take = <A>(len: number, make: (buf: ArrayBuffer, off: number, count: number) => A, width: number): A => sections.take(make, len / width, width);
  const f32 = (b: ArrayBuffer, o: number, c: number) => new Float32Array(b, o, c);
  const i32 = (b: ArrayBuffer, o: number, c: number) => new Int32Array(b, o, c);
  const cen = (b: ArrayBuffer, o: number, c: number) => (cw === 2 ? new Uint16Array(b, o, c) : new Float32Array(b, o, c));
  const p: Parts = {
    levels,
    tokens: n,
    headDim: d,
    centroidDtype,
    source,
    calibrationRows,
    minExpanded,
    fractions: take(lengths[0], f32, 4),
    groups: take(lengths[1], i32, 4),
    fineThr: take(lengths[2], f32, 4),
    coarseThr: take(lengths[3], f32, 4),
    offsets: take(lengths[4], i32, 4),
    members: take(lengths[5], i32, 4),
    centroids: take(lengths[6], cen, cw),
    coarseOffsets: take(lengths[7], i32, 4),
    coarseCentroids: take(lengths[8], cen, cw),
  };
  // Structure: the tables, then CSR offsets and a permutation of the tokens.
  for (let i = 0; i < F; i++)
    if (!(p.fractions[i] > 0 && p.fractions[i] <= 1) || (i > 0 && p.fractions[i] <= p.fractions[i - 1])) corrupt('fractions not increasing in (0, 1]');
  if (p.fractions[F - 1] !== 1) corrupt('the last fraction is not 1');
  for (let i = 0; i < T; i++) if (p.groups[i] < 1 || (i > 0 ? p.groups[i] <= p.groups[i - 1] : p.groups[0] !== 1)) corrupt('table groups');
  for (const t of [p.fineThr, p.coarseThr]) for (let i = 0; i < t.length; i++) if (Number.isNaN(t[i]) || t[i] > 1e-3) corrupt('thresholds');
  const csr = (offs: Int32Array, count: number, what: string) => {
    if (offs[0] !== 0 || offs[offs.length - 1] !== count) corrupt(`${what} offsets do not span ${count}`);
    for (let i = 1; i < offs.length; i++) if (offs[i] <= offs[i - 1]) corrupt(`${what} offsets not increasing`);
  };
  if (n > 0) csr(p.offsets, n, 'cluster');
  if (levels === 2 && n > 0) csr(p.coarseOffsets, C, 'coarse');
  const seen = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const t = p.members[i];
    if (t < 0 || t >= n || seen[t]) corrupt('members are not a permutation of the tokens');
    seen[t] = 1;
  }
  const dt = cw === 2 ? 'f16' : 'f32';
  for (const c of [p.centroids, p.coarseCentroids]) if (c.length && firstNonFinite(bytesOf(c), dt, c.length) >= 0) corrupt('non-finite centroid');
  return p;
}
