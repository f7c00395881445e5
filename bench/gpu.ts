// GPU decode path: correctness checks and a benchmark (needs a CUDA device).
//
//   npm run bench:gpu                 (or: node dist/bench/gpu.js [--check] [--bench] [--decode [--configs wave,nosa,...]
//                                      [--pool-path old|new|ab] [--device-sync loop|pool|ab] [--upload-path heads|batch|ab]
//                                      [--gap MS] [--select-stages]] [--quick])
//
// --check runs the same comparisons as test/native/gpu.test.ts without vitest:
// the split-K kernel over block tables against the CPU `attend` and a float64
// reference on fresh random data (d = 64 and 128, GQA groups 1, 4 and 8, tables
// of 1 to 10^4 blocks with a partial last block, f16 and bf16), the merge of a
// CPU-computed part, a pool that evicts under pressure, and the pool's range
// tables (bench/gpu-range.ts). It exits non-zero on a mismatch.
//
// The benchmark times one layer-step (32 q / 8 kv heads, d=128, f16) with
// 128K, 256K and 1M tokens resident, turns it into achieved bandwidth (K+V
// bytes read / kernel time, against ~3 TB/s), and measures host->device
// copies: the pool's upload path end to end (host memcpy into pinned staging,
// H2D, scatter into slots) and the bare pinned copy, against the 54.8 GB/s
// measured on the lent H100. Results: bench/results/gpu-h100.{json,md}
// (also copied to $OUT when set). Then the decode loop of bench/gpu-decode.ts
// (256 steps at 1M tokens: dense vs nosa vs topk-blocks on the real pool);
// --decode runs only that one, --bench only the kernel and copy timings.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { cudaAvailable, deviceName, GpuPool } from '../addon/cuda.js';
import { attend, bytesOf, convert, type AttendSegment, type KvDtype } from '../addon/kernels.js';
import { mergeInto } from '../engine/cache/merge.js';
import { runDecodeBench, type DeviceSync, type PoolPath, type UploadPath } from './gpu-decode.js';
import { checkRangeTables } from './gpu-range.js';
import { Rng } from '../workload/index.js';
import { quantile } from './stats.js';
import { numFlag } from './args.js';

// ---------------------------------------------------------------- data

/** n random 16-bit words of dtype dt and their exact values. */
export function randomWords(rng: Rng, dt: KvDtype, n: number, sigma = 1): { bits: Uint16Array; values: Float32Array } {
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = rng.normal() * sigma;
  const bits = new Uint16Array(n);
  convert(bytesOf(f), 'f32', bytesOf(bits), dt, n);
  const values = new Float32Array(n);
  convert(bytesOf(bits), dt, bytesOf(values), 'f32', n);
  return { bits, values };
}

/** Float64 attention of every q head over the listed rows of its kv head. */
export function reference(q: Float32Array, k: Float32Array[], v: Float32Array[], qHeads: number, d: number, scale: number,
                   rows: Int32Array[]): { out: Float64Array; lse: Float64Array } {
  const kvHeads = k.length, G = qHeads / kvHeads;
  const out = new Float64Array(qHeads * d), lse = new Float64Array(qHeads);
  for (let qh = 0; qh < qHeads; qh++) {
    const h = Math.floor(qh / G), ids = rows[h], K = k[h], V = v[h];
    const s = new Float64Array(ids.length);
    let m = -Infinity;
    for (let i = 0; i < ids.length; i++) {
      let dot = 0;
      const base = ids[i] * d;
      for (let j = 0; j < d; j++) dot += q[qh * d + j] * K[base + j];
      s[i] = dot * scale;
      if (s[i] > m) m = s[i];
    }
    let z = 0;
    const acc = new Float64Array(d);
    for (let i = 0; i < ids.length; i++) {
      const p = Math.exp(s[i] - m);
      z += p;
      const base = ids[i] * d;
      for (let j = 0; j < d; j++) acc[j] += p * V[base + j];
    }
    for (let j = 0; j < d; j++) out[qh * d + j] = acc[j] / z;
    lse[qh] = m + Math.log(z);
  }
  return { out, lse };
}

export function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let e = 0;
  for (let i = 0; i < a.length; i++) e = Math.max(e, Math.abs(a[i] - b[i]));
  return e;
}

// ---------------------------------------------------------------- checks

