// Typed wrappers for the faiss-backed exports of the addon: an IVF-Flat
// inner-product index over one kv head's keys (the `ivf` baseline) and the
// seeded k-means that `squeezed` clusters a document's keys with.
import { nativeAddon } from './addon.js';
import { DTYPE_CODE, type KvDtype } from './kernels.js';

export interface IvfBuildArgs {
  /** [tokens, headDim] 16-bit words of one kv head. */
  keys: Uint16Array;
  tokens: number;
  headDim: number;
  dtype: KvDtype;
  /** Inverted lists, in [1, tokens]; faiss suggests 4·√tokens to 16·√tokens. */
  nlist: number;
  /** In [0, 2^31): picks the training sample and the k-means initialisation. */
  seed: number;
}

export interface IvfSearchArgs {
  /** [group, headDim] f32: the query heads that share this kv head. */
  q: Float32Array;
  group: number;
  k: number;
  /** Lists probed per query row, in [1, nlist]; nprobe = nlist is exact. */
  nprobe: number;
  /** At least min(k, tokens) entries each; best first (score desc, id asc). */
  outIds: Int32Array;
  outScores: Float32Array;
  /**
   * Who scores the probed keys; same results. 'native' (default): AVX2 dot
   * products over faiss's lists, each probed list read once per group.
   * 'faiss': faiss's own per-row search (a scalar loop in Debian's build).
   */
  scan?: 'native' | 'faiss';
  /**
   * How the rows' scores combine. 'max' (default): a key's score is the
   * largest q·k over the rows. 'attention' (native scan only): the log of the
   * group's attention on it, log Σ_g exp(scale·q_g·k − lse_g) over the rows
   * that probed its list, each lse_g from the row's probed keys and every
   * 32nd key of the lists it did not probe (counted in `scanned`).
   */
  aggregate?: 'max' | 'attention';
  /** Softmax scale for 'attention' (default 1/√headDim). */
  scale?: number;
}

export interface IvfSearchResult {
  /** Ids written: min(k, distinct keys in the probed lists). */
  count: number;
  /** Keys scored: the sizes of the probed lists, summed over the group's rows. */
  scanned: number;
}

export interface KmeansArgs {
  keys: Uint16Array;
  tokens: number;
  headDim: number;
  dtype: KvDtype;
  /** In [1, tokens]. */
  clusters: number;
  /** Lloyd iterations, in [1, 1000]. */
  iterations: number;
  /** In [0, 2^31). */
  seed: number;
}

export interface KmeansResult {
  /** [clusters, headDim]: the mean of each cluster's keys. */
  centroids: Float32Array;
  /** [tokens]: the nearest centroid (L2) of every key. */
  assign: Int32Array;
  /** [clusters]: keys per cluster (sums to tokens; may hold zeros). */
  sizes: Int32Array;
}

interface NativeIvfIndex {
  readonly tokens: number;
  readonly headDim: number;
  readonly nlist: number;
  readonly memoryBytes: number;
  save(): Uint8Array;
  search(a: Omit<IvfSearchArgs, 'aggregate' | 'scale'> & { scale?: number }): IvfSearchResult;
  dispose(): void;
}

interface FaissAddon {
  IvfIndex: {
    build(a: Omit<IvfBuildArgs, 'dtype'> & { dtype: number }): Promise<NativeIvfIndex>;
    load(bytes: Uint8Array): NativeIvfIndex;
  };
  kmeans(a: Omit<KmeansArgs, 'dtype'> & { dtype: number }): Promise<KmeansResult>;
  kmeansMany(a: (Omit<KmeansArgs, 'dtype'> & { dtype: number })[]): Promise<KmeansResult[]>;
  kmeansManyDevice(a: (Omit<KmeansArgs, 'dtype'> & { dtype: number })[]): Promise<KmeansResult[]>;
}

const addon = nativeAddon<FaissAddon>();

/**
 * IVF-Flat (faiss) over one kv head's keys, scored by inner product. A key's
 * score for a group is the largest q·k over the group's rows. The index owns
 * an f32 copy of the keys (tokens·headDim·4 bytes + 8 per id); dispose() frees
 * it at once, otherwise the garbage collector does.
 */
export class IvfIndex {
  private constructor(private readonly native: NativeIvfIndex) {}

  /** Trains on a seeded sample of ≤ 64·nlist keys, then adds all keys (id = row), off the main thread. */
  static async build(args: IvfBuildArgs): Promise<IvfIndex> {
    return new IvfIndex(await addon.IvfIndex.build({ ...args, dtype: DTYPE_CODE[args.dtype] }));
  }

  /** Parses bytes from save(); throws on bytes that are not an intact index. Synchronous. */
  static load(bytes: Uint8Array): IvfIndex {
    return new IvfIndex(addon.IvfIndex.load(bytes));
  }

  /** Serialises (faiss write_index inside a checksummed envelope). Synchronous. */
  save(): Uint8Array {
    return this.native.save();
  }

  /**
   * Top-k keys by the group's rows' scores (`aggregate`), each row probing its
   * own nprobe lists. Synchronous: runs on the calling thread (plus the native
   * pool when the probed work is large).
   */
  search(args: IvfSearchArgs): IvfSearchResult {
    const { aggregate, scale, ...rest } = args;
    if (aggregate === undefined || aggregate === 'max') {
      if (scale !== undefined) throw new TypeError("scale applies to aggregate 'attention' only");
      return this.native.search(rest);
    }
    if (aggregate !== 'attention') throw new TypeError(`aggregate must be 'max' or 'attention', got ${String(aggregate)}`);
    return this.native.search({ ...rest, scale: scale ?? 1 / Math.sqrt(this.native.headDim) });
  }

  dispose(): void {
    this.native.dispose();
  }

  get tokens(): number {
    return this.native.tokens;
  }
  get headDim(): number {
    return this.native.headDim;
  }
  get nlist(): number {
    return this.native.nlist;
  }
  /** Native bytes held (0 after dispose). */
  get memoryBytes(): number {
    return this.native.memoryBytes;
  }
}

/** Seeded k-means (faiss, L2) over every key, then each key assigned to its nearest final centroid. */
export async function kmeans(args: KmeansArgs): Promise<KmeansResult> {
  return addon.kmeans({ ...args, dtype: DTYPE_CODE[args.dtype] });
}

/**
 * Independent k-means problems side by side on the native pool, each
 * answered as kmeans answers it alone (a wave head's segments: one small
 * problem leaves most cores idle inside faiss).
 */
export async function kmeansMany(problems: readonly KmeansArgs[]): Promise<KmeansResult[]> {
  return addon.kmeansMany(problems.map((a) => ({ ...a, dtype: DTYPE_CODE[a.dtype] })));
}

/**
 * The same problems on the GPU (native/cuda/kmeans_device.h; every problem
 * with the same headDim, a multiple of 4, dtype and iterations): Lloyd's
 * k-means from a seeded sample of each problem's keys, repeatable, but not
 * faiss's clusters. Rejects without a CUDA build or device.
 */
export async function kmeansManyDevice(problems: readonly KmeansArgs[]): Promise<KmeansResult[]> {
  return addon.kmeansManyDevice(problems.map((a) => ({ ...a, dtype: DTYPE_CODE[a.dtype] })));
}
