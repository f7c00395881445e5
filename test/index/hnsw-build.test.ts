// hnsw builds off the event loop (index/hnsw-build.ts) and a seal's builds
// side by side (engine/document-indexes.ts buildArtifacts):
//  - the worker's graph is byte for byte the graph hnswlib builds on the
//    calling thread from the same centred keys (the reference, built here);
//  - the event loop keeps turning while a build runs: on the main thread it
//    turned only where the build yielded (every 4096 points);
//  - buildArtifacts runs up to a builder's `concurrency` builds at once (one
//    at a time without it) and keeps the artifacts in (layer, head) order.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import hnswlib from 'hnswlib-node';
import { describe, expect, it } from 'vitest';
import { widenWords } from '../../addon/kernels.js';
import { buildArtifacts } from '../../engine/document-indexes.js';
import { hnswBuilder } from '../../index/hnsw.js';
import type { BuildInput, HeadIndexBuilder } from '../../index/method.js';
import { KvSegment } from '../../storage/kv-segment.js';
import { bitsOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`hnsw-build: seed ${seed}`);

function referenceArtifact(input: BuildInput): Uint8Array {
  const { tokens: N, headDim: d } = input;
  const k = widenWords(input.keys, input.dtype, N * d), mean = new Float32Array(d);
  for (let i = 0; i < N; i++) for (let j = 0; j < d; j++) mean[j] += k[i * d + j] / N;
  for (let i = 0; i < N; i++) for (let j = 0; j < d; j++) k[i * d + j] -= mean[j];
  const index = new hnswlib.HierarchicalNSW('ip', d);
  index.initIndex({ maxElements: N, m: 16, efConstruction: 200, randomSeed: 100 });
  for (let i = 0; i < N; i++) index.addPoint(Array.from(k.subarray(i * d, (i + 1) * d)), i);
  const dir = mkdtempSync(join(tmpdir(), 'kvrecall-hnsw-ref-'));
  try {
    index.writeIndexSync(join(dir, 'index.bin'));
    const graph = readFileSync(join(dir, 'index.bin'));
    const out = new Uint8Array(d * 4 + graph.byteLength);
    out.set(new Uint8Array(mean.buffer), 0);
    out.set(graph, d * 4);
    return out;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('hnsw build in a worker', () => {
  it('gives the calling thread\'s graph, byte for byte, while the event loop turns', async () => {
    const rng = new Rng(seed), N = 3000, d = 24;
    const keys = Uint16Array.from({ length: N * d }, () => bitsOf('f16')(rng.normal()));
    const input: BuildInput = { keys, values: keys, tokens: N, headDim: d, dtype: 'f16', queries: new Float32Array(0), queryCount: 0 };
    let turns = 0, building = true;
    const spin = () => {
      turns++;
      if (building) setImmediate(spin);
    };
    setImmediate(spin);
    const got = await hnswBuilder.build(input);
    building = false;
    // A 3000-point build on the event loop would have let it turn once or twice.
    expect(turns).toBeGreaterThan(20);
    const want = referenceArtifact(input);
    expect(got.byteLength).toBe(want.byteLength);
    expect(Buffer.compare(Buffer.from(got), Buffer.from(want))).toBe(0);
  }, 60_000);
});

describe('buildArtifacts', () => {
  function layers(n: number, heads: number): KvSegment[] {
    return Array.from({ length: n }, () => {
      const s = new KvSegment(heads, 8, 'f16');
      const bytes = new Uint8Array(heads * 4 * 8 * 2);
      s.append(bytes, bytes, 'f16', 4);
      return s;
    });
  }
  /** A stand-in builder: records how many builds overlap, answers [layer-free tag] after a few turns. */
  function recording(concurrency?: number) {
    let running = 0, most = 0, calls = 0;
    const builder: HeadIndexBuilder = {
      async build() {
        const tag = calls++;
        running++;
        most = Math.max(most, running);
        for (let i = 0; i < 3 + (tag % 4); i++) await new Promise((r) => setImmediate(r));
        running--;
        return Uint8Array.of(tag);
      },
      load: () => {
        throw new Error('not used');
      },
      ...(concurrency !== undefined && { concurrency }),
    };
    return { builder, most: () => most };
  }

  for (const concurrency of [undefined, 3])
    it(`runs ${concurrency ?? 1} build(s) at once and keeps (layer, head) order`, async () => {
      const r = recording(concurrency);
      const progress: number[] = [];
      const out = await buildArtifacts('m', r.builder, layers(3, 2), undefined, (n) => progress.push(n));
      expect(r.most()).toBe(concurrency ?? 1);
      expect(out.map((a) => [a.layer, a.head])).toEqual([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]);
      // Builds start in (layer, head) order, so each artifact is the build that was called for it.
      expect(out.map((a) => a.bytes[0])).toEqual([0, 1, 2, 3, 4, 5]);
      expect(progress).toEqual([1, 2, 3, 4, 5, 6]);
    });
});