export interface CheckCase {
  dt: KvDtype;
  d: 64 | 128;
  G: number;
  kvHeads: number;
  blockSize: number;
  blocks: number;
  /** Tokens valid in the last block (odd, <= blockSize). */
  tail: number;
  /** Attend the second half on the CPU and merge it into the GPU's first half. */
  splitCpu?: boolean;
}

export interface CheckResult {
  name: string;
  tokens: number;
  gpuVsRef: { out: number; lse: number };
  gpuVsCpu: { out: number; lse: number };
  cpuVsRef: { out: number; lse: number };
  ok: boolean;
}

// f32 rounding over up to ~1.6e5 tokens: outputs are O(1) averages, lse O(10).
export const TOL = { out: 2e-4, lse: 2e-4 };

function okErr(e: { out: number; lse: number }, lseScale: number): boolean {
  return e.out <= TOL.out && e.lse <= TOL.lse * Math.max(1, lseScale);
}

export async function checkCase(c: CheckCase, seed: number): Promise<CheckResult> {
  const rng = new Rng(seed);
  const { dt, d, G, kvHeads, blockSize: bs, blocks } = c;
  const qHeads = G * kvHeads, n = blocks * bs, valid = (blocks - 1) * bs + c.tail;
  const scale = 1 / Math.sqrt(d);
  const k: Uint16Array[] = [], v: Uint16Array[] = [], kf: Float32Array[] = [], vf: Float32Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const a = randomWords(rng, dt, n * d), b = randomWords(rng, dt, n * d);
    k.push(a.bits);
    kf.push(a.values);
    v.push(b.bits);
    vf.push(b.values);
  }
  const q = new Float32Array(qHeads * d);
  for (let i = 0; i < q.length; i++) q[i] = rng.normal() * 1.5;

  const pool = GpuPool.create({ budgetBytes: kvHeads * blocks * 2 * bs * d * 2, blockSize: bs, headDim: d, dtype: dt });
  try {
    // Logical blocks uploaded in a shuffled order so slots are not in table order.
    const tables: Int32Array[] = [];
    for (let h = 0; h < kvHeads; h++) {
      const order = Int32Array.from({ length: blocks }, (_, i) => i);
      for (let i = blocks - 1; i > 0; i--) {
        const j = rng.int(i + 1);
        [order[i], order[j]] = [order[j], order[i]];
      }
      const ks = new Uint16Array(n * d), vs = new Uint16Array(n * d);
      order.forEach((b, i) => {
        ks.set(k[h].subarray(b * bs * d, (b + 1) * bs * d), i * bs * d);
        vs.set(v[h].subarray(b * bs * d, (b + 1) * bs * d), i * bs * d);
      });
      const slots = pool.upload(1000 + h, order, ks, vs);
      const table = new Int32Array(blocks);
      order.forEach((b, i) => (table[b] = slots[i]));
      tables.push(table);
    }
    const gpuTokens = c.splitCpu ? Math.max(1, Math.floor(valid / 2 / bs)) * bs : valid;
    const gpuBlocks = Math.ceil(gpuTokens / bs);
    const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
    const cpuOut = new Float32Array(qHeads * d), cpuLse = new Float32Array(qHeads);
    await pool.attend({ q, qHeads, kvHeads, scale, out, lse,
      tables: tables.map((t) => t.subarray(0, gpuBlocks)), validTokens: new Array(kvHeads).fill(gpuTokens) });
    if (c.splitCpu) {
      // The rest on the host, merged by log-sum-exp as the engine merges a step's host parts (engine/cache/merge.ts).
      const po = new Float32Array(qHeads * d), pl = new Float32Array(qHeads);
      await attend({ q, qHeads, kvHeads, headDim: d, dtype: dt, scale, out: po, lse: pl,
        segments: [{ k, v, tokens: n, begin: gpuTokens, end: valid }] });
      mergeInto(out, lse, po, pl, d);
    }
    const seg: AttendSegment = { k, v, tokens: n, begin: 0, end: valid };
    await attend({ q, qHeads, kvHeads, headDim: d, dtype: dt, scale, segments: [seg], out: cpuOut, lse: cpuLse });
    const rows = Array.from({ length: kvHeads }, () => Int32Array.from({ length: valid }, (_, i) => i));
    const ref = reference(q, kf, vf, qHeads, d, scale, rows);
    const lseScale = Math.max(...Array.from(ref.lse, Math.abs));
    const r: CheckResult = {
      name: `${dt} d=${d} G=${G} kv=${kvHeads} bs=${bs} blocks=${blocks} valid=${valid}${c.splitCpu ? ' +cpu-part' : ''}`,
      tokens: valid,
      gpuVsRef: { out: maxAbs(out, ref.out), lse: maxAbs(lse, ref.lse) },
      gpuVsCpu: { out: maxAbs(out, cpuOut), lse: maxAbs(lse, cpuLse) },
      cpuVsRef: { out: maxAbs(cpuOut, ref.out), lse: maxAbs(cpuLse, ref.lse) },
      ok: false,
    };
    r.ok = okErr(r.gpuVsRef, lseScale) && okErr(r.gpuVsCpu, lseScale);
    return r;
  } finally {
    pool.close();
  }
}

