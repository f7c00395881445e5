// Seeded, deterministic synthetic attention workloads for one layer (all kv
// heads): keys and values in storage dtype, prefill query rows, decode query
// steps and planted needles. Random Gaussian keys are too easy and too unlike
// real ones (DESIGN.md, "Workloads"); this generator reproduces, each behind
// its own knob (WorkloadKnobs), the structure that real K/V/Q show.
//
// Geometry. Everything is emitted as an LLM server would push it: keys and
// queries already rotated by RoPE. A head's channels come in RoPE pairs
// (c, c + d/2) (the "rotate-half" layout of HF Llama); pair p turns by
// θ_p = base^(-2p/d) radians per position (base 500000 with Llama-3.1's
// frequency scaling by default, or 10000 unscaled). The pairs form bands,
// which is where real heads keep these things:
//   fast      p < d/4                 high frequencies: position (recency)
//   topic     even pairs of the rest  low frequencies: content shared by a span
//   feature   odd pairs of the rest   low frequencies: sparse features of a few
//                                      tokens (heavy hitters, needles); quiet otherwise
//   slow      the last o pairs        the slowest: outlier channels, sink direction
// Scores are logits, q·k/√d. Ordinary key noise has unit variance per channel
// on average over the fast and topic bands (a log-normal spectrum per pair);
// the knobs are stated in logits wherever possible. Boosts that must keep
// their share of attention as the context grows (the bulk's log-partition
// grows as ln(tokens)) default to L + c with L = ln(tokens).
//
// (a) Attention sinks. What: the first `sinks` tokens take a large share of
//     every query's mass. Why: real models park surplus attention on the
//     first tokens (StreamingLLM). How: sink keys get a component along the
//     queries' mean direction in the slow band (which barely turns, so it
//     holds at any distance), sized to score `sinkBoost` logits above an
//     ordinary key; sink values are small (a sink is a no-op). Knobs: sinks
//     (4), sinkBoost (L + 1).
// (b) Outlier key channels. What: the 2·outlierPairs channels of the slowest
//     pairs (d/2−o..d/2−1 and d−o..d−1) carry large fixed-sign values in
//     every key, with small variance. Why: real Llama keys show a few
//     massive, fixed-sign channels in RoPE's slow frequencies. Queries share
//     the signs: a large logit common to all keys (it drifts only as the
//     slow pairs turn, < 0.4 rad over 1M positions with Llama-3.1 scaling).
//     Knobs: outlierPairs (2), outlierScale (10: the channel mean in units
//     of an ordinary channel's std).
// (c) RoPE by position. What: keys are rotated at their position, decode
//     queries at tokens + step, prefill queries at their row's position.
//     Why: servers push post-RoPE K and Q; rotation makes post-RoPE keys of
//     nearby positions alike (a key's nearest keys are often positional,
//     not semantic, neighbours) and drives (f). Knobs: ropeBase (500000),
//     ropeScaling ('llama3' when base ≥ 100000, else 'none').
// (d) Queries out of distribution. What: every q head's mean has a shift in
//     the topic channels, weighted towards the channels where keys vary
//     least, plus its own slow-band and fast-band parts, so queries sit far
//     outside the key distribution (large per-channel z-scores, query–key
//     cosines unlike key–key cosines) and a key's nearest keys are not the
//     keys a query ranks highest. The shift also meets every key's content,
//     which favours some keys whatever the query (static heavy hitters, as
//     H2O observes). Why: RetrievalAttention measured Q and K as different
//     distributions, which is what defeats key-only ANN indexes. Knobs:
//     queryShift (logit std across keys that the shift produces against the
//     keys' noise, 0.4), queryNoise (logit std of a query's own per-step
//     noise, 0.4).
// (e) Clustered content. What: after the sinks the context is a sequence of
//     spans (geometric lengths, mean spanMean), each drawn from a pool of
//     `topics`; a key is its topic's centroid (topic channels) plus noise,
//     so keys cluster by topic and each cluster is contiguous in position.
//     A fraction `salient` of tokens (the same positions in every head, like
//     keywords) also carry a random feature of norm salientNorm in the
//     feature channels (where other keys have std 0.1). Queries target one
//     span at a time (topicBoost logits on its keys, some on the same topic
//     elsewhere) and `hitters` salient tokens in it through their features
//     (hitterBoost logits each): sharp, because a feature stands far out of
//     the quiet channels, so targeting it barely disturbs other keys. Values
//     carry a per-topic mean. Knobs: topics (64), spanMean (1024),
//     topicSpread (1.5: centroid std per topic channel in units of its noise
//     std), topicBoost (2), salient (1/256), salientNorm (4), hitters (3),
//     hitterBoost (L − 2).
// (f) Recency. What: decode queries favour recent tokens. Why: local
//     attention is the commonest head pattern. How: keys and queries share
//     a mean in the fast band, so q·k peaks at distance 0 and decays about
//     as recency·(1 − ln Δ / ln W) as the fast pairs' phases spread (RoPE's
//     long-term decay; W ≈ 1/θ of the slowest fast pair, ~1200 positions at
//     d=128), with RoPE's sidelobes beyond; a new target span is one of the
//     last 8 spans with probability recentTopic. The decode steps' own keys
//     are not part of the workload, so step s sees the context from
//     distance s + 1. Knobs: recency (bonus at distance 0 in logits, L − 3),
//     recentTopic (0.5).
// (g) Temporal locality. What: consecutive decode queries attend similar
//     tokens. How: each q head's own query noise follows AR(1) across steps
//     with coefficient `drift`; the group's target span persists with
//     probability topicStay and each heavy hitter with hitterStay. Decode
//     positions advance by one per step, so the fast pairs still turn, as in
//     a real model. Knobs: drift (0.95), topicStay (0.9), hitterStay (0.9).
// (h) Needles. What: `needles` keys (round-robin over kv heads, not sinks,
//     not salient, clear of the last 1024 tokens), each with a feature of
//     its own (norm needleNorm) that exactly one later decode query (one
//     step, one q head) targets; that query's weight on it is solved from an
//     exact scan so the needle scores needleBoost logits above every other
//     key: rank 1 by construction. No other query (decode or prefill)
//     contains that feature. Recorded as { head, qHead, position, step }.
//     Knobs: needleBoost (3), needleNorm (6).
//
// Prefill queries (per kv head, tokens/16 rows by default, the group's q
// heads in turn, ascending positions) are drawn like decode queries at their
// own position, target the span they sit in (60%) or an earlier one, and
// only salient tokens before them: attention-aware indexes can learn the
// key neighbourhoods that decode queries will want, except the needles.
//
// Speed and determinism. Keys and values are produced in chunks of 2048
// tokens in f32 (Gaussians from a 65536-entry inverse-CDF table indexed by a
// xoshiro128** stream per (head, chunk, tensor); RoPE angles from a two-level
// cos/sin table, no trigonometry per token) and converted with the native
// `convert`; nothing is allocated per element. Every random stream is keyed
// by the seed and by what it draws, never by the order of work, so a seed
// always gives the same bytes.
import { bytesOf, convert, type KvDtype } from '../addon/kernels.js';

