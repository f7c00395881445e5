// Seeded, deterministic synthetic attention workloads for one layer (all kv
// heads): keys and values in storage dtype, prefill query rows, decode query
// steps and planted needles. Random Gaussian keys are too easy and too unlike
// real ones (DESIGN.md, "Workloads"); this generator reproduces, each behind
// its own knob (WorkloadKnobs), the structure real K/V/Q show.
//
// Geometry. Every tensor this emits is as the LLM server would push it:
// keys and queries already rotated by RoPE. A head's channels come in RoPE
// pairs (c, c + d/2) (the "rotate-half" layout of HF Llama); pair p turns by
// θ_p = base^(-2p/d) radians per position (base 500000 with Llama-3.1's
// frequency scaling by default, or 10000 unscaled). The pairs form three
// bands, which is where real heads keep these things:
//   fast      p < d/4               high frequencies: position patterns (recency)
//   semantic  d/4 ≤ p < d/2 − o     low frequencies: content (topics), stable over a span
//   slow      the last o pairs      the slowest: outlier channels and the sink direction
// Scores are logits, q·k/√d. Key noise has unit variance per channel on
// average (a random anisotropic spectrum, log-normal per pair), so a unit
// query direction moves logits by about 1/√d per unit of norm; the knobs
// below are therefore stated in logits wherever possible.
//
// (a) Attention sinks. What: the first `sinks` tokens take a large share of
//     every query's mass. Why: real models park surplus attention on the
//     first tokens (StreamingLLM). How: sink keys get a component along the
//     queries' mean direction in the slow pairs (which barely rotate, so it
//     holds at any distance), sized to score `sinkBoost` logits above an
//     ordinary key; sink values are small (a sink is a no-op). Knobs:
//     sinks (4), sinkBoost (ln(tokens) + 1: the bulk's log-partition grows as
//     ln(tokens), so the share stays comparable across context lengths).
// (b) Outlier key channels. What: the 2·outlierPairs channels of the slowest
//     pairs (channels d/2−o..d/2−1 and d−o..d−1) carry large fixed-sign
//     values in every key, with small variance. Why: real Llama keys show a
//     few massive, fixed-sign channels in RoPE's slow frequencies. Queries
//     share the signs (a big but token-independent logit; it drifts only as
//     the slow pairs turn). Knobs: outlierPairs (2), outlierScale (10: the
//     channel mean in units of the ordinary key channel std).
// (c) RoPE by position. What: keys are rotated at their position, decode
//     queries at tokens + step, prefill queries at their row's position.
//     Why: servers push post-RoPE K and Q; rotation makes post-RoPE keys of
//     nearby positions alike (a key-space neighbour is often a positional
//     neighbour, not a semantic one). Knobs: ropeBase (500000),
//     ropeScaling ('llama3' for base ≥ 100000, else 'none').
// (d) Queries out of distribution. What: queries have their own mean (a
//     per-head shift in directions the keys' mean lacks) and scale, so
//     query–key cosines are far from key–key cosines and a key's nearest
//     keys are not the keys a query ranks highest. Why: RetrievalAttention
//     measured Q and K as different distributions; key-only ANN graphs then
//     need to scan much of the index. Knobs: queryShift (logit std across
//     keys that the shift alone produces, 1.0), queryNoise (logit std of the
//     query's own per-step noise, 0.8).
// (e) Clustered content. What: after the sinks the context is a sequence
//     of spans (geometric lengths, mean spanMean) each drawn from a pool of
//     `topics`; a key is its topic's centroid (semantic band) plus noise, so
//     keys cluster by topic and the clusters are contiguous in position.
//     Decode and prefill queries target one span at a time (topicBoost
//     logits for its keys), plus a few specific tokens in it ("heavy
//     hitters": hitters per step, hitterBoost logits each). Values carry a
//     per-topic mean too. Knobs: topics (64), spanMean (1024), topicSpread
//     (1.0: centroid std per semantic channel), topicBoost (3), hitters (4),
//     hitterBoost (4).
// (f) Recency. What: decode queries favour the last few hundred tokens.
//     Why: local attention is the commonest head pattern. How: keys and
//     queries share a mean in the fast pairs, so q·k is largest at small
//     distance and decays about logarithmically as the fast pairs' phases
//     spread (RoPE's long-term decay); new target spans are also drawn from
//     the last 8 spans with probability recentTopic. Knobs: recency (bonus at
//     distance 0 in logits, 4), recentTopic (0.5).
// (g) Temporal locality. What: consecutive decode queries attend similar
//     tokens. How: the per-head query noise follows AR(1) across steps with
//     coefficient `drift` (0.95); the target span persists with probability
//     topicStay (0.9) and each heavy hitter with hitterStay (0.9). Decode
//     queries come from positions tokens + step, so the fast pairs still
//     turn between steps, as in a real model.
// (h) Needles. What: `needles` keys (spread over kv heads, away from the
//     sinks and the last 1024 tokens), each with a planted random direction
//     of norm needleNorm that exactly one later decode query (one step, one
//     q head of the group) matches, needleBoost logits above a sink. No other
//     query (decode or prefill) contains that direction. Recorded as
//     { head, qHead, position, step }. Knobs: needleBoost (3), needleNorm (16).
//
// Speed and determinism. Keys and values are produced in chunks of 2048
// tokens in f32 (Gaussians from a 65536-entry inverse-CDF table indexed by a
// xoshiro128** stream per (head, chunk, tensor), the RoPE table shared by all
// heads of a chunk) and converted with the native `convert`; nothing is
// allocated per element. Every random stream is keyed by the seed and by what
// it generates, never by the order of work, so a seed gives the same bytes.
import { bytesOf, convert, type KvDtype } from '../native/index.js';

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
  /** Planted needles in all (spread round-robin over kv heads). */
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
  /** Per kv head [rows, headDim] f32, post-RoPE; rows from the group's q heads. */
  prefillQ: Float32Array[];
  /** Per kv head [rows]: each prefill row's position (ascending); it may attend [0, position]. */
  prefillPos: Int32Array[];
  /** Per kv head [rows]: the global q head each prefill row came from. */
  prefillHead: Int32Array[];
  /** Per step [qHeads, headDim] f32, post-RoPE at position tokens + step. */
  decodeQ: Float32Array[];
  needles: Needle[];
  /** Span i covers [spanStart[i], spanStart[i+1]) (the last one ends at tokens); sinks precede span 0. */
  spanStart: Int32Array;
  /** Topic of each span. */
  spanTopic: Int32Array;
  /** Per kv head [steps]: the span that head's group targets at each step. */
  decodeSpan: Int32Array[];
}

