// Channel bands and the per-head structure drawn once from the seed: each kv
// head's key/value means, noise spectrum, topic centroids and sink
// direction, and each q head's mean (the out-of-distribution shift, the
// recency alignment and the slow-band part that meets the outliers).
import { hash32, Rng, S_DSHIFT, S_HEAD, S_QHEAD } from './random.js';
import type { WorkloadKnobs } from './types.js';

/** Channel kinds. */
export const FAST = 0, TOPIC = 1, FEATURE = 2, SLOW = 3;

export interface Bands {
  half: number;
  /** Fast pairs [0, fast), semantic pairs [fast, slow0) (topic and feature in turn), slow [slow0, half). */
  fast: number;
  slow0: number;
  /** Kind of each channel. */
  kind: Uint8Array;
}

export function bandsOf(d: number, outlierPairs: number): Bands {
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
const KEY_TOPIC_MEAN = 0.3, FEATURE_STD = 0.1;
export const SLOW_STD = 0.3;

export interface HeadModel {
  keyMean: Float64Array; // pre-RoPE [d]
  keyStd: Float64Array; // per-channel noise std [d]
  centroids: Float64Array; // [topics, d], topic channels only
  centroidNorm: Float64Array; // [topics]
  valueMean: Float64Array; // [d]
  valueTopic: Float64Array; // [topics, d]
  sinkDir: Float64Array; // unit, pre-RoPE, slow band
  sinkCoef: number; // sink keys add sinkCoef · sinkDir
}

/** Anisotropic key noise: log-normal std per pair, mean variance 1 over the fast and topic channels. */
function keyNoiseStd(rng: Rng, d: number, { half, kind }: Bands): Float64Array {
  const keyStd = new Float64Array(d);
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
  return keyStd;
}

/** Pre-RoPE key mean: a rotating vector per fast pair, small topic offsets, fixed-sign outliers. */
function keyMeanOf(rng: Rng, d: number, k: WorkloadKnobs, { half, kind }: Bands): Float64Array {
  const keyMean = new Float64Array(d);
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
  return keyMean;
}

/** Sink direction and size: along the queries' slow-band mean (which shares the outliers' signs). */
function sinkOf(keyMean: Float64Array, d: number, k: WorkloadKnobs, kind: Uint8Array): { sinkDir: Float64Array; sinkCoef: number } {
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
  return { sinkDir, sinkCoef: (k.sinkBoost * Math.sqrt(d)) / sNorm };
}

export function headModel(seed: number, h: number, d: number, k: WorkloadKnobs, bands: Bands): HeadModel {
  // One stream for the whole head, drawn in this order: noise spectrum, means, centroids, values.
  const rng = new Rng(hash32(seed, S_HEAD, h));
  const { kind } = bands;
  const keyStd = keyNoiseStd(rng, d, bands);
  const keyMean = keyMeanOf(rng, d, k, bands);
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
  return { keyMean, keyStd, centroids, centroidNorm, valueMean, valueTopic, ...sinkOf(keyMean, d, k, kind) };
}

/** A q head's mean, pre-RoPE [d]. */
export function queryMean(seed: number, g: number, d: number, k: WorkloadKnobs, bands: Bands, hm: HeadModel): Float64Array {
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

/**
 * q head g's decode-only shift (knob decodeShift): like the queries' own
 * shift, random in the topic channels and weighted towards channels where
 * keys vary least, scaled to a logit std of `decodeShift` against the keys'
 * noise; added to decode queries only, so what the prefill queries learned
 * about the keys is off by that much at decode. Null when the knob is 0.
 */
export function decodeShiftOf(seed: number, g: number, d: number, k: WorkloadKnobs, bands: Bands, hm: HeadModel): Float64Array | null {
  if (!(k.decodeShift > 0)) return null;
  const rng = new Rng(hash32(seed, S_DSHIFT, g));
  const shift = new Float64Array(d);
  let v = 0;
  for (let c = 0; c < d; c++)
    if (bands.kind[c] === TOPIC) {
      shift[c] = rng.normal() / hm.keyStd[c];
      v += (shift[c] * hm.keyStd[c]) ** 2;
    }
  const a = v > 0 ? (k.decodeShift * Math.sqrt(d)) / Math.sqrt(v) : 0;
  for (let c = 0; c < d; c++) shift[c] *= a;
  return shift;
}

/** Unit random direction over the feature channels (pre-RoPE) from stream `key`, into out. */
export function featureDir(key: number, kind: Uint8Array, out: Float64Array): void {
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