/** A pool smaller than the blocks in use: every step uploads a random subset, evicting others. */
export async function checkEviction(dt: KvDtype, seed: number): Promise<CheckResult & { evictions: number }> {
  const rng = new Rng(seed);
  const d = 128, bs = 16, kvHeads = 2, G = 4, qHeads = G * kvHeads, blocks = 200, n = blocks * bs, scale = 1 / Math.sqrt(d);
  const k: Uint16Array[] = [], v: Uint16Array[] = [], kf: Float32Array[] = [], vf: Float32Array[] = [];
  for (let h = 0; h < kvHeads; h++) {
    const a = randomWords(rng, dt, n * d), b = randomWords(rng, dt, n * d);
    k.push(a.bits), kf.push(a.values), v.push(b.bits), vf.push(b.values);
  }
  const slotsInPool = 100; // < 2 heads x 200 blocks
  const pool = GpuPool.create({ budgetBytes: slotsInPool * 2 * bs * d * 2, blockSize: bs, headDim: d, dtype: dt });
  const worst = { gpuVsRef: { out: 0, lse: 0 }, gpuVsCpu: { out: 0, lse: 0 }, cpuVsRef: { out: 0, lse: 0 } };
  let ok = true;
  try {
    for (let step = 0; step < 12; step++) {
      const pick = 40;
      const tables: Int32Array[] = [], rows: Int32Array[] = [], ids: Int32Array[] = [];
      for (let h = 0; h < kvHeads; h++) {
        const chosen = new Set<number>();
        // Locality like NOSA's: half the blocks from last step's neighbourhood, half random.
        while (chosen.size < pick) chosen.add(chosen.size < pick / 2 ? (step * 7 + rng.int(30)) % blocks : rng.int(blocks));
        const list = Int32Array.from([...chosen]);
        const ks = new Uint16Array(pick * bs * d), vs = new Uint16Array(pick * bs * d);
        list.forEach((b, i) => {
          ks.set(k[h].subarray(b * bs * d, (b + 1) * bs * d), i * bs * d);
          vs.set(v[h].subarray(b * bs * d, (b + 1) * bs * d), i * bs * d);
        });
        tables.push(pool.upload(1 + h, list, ks, vs));
        if (step % 3 === 2) pool.pin(1 + h, list.subarray(0, 2)); // pinned blocks must survive
        const tail = 2 * rng.int(bs / 2) + 1; // odd count in the last block
        const r = new Int32Array((pick - 1) * bs + tail);
        for (let i = 0; i < r.length; i++) r[i] = list[Math.floor(i / bs)] * bs + (i % bs);
        rows.push(r);
        ids.push(r);
      }
      // Both heads' uploads done: the first head's slots must still be valid (pool holds 100 >= 2 x 40 + pinned).
      const validTokens = rows.map((r) => r.length);
      const q = new Float32Array(qHeads * d);
      for (let i = 0; i < q.length; i++) q[i] = rng.normal() * 1.5;
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
      await pool.attend({ q, qHeads, kvHeads, scale, tables, validTokens, out, lse });
      const cpuOut = new Float32Array(qHeads * d), cpuLse = new Float32Array(qHeads);
      await attend({ q, qHeads, kvHeads, headDim: d, dtype: dt, scale, out: cpuOut, lse: cpuLse,
        segments: [{ k, v, tokens: n, ids }] });
      const ref = reference(q, kf, vf, qHeads, d, scale, rows);
      const e = { gpuVsRef: { out: maxAbs(out, ref.out), lse: maxAbs(lse, ref.lse) },
        gpuVsCpu: { out: maxAbs(out, cpuOut), lse: maxAbs(lse, cpuLse) },
        cpuVsRef: { out: maxAbs(cpuOut, ref.out), lse: maxAbs(cpuLse, ref.lse) } };
      for (const key of ['gpuVsRef', 'gpuVsCpu', 'cpuVsRef'] as const) {
        worst[key].out = Math.max(worst[key].out, e[key].out);
        worst[key].lse = Math.max(worst[key].lse, e[key].lse);
      }
      ok &&= okErr(e.gpuVsRef, 20) && okErr(e.gpuVsCpu, 20);
    }
    const s = pool.stats();
    return { name: `${dt} eviction: ${slotsInPool} slots, ${kvHeads}x${blocks} blocks, 12 steps`, tokens: 0, ...worst,
      ok: ok && s.evictions > 0, evictions: s.evictions };
  } finally {
    pool.close();
  }
}

