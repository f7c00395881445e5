// k-means problems side by side, as wave's seal runs them (a segment of 8K
// keys per problem, clusters of 16): wall and process CPU time. Run it with
// and without OPENBLAS_NUM_THREADS=1 to see what OpenBLAS's own threads cost
// (native/indexes/faiss_common.h, BlasScope).
//
//   node dist/bench/kmeans-many.js [--problems 16] [--tokens 8192] [--rounds 2]
import { cpus } from 'node:os';
import { kmeansMany } from '../addon/faiss.js';
import { bytesOf, convert } from '../addon/kernels.js';
import { Rng } from '../workload/index.js';

const arg = (name: string, def: number) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
};
const P = arg('--problems', 16), N = arg('--tokens', 8192), ROUNDS = arg('--rounds', 2), D = 128;

const rng = new Rng(7);
const values = Float32Array.from({ length: N * D }, () => rng.normal());
const keys = new Uint16Array(N * D);
convert(bytesOf(values), 'f32', bytesOf(keys), 'f16', values.length);
const problems = Array.from({ length: P }, (_, i) => ({ keys, tokens: N, headDim: D, dtype: 'f16' as const, clusters: N / 16, iterations: 10, seed: i }));

console.log(`${P} problems of ${N} keys, d=${D}, ${N / 16} clusters, 10 iterations; ${cpus()[0]?.model}, ${cpus().length} cores; OPENBLAS_NUM_THREADS=${process.env.OPENBLAS_NUM_THREADS ?? '(unset)'}`);
for (let r = 0; r < ROUNDS; r++) {
  const t0 = performance.now(), c0 = process.cpuUsage();
  await kmeansMany(problems);
  const cpu = process.cpuUsage(c0);
  console.log(`round ${r}: wall ${(performance.now() - t0).toFixed(0)} ms, CPU ${((cpu.user + cpu.system) / 1000).toFixed(0)} ms`);
}