export interface WorkloadKnobs {
  ropeBase: number;
  ropeScaling: 'llama3' | 'none';
  sinks: number;
  sinkBoost: number;
  outlierPairs: number;
  outlierScale: number;
  recency: number;
  recentTopic: number;
  topics: number;
  spanMean: number;
  topicSpread: number;
  topicBoost: number;
  topicStay: number;
  salient: number;
  salientNorm: number;
  hitters: number;
  hitterBoost: number;
  hitterStay: number;
  queryShift: number;
  queryNoise: number;
  drift: number;
  needleBoost: number;
  needleNorm: number;
}

export interface WorkloadSpec {
  seed: number;
  tokens: number;
  kvHeads: number;
  qHeads: number;
  headDim: number;
  /** Decode steps (one query per q head each). */
  steps: number;
  /** Planted needles in all (round-robin over kv heads). */
  needles: number;
  /** Prefill query rows per kv head (default tokens/16). */
  prefillQueries?: number;
  dtype?: KvDtype;
  knobs?: Partial<WorkloadKnobs>;
}

export interface Needle {
  /** kv head whose keys hold it. */
  head: number;
  /** The one q head (global index) whose query at `step` targets it. */
  qHead: number;
  position: number;
  step: number;
}

export interface Workload {
  spec: Readonly<WorkloadSpec>;
  knobs: Readonly<WorkloadKnobs>;
  dtype: KvDtype;
  /** Softmax scale the knobs are calibrated for: 1/√headDim. */
  scale: number;
  /** Per kv head [tokens, headDim], storage dtype words, post-RoPE. */
  keys: Uint16Array[];
  /** Per kv head [tokens, headDim], storage dtype words. */
  values: Uint16Array[];
  /** Per kv head [rows, headDim] f32, post-RoPE; rows come from the group's q heads in turn. */
  prefillQ: Float32Array[];
  /** Per kv head [rows]: each prefill row's position (ascending); it may attend [0, position]. */
  prefillPos: Int32Array[];
  /** Per kv head [rows]: the global q head of each prefill row. */
  prefillHead: Int32Array[];
  /** Per step [qHeads, headDim] f32, post-RoPE at position tokens + step. */
  decodeQ: Float32Array[];
  needles: Needle[];
  /** Span i covers [spanStart[i], spanStart[i+1]) (the last ends at tokens); the sinks precede span 0. */
  spanStart: Int32Array;
  /** Topic of each span. */
  spanTopic: Int32Array;
  /** Per kv head [steps]: the span its group targets at each step. */
  decodeSpan: Int32Array[];
  /** Positions of the salient tokens (the heavy-hitter candidates), ascending, the same in every head. */
  salient: Int32Array;
}