export function checkCases(quick = false): CheckCase[] {
  const cases: CheckCase[] = [];
  for (const dt of ['f16', 'bf16'] as const)
    for (const d of [64, 128] as const) {
      for (const G of [1, 4, 8])
        for (const blocks of quick ? [1, 37] : [1, 37, 1000])
          cases.push({ dt, d, G, kvHeads: 2, blockSize: 16, blocks, tail: blocks === 1 ? 5 : 11 });
      cases.push({ dt, d, G: 4, kvHeads: 2, blockSize: 64, blocks: 129, tail: 63, splitCpu: true });
      if (!quick) cases.push({ dt, d, G: 8, kvHeads: 1, blockSize: 16, blocks: 10000, tail: 3 });
    }
  return cases;
}

async function runChecks(quick: boolean): Promise<boolean> {
  const seed = Date.now() % 1_000_000;
  console.log(`gpu checks: seed ${seed}`);
  let allOk = true;
  const lines: string[] = [];
  const f = (e: { out: number; lse: number }) => `${e.out.toExponential(1)}/${e.lse.toExponential(1)}`;
  let i = 0;
  for (const c of checkCases(quick)) {
    const r = await checkCase(c, seed + i++);
    allOk &&= r.ok;
    const line = `${r.ok ? 'ok  ' : 'FAIL'} ${r.name}: gpu-ref ${f(r.gpuVsRef)} gpu-cpu ${f(r.gpuVsCpu)} cpu-ref ${f(r.cpuVsRef)}`;
    console.log(line);
    lines.push(line);
  }
  for (const dt of ['f16', 'bf16'] as const) {
    const r = await checkEviction(dt, seed + i++);
    allOk &&= r.ok;
    const line = `${r.ok ? 'ok  ' : 'FAIL'} ${r.name} (${r.evictions} evictions): gpu-ref ${f(r.gpuVsRef)} gpu-cpu ${f(r.gpuVsCpu)}`;
    console.log(line);
    lines.push(line);
  }
  for (const dt of ['f16', 'bf16'] as const)
    for (const r of await checkRangeTables(dt, seed + i++)) {
      allOk &&= r.ok;
      const line = `${r.ok ? 'ok  ' : 'FAIL'} range tables, ${r.name}: range vs per-block ${r.fastVsSlow.toExponential(1)}, range-ref ${f(r.fastVsRef)}, pool ${r.pool ? 'ok' : 'WRONG'}`;
      console.log(line);
      lines.push(line);
    }
  console.log(allOk ? 'gpu checks: all ok (max abs error out/lse)' : 'gpu checks: MISMATCH');
  if (process.env.OUT) writeFileSync(join(process.env.OUT, 'gpu-check.txt'), `seed ${seed}\n${lines.join('\n')}\n`);
  return allOk;
}

// ---------------------------------------------------------------- benchmark

