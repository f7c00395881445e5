// faiss natives on this machine: IVF-Flat build, save/load, single-group
// search latency and recall@k against the exact scan for several nprobe, and
// k-means time. Keys: isotropic Gaussian (the hard case for IVF: no cluster
// structure) and the seeded synthetic workload (workload/).
//
//   node dist/bench/faiss.js [--tokens 65536] [--quick]
import { cpus } from 'node:os';
import { IvfIndex, kmeans } from '../addon/faiss.js';
import { bytesOf, convert, nativeThreads, topk } from '../addon/kernels.js';
import { generateWorkload, Rng } from '../workload/index.js';
import { quantile } from './stats.js';

const arg = (name: string, def: number) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const QUICK = process.argv.includes('--quick');
const N = arg('--tokens', 65536);
const D = 128, G = 4, K = 100;
const QUERIES = QUICK ? 20 : 100;

function f16Keys(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  convert(bytesOf(values), 'f32', bytesOf(out), 'f16', values.length);
  return out;
}

function gaussian(n: number, seed: number): Float32Array {
  const rng = new Rng(seed);
  return Float32Array.from({ length: n }, () => rng.normal());
}

const ms = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e6;
const pct = (xs: number[], p: number) => quantile(xs, p, 'high');

async function exact(keys: Uint16Array, q: Float32Array) {
  const outIds = new Int32Array(K), outScores = new Float32Array(K);
  const t0 = process.hrtime.bigint();
  await topk({ q, group: G, headDim: D, keys, tokens: N, dtype: 'f16', k: K, outIds, outScores });
  return { ids: outIds, time: ms(t0) };
}

async function run(name: string, keys: Uint16Array, queries: Float32Array[]) {
  console.log(`\n### ${name}: ${N} keys, d=${D}, G=${G}, k=${K}, ${queries.length} queries\n`);
  const truth = [] as Int32Array[];
  const exactMs: number[] = [];
  for (const q of queries) {
    const r = await exact(keys, q);
    truth.push(r.ids);
    exactMs.push(r.time);
  }
  console.log(`exact native topk (async, 2 threads): median ${pct(exactMs, 0.5).toFixed(2)} ms\n`);
  console.log('| nlist | build s | save ms / MB | load ms | nprobe | scanned | recall@100 | search ms p50 | p90 | faiss scan p50 |');
  console.log('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const nlist of [256, 1024]) {
    const c0 = process.cpuUsage();
    let t0 = process.hrtime.bigint();
    const index = await IvfIndex.build({ keys, tokens: N, headDim: D, dtype: 'f16', nlist, seed: 1 });
    const buildS = ms(t0) / 1000;
    const buildCpu = process.cpuUsage(c0);
    console.error(`nlist ${nlist}: build ${buildS.toFixed(2)} s wall, ${((buildCpu.user + buildCpu.system) / 1e6).toFixed(2)} s CPU`);
    t0 = process.hrtime.bigint();
    const bytes = index.save();
    const saveMs = ms(t0);
    t0 = process.hrtime.bigint();
    IvfIndex.load(bytes).dispose();
    const loadMs = ms(t0);
    const outIds = new Int32Array(K), outScores = new Float32Array(K);
    for (const nprobe of [1, 4, 16, 64]) {
      const times: number[] = [];
      let recall = 0, scanned = 0;
      for (let rep = 0; rep < 3; rep++)
        queries.forEach((q, i) => {
          const t = process.hrtime.bigint();
          const r = index.search({ q, group: G, k: K, nprobe, outIds, outScores });
          times.push(ms(t));
          if (rep === 0) {
            const want = new Set(truth[i]);
            recall += outIds.subarray(0, r.count).filter((id) => want.has(id)).length / K;
            scanned += r.scanned / (G * N);
          }
        });
      // faiss's own per-row search (scalar inner product in Debian's build).
      const faissTimes = queries.map((q) => {
        const t = process.hrtime.bigint();
        index.search({ q, group: G, k: K, nprobe, outIds, outScores, scan: 'faiss' });
        return ms(t);
      });
      console.log(
        `| ${nlist} | ${buildS.toFixed(2)} | ${saveMs.toFixed(1)} / ${(bytes.length / 2 ** 20).toFixed(1)} | ${loadMs.toFixed(1)} | ${nprobe} | ${((100 * scanned) / queries.length).toFixed(2)}% | ${(recall / queries.length).toFixed(3)} | ${pct(times, 0.5).toFixed(3)} | ${pct(times, 0.9).toFixed(3)} | ${pct(faissTimes, 0.5).toFixed(3)} |`,
      );
    }
    index.dispose();
  }
}

async function main() {
  console.log(`${cpus()[0]?.model ?? 'cpu'}, ${cpus().length} cores, native pool ${nativeThreads} threads`);

  // Isotropic Gaussian keys, Gaussian query rows.
  const keys = f16Keys(gaussian(N * D, 7));
  const queries = Array.from({ length: QUERIES }, (_, i) => gaussian(G * D, 1000 + i));
  await run('Gaussian keys', keys, queries);

  // The seeded synthetic workload: one kv head, decode queries of its group.
  const w = generateWorkload({ seed: 3, tokens: N, kvHeads: 1, qHeads: G, headDim: D, steps: QUERIES, needles: 0 });
  await run('synthetic workload (workload/)', w.keys[0], w.decodeQ);

  console.log('\n### k-means (faiss, L2, every key used)\n');
  console.log('| keys | clusters | iterations | wall s | CPU s (all threads) |');
  console.log('| ---: | ---: | ---: | ---: | ---: |');
  for (const [clusters, iterations] of QUICK ? [[1024, 5]] : [[1024, 10], [1024, 20], [256, 20]]) {
    const t0 = process.hrtime.bigint(), c0 = process.cpuUsage();
    await kmeans({ keys, tokens: N, headDim: D, dtype: 'f16', clusters, iterations, seed: 1 });
    const cpu = process.cpuUsage(c0);
    console.log(`| ${N} | ${clusters} | ${iterations} | ${(ms(t0) / 1000).toFixed(2)} | ${((cpu.user + cpu.system) / 1e6).toFixed(2)} |`);
  }
}

await main();