/** The knobs for a context of `tokens`, defaults overridden by `over`. */
export function defaultKnobs(tokens: number, over: Partial<WorkloadKnobs> = {}): WorkloadKnobs {
  const ropeBase = over.ropeBase ?? 500000;
  // Boosts that must hold their share of attention as the bulk grows scale with ln(tokens).
  const L = Math.log(Math.max(tokens, 2));
  return {
    ropeBase,
    ropeScaling: ropeBase >= 100000 ? 'llama3' : 'none',
    sinks: 4,
    sinkBoost: L + 0.5,
    outlierPairs: 2,
    outlierScale: 10,
    recency: L - 2.5,
    recentTopic: 0.5,
    topics: 64,
    spanMean: 1024,
    topicSpread: 1.5,
    topicBoost: 2,
    topicStay: 0.9,
    salient: 1 / 256,
    salientNorm: 4,
    hitters: 3,
    hitterBoost: L - 2,
    hitterStay: 0.9,
    queryShift: 0.4,
    queryNoise: 0.4,
    drift: 0.95,
    needleBoost: 3,
    needleNorm: 4,
    ...over,
  };
}

// ---------------------------------------------------------------- randomness

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

// Stream tags: every stream is named by what it draws.
const S_HEAD = 1, S_KEYS = 2, S_VALUES = 3, S_SPANS = 4, S_NEEDLES = 5, S_DECODE = 6, S_PREFILL = 7, S_QHEAD = 8, S_SALIENT = 9;

// ---------------------------------------------------------------- RoPE

