// The wave index's build at seal (index/wave/cluster-build.ts), today's and
// the one before it was made faster (bench/wave-build-before.ts, commit
// 077953a), on the same generator heads, interleaved head by head: wall time
// and the main thread's busy time (V8's sampling profiler, every sample not
// '(idle)': the build's JS and its synchronous native calls; k-means and the
// cluster summaries run on native threads and count only as wall). The
// artifacts must be byte-identical (the bench stops otherwise). Shape: llama3.2-1b's (d=64), clusters of 16,
// segments of 8K, 8 Lloyd iterations, the seal's defaults.
//
//   node dist/bench/wave-build.js [--tokens 262144] [--kv-heads 2] [--rounds 1] [--source default|broad] [--json out.json]
import { writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { Session } from 'node:inspector/promises';
import { performance } from 'node:perf_hooks';
import type { BuildInput } from '../index/method.js';
import { buildClusters, DEFAULT_CLUSTER_OPTIONS } from '../index/wave/cluster-build.js';
import { broadKnobs, defaultKnobs, generateWorkload } from '../workload/index.js';
import { numFlag, strFlag } from './args.js';
import { buildClustersBefore } from './wave-build-before.js';

const d = 64, G = 4;

const session = new Session();
session.connect();
await session.post('Profiler.enable');
await session.post('Profiler.setSamplingInterval', { interval: 200 });

interface Profile {
  nodes: { id: number; callFrame: { functionName: string } }[];
  samples: number[];
  timeDeltas: number[];
}

async function timed(build: () => Promise<Uint8Array>): Promise<{ bytes: Uint8Array; wall: number; busy: number }> {
  await session.post('Profiler.start');
  const t0 = performance.now();
  const bytes = await build();
  const wall = performance.now() - t0;
  const { profile } = (await session.post('Profiler.stop')) as unknown as { profile: Profile };
  const idle = new Set(profile.nodes.filter((n) => n.callFrame.functionName === '(idle)').map((n) => n.id));
  // A sample's delta is the time since the one before it: charged to the later sample, as V8's own summaries do.
  let busy = 0;
  for (let i = 0; i < profile.samples.length; i++) if (!idle.has(profile.samples[i])) busy += profile.timeDeltas[i] ?? 0;
  return { bytes, wall, busy: busy / 1000 };
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.compare(a, b) === 0;

async function main(): Promise<void> {
  const N = numFlag('--tokens') ?? 262144, H = numFlag('--kv-heads') ?? 2, rounds = numFlag('--rounds') ?? 1;
  const source = strFlag('--source') ?? 'default', json = strFlag('--json');
  const machine = `${cpus()[0]?.model}, ${cpus().length} cores`;
  const knobs = source === 'broad' ? broadKnobs(N) : defaultKnobs(N);
  const g0 = performance.now();
  const w = generateWorkload({ seed: 7, tokens: N, kvHeads: H, qHeads: H * G, headDim: d, steps: 1, needles: 2 * H, knobs });
  console.log(`${machine}; generator (${source}) ${N} tokens, ${H} kv heads, d=${d}: ${((performance.now() - g0) / 1000).toFixed(1)} s`);
  const rows: { head: number; round: number; before: { wall: number; busy: number }; after: { wall: number; busy: number }; bytes: number }[] = [];
  for (let r = 0; r < rounds; r++)
    for (let h = 0; h < H; h++) {
      const input: BuildInput = { keys: w.keys[h], values: w.values[h], tokens: N, headDim: d, dtype: w.dtype, queries: w.prefillQ[h], queryCount: w.prefillQ[h].length / d };
      const o = { ...DEFAULT_CLUSTER_OPTIONS, seed: 1 + h };
      // Alternate which goes first, so that neither always runs on a warmer heap.
      const first = (r + h) % 2 === 0;
      const a = first ? await timed(() => buildClustersBefore(input, o)) : undefined;
      const b = await timed(() => buildClusters(input, o));
      const before = a ?? (await timed(() => buildClustersBefore(input, o)));
      if (!same(before.bytes, b.bytes)) throw new Error(`head ${h}: the artifacts differ`);
      rows.push({ head: h, round: r, before: { wall: before.wall, busy: before.busy }, after: { wall: b.wall, busy: b.busy }, bytes: b.bytes.byteLength });
      console.log(`head ${h} round ${r}: before wall ${before.wall.toFixed(0)} ms, main thread ${before.busy.toFixed(0)} ms; ` +
        `after wall ${b.wall.toFixed(0)} ms, main thread ${b.busy.toFixed(0)} ms; ${b.bytes.byteLength} bytes, identical`);
    }
  const sum = (f: (x: (typeof rows)[number]) => number) => rows.reduce((s, x) => s + f(x), 0);
  const tot = { beforeWall: sum((x) => x.before.wall), afterWall: sum((x) => x.after.wall), beforeBusy: sum((x) => x.before.busy), afterBusy: sum((x) => x.after.busy) };
  console.log(`total: wall ${tot.beforeWall.toFixed(0)} -> ${tot.afterWall.toFixed(0)} ms (x${(tot.beforeWall / tot.afterWall).toFixed(2)}), ` +
    `main thread ${tot.beforeBusy.toFixed(0)} -> ${tot.afterBusy.toFixed(0)} ms (x${(tot.beforeBusy / tot.afterBusy).toFixed(2)})`);
  if (json) writeFileSync(json, JSON.stringify({ machine, tokens: N, kvHeads: H, headDim: d, source, options: DEFAULT_CLUSTER_OPTIONS, rows, total: tot }, null, 2) + '\n');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
