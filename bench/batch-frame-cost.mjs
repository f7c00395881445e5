// node bench/batch-frame-cost.mjs <after tree> <before tree> [batches]
//
// Main-thread CPU of a batch answer's packing, with and without cold caches:
// "after" (a tree with api/batch-pack.ts BatchFrame) writes each step into
// the frame as it finishes; "before" (a tree from before 181343f, with
// packBatchAnswer) observes the metrics, sizes and fills the frame after the
// batch. 32 steps of 32 q heads × 128 (f32 and f16 out), stats built as the
// engine builds them (spread); between steps 16 MB are streamed through the
// caches, as a step over 4K tokens streams its K/V (NOFLUSH=1: warm caches).
// Each tree's dist/ must be built. Not a timed test: bench/results/transport-vm-stream-overhead.md.
import { join, resolve } from 'node:path';

const [after, before] = [resolve(process.argv[2]), resolve(process.argv[3])];
const N = Number(process.argv[4] ?? 60);
const bpA = await import(join(after, 'dist/api/batch-pack.js'));
const bpB = await import(join(before, 'dist/api/batch-pack.js'));
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16' };
const big = new Float32Array(4 << 20);
let sink = 0;
const flush = process.env.NOFLUSH ? () => {} : () => {
  for (let i = 0; i < big.length; i += 16) sink += big[i];
};
const step = (f16) => {
  const out = new Float32Array(4096).fill(Math.random()), lse = new Float32Array(32);
  const estimated = undefined, blocks = undefined, gpu = undefined;
  const stats = { tokens: 4096, attended: 4096, scanned: 4096, ...(estimated !== undefined && { estimated }), ms: 0, selectMs: Math.random(), attendMs: Math.random(), backend: 'cpu', ...(blocks && { blocks }), ...(gpu && { gpu }) };
  stats.ms = Math.random() * 4;
  const result = { out, lse, stats };
  return f16 ? { ...result, model, outDtype: 'f16', outWords: new Uint16Array(4096).fill(7) } : { ...result, model, outDtype: 'f32' };
};
const room = Buffer.allocUnsafeSlow(1 << 20);
const metrics = { n: 0, s: 0, observeAttend(ms) { this.n++; this.s += ms / 1000; } };
const t = {};
const add = (k, v) => (t[k] ??= []).push(v);
for (let it = 0; it < N; it++)
  for (const f16 of [false, true]) {
    const tag = f16 ? 'f16' : 'f32';
    let inBatch = 0;
    const frame = new bpA.BatchFrame(it), settled = [];
    for (let i = 0; i < 32; i++) {
      flush();
      const r = step(f16);
      settled.push({ status: 'fulfilled', value: r });
      const t0 = performance.now();
      metrics.observeAttend(r.stats.ms);
      frame.step(i, 32, r);
      inBatch += performance.now() - t0;
    }
    let t0 = performance.now();
    const ready = frame.finish(settled, 5.5);
    add(`after, ${tag}: after the batch`, performance.now() - t0);
    add(`after, ${tag}: in the batch (32 steps)`, inBatch);
    ready.release();
    const settledB = [];
    for (let i = 0; i < 32; i++) {
      flush();
      settledB.push({ status: 'fulfilled', value: step(f16) });
    }
    t0 = performance.now();
    for (const r of settledB) metrics.observeAttend(r.value.stats.ms);
    const p = bpB.packBatchAnswer(it, settledB, 5.5);
    p.fill(room.subarray(10, 10 + p.byteLength));
    add(`before, ${tag}: after the batch`, performance.now() - t0);
  }
for (const [k, xs] of Object.entries(t)) {
  const s = xs.slice(xs.length / 4).sort((a, b) => a - b);
  console.log(`${k.padEnd(38)} p50 ${(1000 * s[s.length >> 1]).toFixed(1).padStart(6)} us  p10 ${(1000 * s[Math.floor(s.length / 10)]).toFixed(1).padStart(6)} us`);
}
if (sink === 0.5) console.log('');
