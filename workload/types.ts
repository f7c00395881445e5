// The generator's public shapes. The knobs are documented, one property
// each, in workload/index.ts; their defaults live in workload/knobs.ts.
import type { KvDtype } from '../addon/kernels.js';
import type { RopeScaling } from './rope.js';

export interface WorkloadKnobs {
  ropeBase: number;
  ropeScaling: RopeScaling;
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
  unasked: number;
  decodeShift: number;
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
