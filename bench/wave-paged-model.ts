// The paged wave store's host-to-device traffic, modelled on the host (no
// device needed): bench/wave-gpu-paged.ts's synthetic layer and drifting
// queries, the clusters ranked by the host's kernel (the device's ranking bit
// for bit, native/kernels/cluster_rank), the rows a device step reads (every
// member of the clusters the cut takes until `target` tokens, and of the
// sinks/window rows' clusters: native/cuda/wave_cache.cuh's CacheNeed) and
// the cache's policy (CacheAllocate: slots from a clock hand, skipping those
// read this step) replayed in JS. Per step: the rows missing from the cache,
// as MiB of K and V (4·d bytes a row). What the device bench measures too
// (bytesIn), so the two can be set side by side.
//
//   node dist/bench/wave-paged-model.js [--tokens 1048576] [--heads 8] [--steps 64] [--cluster-size 16] [--probe 4] [--caches 1,2,4] [--stays 0.9,1] [--policy clock|lru] [--out FILE]
//
// --policy lru replays a least-recently-read policy instead of the device's
// clock: how much an age-aware allocation could save.
import { writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { rankClusterHeads } from '../addon/cluster-rank.js';
import type { KvDtype } from '../addon/kernels.js';
import { waveCacheRowsBound } from '../addon/wave-gpu.js';
import { ClusterIndex, PROBE_ESTIMATED, SPREAD } from '../index/wave/cluster-index.js';
import { defaultKnobs, Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { driftingQueries } from './wave-gpu-paged.js';
import { keyRows, staticRows, syntheticHead } from './wave-gpu.js';
import { words } from './wave-gpu-heads.js';

/** A row cache over `rows` slots: which (head, row) each holds and the last step that read it; the policies below differ only in which free slots a step's misses take. */
export abstract class RowCacheModel {
  protected readonly owner: Int32Array;
  protected readonly stamp: Int32Array;
  private readonly slotOf = new Map<number, number>();
  protected step = 0;
  constructor(readonly rows: number) {
    this.owner = new Int32Array(rows).fill(-1);
    this.stamp = new Int32Array(rows).fill(-1);
  }
  /** The step's rows (distinct); returns how many were missing, or -1 where they exceed the cache. */
  run(need: Iterable<number>): number {
    const misses: number[] = [];
    for (const key of need) {
      const s = this.slotOf.get(key);
      if (s === undefined) misses.push(key);
      else this.stamp[s] = this.step;
    }
    const given = this.allocate(misses);
    this.step++;
    return given < misses.length ? -1 : misses.length;
  }
  /** Whether (head, row) `key` holds a slot (bench/wave-code-rescore.ts's miss-capped choice asks). */
  has(key: number): boolean {
    return this.slotOf.has(key);
  }
  /** Gives the misses slots not read this step (`give`), in the policy's order; returns how many got one. */
  protected abstract allocate(misses: number[]): number;
  protected give(s: number, key: number): void {
    if (this.owner[s] >= 0) this.slotOf.delete(this.owner[s]);
    this.owner[s] = key;
    this.slotOf.set(key, s);
    this.stamp[s] = this.step;
  }
}

/** CacheAllocate's policy: a row read this step keeps its slot; a missing one takes the next slot from the hand not read this step. */
export class ClockCache extends RowCacheModel {
  private hand = 0;
  protected allocate(misses: number[]): number {
    let given = 0, last = -1;
    for (let i = 0; i < this.rows && given < misses.length; i++) {
      const s = (this.hand + i) % this.rows;
      if (this.stamp[s] === this.step) continue;
      this.give(s, misses[given++]);
      last = i;
    }
    if (last >= 0) this.hand = (this.hand + last + 1) % this.rows;
    return given;
  }
}

/** The least recently read slots first (by the last step that read them): what a policy with ages could reach beside the clock's. */
export class LruCache extends RowCacheModel {
  protected allocate(misses: number[]): number {
    // Slots by their last step (-1: never), oldest first: a counting sort over the steps so far.
    const byAge: number[][] = Array.from({ length: this.step + 1 }, () => []);
    for (let s = 0; s < this.rows && misses.length > 0; s++) if (this.stamp[s] !== this.step) byAge[this.stamp[s] + 1].push(s);
    let given = 0;
    for (const slots of byAge)
      for (const s of slots) {
        if (given === misses.length) return given;
        this.give(s, misses[given++]);
      }
    return given;
  }
}

async function main() {
  const args = process.argv.slice(2);
  const opt = (name: string, def: string) => (args.includes(name) ? args[args.indexOf(name) + 1] : def);
  const N = Number(opt('--tokens', String(1 << 20))), H = Number(opt('--heads', '8')), steps = Number(opt('--steps', '64'));
  const size = Number(opt('--cluster-size', '16')), probe = Number(opt('--probe', String(PROBE_ESTIMATED)));
  const caches = opt('--caches', '1,2,4').split(',').map(Number), stays = opt('--stays', `${defaultKnobs(1).topicStay},1`).split(',').map(Number);
  const G = 4, d = 128, dt: KvDtype = 'f16', sinks = 16, window = 64, lru = opt('--policy', 'clock') === 'lru';
  const rng = new Rng(20260513);
  const t0 = performance.now();
  const noise = new Float32Array(N * d);
  for (let i = 0; i < noise.length; i++) noise[i] = 0.5 * rng.normal();
  const shared = { noise, values: words(noise, dt), scratch: new Float32Array(N * d) };
  const built = Array.from({ length: H }, () => syntheticHead(rng, N, d, size, dt, shared));
  const heads = built.map((b) => new ClusterIndex(b.arrays, b.head.keys, b.head.values));
  console.log(`layer: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  // The engine's call (bench/wave-gpu-paged.ts's): the budget searched for past the sinks and window.
  const budget = Math.ceil(0.02 * N), exact = staticRows(N, sinks, window), searchK = budget + exact.length, target = probe * searchK;
  const largest = Math.max(...heads.map((h) => Math.max(...h.arrays.counts)));
  const bound = waveCacheRowsBound({ kvHeads: H, tokens: N, target, largestCluster: largest, exactRows: exact.length });
  const C = heads[0].clusters, want = Math.min(C, Math.ceil((2 * target * C) / N) + 8);
  const outIds = heads.map(() => new Int32Array(want)), outScores = heads.map(() => new Float32Array(want));
  // The exact rows' clusters' members: the same every step (the window does not move here).
  const exactRows = heads.map((h) => {
    const rows = new Set<number>();
    for (const t of exact) {
      const c = h.arrays.tokenCluster[t];
      for (let i = h.offsets[c]; i < h.offsets[c + 1]; i++) rows.add(h.members[i]);
    }
    return rows;
  });
  const rowBytes = 4 * d, MiB = 1 << 20;
  const lines: string[] = [];
  const result: Record<string, unknown>[] = [];
  for (const stay of stays) {
    const qs = driftingQueries(rng, keyRows(built.map((b) => b.head), d, dt), H, N, d, G, steps, [], stay);
    const cachesHere = caches.map((f) => new (lru ? LruCache : ClockCache)(Math.min(H * N, Math.ceil(f * bound))));
    const perStep: number[][] = caches.map(() => []);
    let needMax = 0;
    for (let s = 0; s < steps; s++) {
      await rankClusterHeads({
        q: qs[s], group: G, headDim: d, centroidStride: heads[0].stride, dtype: dt, k: want, spread: SPREAD,
        heads: heads.map((h, i) => ({ centroids: h.arrays.centroids, axes: h.arrays.keyAxes, axisScales: h.arrays.axisScales, vars: h.arrays.keyVars,
          varScales: h.arrays.varScales, clusters: h.clusters, outIds: outIds[i], outScores: outScores[i] })),
      });
      const need: number[] = [];
      heads.forEach((h, i) => {
        const rows = new Set(exactRows[i]);
        // The cut: clusters in rank order until their tokens reach the target, the last one whole here (the device reads it whole).
        for (let r = 0, taken = 0; r < want && taken < Math.min(target, N); r++) {
          const c = outIds[i][r];
          taken += h.arrays.counts[c];
          for (let j = h.offsets[c]; j < h.offsets[c + 1]; j++) rows.add(h.members[j]);
        }
        for (const t of rows) need.push(i * N + t);
      });
      needMax = Math.max(needMax, need.length);
      cachesHere.forEach((c, k) => perStep[k].push(c.run(need)));
    }
    cachesHere.forEach((c, k) => {
      const late = perStep[k].slice(16), overflow = late.filter((m) => m < 0).length;
      const mib = late.filter((m) => m >= 0).map((m) => (m * rowBytes) / MiB);
      const mean = mib.reduce((a, v) => a + v, 0) / Math.max(1, mib.length);
      const row = { topicStay: stay, cacheFactor: caches[k], cacheRows: c.rows, cacheShareOfRows: c.rows / (H * N), needMaxRows: needMax,
        firstStepMiB: (perStep[k][0] * rowBytes) / MiB, afterStep16: { mean, p50: quantile(mib, 0.5), p99: quantile(mib, 0.99), max: Math.max(...mib), overflowSteps: overflow } };
      result.push(row);
      lines.push(`| ${stay} | x${caches[k]} (${(100 * row.cacheShareOfRows).toFixed(2)}% of rows) | ${row.firstStepMiB.toFixed(1)} | ${mean.toFixed(2)} | ${row.afterStep16.p50.toFixed(2)} | ${row.afterStep16.p99.toFixed(2)} | ${row.afterStep16.max.toFixed(2)} | ${overflow} |`);
    });
    console.log(`topicStay ${stay}: the most rows a step read ${needMax} (bound ${bound})`);
  }
  const md = [
    `# Paged wave store: host-to-device per step, modelled on the host`,
    '',
    `bench/wave-paged-model.ts: bench/wave-gpu-paged.ts's synthetic layer (${N} tokens, ${H} kv x ${G} q heads, d=${d}, clusters of ${size}), budget ${budget} + ${exact.length} sinks/window rows,`,
    `probe ${probe} (target ${target} rows a head), ${steps} drifting steps per regime; the rows each step reads and ${lru ? 'a least-recently-read policy (not the device\'s)' : 'the cache\'s clock policy (native/cuda/wave_cache.cuh)'} replayed.`,
    `Cache factors are of the bound (waveCacheRowsBound: ${bound} rows, ${((100 * bound) / (H * N)).toFixed(2)}% of the layer's rows). K and V: ${rowBytes} bytes a row.`,
    'Rows counted, nothing timed: any host runs it (these numbers are the same on every machine for the same arguments).',
    '',
    '| topicStay | cache | MiB step 0 | MiB/step 16+: mean | p50 | p99 | max | steps past the cache |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...lines,
    '',
    'Target (issue #13): <= 2 MiB host to device per step after 16 steps.',
  ].join('\n') + '\n';
  console.log(md);
  const out = opt('--out', '');
  if (out) {
    writeFileSync(out, md);
    writeFileSync(out.replace(/\.md$/, '') + '.json', JSON.stringify({ config: { N, H, G, d, size, probe, budget, target, steps, bound }, result }, null, 2) + '\n');
  }
}

// Run only as the entry: bench/wave-code-rescore.ts imports the cache models.
if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) main().catch((e) => {
  console.error(e);
  process.exit(1);
});
