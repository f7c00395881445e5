// RoPE in the rotate-half layout of HF Llama: channel pairs (p, p + d/2),
// pair p turning by θ_p radians per position. Angles come from a two-level
// cos/sin table (pos = hi·4096 + lo, one angle-sum per lookup), so no
// trigonometry runs per token.

export type RopeScaling = 'llama3' | 'none';

/** Angular frequency of each RoPE pair (Llama-3.1 scaling when asked). */
export function ropeFrequencies(headDim: number, base: number, scaling: RopeScaling): Float64Array {
  const half = headDim >> 1;
  const f = new Float64Array(half);
  for (let p = 0; p < half; p++) {
    let w = Math.pow(base, (-2 * p) / headDim);
    if (scaling === 'llama3') {
      const factor = 8, lowFreqFactor = 1, highFreqFactor = 4, oldContext = 8192;
      const wavelen = (2 * Math.PI) / w;
      if (wavelen > oldContext / lowFreqFactor) w /= factor;
      else if (wavelen >= oldContext / highFreqFactor) {
        const smooth = (oldContext / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor);
        w = (1 - smooth) * (w / factor) + smooth * w;
      }
    }
    f[p] = w;
  }
  return f;
}

const LO_BITS = 12, LO = 1 << LO_BITS;

/** cos/sin of pos·θ_p for positions [0, maxPos], from a two-level table (pos = hi·4096 + lo). */
export class RopeTable {
  readonly half: number;
  private readonly loCos: Float64Array;
  private readonly loSin: Float64Array;
  private readonly hiCos: Float64Array;
  private readonly hiSin: Float64Array;
  readonly maxPos: number;

  constructor(readonly freq: Float64Array, maxPos: number) {
    const half = (this.half = freq.length);
    this.maxPos = maxPos;
    const nHi = (maxPos >>> LO_BITS) + 1;
    this.loCos = new Float64Array(LO * half);
    this.loSin = new Float64Array(LO * half);
    this.hiCos = new Float64Array(nHi * half);
    this.hiSin = new Float64Array(nHi * half);
    for (let i = 0; i < LO; i++)
      for (let p = 0; p < half; p++) {
        this.loCos[i * half + p] = Math.cos(i * freq[p]);
        this.loSin[i * half + p] = Math.sin(i * freq[p]);
      }
    for (let i = 0; i < nHi; i++)
      for (let p = 0; p < half; p++) {
        const a = i * LO * freq[p];
        this.hiCos[i * half + p] = Math.cos(a);
        this.hiSin[i * half + p] = Math.sin(a);
      }
  }

  /** cos and sin of pos·θ for every pair into cs/sn at offset `at`. */
  angles(pos: number, cs: Float64Array, sn: Float64Array, at: number): void {
    if (!(pos >= 0 && pos <= this.maxPos)) throw new RangeError(`RopeTable: position ${pos} outside [0, ${this.maxPos}]`);
    const half = this.half, hb = (pos >>> LO_BITS) * half, lb = (pos & (LO - 1)) * half;
    const { hiCos, hiSin, loCos, loSin } = this;
    for (let p = 0; p < half; p++) {
      const c1 = hiCos[hb + p], s1 = hiSin[hb + p], c2 = loCos[lb + p], s2 = loSin[lb + p];
      cs[at + p] = c1 * c2 - s1 * s2;
      sn[at + p] = s1 * c2 + c1 * s2;
    }
  }

  private readonly cs1 = new Float64Array(512);
  private readonly sn1 = new Float64Array(512);

  /** dst = R(pos)·src (pre-RoPE → rotated at pos); dst may be src. */
  rotate(src: ArrayLike<number>, dst: Float64Array | Float32Array, pos: number): void {
    const half = this.half;
    const cs = half <= 512 ? this.cs1 : new Float64Array(half), sn = half <= 512 ? this.sn1 : new Float64Array(half);
    this.angles(pos, cs, sn, 0);
    for (let p = 0; p < half; p++) {
      const x = src[p], y = src[p + half];
      dst[p] = x * cs[p] - y * sn[p];
      dst[p + half] = y * cs[p] + x * sn[p];
    }
  }
}
