// The block scorer GPU sessions offer their block methods (nosa,
// topk-blocks) in the layer context: each (document, layer)'s block summary
// rows, every kv head, are copied to the device the first time a GPU
// session's step scores them (blocks × reps × (headDim + 8) × 2 bytes per
// head: each block's 4 sub-centroids with radius and ln count columns,
// about 1/30 of the K and V at headDim 128), and each step is then one
// native call for all kv heads on one stream (score every row with the
// augmented query rows [q, α_h·‖q‖, √d, 0 ...] (α_h the kv head's
// calibrated radius share), exact top-k rows per head,
// copy back the few ids and scores): tens of microseconds at 1M tokens where
// the host pass took milliseconds. The selection is the host's, block for
// block (the device sums in the host kernel's order, a row width of
// headDim + 8 included; test/native/block-scores.test.ts).
//
// The copies are shared by every GPU session (documents are shared) and
// freed when the summaries they were made from are collected (a document
// deleted or dropped). When the device cannot take a copy (its memory is the
// pool's), that (document, layer) is scored on the host from then on; an
// error in a step falls back to the host for that step.
import { DeviceBlockScores, deviceBlockScoresSupported, deviceRanksGroups, type BlockTopKTimes, type HeadTopBlocks } from '../../addon/block-scores.js';
import type { BlockMeans, BlockScorer } from '../../index/method.js';
import type { KvDtype } from '../../addon/kernels.js';

interface Uploaded {
  heads: readonly BlockMeans[];
  /** Null when the device could not take them. */
  device: DeviceBlockScores | null;
}

export interface DeviceBlockScorerStats {
  /** Steps scored on the device. */
  steps: number;
  /** (document, layer)s copied to the device, and their device bytes. */
  uploads: number;
  bytes: number;
  /** Copies or steps the device refused (scored on the host instead). */
  failures: number;
  /** Wall ms of the steps' device calls, summed (a bench splits a select's time with it). */
  ms: number;
}

/** The last step's device call, split (with DeviceBlockScorer.timeSteps). */
export interface DeviceBlockScorerStep {
  /** Wall ms of the call: the wrapper's JS (arguments, answer views), the native call and its wait. */
  callMs: number;
  /** The native call's split: host prep / issue / wait / copy-out, and deviceMs, the call on the device (CUDA events). */
  native: BlockTopKTimes;
}

/** How a scorer makes its device copies and asks what the build supports: the addon's, unless a bench stands in for the device. */
export interface DeviceBlockScorerBackend {
  create(o: { means: Uint16Array[]; blocks: number; headDim: number; dtype: KvDtype }): DeviceBlockScores;
  supported(headDim: number, group: number): boolean;
}

const ADDON_BACKEND: DeviceBlockScorerBackend = { create: (o) => DeviceBlockScores.create(o), supported: deviceBlockScoresSupported };

export class DeviceBlockScorer implements BlockScorer {
  /** By the first head's summary: a (document, layer)'s means on the device. */
  private readonly uploaded = new WeakMap<BlockMeans, Uploaded>();
  readonly stats: DeviceBlockScorerStats = { steps: 0, uploads: 0, bytes: 0, failures: 0, ms: 0 };
  /** Whether a block's rows are ranked as one group on the device (false: the k·reps best rows; for A/B benches). */
  groupRows = true;
  /**
   * Whether each step's call is split into lastStep (a bench's question: the
   * call's graph with two event nodes, a graph of its own, and the native
   * split read back, a few microseconds a step; off in the engine).
   */
  timeSteps = false;
  lastStep?: DeviceBlockScorerStep;
  /** The last shape asked about (headDim, group) and the build's answer: an N-API call a step otherwise. */
  private askedDim = 0;
  private askedGroup = 0;
  private shapeOk = false;

  constructor(private readonly backend: DeviceBlockScorerBackend = ADDON_BACKEND) {}

  async topBlocks(heads: readonly BlockMeans[], q: Float32Array, group: number, k: number, extra: Int32Array[], reps = 1): Promise<HeadTopBlocks[] | undefined> {
    const first = heads[0];
    if (!first || !this.supports(first.headDim, group)) return undefined;
    if (heads.some((s) => s.blocks !== first.blocks || s.headDim !== first.headDim || s.dtype !== first.dtype)) return undefined;
    let up = this.uploaded.get(first);
    if (!up || up.heads.length !== heads.length || up.heads.some((s, h) => s !== heads[h])) {
      up = this.upload(heads);
      this.uploaded.set(first, up);
    }
    if (!up.device) return undefined;
    try {
      // A block's rows ranked as one group on the device: its select runs over blocks (16K keys a head at 1M,
      // held in registers) instead of rows (64K at 4 rows a block, re-read from memory by 8 CTAs), and the
      // chooser reads k ids a head, not k·reps. Otherwise the k·reps best rows (the same blocks first).
      const grouped = this.groupRows && reps > 1 && deviceRanksGroups(first.blocks, reps);
      const t0 = performance.now();
      const r = up.device.topk({ q, group, k: grouped ? k : k * reps, extra, reps: grouped ? reps : undefined, deviceTime: this.timeSteps });
      const callMs = performance.now() - t0;
      this.stats.ms += callMs;
      this.stats.steps++;
      if (this.timeSteps) this.lastStep = { callMs, native: up.device.lastTimes };
      return r;
    } catch (e) {
      this.stats.failures++;
      warnOnce(`kvrecall: device block scoring failed, scoring on the host: ${String(e)}`);
      return undefined;
    }
  }

  private supports(headDim: number, group: number): boolean {
    if (this.askedDim !== headDim || this.askedGroup !== group) {
      this.askedDim = headDim;
      this.askedGroup = group;
      this.shapeOk = this.backend.supported(headDim, group);
    }
    return this.shapeOk;
  }

  private upload(heads: readonly BlockMeans[]): Uploaded {
    const { blocks, headDim, dtype } = heads[0];
    try {
      const device = this.backend.create({ means: heads.map((s) => s.means.subarray(0, blocks * headDim)), blocks, headDim, dtype });
      this.stats.uploads++;
      this.stats.bytes += device.bytes;
      return { heads: [...heads], device };
    } catch (e) {
      this.stats.failures++;
      warnOnce(`kvrecall: block means not copied to the device, scoring them on the host: ${String(e)}`);
      return { heads: [...heads], device: null };
    }
  }
}

let warned = false;
function warnOnce(msg: string): void {
  if (warned) return;
  warned = true;
  console.error(msg);
}

let shared: DeviceBlockScorer | undefined;

/** The process's device block scorer (one device copy of each document's means for every GPU session). */
export function deviceBlockScorer(): DeviceBlockScorer {
  return (shared ??= new DeviceBlockScorer());
}