/** Angular frequency of each RoPE pair (Llama-3.1 scaling when asked). */
export function ropeFrequencies(headDim: number, base: number, scaling: 'llama3' | 'none'): Float64Array {
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

// ---------------------------------------------------------------- bands and per-head structure

/** Channel kinds. */
const FAST = 0, TOPIC = 1, FEATURE = 2, SLOW = 3;

interface Bands {
  half: number;
  /** Fast pairs [0, fast), semantic pairs [fast, slow0) (topic and feature in turn), slow [slow0, half). */
  fast: number;
  slow0: number;
  /** Kind of each channel. */
  kind: Uint8Array;
}

function bandsOf(d: number, outlierPairs: number): Bands {
  const half = d >> 1;
  const o = Math.max(1, Math.min(outlierPairs, half >> 3 || 1));
  const fast = Math.max(1, Math.min(half - o - 2, half >> 1));
  const slow0 = half - o;
  const kind = new Uint8Array(d);
  for (let p = 0; p < half; p++) {
    const kd = p < fast ? FAST : p >= slow0 ? SLOW : (p - fast) % 2 === 0 ? TOPIC : FEATURE;
    kind[p] = kind[p + half] = kd;
  }
  return { half, fast, slow0, kind };
}

// The slow band's query mean per channel; sinks are sized from it.
const QUERY_SLOW = 4;
// The fast band's key mean per pair (vector length); the query side is sized for `recency`.
const KEY_FAST = 2;
// Key mean in topic channels (std), and key noise std in slow and feature channels.
const KEY_TOPIC_MEAN = 0.3, SLOW_STD = 0.3, FEATURE_STD = 0.1;

interface HeadModel {
  keyMean: Float64Array; // pre-RoPE [d]
  keyStd: Float64Array; // per-channel noise std [d]
  centroids: Float64Array; // [topics, d], topic channels only
  centroidNorm: Float64Array; // [topics]
  valueMean: Float64Array; // [d]
  valueTopic: Float64Array; // [topics, d]
  sinkDir: Float64Array; // unit, pre-RoPE, slow band
  sinkCoef: number; // sink keys add sinkCoef · sinkDir
}

function headModel(seed: number, h: number, d: number, k: WorkloadKnobs, bands: Bands): HeadModel {
  const rng = new Rng(hash32(seed, S_HEAD, h));
  const { half, kind } = bands;
  const keyMean = new Float64Array(d), keyStd = new Float64Array(d);
  // Anisotropic noise: log-normal std per pair, mean variance 1 over the fast and topic channels.
  let sumVar = 0, nVar = 0;
  for (let p = 0; p < half; p++) {
    const kd = kind[p];
    const s = kd === SLOW ? SLOW_STD : kd === FEATURE ? FEATURE_STD : Math.exp(0.5 * rng.normal());
    keyStd[p] = keyStd[p + half] = s;
    if (kd === FAST || kd === TOPIC) {
      sumVar += 2 * s * s;
      nVar += 2;
    }
  }
  const norm = Math.sqrt(sumVar / nVar);
  for (let c = 0; c < d; c++) if (kind[c] === FAST || kind[c] === TOPIC) keyStd[c] /= norm;
  for (let p = 0; p < half; p++) {
    const kd = kind[p];
    if (kd === FAST) {
      const phi = 2 * Math.PI * rng.next();
      keyMean[p] = KEY_FAST * Math.cos(phi);
      keyMean[p + half] = KEY_FAST * Math.sin(phi);
    } else if (kd === TOPIC) {
      keyMean[p] = KEY_TOPIC_MEAN * rng.normal();
      keyMean[p + half] = KEY_TOPIC_MEAN * rng.normal();
    } else if (kd === SLOW) {
      keyMean[p] = (rng.next() < 0.5 ? -1 : 1) * k.outlierScale * (0.8 + 0.4 * rng.next());
      keyMean[p + half] = (rng.next() < 0.5 ? -1 : 1) * k.outlierScale * (0.8 + 0.4 * rng.next());
    }
  }
  const centroids = new Float64Array(k.topics * d), centroidNorm = new Float64Array(k.topics);
  for (let j = 0; j < k.topics; j++) {
    let n2 = 0;
    for (let c = 0; c < d; c++)
      if (kind[c] === TOPIC) {
        const x = k.topicSpread * keyStd[c] * rng.normal();
        centroids[j * d + c] = x;
        n2 += x * x;
      }
    centroidNorm[j] = Math.sqrt(n2);
  }
  const valueMean = new Float64Array(d), valueTopic = new Float64Array(k.topics * d);
  for (let c = 0; c < d; c++) valueMean[c] = 0.5 * rng.normal();
  for (let i = 0; i < valueTopic.length; i++) valueTopic[i] = rng.normal();
  // Sink direction: the queries' slow-band mean (which shares the outliers' signs).
  const sinkDir = new Float64Array(d);
  let s2 = 0;
  for (let c = 0; c < d; c++)
    if (kind[c] === SLOW) {
      sinkDir[c] = Math.sign(keyMean[c]) * QUERY_SLOW;
      s2 += sinkDir[c] * sinkDir[c];
    }
  const sNorm = Math.sqrt(s2);
  for (let c = 0; c < d; c++) sinkDir[c] /= sNorm;
  // A query's slow part is sNorm · sinkDir, so coef · sNorm / √d = sinkBoost.
  const sinkCoef = (k.sinkBoost * Math.sqrt(d)) / sNorm;
  return { keyMean, keyStd, centroids, centroidNorm, valueMean, valueTopic, sinkDir, sinkCoef };
}

/** A q head's mean, pre-RoPE [d]. */
function queryMean(seed: number, g: number, d: number, k: WorkloadKnobs, bands: Bands, hm: HeadModel): Float64Array {
  const rng = new Rng(hash32(seed, S_QHEAD, g));
  const { half, kind } = bands;
  const mean = new Float64Array(d);
  // Slow band: along the sink direction, sharing the outliers' signs.
  for (let c = 0; c < d; c++) if (kind[c] === SLOW) mean[c] = Math.sign(hm.keyMean[c]) * QUERY_SLOW;
  // Fast band: aligned with the keys' fast mean, sized so the bonus at distance 0 is `recency`.
  const qFast = (k.recency * Math.sqrt(d)) / (bands.fast * KEY_FAST * KEY_FAST);
  for (let p = 0; p < bands.fast; p++) {
    mean[p] = qFast * hm.keyMean[p];
    mean[p + half] = qFast * hm.keyMean[p + half];
  }
  // The out-of-distribution shift, in the topic channels only (in the fast
  // band it would beat against the keys' rotating mean and paint periodic
  // bumps over positions; feature channels stay for targeted retrieval):
  // random, weighted towards channels where keys vary least, scaled to a
  // logit std of `queryShift` against the keys' noise.
  const shift = new Float64Array(d);
  let v = 0;
  for (let c = 0; c < d; c++)
    if (kind[c] === TOPIC) {
      shift[c] = rng.normal() / hm.keyStd[c];
      v += (shift[c] * hm.keyStd[c]) ** 2;
    }
  const a = v > 0 ? (k.queryShift * Math.sqrt(d)) / Math.sqrt(v) : 0;
  for (let c = 0; c < d; c++) mean[c] += a * shift[c];
  return mean;
}

// ---------------------------------------------------------------- layout

function makeSpans(seed: number, tokens: number, sinks: number, k: WorkloadKnobs): { start: Int32Array; topic: Int32Array } {
  const rng = new Rng(hash32(seed, S_SPANS));
  const starts: number[] = [], topics: number[] = [];
  const minLen = Math.min(16, k.spanMean);
  let t = sinks, prev = -1;
  while (t < tokens) {
    const len = Math.max(1, Math.round(minLen - Math.log(1 - rng.next()) * Math.max(k.spanMean - minLen, 1)));
    let topic = rng.int(k.topics);
    if (k.topics > 1 && topic === prev) topic = (topic + 1 + rng.int(k.topics - 1)) % k.topics;
    starts.push(t);
    topics.push(topic);
    prev = topic;
    t += len;
  }
  return { start: Int32Array.from(starts), topic: Int32Array.from(topics) };
}

/** Index of the span holding token t (0 for t before the first span). */
export function spanOf(spanStart: Int32Array, t: number): number {
  let lo = 0, hi = spanStart.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (spanStart[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** First index i of the ascending array a with a[i] ≥ x. */
function lowerBound(a: Int32Array, x: number): number {
  let lo = 0, hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Positions of the salient tokens (ascending), the same in every head; never sinks. */
function salientPositions(seed: number, tokens: number, sinks: number, fraction: number): Int32Array {
  const limit = Math.max(0, Math.min(1, fraction)) * 4294967296;
  const out: number[] = [];
  for (let t = sinks; t < tokens; t++) if (hash32(seed, S_SALIENT, t) < limit) out.push(t);
  return Int32Array.from(out);
}

/** Unit random direction over the feature channels (pre-RoPE) from stream `key`, into out. */
function featureDir(key: number, kind: Uint8Array, out: Float64Array): void {
  const rng = new Rng(key);
  let n2 = 0;
  for (let c = 0; c < out.length; c++) {
    const x = kind[c] === FEATURE ? rng.normal() : 0;
    out[c] = x;
    n2 += x * x;
  }
  const inv = n2 > 0 ? 1 / Math.sqrt(n2) : 0;
  for (let c = 0; c < out.length; c++) out[c] *= inv;
}

// ---------------------------------------------------------------- rows

/** Post-RoPE key rows of one head for tokens [t0, t0 + n) into out (f32). */
function keyRows(
  out: Float32Array,
  noise: Float32Array,
  t0: number,
  n: number,
  d: number,
  sinks: number,
  cosT: Float64Array,
  sinT: Float64Array,
  hm: HeadModel,
  spanStart: Int32Array,
  spanTopic: Int32Array,
  salient: Int32Array,
  salientNorm: number,
  salientKey: (t: number) => number,
  kind: Uint8Array,
  dir: Float64Array,
): void {
  const half = d >> 1, nSpans = spanStart.length;
  const { keyMean, keyStd, centroids, sinkDir, sinkCoef } = hm;
  let s = spanOf(spanStart, t0), si = lowerBound(salient, t0);
  for (let i = 0; i < n; i++) {
    const t = t0 + i, row = i * d, rt = i * half;
    if (t < sinks) {
      for (let p = 0; p < half; p++) {
        const q = p + half;
        const x = keyMean[p] + sinkCoef * sinkDir[p] + SLOW_STD * noise[row + p];
        const y = keyMean[q] + sinkCoef * sinkDir[q] + SLOW_STD * noise[row + q];
        const cs = cosT[rt + p], sn = sinT[rt + p];
        out[row + p] = x * cs - y * sn;
        out[row + q] = y * cs + x * sn;
      }
      continue;
    }
    while (s + 1 < nSpans && spanStart[s + 1] <= t) s++;
    const cb = spanTopic[s] * d;
    let g = 0;
    if (si < salient.length && salient[si] === t) {
      featureDir(salientKey(t), kind, dir);
      g = salientNorm;
      si++;
    }
    for (let p = 0; p < half; p++) {
      const q = p + half;
      let x = keyMean[p] + centroids[cb + p] + keyStd[p] * noise[row + p];
      let y = keyMean[q] + centroids[cb + q] + keyStd[q] * noise[row + q];
      if (g !== 0) {
        x += g * dir[p];
        y += g * dir[q];
      }
      const cs = cosT[rt + p], sn = sinT[rt + p];
      out[row + p] = x * cs - y * sn;
      out[row + q] = y * cs + x * sn;
    }
  }
}

/** Value rows of one head for tokens [t0, t0 + n) into out (f32). */
function valueRows(out: Float32Array, noise: Float32Array, t0: number, n: number, d: number, sinks: number, hm: HeadModel, spanStart: Int32Array, spanTopic: Int32Array): void {
  const nSpans = spanStart.length;
  const { valueMean, valueTopic } = hm;
  let s = spanOf(spanStart, t0);
  for (let i = 0; i < n; i++) {
    const t = t0 + i, row = i * d;
    if (t < sinks) {
      for (let c = 0; c < d; c++) out[row + c] = 0.1 * (valueMean[c] + noise[row + c]);
      continue;
    }
    while (s + 1 < nSpans && spanStart[s + 1] <= t) s++;
    const vb = spanTopic[s] * d;
    for (let c = 0; c < d; c++) out[row + c] = valueMean[c] + valueTopic[vb + c] + noise[row + c];
  }
}

/**
 * For each needle j: w[j] = max over rows t ≠ pos[j] of (a_t − ap + margin)/(bp − b_t),
 * a = q·k over all channels, b = r·k over the semantic pairs [s0, s1) (where r lives).
 */
function needleWeights(
  rows: Float32Array,
  n: number,
  d: number,
  s0: number,
  s1: number,
  qs: Float32Array,
  rs: Float32Array,
  m: number,
  t0: number,
  pos: Int32Array,
  ap: Float64Array,
  bp: Float64Array,
  margin: number,
  w: Float64Array,
): void {
  const half = d >> 1;
  for (let i = 0; i < n; i++) {
    const base = i * d, t = t0 + i;
    for (let j = 0; j < m; j++) {
      if (t === pos[j]) continue;
      const qb = j * d;
      let a = 0, b = 0;
      for (let c = 0; c < d; c++) a += qs[qb + c] * rows[base + c];
      for (let c = s0; c < s1; c++) b += rs[qb + c] * rows[base + c] + rs[qb + c + half] * rows[base + c + half];
      const need = a - ap[j] + margin;
      if (need > 0) w[j] = Math.max(w[j], bp[j] > b ? need / (bp[j] - b) : Infinity);
    }
  }
}

// ---------------------------------------------------------------- generation

const CHUNK = 2048;
/** Needles keep clear of the last tokens (a recent window reads those anyway). */
const NEEDLE_AWAY = 1024;

function validate(spec: WorkloadSpec): void {
  const ints: [string, number, number][] = [
    ['tokens', spec.tokens, 16],
    ['kvHeads', spec.kvHeads, 1],
    ['qHeads', spec.qHeads, 1],
    ['headDim', spec.headDim, 16],
    ['steps', spec.steps, 0],
    ['needles', spec.needles, 0],
  ];
  for (const [name, v, lo] of ints)
    if (!Number.isInteger(v) || v < lo) throw new RangeError(`workload: ${name} must be an integer ≥ ${lo}, got ${v}`);
  if (spec.qHeads % spec.kvHeads !== 0) throw new RangeError('workload: qHeads must be a multiple of kvHeads');
  if (spec.headDim % 2 !== 0) throw new RangeError('workload: headDim must be even');
  if (spec.needles > 0 && spec.steps === 0) throw new RangeError('workload: needles need decode steps');
  if (spec.prefillQueries !== undefined && !(Number.isInteger(spec.prefillQueries) && spec.prefillQueries >= 0))
    throw new RangeError('workload: prefillQueries must be a non-negative integer');
}

export function generateWorkload(spec: WorkloadSpec, onProgress?: (fraction: number) => void): Workload {
  validate(spec);
  const { seed, tokens, kvHeads, qHeads, headDim: d, steps } = spec;
  const dtype: KvDtype = spec.dtype ?? 'f16';
  const k = defaultKnobs(tokens, spec.knobs);
  const G = qHeads / kvHeads;
  const bands = bandsOf(d, k.outlierPairs);
  const { half, kind } = bands;
  const rope = new RopeTable(ropeFrequencies(d, k.ropeBase, k.ropeScaling), tokens + steps + 1);
  const sinks = Math.max(0, Math.min(k.sinks, tokens - 1));
  const heads = Array.from({ length: kvHeads }, (_, h) => headModel(seed, h, d, k, bands));
  const qMeans = Array.from({ length: qHeads }, (_, g) => queryMean(seed, g, d, k, bands, heads[Math.floor(g / G)]));
  const spans = makeSpans(seed, tokens, sinks, k);
  const nSpans = spans.start.length;
  const spanEnd = (s: number) => (s + 1 < nSpans ? spans.start[s + 1] : tokens);
  const salient = salientPositions(seed, tokens, sinks, k.salient);
  const isSalient = (t: number) => {
    const i = lowerBound(salient, t);
    return i < salient.length && salient[i] === t;
  };
  const salientKey = (h: number, t: number) => hash32(seed, S_SALIENT, h, t);
  const prefillRows = spec.prefillQueries ?? Math.floor(tokens / 16);
  // Progress: key/value chunks, then one unit per kv head of queries.
  const totalWork = Math.ceil(tokens / CHUNK) + kvHeads;
  let done = 0;
  const tick = () => onProgress?.(++done / totalWork);

  // Needles: positions (not sinks, not salient, clear of the end), steps, q heads, feature directions.
  const needleRng = new Rng(hash32(seed, S_NEEDLES));
  const lo = sinks, hi = Math.max(lo + 1, tokens - NEEDLE_AWAY);
  const needles: Needle[] = [];
  const needleDir: Float64Array[] = [];
  const taken = new Set<number>();
  for (let n = 0; n < spec.needles; n++) {
    const head = n % kvHeads;
    const bad = (t: number) => taken.has(head * tokens + t) || isSalient(t);
    let position = lo + needleRng.int(hi - lo);
    for (let tries = 0; bad(position) && tries < 1000; tries++) position = lo + needleRng.int(hi - lo);
    if (bad(position)) throw new RangeError('workload: too few tokens for the needles');
    taken.add(head * tokens + position);
    // One needle per (step, q head): a query targets at most one needle.
    let qHead = head * G + needleRng.int(G), step = needleRng.int(steps);
    for (let tries = 0; needles.some((x) => x.qHead === qHead && x.step === step); tries++) {
      if (tries > 1000) throw new RangeError('workload: too many needles for the decode steps');
      qHead = head * G + needleRng.int(G);
      step = needleRng.int(steps);
    }
    needles.push({ head, qHead, position, step });
    const dir = new Float64Array(d);
    featureDir(needleRng.u32(), kind, dir);
    needleDir.push(dir);
  }

  // Keys and values, chunk by chunk.
  const keys = Array.from({ length: kvHeads }, () => new Uint16Array(tokens * d));
  const values = Array.from({ length: kvHeads }, () => new Uint16Array(tokens * d));
  const cosT = new Float64Array(CHUNK * half), sinT = new Float64Array(CHUNK * half);
  const noise = new Float32Array(CHUNK * d), out = new Float32Array(CHUNK * d), scratch = new Float64Array(d);
  for (let t0 = 0, chunk = 0; t0 < tokens; t0 += CHUNK, chunk++) {
    const n = Math.min(CHUNK, tokens - t0);
    for (let i = 0; i < n; i++) rope.angles(t0 + i, cosT, sinT, i * half);
    for (let h = 0; h < kvHeads; h++) {
      fillNormals(noise, n * d, hash32(seed, S_KEYS, h, chunk));
      keyRows(out, noise, t0, n, d, sinks, cosT, sinT, heads[h], spans.start, spans.topic, salient, k.salientNorm, (t) => salientKey(h, t), kind, scratch);
      convert(bytesOf(out.subarray(0, n * d)), 'f32', bytesOf(keys[h].subarray(t0 * d, (t0 + n) * d)), dtype, n * d);
      fillNormals(noise, n * d, hash32(seed, S_VALUES, h, chunk));
      valueRows(out, noise, t0, n, d, sinks, heads[h], spans.start, spans.topic);
      convert(bytesOf(out.subarray(0, n * d)), 'f32', bytesOf(values[h].subarray(t0 * d, (t0 + n) * d)), dtype, n * d);
    }
    tick();
  }
  // Plant needleNorm · R(p)·dir into each needle's stored key (rounded once more).
  const decodeTable = new Float32Array(65536);
  {
    const codes = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) codes[i] = i;
    convert(bytesOf(codes), dtype, bytesOf(decodeTable), 'f32', 65536);
  }
  const one = new Float32Array(d), oneBits = new Uint16Array(d), rot = new Float64Array(d);
  needles.forEach((nd, i) => {
    const kb = keys[nd.head], at = nd.position * d;
    rope.rotate(needleDir[i], rot, nd.position);
    for (let c = 0; c < d; c++) one[c] = decodeTable[kb[at + c]] + k.needleNorm * rot[c];
    convert(bytesOf(one), 'f32', bytesOf(oneBits), dtype, d);
    kb.set(oneBits, at);
  });

  // Query parts.
  const dir = new Float64Array(d);
  /** A salient token of span s below `limit`, or -1. */
  const pickIn = (rng: Rng, s: number, limit: number): number => {
    const i0 = lowerBound(salient, spans.start[s]), i1 = lowerBound(salient, Math.min(spanEnd(s), limit));
    return i1 > i0 ? salient[i0 + rng.int(i1 - i0)] : -1;
  };
  // Span-targeting part per (head, span): the topic centroid rotated to the
  // span's middle, weighted for topicBoost logits on the span's keys; cached.
  const topicCache = new Map<number, Float64Array>();
  const addTopic = (h: number, s: number, q: Float64Array): void => {
    let part = topicCache.get(h * nSpans + s);
    if (!part) {
      const hm = heads[h], topic = spans.topic[s], nc = hm.centroidNorm[topic];
      part = new Float64Array(d);
      if (nc > 0) {
        rope.rotate(hm.centroids.subarray(topic * d, (topic + 1) * d), part, (spans.start[s] + spanEnd(s) - 1) >> 1);
        const w = (k.topicBoost * Math.sqrt(d)) / (nc * nc);
        for (let c = 0; c < d; c++) part[c] *= w;
      }
      if (topicCache.size >= 4096) topicCache.clear();
      topicCache.set(h * nSpans + s, part);
    }
    for (let c = 0; c < d; c++) q[c] += part[c];
  };
  // Heavy hitter: hitterBoost logits on salient token t through its feature direction.
  const hitterW = (k.hitterBoost * Math.sqrt(d)) / k.salientNorm;
  const addHitter = (h: number, t: number, q: Float64Array): void => {
    featureDir(salientKey(h, t), kind, dir);
    rope.rotate(dir, rot, t);
    for (let c = 0; c < d; c++) q[c] += hitterW * rot[c];
  };

  // Decode queries.
  const decodeQ = Array.from({ length: steps }, () => new Float32Array(qHeads * d));
  const decodeSpan = Array.from({ length: kvHeads }, () => new Int32Array(steps));
  const q = new Float64Array(d), qr = new Float64Array(d);
  const rho = k.drift, innov = Math.sqrt(Math.max(0, 1 - rho * rho));
  for (let h = 0; h < kvHeads; h++) {
    const rng = new Rng(hash32(seed, S_DECODE, h));
    const xi = Array.from({ length: G }, () => new Float64Array(d));
    let span = -1;
    const hitters = new Int32Array(k.hitters).fill(-1);
    const newSpan = (): number =>
      rng.next() < k.recentTopic ? Math.max(0, nSpans - 1 - rng.int(Math.min(8, nSpans))) : rng.int(nSpans);
    for (let st = 0; st < steps; st++) {
      if (span < 0 || rng.next() >= k.topicStay) {
        span = newSpan();
        for (let j = 0; j < hitters.length; j++) hitters[j] = pickIn(rng, span, tokens);
      } else {
        for (let j = 0; j < hitters.length; j++) if (rng.next() >= k.hitterStay) hitters[j] = pickIn(rng, span, tokens);
      }
      decodeSpan[h][st] = span;
      for (let gi = 0; gi < G; gi++) {
        const g = h * G + gi, x = xi[gi], mean = qMeans[g];
        for (let c = 0; c < d; c++) {
          if (kind[c] !== TOPIC) continue;
          const z = rng.normal() * k.queryNoise;
          x[c] = st === 0 ? z : rho * x[c] + innov * z;
        }
        for (let c = 0; c < d; c++) q[c] = mean[c] + x[c];
        rope.rotate(q, qr, tokens + st);
        addTopic(h, span, qr);
        for (let j = 0; j < hitters.length; j++) if (hitters[j] >= 0 && (j === 0 || !hitters.subarray(0, j).includes(hitters[j]))) addHitter(h, hitters[j], qr);
        decodeQ[st].set(qr, g * d);
      }
    }
  }

  // Needle queries: add w·R(p)dir to the targeting row, with w solved from an
  // exact scan of the head's keys so that key p beats every other key by
  // needleBoost logits: w·(b_p − b_t) ≥ a_t − a_p + margin, where a = q·k and
  // b = R(p)dir·k. One pass per kv head over its keys, widened in chunks.
  for (let h = 0; h < kvHeads; h++) {
    const mine = needles.map((nd, i) => ({ nd, i })).filter((x) => x.nd.head === h);
    const m = mine.length;
    if (m === 0) continue;
    const qs = new Float32Array(m * d), rs = new Float32Array(m * d), pos = new Int32Array(m);
    const ap = new Float64Array(m), bp = new Float64Array(m), w = new Float64Array(m);
    const kb = keys[h];
    mine.forEach(({ nd, i }, j) => {
      qs.set(decodeQ[nd.step].subarray(nd.qHead * d, (nd.qHead + 1) * d), j * d);
      rope.rotate(needleDir[i], rot, nd.position);
      rs.set(rot, j * d);
      pos[j] = nd.position;
      for (let c = 0; c < d; c++) {
        const x = decodeTable[kb[nd.position * d + c]];
        ap[j] += qs[j * d + c] * x;
        bp[j] += rs[j * d + c] * x;
      }
    });
    const margin = (k.needleBoost + 0.05) * Math.sqrt(d);
    const wide = new Float32Array(CHUNK * d);
    for (let t0 = 0; t0 < tokens; t0 += CHUNK) {
      const n = Math.min(CHUNK, tokens - t0);
      convert(bytesOf(kb.subarray(t0 * d, (t0 + n) * d)), dtype, bytesOf(wide), 'f32', n * d);
      needleWeights(wide, n, d, bands.fast, bands.slow0, qs, rs, m, t0, pos, ap, bp, margin, w);
    }
    mine.forEach(({ nd }, j) => {
      if (!Number.isFinite(w[j])) throw new Error(`workload: the needle at ${nd.position} cannot be made top-1`);
      const o = decodeQ[nd.step].subarray(nd.qHead * d, (nd.qHead + 1) * d);
      for (let c = 0; c < d; c++) o[c] = qs[j * d + c] + w[j] * rs[j * d + c];
    });
  }

  // Prefill query rows: ascending positions, the group's heads in turn; each
  // targets the span it sits in (60%) or an earlier one, causally.
  const prefillQ: Float32Array[] = [], prefillPos: Int32Array[] = [], prefillHead: Int32Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const rng = new Rng(hash32(seed, S_PREFILL, h));
    const Q = new Float32Array(prefillRows * d), P = new Int32Array(prefillRows), H = new Int32Array(prefillRows);
    for (let r = 0; r < prefillRows; r++) {
      const pos = Math.min(tokens - 1, Math.floor(((r + rng.next()) * tokens) / prefillRows));
      const g = h * G + (r % G), mean = qMeans[g];
      P[r] = pos;
      H[r] = g;
      for (let c = 0; c < d; c++) q[c] = mean[c] + (kind[c] === TOPIC ? k.queryNoise * rng.normal() : 0);
      rope.rotate(q, qr, pos);
      if (nSpans > 0 && pos >= spans.start[0]) {
        const here = spanOf(spans.start, pos);
        const s = rng.next() < 0.6 ? here : rng.int(here + 1);
        addTopic(h, s, qr);
        let last = -1;
        for (let j = 0; j < k.hitters; j++) {
          const t = pickIn(rng, s, pos + 1);
          if (t >= 0 && t !== last) addHitter(h, t, qr);
          last = t;
        }
      }
      Q.set(qr, r * d);
    }
    prefillQ.push(Q);
    prefillPos.push(P);
    prefillHead.push(H);
    tick();
  }

  return {
    spec: { ...spec },
    knobs: k,
    dtype,
    scale: 1 / Math.sqrt(d),
    keys,
    values,
    prefillQ,
    prefillPos,
    prefillHead,
    decodeQ,
    needles,
    spanStart: spans.start,
    spanTopic: spans.topic,
    decodeSpan,
    salient,
  };
}
