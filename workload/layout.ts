// The context's layout along positions, the same in every head: the spans of
// clustered content (each with a topic) and the salient tokens (the
// heavy-hitter candidates).
import { hash32, Rng, S_SALIENT, S_SPANS, S_UNASKED } from './random.js';
import type { WorkloadKnobs } from './types.js';

export interface Spans {
  start: Int32Array;
  topic: Int32Array;
}

/** Geometric span lengths (mean spanMean, at least 16) after the sinks; a span never repeats its predecessor's topic. */
export function makeSpans(seed: number, tokens: number, sinks: number, k: WorkloadKnobs): Spans {
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
export function lowerBound(a: Int32Array, x: number): number {
  let lo = 0, hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Positions of the salient tokens (ascending), the same in every head; never sinks. */
export function salientPositions(seed: number, tokens: number, sinks: number, fraction: number): Int32Array {
  const limit = Math.max(0, Math.min(1, fraction)) * 4294967296;
  const out: number[] = [];
  for (let t = sinks; t < tokens; t++) if (hash32(seed, S_SALIENT, t) < limit) out.push(t);
  return Int32Array.from(out);
}

/** The stream of salient token t's feature direction in kv head h. */
export function salientKey(seed: number, h: number, t: number): number {
  return hash32(seed, S_SALIENT, h, t);
}

/**
 * The spans prefill queries may target, ascending: each span is left out
 * (a fact no prefill query asks about) with probability `unasked`, drawn
 * per span; every span when the knob is 0.
 */
export function askedSpans(seed: number, spans: number, unasked: number): Int32Array {
  const limit = Math.max(0, Math.min(1, unasked)) * 4294967296;
  const out: number[] = [];
  for (let s = 0; s < spans; s++) if (!(hash32(seed, S_UNASKED, s) < limit)) out.push(s);
  return Int32Array.from(out);
}
