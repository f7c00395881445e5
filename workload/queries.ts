// Decode and prefill queries. A query is its q head's mean plus its own
// noise in the topic channels, rotated to its position, plus targeting
// parts added after rotation: a span's topic centroid (topicBoost logits on
// that span's keys) and salient tokens' feature directions (hitterBoost
// logits each). Decode queries drift: the noise follows AR(1) across steps
// and the target span and heavy hitters persist with topicStay / hitterStay.
import { featureDir, TOPIC } from './heads.js';
import { lowerBound, salientKey, spanOf } from './layout.js';
import { spanEnd, type Plan } from './plan.js';
import { hash32, Rng, S_DECODE, S_PREFILL } from './random.js';

/** The targeting parts of queries, shared by decode and prefill queries. */
export class QueryParts {
  /** Span-targeting part per (head, span), bounded: recomputing one costs a rotation. */
  private readonly topicCache = new Map<number, Float64Array>();
  private readonly dir: Float64Array;
  private readonly rot: Float64Array;
  private readonly hitterW: number;

  constructor(private readonly plan: Plan) {
    this.dir = new Float64Array(plan.d);
    this.rot = new Float64Array(plan.d);
    this.hitterW = (plan.k.hitterBoost * Math.sqrt(plan.d)) / plan.k.salientNorm;
  }

  /** A salient token of span s below `limit`, or -1. */
  pickIn(rng: Rng, s: number, limit: number): number {
    const { salient, spans } = this.plan;
    const i0 = lowerBound(salient, spans.start[s]), i1 = lowerBound(salient, Math.min(spanEnd(this.plan, s), limit));
    return i1 > i0 ? salient[i0 + rng.int(i1 - i0)] : -1;
  }

  /** q += the topic centroid of span s rotated to the span's middle, weighted for topicBoost logits on its keys. */
  addTopic(h: number, s: number, q: Float64Array): void {
    const { d, spans, heads, rope, k } = this.plan, key = h * spans.start.length + s;
    let part = this.topicCache.get(key);
    if (!part) {
      const hm = heads[h], topic = spans.topic[s], nc = hm.centroidNorm[topic];
      part = new Float64Array(d);
      if (nc > 0) {
        rope.rotate(hm.centroids.subarray(topic * d, (topic + 1) * d), part, (spans.start[s] + spanEnd(this.plan, s) - 1) >> 1);
        const w = (k.topicBoost * Math.sqrt(d)) / (nc * nc);
        for (let c = 0; c < d; c++) part[c] *= w;
      }
      if (this.topicCache.size >= 4096) this.topicCache.clear();
      this.topicCache.set(key, part);
    }
    for (let c = 0; c < d; c++) q[c] += part[c];
  }

  /** q += hitterBoost logits on salient token t of kv head h, through its feature direction. */
  addHitter(h: number, t: number, q: Float64Array): void {
    const { d, seed, bands, rope } = this.plan;
    featureDir(salientKey(seed, h, t), bands.kind, this.dir);
    rope.rotate(this.dir, this.rot, t);
    for (let c = 0; c < d; c++) q[c] += this.hitterW * this.rot[c];
  }
}

/** One kv head group's decode target: a span and its heavy hitters, persisting across steps. */
class DecodeTarget {
  span = -1;
  readonly hitters: Int32Array;

  constructor(
    private readonly plan: Plan,
    private readonly parts: QueryParts,
    private readonly rng: Rng,
  ) {
    this.hitters = new Int32Array(plan.k.hitters).fill(-1);
  }

  /** A new target span: one of the last 8 with probability recentTopic, else any. */
  private newSpan(): number {
    const { rng } = this, nSpans = this.plan.spans.start.length;
    return rng.next() < this.plan.k.recentTopic ? Math.max(0, nSpans - 1 - rng.int(Math.min(8, nSpans))) : rng.int(nSpans);
  }

  /** Moves on one step: keep the span with probability topicStay, each hitter with hitterStay. */
  step(): void {
    const { rng, hitters, plan, parts } = this;
    if (this.span < 0 || rng.next() >= plan.k.topicStay) {
      this.span = this.newSpan();
      for (let j = 0; j < hitters.length; j++) hitters[j] = parts.pickIn(rng, this.span, plan.tokens);
    } else {
      for (let j = 0; j < hitters.length; j++) if (rng.next() >= plan.k.hitterStay) hitters[j] = parts.pickIn(rng, this.span, plan.tokens);
    }
  }

  /** Adds the span and each distinct hitter to q (post-RoPE). */
  addTo(h: number, q: Float64Array): void {
    const { hitters, parts } = this;
    parts.addTopic(h, this.span, q);
    for (let j = 0; j < hitters.length; j++)
      if (hitters[j] >= 0 && (j === 0 || !hitters.subarray(0, j).includes(hitters[j]))) parts.addHitter(h, hitters[j], q);
  }
}

