// Typed wrapper around the addon's device block scoring
// (native/bindings/block_scores_binding.cc, kernels in native/cuda/block_scores.cu):
// one (document, layer)'s block means, every kv head, resident on the GPU,
// and per decode step one native call that scores every block of every head
// (max over the GQA group of q·mean, summed in the host kernel's order, so
// the scores are the host's bit for bit) and returns each head's top k
// blocks, best first, ties towards the lower id: what topkHeads over the
// same means returns.
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';
import { concatInto } from './typed-concat.js';

/** The addon's object behind a DeviceBlockScores (exported for stand-ins: a bench's run on a host without a device). */
export interface NativeBlockScores {
  topk(a: {
    q: Float32Array;
    group: number;
    k: number;
    outIds: Int32Array;
    outScores: Float32Array;
    extraIds?: Int32Array;
    extraCounts?: Int32Array;
    extraScores?: Float32Array;
    reps?: number;
    sync?: boolean;
    times?: boolean;
    deviceTime?: boolean;
  }): number | Promise<number>;
  bytes(): number;
  lastTimes(): BlockTopKTimes;
  graphCaptures(): number;
  pipedScores(): boolean;
  slicedSelect(): boolean;
  close(): void;
}

interface Addon {
  blockScoresSupported(headDim: number, group: number): boolean;
  BlockScores: new (o: { heads: Uint16Array[]; blocks: number; headDim: number; dtype: number }) => NativeBlockScores;
}

const addon = nativeAddon<Addon>();

/** Where the last step's time went, milliseconds. */
export interface BlockTopKTimes {
  /** The scoring and the selection kernel (CUDA events; 0 unless the step asked for `times`). */
  scoreMs: number;
  selectMs: number;
  /** The whole call on the device: its copies, kernels and the gaps between them (CUDA events around them; 0 unless the step asked for `deviceTime`). */
  deviceMs: number;
  /** On the host: staging the inputs, issuing copies and launches, waiting for the stream, copying the outputs out. */
  prepMs: number;
  issueMs: number;
  waitMs: number;
  copyOutMs: number;
}

/** One kv head's answer of a step. */
export interface HeadTopBlocks {
  /** The best blocks, best first (min(k, blocks) of them). */
  ids: Int32Array;
  /** Their scores, aligned with ids. */
  scores: Float32Array;
  /** The scores of the extra blocks asked for, in their order. */
  extraScores: Float32Array;
}

export interface BlockTopKArgs {
  /** [heads * group, headDim]: head h scores with rows h*group .. (h+1)*group. */
  q: Float32Array;
  group: number;
  k: number;
  /** Per kv head, blocks whose scores are wanted too (any blocks, each < blocks). */
  extra?: Int32Array[];
  /**
   * Rank groups of `reps` consecutive blocks (rows) instead (deviceRanksGroups
   * must hold): the top k groups, each ranked where its best row ranks among
   * the rows (score, then the lower row), so in the order of their first
   * rows in the rows' ranking; answered as the group's first row
   * (group · reps) with its best row's score. `extra` stays rows. Default 1.
   */
  reps?: number;
  /**
   * Per-kernel CUDA event times in lastTimes (a bench's question): the
   * copies and kernels launched one by one. Otherwise (the engine) the step
   * is replayed from a CUDA graph captured once per shape: one launch.
   */
  times?: boolean;
  /**
   * The whole call's device time in lastTimes.deviceMs: two CUDA events
   * around its copies and kernels, recorded as the device reaches them
   * (replayed: nodes of a graph of their own), so the host's issue before
   * them is not in it: what a select's device call costs the device, apart
   * from the host's issue and wait.
   */
  deviceTime?: boolean;
}

/** Whether this build and host can score blocks of this shape on the device (never throws). */
export function deviceBlockScoresSupported(headDim: number, group: number): boolean {
  try {
    return addon.blockScoresSupported(headDim, group);
  } catch {
    return false;
  }
}

/** Whether a step may rank groups of `reps` rows of a head of `rows` rows (BlockTopKArgs.reps): a power of two ≤ 16 dividing rows. */
export function deviceRanksGroups(rows: number, reps: number): boolean {
  return Number.isInteger(reps) && reps >= 1 && reps <= 16 && (reps & (reps - 1)) === 0 && rows % reps === 0;
}

/**
 * The block means of one (document, layer) on the device: heads × blocks ×
 * headDim 16-bit words, uploaded once by create (blocks × headDim × 2 bytes
 * per head, 1/64 of the K and V at 64-token blocks).
 */
export class DeviceBlockScores {
  private constructor(
    private readonly native: NativeBlockScores,
    readonly heads: number,
    readonly blocks: number,
    readonly headDim: number,
  ) {}

