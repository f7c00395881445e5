// A spec resolved into everything the generation stages share: shapes,
// knobs, bands, the RoPE table, and the structures drawn once from the seed
// (per-head models, q-head means, spans, salient positions). Each stage
// (keys & values, needles, queries) reads a Plan and draws only its own
// streams, so a stage's bytes do not depend on which stages ran before it,
// only on the data it is handed.
import type { KvDtype } from '../addon/kernels.js';
import { bandsOf, decodeShiftOf, headModel, queryMean, type Bands, type HeadModel } from './heads.js';
import { defaultKnobs, validateSpec } from './knobs.js';
import { askedSpans, lowerBound, makeSpans, salientPositions, type Spans } from './layout.js';
import { RopeTable, ropeFrequencies } from './rope.js';
import type { WorkloadKnobs, WorkloadSpec } from './types.js';

export interface Plan {
  seed: number;
  tokens: number;
  kvHeads: number;
  qHeads: number;
  d: number;
  steps: number;
  /** q heads per kv head. */
  G: number;
  dtype: KvDtype;
  k: WorkloadKnobs;
  bands: Bands;
  /** Covers every position a key or query is rotated to: [0, tokens + steps]. */
  rope: RopeTable;
  sinks: number;
  heads: HeadModel[];
  qMeans: Float64Array[];
  /** Per q head: the decode-only shift (knob decodeShift), null when off. */
  decodeShift: (Float64Array | null)[];
  spans: Spans;
  /** Spans prefill queries may target, ascending (all unless the knob `unasked` is set). */
  asked: Int32Array;
  salient: Int32Array;
}

export function makePlan(spec: WorkloadSpec): Plan {
  validateSpec(spec);
  const { seed, tokens, kvHeads, qHeads, headDim: d, steps } = spec;
  const k = defaultKnobs(tokens, spec.knobs);
  const G = qHeads / kvHeads;
  const bands = bandsOf(d, k.outlierPairs);
  const sinks = Math.max(0, Math.min(k.sinks, tokens - 1));
  const heads = Array.from({ length: kvHeads }, (_, h) => headModel(seed, h, d, k, bands));
  const spans = makeSpans(seed, tokens, sinks, k);
  return {
    seed,
    tokens,
    kvHeads,
    qHeads,
    d,
    steps,
    G,
    dtype: spec.dtype ?? 'f16',
    k,
    bands,
    rope: new RopeTable(ropeFrequencies(d, k.ropeBase, k.ropeScaling), tokens + steps + 1),
    sinks,
    heads,
    qMeans: Array.from({ length: qHeads }, (_, g) => queryMean(seed, g, d, k, bands, heads[Math.floor(g / G)])),
    decodeShift: Array.from({ length: qHeads }, (_, g) => decodeShiftOf(seed, g, d, k, bands, heads[Math.floor(g / G)])),
    spans,
    asked: askedSpans(seed, spans.start.length, k.unasked),
    salient: salientPositions(seed, tokens, sinks, k.salient),
  };
}

/** End (exclusive) of span s: the next span's start, or the context's end. */
export function spanEnd(plan: Plan, s: number): number {
  const start = plan.spans.start;
  return s + 1 < start.length ? start[s + 1] : plan.tokens;
}

export function isSalient(plan: Plan, t: number): boolean {
  const i = lowerBound(plan.salient, t);
  return i < plan.salient.length && plan.salient[i] === t;
}
