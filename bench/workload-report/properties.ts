// The measurements behind each property row of the workload report, on the
// generated workload and on plain Gaussian keys/queries of the same size:
// key statistics (outliers, out-of-distribution queries), k-means cluster
// purity, and attention statistics from float64 exact attention.
import { bytesOf, convert } from '../../addon/kernels.js';
import { fillNormals, hash32, Rng, type Workload, type WorkloadSpec } from '../../workload/index.js';
import { exactAttention, rankOf, topKIndices, type ExactAttention } from '../quality.js';
import { mean, quantile } from '../stats.js';

// The report has always read the upper median; keep it so its tables do not shift.
export const median = (xs: number[]) => quantile(xs, 0.5, 'high');

function cosine(a: ArrayLike<number>, ao: number, b: ArrayLike<number>, bo: number, d: number): number {
  let ab = 0, aa = 0, bb = 0;
  for (let j = 0; j < d; j++) {
    const x = a[ao + j], y = b[bo + j];
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  return ab / Math.sqrt(aa * bb || 1);
}

/** Gaussian keys/values (f16 words) and Gaussian queries, the "too easy" baseline. */
export function gaussianWorkload(tokens: number, d: number, rows: number, seed: number, qShift = 0) {
  const f = new Float32Array(tokens * d);
  fillNormals(f, f.length, hash32(seed, 101));
  const keys = new Uint16Array(tokens * d);
  convert(bytesOf(f), 'f32', bytesOf(keys), 'f16', f.length);
  fillNormals(f, f.length, hash32(seed, 102));
  const values = new Uint16Array(tokens * d);
  convert(bytesOf(f), 'f32', bytesOf(values), 'f16', f.length);
  const q = new Float32Array(rows * d);
  fillNormals(q, q.length, hash32(seed, 103));
  if (qShift) {
    const mu = new Float32Array(d);
    fillNormals(mu, d, hash32(seed, 104));
    for (let r = 0; r < rows; r++) for (let j = 0; j < d; j++) q[r * d + j] += qShift * mu[j];
  }
  return { keys, values, q };
}

// ---------------------------------------------------------------- key statistics

export interface KeyStats {
  outlierRatio: number; // mean |k| of the top outlier channels / median channel mean |k|
  outlierChannels: number[];
  outlierSignAgreement: number; // min over those channels of the majority-sign share
  keyKeyCos: number;
  queryKeyCos: number;
  queryQueryCos: number;
  keyNorm: number;
  queryNorm: number;
  keyZ: number; // mean squared per-channel z-score of keys, outlier channels excluded (1 by construction)
  queryZ: number; // same for queries, against the keys' per-channel mean and std
}

export function keyStats(K: Float32Array, tokens: number, d: number, Q: Float32Array, qRows: number, nOut: number, seed: number): KeyStats {
  const absMean = new Float64Array(d), mu = new Float64Array(d), m2 = new Float64Array(d), pos = new Float64Array(d);
  for (let t = 0; t < tokens; t++)
    for (let j = 0; j < d; j++) {
      const x = K[t * d + j];
      absMean[j] += Math.abs(x);
      mu[j] += x;
      m2[j] += x * x;
      if (x > 0) pos[j]++;
    }
  const sd = new Float64Array(d);
  for (let j = 0; j < d; j++) {
    absMean[j] /= tokens;
    mu[j] /= tokens;
    sd[j] = Math.sqrt(Math.max(m2[j] / tokens - mu[j] * mu[j], 1e-12));
  }
  const order = Array.from({ length: d }, (_, j) => j).sort((a, b) => absMean[b] - absMean[a]);
  const top = order.slice(0, nOut);
  const med = median(Array.from(absMean));
  const rng = new Rng(hash32(seed, 201));
  const pairs = 4000;
  const kk: number[] = [], qk: number[] = [], qq: number[] = [];
  for (let i = 0; i < pairs; i++) {
    const a = rng.int(tokens), b = rng.int(tokens), r = rng.int(qRows), r2 = rng.int(qRows);
    kk.push(cosine(K, a * d, K, b * d, d));
    qk.push(cosine(Q, r * d, K, a * d, d));
    if (r !== r2) qq.push(cosine(Q, r * d, Q, r2 * d, d));
  }
  const norms = (A: Float32Array, rows: number, n: number) => {
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const r = rng.int(rows);
      let s = 0;
      for (let j = 0; j < d; j++) s += A[r * d + j] ** 2;
      out.push(Math.sqrt(s));
    }
    return mean(out);
  };
  // Over every row and every channel but the outlier ones (whose tiny spread would dominate).
  const skip = new Set(order.slice(0, nOut));
  const z = (A: Float32Array, rows: number) => {
    let s = 0;
    for (let r = 0; r < rows; r++) for (let j = 0; j < d; j++) if (!skip.has(j)) s += ((A[r * d + j] - mu[j]) / sd[j]) ** 2;
    return s / (rows * (d - skip.size));
  };
  return {
    outlierRatio: mean(top.map((j) => absMean[j])) / med,
    outlierChannels: top,
    outlierSignAgreement: Math.min(...top.map((j) => Math.max(pos[j], tokens - pos[j]) / tokens)),
    keyKeyCos: mean(kk),
    queryKeyCos: mean(qk),
    queryQueryCos: mean(qq),
    keyNorm: norms(K, tokens, 2000),
    queryNorm: norms(Q, qRows, Math.min(2000, qRows * 4)),
    keyZ: z(K, tokens),
    queryZ: z(Q, qRows),
  };
}