/** Decode queries at positions tokens + step, and each kv head's target span per step. */
export function decodeQueries(plan: Plan, parts: QueryParts): { decodeQ: Float32Array[]; decodeSpan: Int32Array[] } {
  const { seed, tokens, kvHeads, qHeads, d, steps, G, k, rope, qMeans } = plan, kind = plan.bands.kind;
  const decodeQ = Array.from({ length: steps }, () => new Float32Array(qHeads * d));
  const decodeSpan = Array.from({ length: kvHeads }, () => new Int32Array(steps));
  const q = new Float64Array(d), qr = new Float64Array(d);
  const rho = k.drift, innov = Math.sqrt(Math.max(0, 1 - rho * rho));
  for (let h = 0; h < kvHeads; h++) {
    // One stream per kv head: its target's moves and its q heads' noise, interleaved by step.
    const rng = new Rng(hash32(seed, S_DECODE, h));
    const xi = Array.from({ length: G }, () => new Float64Array(d));
    const target = new DecodeTarget(plan, parts, rng);
    for (let st = 0; st < steps; st++) {
      target.step();
      decodeSpan[h][st] = target.span;
      for (let gi = 0; gi < G; gi++) {
        const g = h * G + gi, x = xi[gi], mean = qMeans[g];
        for (let c = 0; c < d; c++) {
          if (kind[c] !== TOPIC) continue;
          const z = rng.normal() * k.queryNoise;
          x[c] = st === 0 ? z : rho * x[c] + innov * z;
        }
        for (let c = 0; c < d; c++) q[c] = mean[c] + x[c];
        const shift = plan.decodeShift[g];
        if (shift) for (let c = 0; c < d; c++) q[c] += shift[c];
        rope.rotate(q, qr, tokens + st);
        target.addTo(h, qr);
        decodeQ[st].set(qr, g * d);
      }
    }
  }
  return { decodeQ, decodeSpan };
}

/**
 * Prefill query rows per kv head: ascending positions, the group's heads in
 * turn; each targets the span it sits in (60%) or an earlier one, and only
 * salient tokens before it (causal). `tick` after each kv head.
 */
export function prefillQueries(
  plan: Plan,
  parts: QueryParts,
  rows: number,
  tick: () => void,
): { prefillQ: Float32Array[]; prefillPos: Int32Array[]; prefillHead: Int32Array[] } {
  const { seed, tokens, kvHeads, d, G, k, rope, qMeans, spans, asked } = plan, kind = plan.bands.kind;
  // Every span is asked unless the knob `unasked` left some out (then no extra draws, so the bytes stay as without the knob).
  const askedCount = asked.length;
  const isAsked = (s: number) => {
    const i = lowerBound(asked, s);
    return i < asked.length && asked[i] === s;
  };
  const prefillQ: Float32Array[] = [], prefillPos: Int32Array[] = [], prefillHead: Int32Array[] = [];
  const q = new Float64Array(d), qr = new Float64Array(d);
  for (let h = 0; h < kvHeads; h++) {
    const rng = new Rng(hash32(seed, S_PREFILL, h));
    const Q = new Float32Array(rows * d), P = new Int32Array(rows), H = new Int32Array(rows);
    for (let r = 0; r < rows; r++) {
      const pos = Math.min(tokens - 1, Math.floor(((r + rng.next()) * tokens) / rows));
      const g = h * G + (r % G), mean = qMeans[g];
      P[r] = pos;
      H[r] = g;
      for (let c = 0; c < d; c++) q[c] = mean[c] + (kind[c] === TOPIC ? k.queryNoise * rng.normal() : 0);
      rope.rotate(q, qr, pos);
      if (spans.start.length > 0 && pos >= spans.start[0]) {
        const here = spanOf(spans.start, pos);
        let s = rng.next() < 0.6 ? here : rng.int(here + 1);
        // A span no prefill query asks about: this row asks about an asked span at or before it instead, if any.
        if (askedCount < spans.start.length && !isAsked(s)) {
          const n = lowerBound(asked, here + 1);
          s = n > 0 ? asked[rng.int(n)] : -1;
        }
        if (s < 0) {
          Q.set(qr, r * d);
          continue;
        }
        parts.addTopic(h, s, qr);
        let last = -1;
        for (let j = 0; j < k.hitters; j++) {
          const t = parts.pickIn(rng, s, pos + 1);
          if (t >= 0 && t !== last) parts.addHitter(h, t, qr);
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
  return { prefillQ, prefillPos, prefillHead };
}
