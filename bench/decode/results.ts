// What bench:decode records: per context, the preload, one result per
// method and the GPU reference points. These shapes are the JSON output's
// schema (decode-<mode>-<preset>.json): add fields, do not rename them.
import type { UploadPhases } from '../upload-tally.js';
import type { ServerMemory } from './machine.js';
import type { Shape, Via } from './options.js';
import type { CallKind } from './run.js';

/** Per-layer dense decode attention on the lent H100 (torch SDPA, f16, 32 q / 8 kv heads), ms, at 128K and 1M. */
export const H100_DENSE: Record<number, [number, number]> = { 128: [0.227, 1.449], 64: [0.122, 0.746] };
export const H100_PINNED_GBPS = 54.8;

export interface Baselines {
  /** Whole token (all layers), dense attention with the KV resident in HBM. */
  gpuDenseMs?: number;
  /** Whole token, the KV streamed from pinned host memory every step. */
  gpuStreamMs: number;
  /** The dense figure is a straight-line extrapolation outside 128K..1M. */
  extrapolated: boolean;
}

export function baselines(shape: Shape, tokens: number): Baselines {
  const kvBytesPerLayer = tokens * shape.kvHeads * shape.headDim * 2 * 2;
  const gpuStreamMs = (shape.layers * kvBytesPerLayer) / (H100_PINNED_GBPS * 1e9) * 1e3;
  const ref = shape.qHeads === 32 && shape.kvHeads === 8 ? H100_DENSE[shape.headDim] : undefined;
  if (!ref) return { gpuStreamMs, extrapolated: false };
  const slope = (ref[1] - ref[0]) / (1048576 - 131072);
  const perLayer = ref[0] + slope * (tokens - 131072);
  return { gpuDenseMs: shape.layers * perLayer, gpuStreamMs, extrapolated: tokens < 131072 || tokens > 1048576 };
}

/** With the server's memory after seal and session attach (ServerMemory's fields, decode/context.ts). */
export interface Preload extends ServerMemory {
  tokens: number;
  layers: number;
  kvBytes: number;
  /** K/V plus prefill queries as sent. */
  wireBytes: number;
  generateSeconds: number;
  /** Upload wall time (generation excluded), with `concurrency` layers in flight. */
  uploadSeconds: number;
  /** K/V bytes per second of upload wall time. */
  uploadGBps: number;
  concurrency: number;
  /** The upload's split: client wall time and the server's phases (from each reply's stats). */
  upload: UploadPhases;
  sealSeconds: number;
  /** Index build per indexed method (from the document's build progress, ±50 ms). */
  buildSeconds: Record<string, number>;
  /** Seal time after the last index build (the LMDB transaction). */
  sealWriteSeconds: number;
  /** Session create (index load at attach) per method. */
  attachMs: Record<string, number>;
  kvAccountedBytes?: number;
  gpuPool: string;
}

/** p50s over one kind of call (bench/decode/run.ts CallKind), ms: each its own p50, so they do not add up exactly. */
export interface CallSplit {
  calls: number;
  /** Client wall: encode, send, the server, read, decode. */
  wallP50Ms: number;
  /** The server's stats.ms, and its selectMs, attendMs and the rest (other). */
  serverP50Ms: number;
  selectP50Ms: number;
  attendP50Ms: number;
  otherP50Ms: number;
  /** stats.gpu.kernelMs (the device's time for the call, CUDA events; NaN off the GPU or where the call reports none). */
  kernelP50Ms: number;
  /** --timing: p50 per host stage of a device step (stats.gpu.host: queue, prep, launch, wait, copy, back, convert; own: the own tokens' attend, device: the call and it settled, from the step's start). */
  hostP50Ms?: Record<string, number>;
  /** wall − stats.ms, call by call. */
  rpcP50Ms: number;
}

