// Dense decode on the GPU pool against torch's scaled_dot_product_attention,
// measured in the same device visit (needs a CUDA device).
//
//   python3 bench/sdpa_reference.py --out $OUT/sdpa.json
//   node dist/bench/dense-vs-sdpa.js --sdpa $OUT/sdpa.json [--reps 50] [--sweep] [--before earlier.json] [--quick]
//
// The shape: one layer, one query token, 32 q / 8 kv heads, f16, blocks of 64
// tokens, every block of 1,048,576 tokens resident in a GpuPool (uploaded
// once), d = 128 and d = 64; the 131,072-token case reads the first 2,048
// blocks of the same tables. Kernel time is the pool's lastKernelMs (CUDA
// events around the split-K kernel and the merge), p50 (nearest rank) of --reps
// attends after 5 warm-ups; sdpa_reference.py times torch the same way. The
// GPU answer is compared with the CPU attend (max abs error of out and lse) at
// both lengths. --sweep also times fixed split counts (AttendArgs.splits)
// beside ChooseSplits' own. --before takes this bench's JSON from an earlier
// visit whose rows carry the previous kernel's times ('legacy' in its sweep)
// and the torch times of that visit, and adds them to the table as the
// "before" columns. A few block sizes the checks of bench/gpu.ts do not cover
// (1, 4, 8, 128, 1024) are checked against the CPU and float64 as well.
//
// Writes gpu-dense-<card>.{md,json} (h100, h200: the device's name) into $OUT when set, else bench/results/.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cudaAvailable, GpuPool } from '../addon/cuda.js';
import { attend, bytesOf, convert } from '../addon/kernels.js';
import { Rng } from '../workload/index.js';
import { checkCase, type CheckCase } from './gpu.js';
import { quantile } from './stats.js';

const argv = process.argv;
const arg = (name: string): string | undefined => (argv.indexOf(name) >= 0 ? argv[argv.indexOf(name) + 1] : undefined);
const reps = Number(arg('--reps') ?? 50);
const sweep = argv.includes('--sweep');
const quick = argv.includes('--quick');

interface Timing {
  variant: string;
  splits: number | 'auto';
  p50: number;
  min: number;
  max: number;
}
interface Row {
  headDim: number;
  tokens: number;
  kvBytes: number;
  ours: Timing;
  oursGBps: number;
  gpuVsCpu: { out: number; lse: number };
  sweep: Timing[];
}

function fillWords(rng: Rng, n: number): Uint16Array {
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = rng.normal();
  const bits = new Uint16Array(n);
  convert(bytesOf(f), 'f32', bytesOf(bits), 'f16', n);
  return bits;
}

function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let e = 0;
  for (let i = 0; i < a.length; i++) e = Math.max(e, Math.abs(a[i] - b[i]));
  return e;
}

async function timeAttend(pool: GpuPool, args: Parameters<GpuPool['attend']>[0], variant: string,
                          splits: number | 'auto'): Promise<Timing> {
  const a = { ...args, splits: splits === 'auto' ? undefined : splits };
  for (let i = 0; i < 5; i++) await pool.attend(a);
  const ms: number[] = [];
  for (let i = 0; i < reps; i++) {
    await pool.attend(a);
    ms.push(pool.stats().lastKernelMs);
  }
  return { variant, splits, p50: quantile(ms, 0.5, 'nearest'), min: Math.min(...ms), max: Math.max(...ms) };
}

