// Defaults for the knobs and the checks on a spec: the configuration a
// workload is drawn from, before any randomness.
import type { WorkloadKnobs, WorkloadSpec } from './types.js';

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
    unasked: 0,
    decodeShift: 0,
    ...over,
  };
}

/**
 * The broad-attention configuration (aggregation tasks: a question about a
 * topic reads every run of it). Short spans of few topics, so a topic's keys
 * are spread over many runs across the whole context; queries pull on the
 * topic more than on any one token; recency, heavy hitters and sinks are
 * weak. Attention mass is spread thin: choosing tokens alone leaves much of
 * it out, which is what the estimation zone is for.
 */
export function broadKnobs(tokens: number, over: Partial<WorkloadKnobs> = {}): WorkloadKnobs {
  const L = Math.log(Math.max(tokens, 2));
  return defaultKnobs(tokens, { topics: 16, spanMean: 48, topicBoost: 3, topicStay: 0.95, recency: L - 5, hitters: 1, hitterBoost: L - 5, sinkBoost: L - 2, ...over });
}

/**
 * The hard knobs on top of a configuration's (defaultKnobs or broadKnobs):
 * half the spans are facts no prefill query asks about, and decode queries
 * are shifted away from the prefill queries (workload/index.ts, (i) and (j)).
 */
export const HARD_KNOBS: Readonly<Pick<WorkloadKnobs, 'unasked' | 'decodeShift'>> = { unasked: 0.5, decodeShift: 0.8 };

/** Throws a RangeError naming the first malformed field of `spec`. */
export function validateSpec(spec: WorkloadSpec): void {
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
  const u = spec.knobs?.unasked;
  if (u !== undefined && !(u >= 0 && u <= 1)) throw new RangeError(`workload: unasked must be in [0, 1], got ${u}`);
  const ds = spec.knobs?.decodeShift;
  if (ds !== undefined && !(ds >= 0 && Number.isFinite(ds))) throw new RangeError(`workload: decodeShift must be a finite number ≥ 0, got ${ds}`);
  if (spec.prefillQueries !== undefined && !(Number.isInteger(spec.prefillQueries) && spec.prefillQueries >= 0))
    throw new RangeError('workload: prefillQueries must be a non-negative integer');
}