/** k-means (Lloyd, k-means++-free: k evenly spaced sample points as seeds) on a key sample; purity against labels. */
function kmeansPurity(K: Float32Array, d: number, sample: Int32Array, labels: Int32Array[], k: number, iters: number): number[] {
  const n = sample.length;
  const C = new Float64Array(k * d), assign = new Int32Array(n), cnt = new Float64Array(k);
  for (let c = 0; c < k; c++) {
    const t = sample[Math.floor(((c + 0.5) * n) / k)];
    for (let j = 0; j < d; j++) C[c * d + j] = K[t * d + j];
  }
  for (let it = 0; it < iters; it++) {
    for (let i = 0; i < n; i++) {
      const kb = sample[i] * d;
      let best = 0, bestD = Infinity;
      for (let c = 0; c < k; c++) {
        let s = 0;
        for (let j = 0; j < d; j++) {
          const x = K[kb + j] - C[c * d + j];
          s += x * x;
        }
        if (s < bestD) {
          bestD = s;
          best = c;
        }
      }
      assign[i] = best;
    }
    C.fill(0);
    cnt.fill(0);
    for (let i = 0; i < n; i++) {
      const c = assign[i], kb = sample[i] * d;
      cnt[c]++;
      for (let j = 0; j < d; j++) C[c * d + j] += K[kb + j];
    }
    for (let c = 0; c < k; c++) {
      if (cnt[c] === 0) {
        const t = sample[(c * 7919) % n];
        for (let j = 0; j < d; j++) C[c * d + j] = K[t * d + j];
      } else for (let j = 0; j < d; j++) C[c * d + j] /= cnt[c];
    }
  }
  return labels.map((lab) => {
    const tally = new Map<number, Map<number, number>>();
    for (let i = 0; i < n; i++) {
      const m = tally.get(assign[i]) ?? new Map<number, number>();
      m.set(lab[i], (m.get(lab[i]) ?? 0) + 1);
      tally.set(assign[i], m);
    }
    let hit = 0;
    for (const m of tally.values()) hit += Math.max(...m.values());
    return hit / n;
  });
}

// ---------------------------------------------------------------- attention statistics

export interface AttnStats {
  sinkMass: number;
  recent128: number;
  recent1024: number;
  recencyRatio: number; // per-token probability, last 128 vs older, sinks and target span excluded
  topicMass: number;
  topicShare: number; // the target span's share of tokens
  salientMass: number; // mass on the target span's salient tokens (heavy-hitter candidates)
  salientCount: number; // how many those are, on average
  top1pctRecall: number; // mass of the best 1% of tokens
  top100Recall: number;
  overlapNext: number; // |top100(s) ∩ top100(s+1)| / 100
  overlapFar: number; // same for steps 32 apart
  needleRanks: number[];
  needleProbs: number[];
  needleOtherRank: number; // median rank of a needle at other steps / in other heads
}

