// How long the event loop stalls while a wave layer's device store is made
// and freed: WaveGpuStore.create/close (on the calling thread, as the server
// did) against open/closeAsync (libuv's pool, engine/cache/device-wave.ts).
// Needs a CUDA device.
//
//   node dist/bench/wave-gpu-open.js [--tokens N] [--kv-heads H] [--head-dim D] [--rounds R] [--cache-share S]
//
// One layer (default 1M tokens, 8 kv heads, d=128, f16, clusters of 16:
// ~0.6 GiB of summaries and 4 GiB of K/V; --cache-share S: paged, a 4 GiB
// pinned host copy and S of the rows cached). The arrays' contents are
// constant (the copies' time does not depend on them); the heads share one
// set of host arrays. A 1 ms interval timer measures the loop: the largest
// gap between its ticks while the store is made and while it is freed, with
// each variant's wall time. The two variants alternate (sync, async, sync,
// ...), R rounds of each.
// Results: bench/results/wave-gpu-open-<card>.{json,md} (also to $OUT when set).
import { loadavg } from 'node:os';
import { deviceName } from '../addon/cuda.js';
import { WaveGpuStore, type WaveGpuStoreOptions } from '../addon/wave-gpu.js';
import { centroidStride } from '../index/wave/cluster-codec.js';
import { cardName, saveDeviceResult, requireDevice } from './device-results.js';

interface Row { variant: 'sync' | 'async'; makeMs: number; makeGapMs: number; freeMs: number; freeGapMs: number }

function layerOptions(tokens: number, kvHeads: number, d: number, size: number, cacheShare: number): WaveGpuStoreOptions {
  const C = Math.ceil(tokens / size);
  const half = (n: number) => new Uint16Array(n).fill(0x3c00); // 1.0
  const centroids = half(C * centroidStride(d)), means = half(C * d);
  const axes = new Int8Array(C * d).fill(1), vars = new Uint8Array(C * d).fill(1), scales = new Float32Array(C).fill(1);
  const counts = new Int32Array(C);
  const tokenCluster = new Int32Array(tokens);
  for (let t = 0; t < tokens; t++) counts[(tokenCluster[t] = (t / size) | 0)]++;
  const keys = half(tokens * d), values = half(tokens * d);
  const head = { centroids, valueMeans: means, keyAxes: axes, axisScales: scales, keyVars: vars, varScales: scales, counts, tokenCluster, keys, values };
  return { kvHeads, headDim: d, dtype: 'f16', tokens, heads: Array.from({ length: kvHeads }, () => head),
    ...(cacheShare > 0 && { cacheRows: Math.ceil(cacheShare * kvHeads * tokens) }) };
}

/** Runs `f` with a 1 ms interval ticking; the largest gap between ticks (or since the start, or until a tick after the end). */
async function loopGap<T>(f: () => Promise<T> | T): Promise<{ value: T; ms: number; gapMs: number }> {
  let last = performance.now(), gap = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    gap = Math.max(gap, now - last);
    last = now;
  }, 1);
  const t0 = performance.now();
  const value = await f();
  const ms = performance.now() - t0;
  // A tick after the end sees a stall that ran to it (the synchronous variant's whole call).
  await new Promise((r) => setTimeout(r, 5));
  clearInterval(timer);
  return { value, ms, gapMs: gap };
}

async function main() {
  const args = process.argv.slice(2);
  const arg = (k: string, def: number) => (args.includes(k) ? Number(args[args.indexOf(k) + 1]) : def);
  const tokens = arg('--tokens', 1 << 20), kvHeads = arg('--kv-heads', 8), d = arg('--head-dim', 128), rounds = arg('--rounds', 3), share = arg('--cache-share', 0);
  const info = requireDevice();
  const o = layerOptions(tokens, kvHeads, d, 16, share);
  const rows: Row[] = [];
  for (let r = 0; r < rounds; r++)
    for (const variant of ['sync', 'async'] as const) {
      const made = await loopGap(() => (variant === 'sync' ? WaveGpuStore.create(o) : WaveGpuStore.open(o)));
      const freed = await loopGap(() => (variant === 'sync' ? made.value.close() : made.value.closeAsync()));
      const row = { variant, makeMs: made.ms, makeGapMs: made.gapMs, freeMs: freed.ms, freeGapMs: freed.gapMs };
      rows.push(row);
      console.log(JSON.stringify(row));
    }
  const f = (x: number) => x.toFixed(1);
  const md = [
    `# A wave layer's device store made and freed: on the event loop vs on libuv's pool, ${deviceName(info)}`,
    '',
    `One layer, ${tokens} tokens, ${kvHeads} kv heads, d=${d}, f16, clusters of 16${share > 0 ? `, paged (cache share ${share})` : ', dense'}. ` +
      `Largest gap between ticks of a 1 ms interval timer while the store is made / freed (the stall every other request sees), and the call's wall time; ` +
      `the variants alternated, ${rounds} rounds. Load average ${loadavg().map((x) => x.toFixed(2)).join(' ')}.`,
    '',
    '| variant | make ms | loop gap ms | free ms | loop gap ms |',
    '| --- | ---: | ---: | ---: | ---: |',
    ...rows.map((x) => `| ${x.variant === 'sync' ? 'create / close' : 'open / closeAsync'} | ${f(x.makeMs)} | ${f(x.makeGapMs)} | ${f(x.freeMs)} | ${f(x.freeGapMs)} |`),
    '',
  ].join('\n');
  console.log(md);
  saveDeviceResult(`wave-gpu-open-${share > 0 ? 'paged-' : ''}${cardName(info.device)}`, { tokens, kvHeads, d, share, rows, date: new Date().toISOString() }, md);
  process.exit(0);
}

void main();