async function runBench(quick: boolean): Promise<void> {
  const info = cudaAvailable();
  const qHeads = 32, kvHeads = 8, d = 128 as const, bs = 64, dt = 'f16' as const, scale = 1 / Math.sqrt(d);
  const contexts = quick ? [131072] : [131072, 262144, 1048576];
  const maxTokens = contexts[contexts.length - 1], blocksPerHead = maxTokens / bs;
  const slotBytes = 2 * bs * d * 2;
  const pool = GpuPool.create({ budgetBytes: kvHeads * blocksPerHead * slotBytes, blockSize: bs, headDim: d, dtype: dt,
    stagingBytes: 256 << 20 });
  const rng = new Rng(7);
  // One head's worth of K and V host data, reused for every head (values do not change the timing).
  const words = maxTokens * d, pattern = 1 << 22;
  const kh = new Uint16Array(words), vh = new Uint16Array(words);
  const kp = randomWords(rng, dt, pattern).bits, vp = randomWords(rng, dt, pattern).bits;
  for (let o = 0; o < words; o += pattern) kh.set(kp, o), vh.set(vp, o);
  const blockIds = Int32Array.from({ length: blocksPerHead }, (_, i) => i);
  const tables: Int32Array[] = [];
  const t0 = performance.now();
  for (let h = 0; h < kvHeads; h++) tables.push(pool.upload(h, blockIds, kh, vh));
  pool.sync();
  const uploadS = (performance.now() - t0) / 1e3;
  const uploadBytes = pool.stats().bytesCopied;
  const probe = pool.probeH2D(512 << 20, 8);

  const q = new Float32Array(qHeads * d);
  for (let i = 0; i < q.length; i++) q[i] = rng.normal();
  const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads);
  const rows: Record<string, number | string>[] = [];
  for (const T of contexts) {
    const args = { q, qHeads, kvHeads, scale, out, lse, tables: tables.map((t) => t.subarray(0, T / bs)),
      validTokens: new Array(kvHeads).fill(T) };
    for (let i = 0; i < 3; i++) await pool.attend(args);
    const iters = 20, kms: number[] = [];
    const w0 = performance.now();
    for (let i = 0; i < iters; i++) {
      await pool.attend(args);
      kms.push(pool.stats().lastKernelMs);
    }
    const wallMs = (performance.now() - w0) / iters;
    const med = quantile(kms, 0.5, 'high');
    const bytes = kvHeads * T * d * 2 * 2;
    const row: Record<string, number | string> = { tokens: T, kvBytesRead: bytes, kernelMsMedian: med, kernelMsMin: Math.min(...kms),
      callMsMean: wallMs, GBps: bytes / (med / 1e3) / 1e9, fractionOf3TBps: bytes / (med / 1e3) / 3e12 };
    if (T === contexts[0]) {
      // The same step on the CPU path, for scale (and as a check of the GPU answer).
      const cpuOut = new Float32Array(qHeads * d), cpuLse = new Float32Array(qHeads);
      const segK: Uint16Array[] = [], segV: Uint16Array[] = [];
      for (let h = 0; h < kvHeads; h++) segK.push(kh.subarray(0, T * d)), segV.push(vh.subarray(0, T * d));
      const c0 = performance.now();
      await attend({ q, qHeads, kvHeads, headDim: d, dtype: dt, scale, out: cpuOut, lse: cpuLse,
        segments: [{ k: segK, v: segV, tokens: T, begin: 0, end: T }] });
      row.cpuMs = performance.now() - c0;
      row.gpuVsCpuMaxAbsOut = maxAbs(out, cpuOut);
      row.gpuVsCpuMaxAbsLse = maxAbs(lse, cpuLse);
    }
    rows.push(row);
    console.log(JSON.stringify(row));
  }
  pool.close();
  const result = {
    device: deviceName(info), memory: info.memory, smCount: info.smCount, computeCapability: info.computeCapability,
    shape: { qHeads, kvHeads, headDim: d, dtype: dt, blockSize: bs },
    attend: rows,
    h2d: { uploadBytes, uploadSeconds: uploadS, uploadGBps: uploadBytes / uploadS / 1e9,
      pinnedProbeGBps: probe / 1e9, referencePinnedGBps: 54.8,
      note: 'upload = host memcpy into pinned staging (thread pool) + cudaMemcpyAsync + scatter kernel, end to end' },
    date: new Date().toISOString(),
  };
  const md = [
    `# GPU decode attention (${deviceName(info)})`,
    '',
    `One layer-step: ${qHeads} q / ${kvHeads} kv heads, d=${d}, ${dt} KV in blocks of ${bs} tokens, all resident in the device pool. ` +
      'Kernel time = split-K kernel + log-sum-exp merge (CUDA events), median of 20; bandwidth = K+V bytes read / kernel time.',
    '',
    '| tokens | K+V bytes | kernel ms (median) | GB/s | of ~3 TB/s | call ms (mean, incl. JS + copies) |',
    '| ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map((r) => `| ${r.tokens} | ${(Number(r.kvBytesRead) / 2 ** 20).toFixed(0)} MiB | ${Number(r.kernelMsMedian).toFixed(3)} | ` +
      `${Number(r.GBps).toFixed(0)} | ${(Number(r.fractionOf3TBps) * 100).toFixed(0)}% | ${Number(r.callMsMean).toFixed(3)} |`),
    '',
    rows[0].cpuMs !== undefined
      ? `CPU attend on the device machine's cores at ${rows[0].tokens} tokens: ${Number(rows[0].cpuMs).toFixed(1)} ms; ` +
        `GPU vs CPU max abs error: out ${Number(rows[0].gpuVsCpuMaxAbsOut).toExponential(1)}, lse ${Number(rows[0].gpuVsCpuMaxAbsLse).toExponential(1)}.`
      : '',
    '',
    '## Host -> device',
    '',
    `| path | GB/s | of 54.8 GB/s pinned |`,
    '| --- | ---: | ---: |',
    `| pool upload, end to end (${(uploadBytes / 2 ** 30).toFixed(1)} GiB) | ${result.h2d.uploadGBps.toFixed(1)} | ${((result.h2d.uploadGBps / 54.8) * 100).toFixed(0)}% |`,
    `| bare pinned cudaMemcpyAsync (512 MiB x 8) | ${result.h2d.pinnedProbeGBps.toFixed(1)} | ${((result.h2d.pinnedProbeGBps / 54.8) * 100).toFixed(0)}% |`,
    '',
  ].join('\n');
  const dir = join('bench', 'results');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'gpu-h100.json'), JSON.stringify(result, null, 2) + '\n');
  writeFileSync(join(dir, 'gpu-h100.md'), md);
  if (process.env.OUT) {
    writeFileSync(join(process.env.OUT, 'gpu-h100.json'), JSON.stringify(result, null, 2) + '\n');
    writeFileSync(join(process.env.OUT, 'gpu-h100.md'), md);
  }
  console.log(md);
}

