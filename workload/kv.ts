// Keys and values, chunk by chunk: rows are built in f32 from one noise
// stream per (head, chunk, tensor), keys rotated by RoPE at their position,
// and converted to the storage dtype with the native `convert`. Nothing is
// allocated per element; the chunk buffers are reused across heads.
import { bytesOf, convert, type KvDtype } from '../addon/kernels.js';
import { featureDir, SLOW_STD } from './heads.js';
import { lowerBound, salientKey, spanOf } from './layout.js';
import type { Plan } from './plan.js';
import { fillNormals, hash32, S_KEYS, S_VALUES } from './random.js';

export const CHUNK = 2048;

/** One chunk of tokens [t0, t0 + n): RoPE angles per token and the f32 row buffers. */
interface Chunk {
  t0: number;
  n: number;
  cosT: Float64Array;
  sinT: Float64Array;
  noise: Float32Array;
  out: Float32Array;
}

/** Sink rows: the key mean plus the sink direction, with the slow band's small noise, rotated. */
function sinkKeyRow(plan: Plan, h: number, c: Chunk, i: number): void {
  const { d } = plan, half = d >> 1, row = i * d, rt = i * half;
  const { keyMean, sinkDir, sinkCoef } = plan.heads[h];
  const { noise, out, cosT, sinT } = c;
  for (let p = 0; p < half; p++) {
    const q = p + half;
    const x = keyMean[p] + sinkCoef * sinkDir[p] + SLOW_STD * noise[row + p];
    const y = keyMean[q] + sinkCoef * sinkDir[q] + SLOW_STD * noise[row + q];
    const cs = cosT[rt + p], sn = sinT[rt + p];
    out[row + p] = x * cs - y * sn;
    out[row + q] = y * cs + x * sn;
  }
}

/** Post-RoPE key rows of kv head h for the chunk into c.out (f32); dir is scratch [d]. */
function keyRows(plan: Plan, h: number, c: Chunk, dir: Float64Array): void {
  const { d, sinks, salient, seed } = plan, half = d >> 1;
  const { start: spanStart, topic: spanTopic } = plan.spans, nSpans = spanStart.length;
  const { keyMean, keyStd, centroids } = plan.heads[h];
  const { t0, n, noise, out, cosT, sinT } = c;
  const salientNorm = plan.k.salientNorm, kind = plan.bands.kind;
  let s = spanOf(spanStart, t0), si = lowerBound(salient, t0);
  for (let i = 0; i < n; i++) {
    const t = t0 + i, row = i * d, rt = i * half;
    if (t < sinks) {
      sinkKeyRow(plan, h, c, i);
      continue;
    }
    while (s + 1 < nSpans && spanStart[s + 1] <= t) s++;
    const cb = spanTopic[s] * d;
    let g = 0;
    if (si < salient.length && salient[si] === t) {
      featureDir(salientKey(seed, h, t), kind, dir);
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

/** Value rows of kv head h for the chunk into c.out (f32): sinks small (a no-op), others their topic's mean plus noise. */
function valueRows(plan: Plan, h: number, c: Chunk): void {
  const { d, sinks } = plan;
  const { start: spanStart, topic: spanTopic } = plan.spans, nSpans = spanStart.length;
  const { valueMean, valueTopic } = plan.heads[h];
  const { t0, n, noise, out } = c;
  let s = spanOf(spanStart, t0);
  for (let i = 0; i < n; i++) {
    const t = t0 + i, row = i * d;
    if (t < sinks) {
      for (let j = 0; j < d; j++) out[row + j] = 0.1 * (valueMean[j] + noise[row + j]);
      continue;
    }
    while (s + 1 < nSpans && spanStart[s + 1] <= t) s++;
    const vb = spanTopic[s] * d;
    for (let j = 0; j < d; j++) out[row + j] = valueMean[j] + valueTopic[vb + j] + noise[row + j];
  }
}

/** Every kv head's keys and values in storage words; `tick` after each chunk (all heads). */
export function generateKeysValues(plan: Plan, tick: () => void): { keys: Uint16Array[]; values: Uint16Array[] } {
  const { tokens, kvHeads, d, seed, dtype, rope } = plan, half = d >> 1;
  const keys = Array.from({ length: kvHeads }, () => new Uint16Array(tokens * d));
  const values = Array.from({ length: kvHeads }, () => new Uint16Array(tokens * d));
  const c: Chunk = {
    t0: 0,
    n: 0,
    cosT: new Float64Array(CHUNK * half),
    sinT: new Float64Array(CHUNK * half),
    noise: new Float32Array(CHUNK * d),
    out: new Float32Array(CHUNK * d),
  };
  const dir = new Float64Array(d);
  const store = (dst: Uint16Array) =>
    convert(bytesOf(c.out.subarray(0, c.n * d)), 'f32', bytesOf(dst.subarray(c.t0 * d, (c.t0 + c.n) * d)), dtype, c.n * d);
  for (let t0 = 0, chunk = 0; t0 < tokens; t0 += CHUNK, chunk++) {
    c.t0 = t0;
    c.n = Math.min(CHUNK, tokens - t0);
    for (let i = 0; i < c.n; i++) rope.angles(t0 + i, c.cosT, c.sinT, i * half);
    for (let h = 0; h < kvHeads; h++) {
      fillNormals(c.noise, c.n * d, hash32(seed, S_KEYS, h, chunk));
      keyRows(plan, h, c, dir);
      store(keys[h]);
      fillNormals(c.noise, c.n * d, hash32(seed, S_VALUES, h, chunk));
      valueRows(plan, h, c);
      store(values[h]);
    }
    tick();
  }
  return { keys, values };
}

/** f32 value of every 16-bit storage word of `dtype`: widening single words without a native call each. */
export function decodeTable(dtype: KvDtype): Float32Array {
  const table = new Float32Array(65536);
  const codes = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) codes[i] = i;
  convert(bytesOf(codes), dtype, bytesOf(table), 'f32', 65536);
  return table;
}