export interface MethodResult {
  method: string;
  /** The transport its attends took (absent in files from before --via: http). */
  via?: Via;
  error?: string;
  /** Steps (layer-steps) whose answer differed from the same method's on the first transport. */
  mismatches?: number;
  mismatch?: string;
  steps: number;
  latency: {
    perTokenMs: number[];
    p50Ms: number;
    p99Ms: number;
    meanMs: number;
    /** The warm-up pass (step 0's queries, nothing appended): JIT and lazy per-session work. */
    coldMs: number;
    /**
     * Means per token of: client wall − server stats.ms; stats.selectMs; stats.attendMs; stats.ms − select − attend; transfers.
     * Via batch, a step's wall is its own stats.ms plus its batch's wall − the batch's server ms (each session waits for the
     * whole exchange), so rpcMs is the batches' wall − server ms summed over layers.
     */
    rpcMs: number;
    /** rpcMs / meanMs: the RPC share of the per-token time. */
    rpcShare: number;
    /** p50 over tokens of (wall − server), Σ over layers: what a GC pause in one call moves less than the mean. */
    rpcP50Ms: number;
    /**
     * Per call, p50 of wall − stats.ms, apart for the calls that asked only
     * `out` (what an LLM server's calls are) and those on the quality-sampled
     * layers, which ask the selection too (its bytes packed, sent, decoded
     * and copied out), both back to back after the call before; and the
     * first call after the loop's fidelity work (afterWork, either kind:
     * bench/decode/run.ts CallKind). NaN where there were none; absent in
     * older results (afterWork: in those, such calls were in plain or
     * sampled).
     */
    rpcCall?: { plainP50Ms: number; plainCalls: number; sampledP50Ms: number; sampledCalls: number; afterWorkP50Ms?: number; afterWorkCalls?: number };
    /** Per call kind, the p50s of a call's parts (absent in older results). */
    calls?: Record<CallKind, CallSplit>;
    serverMs: number;
    retrievalMs: number;
    attentionMs: number;
    otherServerMs: number;
    transferMs: number;
    tokensPerSecond: number;
    ratioToExact: number;
  };
  /** Mean over calls (the warm-up pass included) of stats.scanned / stats.tokens. */
  scannedFraction: number;
  /** A code-walk session's (retrieval-attention with --code-walk): mean of stats.codes / stats.tokens over the timed calls. */
  codesFraction?: number;
  /** Mean tokens attended per kv head per call. */
  attended: number;
  /** The GPU block pool's work per call (stats.blocks): measured with the cuda backend, simulated by block methods without it. */
  blocks?: { selectedPerCall: number; hitRate: number; bytesInPerToken: number };
  fidelity: {
    /** Over all layers and steps: mean over calls of the mean over q heads of ‖o − o_exact‖/‖o_exact‖, and the worst head. */
    outputErrorMean: number;
    outputErrorWorst: number;
    /** Sampled layers/heads, vs float64 exact attention. */
    recallMean: number;
    recallWorst: number;
    oracleRecallMean: number;
    topKRecallMean: number;
    recallSamples: number;
    needlesHit: number;
    needles: number;
    /** Selections holding a position twice (server problem if > 0). */
    duplicateSelections: number;
    /** exact only: its out vs float64 exact attention on the sampled heads (worst head). */
    kernelErrorVsFloat64?: number;
  };
}

/** Via batch: the batches themselves, summed over layers per token. */
export interface BatchSummary {
  /** Sessions per batch. */
  size: number;
  /** Per token: Σ over layers of the batch's client wall time; its p50; the server's batch ms (stats.ms); wall − server. */
  perTokenMs: number[];
  p50Ms: number;
  meanMs: number;
  serverMs: number;
  rpcMs: number;
  rpcShare: number;
  rpcP50Ms: number;
}

export interface TransportResult {
  via: Via;
  methods: MethodResult[];
  batch?: BatchSummary;
}

export interface ContextResult {
  tokens: number;
  steps: number;
  budgetTokens: number;
  preload: Preload;
  /** The first transport's (options.vias[0]) results. */
  methods: MethodResult[];
  /** Every transport's, in options.vias order (the first's methods are `methods`). */
  transports: TransportResult[];
  baselines: Baselines;
  /** GET /v1/health after the decode: the backend the attends ran on and its GPU (pool stats with the cuda backend). */
  server: { backend: string; gpu?: unknown };
}