async function main(): Promise<void> {
  const info = cudaAvailable();
  console.log(`cuda: ${JSON.stringify(info)}`);
  if (!info.ok) {
    console.log('no CUDA device: nothing to run');
    return;
  }
  const argv = process.argv, quick = argv.includes('--quick');
  const get = (name: string) => numFlag(name, argv);
  if (argv.includes('--check')) {
    const ok = await runChecks(quick);
    if (!ok) process.exitCode = 1;
    if (!argv.includes('--bench') && !argv.includes('--decode')) return;
  }
  const bench = argv.includes('--bench'), decode = argv.includes('--decode');
  if (bench || !decode) await runBench(quick);
  const configs = argv.indexOf('--configs') >= 0 ? argv[argv.indexOf('--configs') + 1].split(',') : undefined;
  const poolPath = argv.indexOf('--pool-path') >= 0 ? argv[argv.indexOf('--pool-path') + 1] : undefined;
  if (poolPath !== undefined && !['old', 'new', 'ab'].includes(poolPath)) throw new Error(`--pool-path: old, new or ab, not ${poolPath}`);
  const deviceSync = argv.indexOf('--device-sync') >= 0 ? argv[argv.indexOf('--device-sync') + 1] : undefined;
  if (deviceSync !== undefined && !['loop', 'pool', 'ab'].includes(deviceSync)) throw new Error(`--device-sync: loop, pool or ab, not ${deviceSync}`);
  const uploadPath = argv.indexOf('--upload-path') >= 0 ? argv[argv.indexOf('--upload-path') + 1] : undefined;
  if (uploadPath !== undefined && !['heads', 'batch', 'ab'].includes(uploadPath)) throw new Error(`--upload-path: heads, batch or ab, not ${uploadPath}`);
  if (decode || !bench)
    await runDecodeBench({ tokens: get('--tokens') ?? (quick ? 131072 : 1048576), steps: get('--steps') ?? (quick ? 32 : 256), device: info.device, configs, poolPath: poolPath as PoolPath | undefined,
      deviceSync: deviceSync as DeviceSync | undefined, uploadPath: uploadPath as UploadPath | undefined, gapMs: get('--gap'),
      selectStages: argv.includes('--select-stages') });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
