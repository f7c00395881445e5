// Seeded randomness. Every stream is keyed by the seed and by what it draws
// (a stream tag plus indices such as head and chunk), never by the order of
// work, so a seed always gives the same bytes whichever stage runs first.
// Gaussians come from a 65536-entry inverse-CDF table indexed by 16 bits of
// a xoshiro128** draw: no transcendental per element, and two normals per
// 32-bit draw on the per-element path (fillNormals).

/** Stream tags: every stream is named by what it draws. */
export const S_HEAD = 1, S_KEYS = 2, S_VALUES = 3, S_SPANS = 4, S_NEEDLES = 5, S_DECODE = 6, S_PREFILL = 7, S_QHEAD = 8, S_SALIENT = 9, S_DSHIFT = 10, S_UNASKED = 11;

/** 32-bit mix of stream keys (murmur-style finaliser per part); deterministic. */
export function hash32(...parts: number[]): number {
  let h = 0x9e3779b9;
  for (const p of parts) {
    h = Math.imul(h ^ (p >>> 0), 0x85ebca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35);
    h ^= h >>> 16;
    h = (h + 0x9e3779b9) | 0;
  }
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  h ^= h >>> 12;
  return h >>> 0;
}

/** Inverse standard normal CDF (Acklam; |error| < 1.2e-9). */
function normalQuantile(p: number): number {
  const a = [-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.357751867269, -30.66479806614716, 2.506628277459239];
  const b = [-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972, -13.28068155288572];
  const c = [-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
  const d = [0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416];
  if (p < 0.02425) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - 0.02425) return -normalQuantile(1 - p);
  const q = p - 0.5, r = q * q;
  return ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q) / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

/** 65536 standard-normal quantiles at (i + 0.5)/65536: exact moments, tails to ±4.17. */
const NORMAL_TABLE = (() => {
  const t = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = normalQuantile((i + 0.5) / 65536);
  return t;
})();

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** xoshiro128** seeded from a 32-bit key; for the paths that are not per element. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  constructor(key: number) {
    this.a = hash32(key, 1);
    this.b = hash32(key, 2);
    this.c = hash32(key, 3);
    this.d = hash32(key, 4) | 1;
  }
  u32(): number {
    const r = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return r;
  }
  /** Uniform in [0, 1). */
  next(): number {
    return this.u32() / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  normal(): number {
    return NORMAL_TABLE[this.u32() >>> 16];
  }
}

/** Fills out[0..n) with standard normals from the stream `key` (two per 32-bit draw). */
export function fillNormals(out: Float32Array, n: number, key: number): void {
  // The xoshiro step inlined: this runs once per two key/value elements.
  let a = hash32(key, 1), b = hash32(key, 2), c = hash32(key, 3), d = hash32(key, 4) | 1;
  const T = NORMAL_TABLE;
  for (let i = 0; i < n; i += 2) {
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9);
    const t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = (d << 11) | (d >>> 21);
    out[i] = T[r >>> 16];
    if (i + 1 < n) out[i + 1] = T[r & 0xffff];
  }
}