async function runDim(d: 64 | 128, contexts: number[]): Promise<Row[]> {
  const qHeads = 32, kvHeads = 8, bs = 64, scale = 1 / Math.sqrt(d);
  const maxTokens = Math.max(...contexts), blocksPerHead = maxTokens / bs;
  const pool = GpuPool.create({ budgetBytes: kvHeads * blocksPerHead * 2 * bs * d * 2, blockSize: bs, headDim: d,
    dtype: 'f16', stagingBytes: 256 << 20 });
  const rows: Row[] = [];
  try {
    const rng = new Rng(11 + d);
    // One head's K and V, a repeated random pattern, uploaded for every kv head.
    const words = maxTokens * d, pattern = 1 << 22;
    const kh = new Uint16Array(words), vh = new Uint16Array(words);
    const kp = fillWords(rng, pattern), vp = fillWords(rng, pattern);
    for (let o = 0; o < words; o += pattern) kh.set(kp, o), vh.set(vp, o);
    const blockIds = Int32Array.from({ length: blocksPerHead }, (_, i) => i);
    const tables: Int32Array[] = [];
    for (let h = 0; h < kvHeads; h++) tables.push(pool.upload(h, blockIds, kh, vh));
    pool.sync();
    const q = new Float32Array(qHeads * d);
    for (let i = 0; i < q.length; i++) q[i] = rng.normal() * 1.5;
    for (const T of contexts) {
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
      const args = { q, qHeads, kvHeads, scale, out, lse, tables: tables.map((t) => t.subarray(0, T / bs)),
        validTokens: new Array(kvHeads).fill(T) };
      const ours = await timeAttend(pool, args, 'default', 'auto');
      await pool.attend(args);
      const cpuOut = new Float32Array(qHeads * d), cpuLse = new Float32Array(qHeads);
      await attend({ q, qHeads, kvHeads, headDim: d, dtype: 'f16', scale, out: cpuOut, lse: cpuLse,
        segments: [{ k: new Array(kvHeads).fill(kh.subarray(0, T * d)), v: new Array(kvHeads).fill(vh.subarray(0, T * d)),
          tokens: T, begin: 0, end: T }] });
      const row: Row = { headDim: d, tokens: T, kvBytes: 2 * kvHeads * T * d * 2, ours,
        oursGBps: (2 * kvHeads * T * d * 2) / (ours.p50 / 1e3) / 1e9,
        gpuVsCpu: { out: maxAbs(out, cpuOut), lse: maxAbs(lse, cpuLse) }, sweep: [] };
      if (sweep)
        for (const s of (process.env.KVR_SWEEP_SPLITS ?? '16,33,49,66,99,132').split(',').map(Number))
          row.sweep.push(await timeAttend(pool, args, 'default', s));
      rows.push(row);
      console.log(JSON.stringify(row));
    }
  } finally {
    pool.close();
  }
  return rows;
}