  /** Uploads every head's [blocks, headDim] means; throws without a device, a CUDA build or the memory. */
  static create(o: { means: Uint16Array[]; blocks: number; headDim: number; dtype: KvDtype }): DeviceBlockScores {
    const native = new addon.BlockScores({ heads: o.means, blocks: o.blocks, headDim: o.headDim, dtype: DTYPE_CODE[o.dtype] });
    return new DeviceBlockScores(native, o.means.length, o.blocks, o.headDim);
  }

  /**
   * The wrapper over another native object of the same contract: a bench's
   * stand-in for the device, so the wrapper's JS is what it times.
   */
  static over(native: NativeBlockScores, o: { heads: number; blocks: number; headDim: number }): DeviceBlockScores {
    return new DeviceBlockScores(native, o.heads, o.blocks, o.headDim);
  }

  /**
   * One decode step for every kv head, blocking the caller until the
   * answer is back (tens of microseconds: cheaper than a hop to a worker
   * thread and back).
   */
  topk(a: BlockTopKArgs): HeadTopBlocks[] {
    const call = this.args(a);
    call.native.sync = true;
    const kk = this.native.topk(call.native) as number;
    return this.split(call, kk);
  }

  /** topk on a worker thread (the event loop runs meanwhile). */
  async topkAsync(a: BlockTopKArgs): Promise<HeadTopBlocks[]> {
    const call = this.args(a);
    const kk = await this.native.topk(call.native);
    return this.split(call, kk);
  }

  /** Device bytes held (means and scratch). */
  get bytes(): number {
    return this.native.bytes();
  }

  /** CUDA graphs captured so far: one for a layer's steady shape (steps with `times` capture none). */
  get graphCaptures(): number {
    return this.native.graphCaptures();
  }

  /** Whether the score kernel overlaps its copies with its sums where the shape fits (unless KVRECALL_BLOCK_SCORES_PIPED=0 when made). */
  get pipedScores(): boolean {
    return this.native.pipedScores();
  }

  /** Whether the select runs in two launches (slices, then the heads' candidates) where it fits (unless KVRECALL_BLOCK_SELECT_SLICED=0 when made). */
  get slicedSelect(): boolean {
    return this.native.slicedSelect();
  }

  /** Where the last step's time went (kernels from CUDA events, host phases from a steady clock). */
  get lastTimes(): BlockTopKTimes {
    return this.native.lastTimes();
  }

  /** Frees the device memory now (otherwise when collected). */
  close(): void {
    this.native.close();
  }

  private args(a: BlockTopKArgs) {
    const reps = a.reps ?? 1, H = this.heads;
    const kk = Math.max(0, Math.min(a.k, Math.floor(this.blocks / reps)));
    if (a.extra && a.extra.length !== H) throw new RangeError(`extra must have ${H} entries`);
    let total = 0;
    if (a.extra) for (let h = 0; h < H; h++) total += a.extra[h].length;
    // Every array of the call is a view of one buffer (one backing store off V8's heap, not five), and the
    // argument object has one shape whatever is asked (absent members undefined, which the binding reads as
    // absent): 14-17 -> 3-8 us of JS a call on the 2-core VM (a stand-in native, nosa's 1M shape).
    const buf = new ArrayBuffer(4 * (2 * H * kk + (a.extra ? H + 2 * total : 0)));
    const outIds = new Int32Array(buf, 0, H * kk), outScores = new Float32Array(buf, 4 * H * kk, H * kk);
    let extraCounts: Int32Array | undefined, extraIds: Int32Array | undefined, extraScores: Float32Array | undefined;
    if (a.extra) {
      extraCounts = new Int32Array(buf, 8 * H * kk, H);
      extraIds = new Int32Array(buf, 4 * (2 * H * kk + H), total);
      extraScores = new Float32Array(buf, 4 * (2 * H * kk + H + total), total);
      for (let h = 0; h < H; h++) extraCounts[h] = a.extra[h].length;
      concatInto(extraIds, a.extra);
    }
    const native: Parameters<NativeBlockScores['topk']>[0] = {
      q: a.q, group: a.group, k: a.k, outIds, outScores, extraIds, extraCounts, extraScores, reps: reps !== 1 ? reps : undefined, sync: undefined, times: a.times ? true : undefined,
      deviceTime: a.deviceTime ? true : undefined,
    };
    return { native, outIds, outScores, extraCounts, extraScores };
  }

  private split(call: ReturnType<DeviceBlockScores['args']>, kk: number): HeadTopBlocks[] {
    const out: HeadTopBlocks[] = [];
    let at = 0;
    for (let h = 0; h < this.heads; h++) {
      const n = call.extraCounts?.[h] ?? 0;
      out.push({
        ids: call.outIds.subarray(h * kk, (h + 1) * kk),
        scores: call.outScores.subarray(h * kk, (h + 1) * kk),
        extraScores: call.extraScores?.subarray(at, at + n) ?? new Float32Array(0),
      });
      at += n;
    }
    return out;
  }
}
