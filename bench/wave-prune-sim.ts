// Would an exact two-pass prune of the wave step's cluster scoring read fewer
// bytes? (issue #13; a float64 simulation on the CPU, no device.)
//
//   node dist/bench/wave-prune-sim.js [--tokens 262144] [--kv-heads 2] [--steps 4] [--source synthetic|default|broad]
//
// ScoreClusters ranks a cluster by max over the group of
// q·mu + 2·sqrt(max(0, (q·a)² + q²·var)) (cluster_rank.cc). Pass 1 would read
// the centroid and variances (the estimate needs every cluster's q²·var
// anyway) and drop the axis term: a lower bound, exact in floats (fma(a, a, c)
// >= c). The cut over lower bounds (the best clusters until their tokens reach
// probe 4 × (2% + 80 rows), the bench's engine call) is one the true cut
// provably reaches; pass 2 would read the axis (256 of 784 bytes a cluster at
// d=128) only for clusters whose upper bound, (q·a)² <= ‖q‖²·‖a‖², reaches it.
// Also the prune first asked for: pass 1 on centroids alone with
// 2·‖q‖·sqrt(max var + ‖a‖²) as the spread bound. Reports the share of clusters
// each pass 2 would still read. Keys: the bench's synthetic clusters
// (bench/wave-gpu.ts syntheticHead) or the generator's (workload/, default or
// broad knobs) clustered by the real builder, 16 tokens a cluster.
import { bytesOf, convert, type KvDtype } from '../addon/kernels.js';
import { buildClusters } from '../index/wave/cluster-build.js';
import { decodeClusters } from '../index/wave/cluster-codec.js';
import { decodeMoments } from '../index/wave/moment-code.js';
import { broadKnobs, defaultKnobs, generateWorkload, Rng } from '../workload/index.js';
import { numFlag } from './args.js';
import { words } from './wave-gpu-heads.js';
import { keyRows, queries, syntheticHead } from './wave-gpu.js';

interface Head {
  cent: Float32Array;
  axes: Float32Array;
  vars: Float32Array;
  counts: Int32Array;
}

const d = 128, G = 4, stride = d + 8, size = 16;
const widen = (w: Uint16Array, dt: KvDtype) => {
  const f = new Float32Array(w.length);
  convert(bytesOf(w), dt, bytesOf(f), 'f32', w.length);
  return f;
};

/** The share of the head's clusters each pass 2 reads for one query group q ([G, d]). */
function survivors(hd: Head, q: Float32Array, target: number): { axes: number; centroidsOnly: number } {
  const C = hd.counts.length, qn = Array.from({ length: G }, (_, g) => Math.hypot(...q.subarray(g * d, (g + 1) * d)));
  const lb = new Float64Array(C), ub = new Float64Array(C), lb2 = new Float64Array(C), ub2 = new Float64Array(C);
  for (let c = 0; c < C; c++) {
    let an = 0, vmax = 0;
    for (let j = 0; j < d; j++) (an += hd.axes[c * d + j] ** 2), (vmax = Math.max(vmax, hd.vars[c * d + j]));
    let L = -Infinity, U = -Infinity, L2 = -Infinity, U2 = -Infinity;
    for (let g = 0; g < G; g++) {
      let dot = 0, ch = 0;
      for (let j = 0; j < d; j++) (dot += q[g * d + j] * hd.cent[c * stride + j]), (ch += q[g * d + j] ** 2 * hd.vars[c * d + j]);
      L = Math.max(L, dot + 2 * Math.sqrt(ch));
      U = Math.max(U, dot + 2 * Math.sqrt(ch + qn[g] ** 2 * an));
      L2 = Math.max(L2, dot);
      U2 = Math.max(U2, dot + 2 * qn[g] * Math.sqrt(vmax + an));
    }
    (lb[c] = L), (ub[c] = U), (lb2[c] = L2), (ub2[c] = U2);
  }
  const cut = (key: Float64Array) => {
    const order = Array.from(key.keys()).sort((x, y) => key[y] - key[x]);
    let tokens = 0, i = 0;
    while (i < C && tokens < target) tokens += hd.counts[order[i++]];
    return key[order[i - 1]];
  };
  const share = (key: Float64Array, up: Float64Array) => {
    const t = cut(key);
    return up.filter((u) => u >= t).length / C;
  };
  return { axes: share(lb, ub), centroidsOnly: share(lb2, ub2) };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const N = numFlag('--tokens') ?? 262144, H = numFlag('--kv-heads') ?? 2, steps = numFlag('--steps') ?? 4;
  const source = args.includes('--source') ? args[args.indexOf('--source') + 1] : 'synthetic';
  const target = 4 * (Math.ceil(0.02 * N) + 80);
  const heads: Head[] = [], qs: Float32Array[][] = [];
  if (source === 'synthetic') {
    const dt: KvDtype = 'f16', rng = new Rng(20260513), noise = new Float32Array(N * d);
    for (let i = 0; i < noise.length; i++) noise[i] = 0.5 * rng.normal();
    const shared = { noise, values: words(noise, dt), scratch: new Float32Array(N * d) };
    const built = Array.from({ length: H }, () => syntheticHead(rng, N, d, size, dt, shared));
    for (const b of built) heads.push({ cent: widen(b.arrays.centroids, dt), ...decodeMoments(b.arrays, d), counts: b.arrays.counts });
    const keyRow = keyRows(built.map((b) => b.head), d, dt);
    for (let s = 0; s < steps; s++) {
      const q = queries(rng, keyRow, H, N, d, G);
      qs.push(Array.from({ length: H }, (_, h) => q.subarray(h * G * d, (h + 1) * G * d)));
    }
  } else {
    const knobs = source === 'broad' ? broadKnobs(N) : defaultKnobs(N);
    const w = generateWorkload({ seed: 7, tokens: N, kvHeads: H, qHeads: H * G, headDim: d, steps, needles: 2 * H, knobs });
    for (let h = 0; h < H; h++) {
      const bytes = await buildClusters({ keys: w.keys[h], values: w.values[h], tokens: N, headDim: d, dtype: w.dtype, queries: w.prefillQ[h],
        queryCount: w.prefillQ[h].length / d }, { clusterSize: size, segmentTokens: 8192, iterations: 4, seed: 1 + h });
      const a = decodeClusters(bytes);
      heads.push({ cent: widen(a.centroids, w.dtype), ...decodeMoments(a, d), counts: a.counts });
    }
    for (let s = 0; s < steps; s++) qs.push(Array.from({ length: H }, (_, h) => w.decodeQ[s].subarray(h * G * d, (h + 1) * G * d)));
  }
  let axes = 0, centroidsOnly = 0;
  for (const step of qs)
    step.forEach((q, h) => {
      const r = survivors(heads[h], q, target);
      (axes += r.axes), (centroidsOnly += r.centroidsOnly);
    });
  const n = qs.length * H, pct = (x: number) => `${((100 * x) / n).toFixed(1)}%`;
  console.log(`${source}, ${N} tokens, ${H} kv heads x ${steps} steps, clusters of ${size}: pass 2 still reads ${pct(axes)} of clusters ` +
    `(axes pruned), ${pct(centroidsOnly)} (centroids-only pass 1, sigma-max bound)`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