/** Block sizes that bench/gpu.ts's checks leave out: whole tiles of several blocks, and rows looked up one by one. */
async function extraChecks(): Promise<{ name: string; ok: boolean; gpuVsRef: unknown; gpuVsCpu: unknown }[]> {
  const cases: CheckCase[] = [
    { dt: 'f16', d: 128, G: 4, kvHeads: 2, blockSize: 1, blocks: 301, tail: 1 },
    { dt: 'bf16', d: 64, G: 8, kvHeads: 2, blockSize: 4, blocks: 203, tail: 3 },
    { dt: 'f16', d: 64, G: 1, kvHeads: 3, blockSize: 8, blocks: 157, tail: 5 },
    { dt: 'bf16', d: 128, G: 2, kvHeads: 2, blockSize: 128, blocks: 41, tail: 77 },
    { dt: 'f16', d: 128, G: 8, kvHeads: 1, blockSize: 1024, blocks: 9, tail: 999 },
    { dt: 'f16', d: 64, G: 4, kvHeads: 2, blockSize: 32, blocks: 3, tail: 7, splitCpu: true },
  ];
  const res = [];
  let i = 0;
  for (const c of cases) {
    const r = await checkCase(c, 4242 + i++);
    res.push({ name: r.name, ok: r.ok, gpuVsRef: r.gpuVsRef, gpuVsCpu: r.gpuVsCpu });
    console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${r.name}: gpu-ref ${r.gpuVsRef.out.toExponential(1)}/${r.gpuVsRef.lse.toExponential(1)} ` +
      `gpu-cpu ${r.gpuVsCpu.out.toExponential(1)}/${r.gpuVsCpu.lse.toExponential(1)}`);
  }
  return res;
}

interface SdpaCase {
  headDim: number;
  tokens: number;
  sdpa_enable_gqa: { p50: number; kernels?: string[] };
  sdpa_grouped_rows?: { p50: number };
  [k: string]: unknown;
}

async function main(): Promise<void> {
  const info = cudaAvailable();
  console.log(`cuda: ${JSON.stringify(info)}`);
  if (!info.ok) {
    console.log('no CUDA device: nothing to run');
    return;
  }
  const sdpaPath = arg('--sdpa');
  const sdpa = sdpaPath ? (JSON.parse(readFileSync(sdpaPath, 'utf8')) as { device: string; torch: string; date: string;
    gqa: string; cases: SdpaCase[] }) : undefined;
  const checks = await extraChecks();
  const contexts = quick ? [131072] : [1048576, 131072];
  const rows = [...(await runDim(128, contexts)), ...(await runDim(64, contexts))];
  const sdpaOf = (r: Row) => sdpa?.cases.find((c) => c.headDim === r.headDim && c.tokens === r.tokens);
  // The previous kernel, timed in an earlier visit (its 'legacy' sweep entry), with that visit's torch time.
  const beforePath = arg('--before');
  const before = beforePath ? (JSON.parse(readFileSync(beforePath, 'utf8')) as { date: string;
    rows: { headDim: number; tokens: number; sweep: Timing[] }[]; table: { headDim: number; tokens: number; sdpaMs?: number }[] })
    : undefined;
  const table = rows.map((r) => {
    const s = sdpaOf(r);
    const best = [r.ours, ...r.sweep].reduce((a, b) => (b.p50 < a.p50 ? b : a));
    const b = before?.rows.find((x) => x.headDim === r.headDim && x.tokens === r.tokens);
    const bt = before?.table.find((x) => x.headDim === r.headDim && x.tokens === r.tokens);
    const prevMs = b?.sweep.find((t) => t.variant === 'legacy')?.p50;
    return { headDim: r.headDim, tokens: r.tokens, kvBytes: r.kvBytes, oursMs: r.ours.p50, oursGBps: r.oursGBps,
      sdpaMs: s?.sdpa_enable_gqa.p50, ratio: s ? r.ours.p50 / s.sdpa_enable_gqa.p50 : undefined,
      sdpaGroupedRowsMs: s?.sdpa_grouped_rows?.p50, sdpaKernels: s?.sdpa_enable_gqa.kernels,
      bestSplits: r.sweep.length ? best : undefined, sweep: r.sweep.map((t) => ({ splits: t.splits, p50: t.p50 })),
      before: prevMs === undefined ? undefined : { date: before?.date, previousKernelMs: prevMs, sdpaMs: bt?.sdpaMs,
        ratio: bt?.sdpaMs ? prevMs / bt.sdpaMs : undefined },
      gpuVsCpu: r.gpuVsCpu };
  });
  const result = {
    device: info.device, torchDevice: sdpa?.device, smCount: info.smCount, torch: sdpa?.torch,
    date: new Date().toISOString(), sdpaDate: sdpa?.date,
    shape: { qHeads: 32, kvHeads: 8, queryTokens: 1, dtype: 'f16', blockSize: 64 },
    timing: `kernel: GpuPool lastKernelMs (CUDA events, split-K kernel + merge), p50 nearest rank of ${reps} after 5 warm-ups; ` +
      'torch: CUDA events around F.scaled_dot_product_attention(q, k, v, enable_gqa=True), same rule',
    gqa: sdpa?.gqa, table, rows, extraChecks: checks, sdpa,
  };
  const f = (x: number | undefined, n = 3) => (x === undefined ? '-' : x.toFixed(n));
  const md = [
    `# Dense decode: GpuPool split-K kernel vs torch SDPA (${sdpa?.device ?? info.device})`,
    '',
    `Measured ${result.date.slice(0, 10)} in one device visit (torch ${sdpa?.torch ?? '-'}; SDPA timed ${sdpa?.date ?? '-'}). ` +
      'One layer, one query token, 32 q / 8 kv heads, f16, every K/V block resident (blocks of 64 tokens). ' +
      `Ours: the pool's kernel time (split-K + merge, CUDA events), p50 of ${reps}. ` +
      'SDPA: `F.scaled_dot_product_attention(q, k, v, enable_gqa=True)` on contiguous [1, 8, T, d] K/V (GQA without a K/V copy, ' +
      `backend chosen by torch), CUDA events, p50 of ${reps}. Bandwidth = K+V bytes / our time.`,
    '',
    '| d | tokens | K+V | SDPA ms | ours ms | ours / SDPA | ours GB/s | GPU vs CPU max abs (out / lse) |',
    '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |',
    ...table.map((t) => `| ${t.headDim} | ${t.tokens} | ${(t.kvBytes / 2 ** 30).toFixed(3)} GiB | ${f(t.sdpaMs)} | ${f(t.oursMs)} | ` +
      `${t.ratio === undefined ? '-' : t.ratio.toFixed(2) + 'x'} | ${t.oursGBps.toFixed(0)} | ` +
      `${t.gpuVsCpu.out.toExponential(1)} / ${t.gpuVsCpu.lse.toExponential(1)} |`),
    '',
    `SDPA kernels (profiler): ${[...new Set(table.flatMap((t) => t.sdpaKernels ?? []))].join('; ') || '-'}. ` +
      'Reference: SDPA with the 4 query heads of a kv head as 4 query rows (plain MHA, exact for one non-causal token): ' +
      table.map((t) => `d=${t.headDim} T=${t.tokens}: ${f(t.sdpaGroupedRowsMs)} ms`).join(', ') + '.',
    '',
    ...(table.some((t) => t.before)
      ? [`Before (the split-K kernel this change replaced, timed in the visit of ${before?.date ?? '-'} with that visit's SDPA):`, '',
          '| d | tokens | SDPA ms | previous kernel ms | previous / SDPA |', '| ---: | ---: | ---: | ---: | ---: |',
          ...table.map((t) => `| ${t.headDim} | ${t.tokens} | ${f(t.before?.sdpaMs)} | ${f(t.before?.previousKernelMs)} | ` +
            `${t.before?.ratio === undefined ? '-' : t.before.ratio.toFixed(2) + 'x'} |`), '']
      : []),
    ...(table.some((t) => t.sweep.length)
      ? ['Split counts (ChooseSplits picks one wave of CTAs; ms, p50):', '',
          `| d | tokens | auto | ${table[0].sweep.map((x) => x.splits).join(' | ')} |`,
          `| ---: | ---: | ---: | ${table[0].sweep.map(() => '---:').join(' | ')} |`,
          ...table.map((t) => `| ${t.headDim} | ${t.tokens} | ${f(t.oursMs)} | ${t.sweep.map((x) => f(x.p50)).join(' | ')} |`), '']
      : []),
    `Extra block-size checks (GPU vs CPU and float64): ${checks.every((c) => c.ok) ? 'all ok' : 'FAIL'} ` +
      `(${checks.map((c) => c.name).join('; ')}).`,
    '',
  ].join('\n');
  const dir = process.env.OUT ?? join('bench', 'results');
  mkdirSync(dir, { recursive: true });
  const card = /H\d00/.exec(info.device ?? '')?.[0].toLowerCase() ?? 'gpu';
  writeFileSync(join(dir, `gpu-dense-${card}.json`), JSON.stringify(result, null, 2) + '\n');
  writeFileSync(join(dir, `gpu-dense-${card}.md`), md);
  console.log(md);
  if (!checks.every((c) => c.ok)) process.exitCode = 1;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