/** Defaults for a context of `tokens` (see the comment block at the top). */
export function defaultKnobs(tokens: number, over: Partial<WorkloadKnobs> = {}): WorkloadKnobs {
  const ropeBase = over.ropeBase ?? 500000;
  return {
    ropeBase,
    ropeScaling: ropeBase >= 100000 ? 'llama3' : 'none',
    sinks: 4,
    sinkBoost: Math.log(Math.max(tokens, 2)) + 1,
    outlierPairs: 2,
    outlierScale: 10,
    recency: 4,
    recentTopic: 0.5,
    topics: 64,
    spanMean: 1024,
    topicSpread: 1,
    topicBoost: 3,
    topicStay: 0.9,
    hitters: 4,
    hitterBoost: 4,
    hitterStay: 0.9,
    queryShift: 1,
    queryNoise: 0.8,
    drift: 0.95,
    needleBoost: 3,
    needleNorm: 16,
    ...over,
  };
}

// ---------------------------------------------------------------- randomness

/** 32-bit mix of a seed and stream keys (splitmix-style), deterministic. */
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

/** xoshiro128** seeded from a 32-bit key; for the non-hot paths. */
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

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** Fills out[0..n) with standard normals from the stream `key` (two per 32-bit draw). */
export function fillNormals(out: Float32Array, n: number, key: number): void {
  let a = hash32(key, 1), b = hash32(key, 2), c = hash32(key, 3), d = hash32(key, 4) | 1;
  const T = NORMAL_TABLE;
  let i = 0;
  for (; i < n; i += 2) {
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

// Stream tags (second hash part), so every stream is named by what it draws.
const S_HEAD = 1, S_KEYS = 2, S_VALUES = 3, S_SPANS = 4, S_NEEDLES = 5, S_DECODE = 6, S_PREFILL = 7, S_QHEAD = 8;

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

/** Rotates src (pre-RoPE, length d) to position `pos` into dst (dst may equal src). */
export function rotate(src: ArrayLike<number>, dst: Float64Array | Float32Array, freq: Float64Array, pos: number): void {
  const half = freq.length;
  for (let p = 0; p < half; p++) {
    const ang = pos * freq[p], cs = Math.cos(ang), sn = Math.sin(ang);
    const x = src[p], y = src[p + half];
    dst[p] = x * cs - y * sn;
    dst[p + half] = y * cs + x * sn;
  }
}

// ---------------------------------------------------------------- per-head structure

interface HeadModel {
  /** Key mean, pre-RoPE [d]. */
  keyMean: Float64Array;
  /** Per-channel key noise std [d]. */
  keyStd: Float64Array;
  /** Topic centroids, pre-RoPE [topics, d] (semantic band only). */
  centroids: Float64Array;
  /** Norm of each centroid. */
  centroidNorm: Float64Array;
  /** Value mean [d] and per-topic value means [topics, d]. */
  valueMean: Float64Array;
  valueTopic: Float64Array;
  /** Unit sink direction, pre-RoPE [d] (slow band), and its key coefficient. */
  sinkDir: Float64Array;
  sinkCoef: number;
}

interface QHeadModel {
  /** Query mean, pre-RoPE [d]. */
  mean: Float64Array;
}

interface Bands {
  half: number;
  fast: number; // pairs [0, fast)
  slow0: number; // slow pairs [slow0, half)
}

function bandsOf(d: number, outlierPairs: number): Bands {
  const half = d >> 1;
  const o = Math.max(1, Math.min(outlierPairs, half >> 2));
  return { half, fast: Math.max(1, half >> 1), slow0: half - o };
}

const inBand = (b: Bands, c: number, band: 'fast' | 'semantic' | 'slow'): boolean => {
  const p = c < b.half ? c : c - b.half;
  if (band === 'fast') return p < b.fast;
  if (band === 'slow') return p >= b.slow0;
  return p >= b.fast && p < b.slow0;
};

// The slow band's query mean per channel; sinks and outliers are sized from it.
const QUERY_SLOW = 4;
// The fast band's key mean per pair (vector length); the query side is sized for `recency`.
const KEY_FAST = 1;
// Small random key mean in the semantic band, and the noise std in the slow band.
const KEY_SEMANTIC_MEAN = 0.3, SLOW_STD = 0.3;

function headModel(seed: number, h: number, d: number, k: WorkloadKnobs, bands: Bands): HeadModel {
  const rng = new Rng(hash32(seed, S_HEAD, h));
  const { half } = bands;
  const keyMean = new Float64Array(d), keyStd = new Float64Array(d);
  // Anisotropic noise: log-normal std per pair, mean variance 1 over fast + semantic.
  let sumVar = 0, nVar = 0;
  for (let p = 0; p < half; p++) {
    const s = p >= bands.slow0 ? SLOW_STD : Math.exp(0.5 * rng.normal());
    keyStd[p] = keyStd[p + half] = s;
    if (p < bands.slow0) {
      sumVar += 2 * s * s;
      nVar += 2;
    }
  }
  const norm = Math.sqrt(sumVar / nVar);
  for (let p = 0; p < bands.slow0; p++) {
    keyStd[p] /= norm;
    keyStd[p + half] /= norm;
  }
  for (let p = 0; p < half; p++) {
    if (p < bands.fast) {
      const phi = 2 * Math.PI * rng.next();
      keyMean[p] = KEY_FAST * Math.cos(phi);
      keyMean[p + half] = KEY_FAST * Math.sin(phi);
    } else if (p < bands.slow0) {
      keyMean[p] = KEY_SEMANTIC_MEAN * rng.normal();
      keyMean[p + half] = KEY_SEMANTIC_MEAN * rng.normal();
    } else {
      // Outliers: large fixed-sign channels.
      keyMean[p] = (rng.next() < 0.5 ? -1 : 1) * k.outlierScale * (0.8 + 0.4 * rng.next());
      keyMean[p + half] = (rng.next() < 0.5 ? -1 : 1) * k.outlierScale * (0.8 + 0.4 * rng.next());
    }
  }
  const centroids = new Float64Array(k.topics * d), centroidNorm = new Float64Array(k.topics);
  for (let j = 0; j < k.topics; j++) {
    let n2 = 0;
    for (let c = 0; c < d; c++)
      if (inBand(bands, c, 'semantic')) {
        const x = k.topicSpread * rng.normal();
        centroids[j * d + c] = x;
        n2 += x * x;
      }
    centroidNorm[j] = Math.sqrt(n2);
  }
  const valueMean = new Float64Array(d), valueTopic = new Float64Array(k.topics * d);
  for (let c = 0; c < d; c++) valueMean[c] = 0.5 * rng.normal();
  for (let i = 0; i < valueTopic.length; i++) valueTopic[i] = rng.normal();
  // Sink direction: the queries' slow-band mean, which shares the outliers' signs.
  const sinkDir = new Float64Array(d);
  let s2 = 0;
  for (let c = 0; c < d; c++)
    if (inBand(bands, c, 'slow')) {
      sinkDir[c] = Math.sign(keyMean[c]) * QUERY_SLOW;
      s2 += sinkDir[c] * sinkDir[c];
    }
  const sNorm = Math.sqrt(s2);
  for (let c = 0; c < d; c++) sinkDir[c] /= sNorm;
  // q·(coef·sinkDir)/√d = sinkBoost with q's slow part = sNorm·sinkDir.
  const sinkCoef = (k.sinkBoost * Math.sqrt(d)) / sNorm;
  return { keyMean, keyStd, centroids, centroidNorm, valueMean, valueTopic, sinkDir, sinkCoef };
}

function qHeadModel(seed: number, g: number, d: number, k: WorkloadKnobs, bands: Bands, hm: HeadModel): QHeadModel {
  const rng = new Rng(hash32(seed, S_QHEAD, g));
  const { half } = bands;
  const mean = new Float64Array(d);
  // Slow band: the sink direction at the sink scale (shares the outliers' signs).
  for (let c = 0; c < d; c++) if (inBand(bands, c, 'slow')) mean[c] = Math.sign(hm.keyMean[c]) * QUERY_SLOW;
  // Fast band: aligned with the keys' fast mean, sized so the distance-0 bonus is `recency`.
  const qFast = (k.recency * Math.sqrt(d)) / (bands.fast * KEY_FAST * KEY_FAST);
  for (let p = 0; p < bands.fast; p++) {
    mean[p] = qFast * hm.keyMean[p];
    mean[p + half] = qFast * hm.keyMean[p + half];
  }
  // The out-of-distribution shift: a random direction over fast + semantic
  // channels, weighted away from where keys vary most, with logit std
  // `queryShift` across keys.
  const shift = new Float64Array(d);
  let v = 0;
  for (let c = 0; c < d; c++)
    if (!inBand(bands, c, 'slow')) {
      shift[c] = rng.normal() / hm.keyStd[c];
      v += shift[c] * shift[c] * hm.keyStd[c] * hm.keyStd[c];
    }
  const a = (k.queryShift * Math.sqrt(d)) / Math.sqrt(v);
  for (let c = 0; c < d; c++) mean[c] += a * shift[c];
  return { mean };
}

// ---------------------------------------------------------------- layout

function makeSpans(seed: number, tokens: number, k: WorkloadKnobs): { start: Int32Array; topic: Int32Array } {
  const rng = new Rng(hash32(seed, S_SPANS));
  const starts: number[] = [], topics: number[] = [];
  const minLen = Math.min(16, k.spanMean);
  let t = Math.min(k.sinks, tokens), prev = -1;
  while (t < tokens) {
    const len = Math.max(1, Math.round(minLen - Math.log(1 - rng.next()) * Math.max(k.spanMean - minLen, 1)));
    let topic = rng.int(k.topics);
    if (k.topics > 1 && topic === prev) topic = (topic + 1 + rng.int(k.topics - 1)) % k.topics;
    starts.push(t);
    topics.push(topic);
    prev = topic;
    t += len;
  }
  if (starts.length === 0) {
    starts.push(Math.min(k.sinks, tokens));
    topics.push(0);
  }
  return { start: Int32Array.from(starts), topic: Int32Array.from(topics) };
}

/** Index of the span holding token t (t ≥ spanStart[0]). */
export function spanOf(spanStart: Int32Array, t: number): number {
  let lo = 0, hi = spanStart.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (spanStart[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// ---------------------------------------------------------------- generation

const CHUNK = 2048;
const NEEDLE_AWAY = 1024; // needles keep clear of the last tokens (the recent window)

function validate(spec: WorkloadSpec): void {
  const ints: [string, number, number][] = [
    ['tokens', spec.tokens, 1],
    ['kvHeads', spec.kvHeads, 1],
    ['qHeads', spec.qHeads, 1],
    ['headDim', spec.headDim, 8],
    ['steps', spec.steps, 0],
    ['needles', spec.needles, 0],
  ];
  for (const [name, v, lo] of ints)
    if (!Number.isInteger(v) || v < lo) throw new RangeError(`workload: ${name} must be an integer ≥ ${lo}, got ${v}`);
  if (spec.qHeads % spec.kvHeads !== 0) throw new RangeError('workload: qHeads must be a multiple of kvHeads');
  if (spec.headDim % 2 !== 0) throw new RangeError('workload: headDim must be even');
  if (spec.needles > 0 && spec.steps === 0) throw new RangeError('workload: needles need decode steps');
}

/** Post-RoPE key rows of one head for tokens [t0, t0 + n) into out (f32); returns the needle cursor. */
function keyRows(
  out: Float32Array,
  noise: Float32Array,
  pre: Float64Array,
  t0: number,
  n: number,
  d: number,
  sinks: number,
  cosT: Float64Array,
  sinT: Float64Array,
  hm: HeadModel,
  spanStart: Int32Array,
  spanTopic: Int32Array,
  hn: { position: number; i: number }[],
  ni: number,
  needleDir: Float64Array[],
  needleNorm: number,
): number {
  const half = d >> 1, nSpans = spanStart.length;
  const { keyMean, keyStd, centroids, sinkDir, sinkCoef } = hm;
  let s = t0 < sinks ? 0 : spanOf(spanStart, t0);
  for (let i = 0; i < n; i++) {
    const t = t0 + i, row = i * d;
    if (t < sinks) {
      for (let c = 0; c < d; c++) pre[c] = keyMean[c] + sinkCoef * sinkDir[c] + SLOW_STD * noise[row + c];
    } else {
      while (s + 1 < nSpans && spanStart[s + 1] <= t) s++;
      const cb = spanTopic[s] * d;
      for (let c = 0; c < d; c++) pre[c] = keyMean[c] + centroids[cb + c] + keyStd[c] * noise[row + c];
      while (ni < hn.length && hn[ni].position === t) {
        const dir = needleDir[hn[ni].i];
        for (let c = 0; c < d; c++) pre[c] += needleNorm * dir[c];
        ni++;
      }
    }
    const rt = i * half;
    for (let p = 0; p < half; p++) {
      const cs = cosT[rt + p], sn = sinT[rt + p], x = pre[p], y = pre[p + half];
      out[row + p] = x * cs - y * sn;
      out[row + p + half] = y * cs + x * sn;
    }
  }
  return ni;
}

/** Value rows of one head for tokens [t0, t0 + n) into out (f32). */
function valueRows(
  out: Float32Array,
  noise: Float32Array,
  t0: number,
  n: number,
  d: number,
  sinks: number,
  hm: HeadModel,
  spanStart: Int32Array,
  spanTopic: Int32Array,
): void {
  const nSpans = spanStart.length;
  const { valueMean, valueTopic } = hm;
  let s = t0 < sinks ? 0 : spanOf(spanStart, t0);
  for (let i = 0; i < n; i++) {
    const t = t0 + i, row = i * d;
    if (t < sinks) {
      for (let c = 0; c < d; c++) out[row + c] = 0.1 * (valueMean[c] + noise[row + c]);
    } else {
      while (s + 1 < nSpans && spanStart[s + 1] <= t) s++;
      const vb = spanTopic[s] * d;
      for (let c = 0; c < d; c++) out[row + c] = valueMean[c] + valueTopic[vb + c] + noise[row + c];
    }
  }
}

export function generateWorkload(spec: WorkloadSpec, onProgress?: (fraction: number) => void): Workload {
  validate(spec);
  const { seed, tokens, kvHeads, qHeads, headDim: d, steps } = spec;
  const dtype: KvDtype = spec.dtype ?? 'f16';
  const k = defaultKnobs(tokens, spec.knobs);
  const G = qHeads / kvHeads;
  const bands = bandsOf(d, k.outlierPairs);
  const { half } = bands;
  const freq = ropeFrequencies(d, k.ropeBase, k.ropeScaling);
  const sinks = Math.min(k.sinks, tokens);
  const heads = Array.from({ length: kvHeads }, (_, h) => headModel(seed, h, d, k, bands));
  const qModels = Array.from({ length: qHeads }, (_, g) => qHeadModel(seed, g, d, k, bands, heads[Math.floor(g / G)]));
  const spans = makeSpans(seed, tokens, k);
  const nSpans = spans.start.length;
  const spanEnd = (s: number) => (s + 1 < nSpans ? spans.start[s + 1] : tokens);

  // Needles: position, step, q head, planted unit direction (pre-RoPE, fast + semantic bands).
  const needleRng = new Rng(hash32(seed, S_NEEDLES));
  const lo = sinks, hi = Math.max(lo + 1, tokens - NEEDLE_AWAY);
  const needles: Needle[] = [];
  const needleDir: Float64Array[] = [];
  const taken = new Set<number>();
  for (let n = 0; n < spec.needles; n++) {
    const head = n % kvHeads;
    let position = lo + needleRng.int(hi - lo);
    for (let tries = 0; taken.has(head * tokens + position) && tries < 100; tries++) position = lo + needleRng.int(hi - lo);
    if (position >= tokens) throw new RangeError('workload: too few tokens for needles');
    taken.add(head * tokens + position);
    const step = needleRng.int(steps);
    const qHead = head * G + needleRng.int(G);
    const dir = new Float64Array(d);
    let n2 = 0;
    for (let c = 0; c < d; c++)
      if (!inBand(bands, c, 'slow')) {
        dir[c] = needleRng.normal();
        n2 += dir[c] * dir[c];
      }
    for (let c = 0; c < d; c++) dir[c] /= Math.sqrt(n2);
    needles.push({ head, qHead, position, step });
    needleDir.push(dir);
  }
  // Per head: needles sorted by position, for the chunk loop.
  const needlesOf = Array.from({ length: kvHeads }, (_, h) =>
    needles.map((x, i) => ({ ...x, i })).filter((x) => x.head === h).sort((a, b) => a.position - b.position),
  );

  const keys = Array.from({ length: kvHeads }, () => new Uint16Array(tokens * d));
  const values = Array.from({ length: kvHeads }, () => new Uint16Array(tokens * d));
  const totalWork = Math.ceil(tokens / CHUNK) + 1;

  // Keys and values, chunk by chunk.
  const cosT = new Float64Array(CHUNK * half), sinT = new Float64Array(CHUNK * half);
  const noise = new Float32Array(CHUNK * d), out = new Float32Array(CHUNK * d);
  const pre = new Float64Array(d);
  for (let t0 = 0, chunk = 0; t0 < tokens; t0 += CHUNK, chunk++) {
    const n = Math.min(CHUNK, tokens - t0);
    for (let i = 0; i < n; i++) {
      const t = t0 + i;
      for (let p = 0; p < half; p++) {
        const ang = t * freq[p];
        cosT[i * half + p] = Math.cos(ang);
        sinT[i * half + p] = Math.sin(ang);
      }
    }
    for (let h = 0; h < kvHeads; h++) {
      const hm = heads[h];
      const hn = needlesOf[h];
      let ni = 0;
      while (ni < hn.length && hn[ni].position < t0) ni++;
      // Keys.
      fillNormals(noise, n * d, hash32(seed, S_KEYS, h, chunk));
      ni = keyRows(out, noise, pre, t0, n, d, sinks, cosT, sinT, hm, spans.start, spans.topic, hn, ni, needleDir, k.needleNorm);
      convert(bytesOf(out.subarray(0, n * d)), 'f32', bytesOf(keys[h].subarray(t0 * d, (t0 + n) * d)), dtype, n * d);
      // Values: mean + topic mean + noise; sinks nearly zero.
      fillNormals(noise, n * d, hash32(seed, S_VALUES, h, chunk));
      valueRows(out, noise, t0, n, d, sinks, hm, spans.start, spans.topic);
      convert(bytesOf(out.subarray(0, n * d)), 'f32', bytesOf(values[h].subarray(t0 * d, (t0 + n) * d)), dtype, n * d);
    }
    onProgress?.((chunk + 1) / totalWork);
  }

  // Queries need keys' residuals (the heavy hitters' own noise), read back
  // through a decode table.
  const decodeTable = new Float32Array(65536);
  {
    const codes = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) codes[i] = i;
    convert(bytesOf(codes), dtype, bytesOf(decodeTable), 'f32', 65536);
  }
  const row = new Float64Array(d), tmp = new Float64Array(d);
  /** Unit post-RoPE residual of key t of head h: key − R(t)(mean + centroid). */
  const residual = (h: number, t: number, dst: Float64Array): void => {
    const hm = heads[h], kb = keys[h];
    const cb = spans.topic[spanOf(spans.start, t)] * d;
    for (let c = 0; c < d; c++) tmp[c] = hm.keyMean[c] + hm.centroids[cb + c];
    rotate(tmp, row, freq, t);
    let n2 = 0;
    for (let c = 0; c < d; c++) {
      const r = decodeTable[kb[t * d + c]] - row[c];
      dst[c] = r;
      n2 += r * r;
    }
    const inv = n2 > 0 ? 1 / Math.sqrt(n2) : 0;
    for (let c = 0; c < d; c++) dst[c] *= inv;
  };
  const isNeedle = (h: number, t: number) => taken.has(h * tokens + t);
  /** A token of span s, below `limit`, that is not a needle (or -1). */
  const pickIn = (rng: Rng, h: number, s: number, limit: number): number => {
    const a = spans.start[s], b = Math.min(spanEnd(s), limit);
    if (b <= a) return -1;
    for (let tries = 0; tries < 8; tries++) {
      const t = a + rng.int(b - a);
      if (!isNeedle(h, t)) return t;
    }
    return -1;
  };
  const dir = new Float64Array(d), rot = new Float64Array(d), centre = new Float64Array(d);
  /** Adds the span-targeting part (topicBoost logits on the span's keys) to q. */
  const addTopic = (h: number, s: number, q: Float64Array): void => {
    const hm = heads[h], topic = spans.topic[s];
    const mid = Math.floor((spans.start[s] + spanEnd(s) - 1) / 2);
    const nc = hm.centroidNorm[topic];
    if (nc === 0) return;
    for (let c = 0; c < d; c++) centre[c] = hm.centroids[topic * d + c];
    rotate(centre, rot, freq, mid);
    const w = (k.topicBoost * Math.sqrt(d)) / (nc * nc);
    for (let c = 0; c < d; c++) q[c] += w * rot[c];
  };
  /** Adds a heavy-hitter target: hitterBoost logits on key t. */
  const addHitter = (h: number, t: number, q: Float64Array, noiseNorm: number): void => {
    residual(h, t, dir);
    const w = (k.hitterBoost * Math.sqrt(d)) / noiseNorm;
    for (let c = 0; c < d; c++) q[c] += w * dir[c];
  };
  // Expected norm of a key's noise part (for the hitter weight).
  const noiseNorm = heads.map((hm) => Math.sqrt(hm.keyStd.reduce((a, s) => a + s * s, 0)));

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
    const newSpan = (): number => {
      if (rng.next() < k.recentTopic) return Math.max(0, nSpans - 1 - rng.int(Math.min(8, nSpans)));
      return rng.int(nSpans);
    };
    for (let st = 0; st < steps; st++) {
      const pos = tokens + st;
      if (span < 0 || rng.next() >= k.topicStay) {
        span = newSpan();
        for (let j = 0; j < hitters.length; j++) hitters[j] = pickIn(rng, h, span, tokens);
      } else {
        for (let j = 0; j < hitters.length; j++) if (rng.next() >= k.hitterStay) hitters[j] = pickIn(rng, h, span, tokens);
      }
      decodeSpan[h][st] = span;
      for (let gi = 0; gi < G; gi++) {
        const g = h * G + gi, x = xi[gi];
        for (let c = 0; c < d; c++) {
          if (inBand(bands, c, 'slow')) continue;
          const z = rng.normal() * k.queryNoise;
          x[c] = st === 0 ? z : rho * x[c] + innov * z;
        }
        for (let c = 0; c < d; c++) q[c] = qModels[g].mean[c] + x[c];
        rotate(q, qr, freq, pos);
        addTopic(h, span, qr);
        for (const t of hitters) if (t >= 0) addHitter(h, t, qr, noiseNorm[h]);
        for (let n = 0; n < needles.length; n++) {
          const nd = needles[n];
          if (nd.qHead !== g || nd.step !== st) continue;
          // needleBoost logits over a sink: q·(needleNorm·R(p)dir)/√d.
          const w = ((k.sinkBoost + k.needleBoost) * Math.sqrt(d)) / k.needleNorm;
          rotate(needleDir[n], rot, freq, nd.position);
          for (let c = 0; c < d; c++) qr[c] += w * rot[c];
        }
        const o = decodeQ[st].subarray(g * d, (g + 1) * d);
        for (let c = 0; c < d; c++) o[c] = qr[c];
      }
    }
  }

  // Prefill query rows: ascending positions, heads of the group in turn;
  // each targets the span it sits in (60%) or an earlier one, causally.
  const rows = spec.prefillQueries ?? Math.floor(tokens / 16);
  const prefillQ: Float32Array[] = [], prefillPos: Int32Array[] = [], prefillHead: Int32Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const rng = new Rng(hash32(seed, S_PREFILL, h));
    const Q = new Float32Array(rows * d), P = new Int32Array(rows), H = new Int32Array(rows);
    for (let r = 0; r < rows; r++) {
      const pos = Math.min(tokens - 1, Math.floor(((r + rng.next()) * tokens) / rows));
      const g = h * G + (r % G);
      P[r] = pos;
      H[r] = g;
      for (let c = 0; c < d; c++) q[c] = qModels[g].mean[c] + (inBand(bands, c, 'slow') ? 0 : k.queryNoise * rng.normal());
      rotate(q, qr, freq, pos);
      if (pos >= spans.start[0]) {
        const here = spanOf(spans.start, pos);
        const s = rng.next() < 0.6 ? here : rng.int(here + 1);
        addTopic(h, s, qr);
        for (let j = 0; j < k.hitters; j++) {
          const t = pickIn(rng, h, s, pos + 1);
          if (t >= 0) addHitter(h, t, qr, noiseNorm[h]);
        }
      }
      for (let c = 0; c < d; c++) Q[r * d + c] = qr[c];
    }
    prefillQ.push(Q);
    prefillPos.push(P);
    prefillHead.push(H);
  }
  onProgress?.(1);

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
  };
}