export function attnStats(w: Workload, heads: number[]): AttnStats {
  const { tokens, headDim: d, qHeads, kvHeads, steps } = w.spec;
  const G = qHeads / kvHeads, sinks = w.knobs.sinks;
  const acc = { sink: [] as number[], r128: [] as number[], r1024: [] as number[], topic: [] as number[], share: [] as number[], p1: [] as number[], p100: [] as number[], sal: [] as number[], salN: [] as number[], rr: [] as number[] };
  const lb = (x: number) => {
    let lo = 0, hi = w.salient.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (w.salient[mid] < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  const next: number[] = [], far: number[] = [];
  const needleRanks: number[] = [], needleProbs: number[] = [], other: number[] = [];
  const onePct = Math.max(1, Math.floor(tokens / 100));
  for (const h of heads) {
    const tops: Int32Array[][] = Array.from({ length: G }, () => []);
    for (let s = 0; s < steps; s++) {
      const q = w.decodeQ[s].subarray(h * G * d, (h + 1) * G * d);
      const ex: ExactAttention = exactAttention(q, G, w.keys[h], w.values[h], { headDim: d, dtype: w.dtype, outputs: false });
      const span = w.decodeSpan[h][s];
      const a = w.spanStart[span], b = span + 1 < w.spanStart.length ? w.spanStart[span + 1] : tokens;
      for (let g = 0; g < G; g++) {
        const p = ex.probs[g];
        let sm = 0, r1 = 0, r2 = 0, tm = 0;
        for (let t = 0; t < Math.min(sinks, tokens); t++) sm += p[t];
        for (let t = Math.max(0, tokens - 128); t < tokens; t++) r1 += p[t];
        for (let t = Math.max(0, tokens - 1024); t < tokens; t++) r2 += p[t];
        for (let t = a; t < b; t++) tm += p[t];
        let near = 0, nn = 0, far = 0, nf = 0;
        for (let t = sinks; t < tokens; t++) {
          if (t >= a && t < b) continue;
          if (t >= tokens - 128) {
            near += p[t];
            nn++;
          } else {
            far += p[t];
            nf++;
          }
        }
        if (nn > 0 && far > 0) acc.rr.push(near / nn / (far / nf));
        let sal = 0;
        const i0 = lb(a), i1 = lb(b);
        for (let i = i0; i < i1; i++) sal += p[w.salient[i]];
        acc.sal.push(sal);
        acc.salN.push(i1 - i0);
        acc.sink.push(sm);
        acc.r128.push(r1);
        acc.r1024.push(r2);
        acc.topic.push(tm);
        acc.share.push((b - a) / tokens);
        const top = topKIndices(p, onePct);
        let m1 = 0, m100 = 0;
        for (let i = 0; i < top.length; i++) {
          m1 += p[top[i]];
          if (i < 100) m100 += p[top[i]];
        }
        acc.p1.push(m1);
        acc.p100.push(m100);
        tops[g].push(top.subarray(0, Math.min(100, top.length)));
        const gq = h * G + g;
        for (const n of w.needles) {
          if (n.head !== h) continue;
          if (n.qHead === gq && n.step === s) {
            needleRanks.push(rankOf(p, n.position));
            needleProbs.push(p[n.position]);
          } else if (other.length < 2000) other.push(rankOf(p, n.position));
        }
      }
    }
    const overlap = (x: Int32Array, y: Int32Array) => {
      const set = new Set(x);
      let c = 0;
      for (const t of y) if (set.has(t)) c++;
      return c / x.length;
    };
    for (let g = 0; g < G; g++)
      for (let s = 0; s + 1 < steps; s++) {
        next.push(overlap(tops[g][s], tops[g][s + 1]));
        if (s + 32 < steps) far.push(overlap(tops[g][s], tops[g][s + 32]));
      }
  }
  return {
    sinkMass: mean(acc.sink),
    recent128: mean(acc.r128),
    recent1024: mean(acc.r1024),
    recencyRatio: mean(acc.rr),
    topicMass: mean(acc.topic),
    topicShare: mean(acc.share),
    salientMass: mean(acc.sal),
    salientCount: mean(acc.salN),
    top1pctRecall: mean(acc.p1),
    top100Recall: mean(acc.p100),
    overlapNext: mean(next),
    overlapFar: mean(far),
    needleRanks,
    needleProbs,
    needleOtherRank: median(other),
  };
}

/** The same attention statistics for plain Gaussian keys and queries (steps independent). */
export function gaussianAttn(tokens: number, d: number, rows: number, seed: number) {
  const gw = gaussianWorkload(tokens, d, rows, seed);
  const sink: number[] = [], r1024: number[] = [], p1: number[] = [], p100: number[] = [], ov: number[] = [];
  const onePct = Math.max(1, Math.floor(tokens / 100));
  let prev: Int32Array | undefined;
  for (let r = 0; r < rows; r++) {
    const ex = exactAttention(gw.q.subarray(r * d, (r + 1) * d), 1, gw.keys, gw.values, { headDim: d, outputs: false });
    const p = ex.probs[0];
    let sm = 0, rm = 0;
    for (let t = 0; t < 4; t++) sm += p[t];
    for (let t = tokens - 1024; t < tokens; t++) rm += p[t];
    sink.push(sm);
    r1024.push(rm);
    const top = topKIndices(p, onePct);
    let m1 = 0, m100 = 0;
    for (let i = 0; i < top.length; i++) {
      m1 += p[top[i]];
      if (i < 100) m100 += p[top[i]];
    }
    p1.push(m1);
    p100.push(m100);
    const t100 = top.subarray(0, 100);
    if (prev) {
      const set = new Set(prev);
      let c = 0;
      for (const t of t100) if (set.has(t)) c++;
      ov.push(c / 100);
    }
    prev = t100;
  }
  return { gw, sinkMass: mean(sink), recent1024: mean(r1024), top1pctRecall: mean(p1), top100Recall: mean(p100), overlapNext: mean(ov) };
}

export interface ClusterStudy {
  k: number;
  spanPurity: number;
  topicPurity: number;
  chancePurity: number;
  gaussianSpanPurity: number;
  spanLens: number[];
}

/** k-means over a sample of kv head 0's keys (past the sinks), k = spans (≤ 256); purity against span, topic and shuffled labels. */
export function clusterStudy(spec: WorkloadSpec, w: Workload, K0: Float32Array, gaussKeys: Float32Array): ClusterStudy {
  const d = spec.headDim;
  const sinks = w.knobs.sinks;
  const nSample = Math.min(20000, spec.tokens - sinks);
  const sample = new Int32Array(nSample);
  const spanLab = new Int32Array(nSample), topicLab = new Int32Array(nSample), shuffled = new Int32Array(nSample);
  const rng = new Rng(hash32(spec.seed, 301));
  let si = 0;
  for (let i = 0; i < nSample; i++) {
    const t = sinks + Math.floor(((i + 0.5) * (spec.tokens - sinks)) / nSample);
    sample[i] = t;
    while (si + 1 < w.spanStart.length && w.spanStart[si + 1] <= t) si++;
    spanLab[i] = si;
    topicLab[i] = w.spanTopic[si];
  }
  shuffled.set(spanLab);
  for (let i = nSample - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [shuffled[i], shuffled[j]] = [shuffled[j], shuffled[i]];
  }
  const k = Math.min(256, w.spanStart.length);
  const [spanPurity, topicPurity, chancePurity] = kmeansPurity(K0, d, sample, [spanLab, topicLab, shuffled], k, 8);
  const gSample = sample.map((t) => t);
  const [gaussianSpanPurity] = kmeansPurity(gaussKeys, d, gSample, [spanLab], k, 8);
  const spanLens: number[] = [];
  for (let i = 0; i < w.spanStart.length; i++) spanLens.push((i + 1 < w.spanStart.length ? w.spanStart[i + 1] : spec.tokens) - w.spanStart[i]);
  return { k, spanPurity, topicPurity, chancePurity, gaussianSpanPurity, spanLens };
}
