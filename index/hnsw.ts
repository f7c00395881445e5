// `hnsw`: off-the-shelf HNSW over one kv head's keys by inner product
// (hnswlib-node), the baseline the attention-aware index is measured against.
// hnswlib-node takes points as JS number arrays: keys cross once at build,
// and a search converts only its G query rows (G × headDim numbers).
// Keys are centred before insertion: q·(k − μ) ranks keys as q·k does, but
// without the keys' shared mean (outlier channels, sinks) the inner-product
// graph no longer collapses onto a few hub keys (bench/results/workload.md).
// The artifact is μ (f32 [headDim]) followed by hnswlib's index bytes; the
// graph is built in a worker thread (index/hnsw-build.ts).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import hnswlib from 'hnswlib-node';
import { widenWords } from '../addon/kernels.js';
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, SearchResult } from './method.js';
import { staticPlusRetrieved } from './static-plus-retrieved.js';
import { buildHnswGraph, HNSW_BUILD_WORKERS } from './hnsw-build.js';

const M = 16;
const EF_CONSTRUCTION = 200;

/** hnswlib-node reads and writes indexes only through files. */
function viaTempFile<T>(work: (path: string) => T): T {
  const dir = mkdtempSync(join(tmpdir(), 'kvrecall-hnsw-'));
  try {
    return work(join(dir, 'index.bin'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const widen = (keys: HeadKeys): Float32Array => widenWords(keys.keys, keys.dtype, keys.tokens * keys.headDim);

class HnswHead implements HeadIndex {
  constructor(
    private readonly index: hnswlib.HierarchicalNSW,
    private readonly headDim: number,
    private readonly mean: Float32Array,
  ) {}

  search(q: Float32Array, group: number, k: number, ef: number): SearchResult {
    const n = this.index.getCurrentCount();
    k = Math.min(k, n);
    this.index.setEf(Math.max(ef, k));
    // Merge the group's rows by max score; the filter callback counts the
    // candidates hnswlib examined (a lower bound on the keys it scored).
    const best = new Map<number, number>();
    let scanned = 0;
    const count = () => (scanned++, true);
    for (let g = 0; g < group; g++) {
      const row = Array.from(q.subarray(g * this.headDim, (g + 1) * this.headDim));
      // Back to q·k: the centred score plus this row's q·μ.
      const offset = row.reduce((a, x, j) => a + x * this.mean[j], 0);
      const { neighbors, distances } = this.index.searchKnn(row, k, count);
      neighbors.forEach((id, i) => best.set(id, Math.max(best.get(id) ?? -Infinity, 1 - distances[i] + offset)));
    }
    const ids = Int32Array.from([...best.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, k), ([id]) => id);
    return { ids, scanned };
  }
}

export const hnswBuilder: HeadIndexBuilder = {
  async build(input: BuildInput): Promise<Uint8Array> {
    const keys = widen(input);
    const d = input.headDim;
    const mean = new Float32Array(d);
    for (let i = 0; i < input.tokens; i++) for (let j = 0; j < d; j++) mean[j] += keys[i * d + j] / input.tokens;
    for (let i = 0; i < input.tokens; i++) for (let j = 0; j < d; j++) keys[i * d + j] -= mean[j];
    const graph = await buildHnswGraph({ keys, tokens: input.tokens, d, m: M, efConstruction: EF_CONSTRUCTION, seed: 100 });
    const out = new Uint8Array(d * 4 + graph.byteLength);
    out.set(new Uint8Array(mean.buffer), 0);
    out.set(graph, d * 4);
    return out;
  },
  concurrency: HNSW_BUILD_WORKERS,

  load(bytes: Uint8Array, keys: HeadKeys): HeadIndex {
    const d = keys.headDim;
    if (bytes.byteLength <= d * 4) throw new Error('hnsw artifact is truncated');
    const mean = new Float32Array(bytes.slice(0, d * 4).buffer);
    const index = new hnswlib.HierarchicalNSW('ip', d);
    viaTempFile((path) => {
      writeFileSync(path, bytes.subarray(d * 4));
      index.readIndexSync(path);
    });
    return new HnswHead(index, d, mean);
  },
};

export const hnsw = staticPlusRetrieved('hnsw', hnswBuilder);
