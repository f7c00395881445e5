// The estimate at a size where its work is split: whole clusters in chunks
// of 4096, partly attended ones in chunks of 256, over the thread pool, the
// clusters each task skips found by walking a sorted list. Against float64
// written from the definition, with clusters of odd sizes (1 to 9 rows),
// retrieved clusters (some also holding exact rows, which are then ignored),
// clusters attended whole through their rows and exact rows listed twice.
// Both ways a partly attended cluster is estimated: by its remaining rows'
// own logits (member lists) and first order (the centroid).
import { describe, expect, it } from 'vitest';
import { estimateClusters, type ClusterHeadArgs } from '../../addon/estimate.js';
import { bitsOf, valueOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`cluster-estimate-chunks: seed ${seed}`);
const toBits = bitsOf('f16'), toValue = valueOf('f16');
const d = 8, stride = 16, C = 9001, kvHeads = 2, G = 2, qHeads = kvHeads * G, scale = 0.3;

function head(rng: Rng) {
  const counts = Int32Array.from({ length: C }, () => 1 + rng.int(9));
  const N = counts.reduce((a, b) => a + b, 0);
  // Rows shuffled over the clusters, so a cluster's rows are scattered.
  const tokenCluster = new Int32Array(N);
  let at = 0;
  counts.forEach((n, c) => tokenCluster.fill(c, at, (at += n)));
  for (let i = N - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [tokenCluster[i], tokenCluster[j]] = [tokenCluster[j], tokenCluster[i]];
  }
  const offsets = new Int32Array(C + 1);
  for (let c = 0; c < C; c++) offsets[c + 1] = offsets[c] + counts[c];
  const members = new Int32Array(N), next = offsets.slice(0, C);
  tokenCluster.forEach((c, t) => (members[next[c]++] = t));
  const centroids = new Uint16Array(C * stride), valueMeans = new Uint16Array(C * d);
  for (let c = 0; c < C; c++) {
    for (let j = 0; j < d; j++) (centroids[c * stride + j] = toBits(rng.normal())), (valueMeans[c * d + j] = toBits(rng.normal()));
    centroids[c * stride + d] = toBits(1); // the radius: the cap s(q·mu + |q| r) never binds with no spread
  }
  const keys = new Uint16Array(N * d), values = new Uint16Array(N * d);
  for (let t = 0; t < N; t++)
    for (let j = 0; j < d; j++) (keys[t * d + j] = toBits(toValue(centroids[tokenCluster[t] * stride + j]) + 0.5 * rng.normal())), (values[t * d + j] = toBits(rng.normal()));
  // About a fifth of the clusters get exact rows (a tenth of those all of theirs), a few rows twice; some clusters retrieved.
  const exact: number[] = [], retrieved: number[] = [];
  for (let c = 0; c < C; c++) {
    const u = rng.next();
    if (u < 0.2) {
      const rows = Array.from(members.subarray(offsets[c], offsets[c + 1]));
      const take = rng.next() < 0.1 ? rows.length : 1 + rng.int(rows.length);
      for (let i = 0; i < take; i++) exact.push(rows[i]);
      if (rng.next() < 0.1) exact.push(rows[0]);
    }
    if (u > 0.97 || (u < 0.2 && u > 0.19)) retrieved.push(c);
  }
  for (let i = exact.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [exact[i], exact[j]] = [exact[j], exact[i]];
  }
  retrieved.push(retrieved[0]);
  const args: ClusterHeadArgs = {
    centroids, valueMeans, counts, tokenCluster, values, clusters: C, tokens: N, exact: Int32Array.from(exact), retrieved: Int32Array.from(retrieved),
    keys, keyVars: new Uint8Array(C * d), varScales: new Float32Array(C), offsets, members,
  };
  return { args, N };
}

/** Float64 of the definition: per query row, log of the normaliser and out. */
function reference(h: ReturnType<typeof head>, q: Float64Array, rows: boolean) {
  const { centroids, valueMeans, counts, tokenCluster, values, keys, exact, retrieved } = h.args;
  const skip = new Set(retrieved), taken = new Map<number, Set<number>>();
  for (const r of exact!) {
    const c = tokenCluster[r];
    if (skip.has(c)) continue;
    if (!taken.has(c)) taken.set(c, new Set());
    taken.get(c)!.add(r);
  }
  let den = 0, estimated = 0, scanned = 0;
  const num = new Float64Array(d);
  const dotC = (c: number) => q.reduce((a, x, j) => a + x * toValue(centroids[c * stride + j]), 0);
  for (let c = 0; c < C; c++) {
    if (skip.has(c)) continue;
    const out = taken.get(c) ?? new Set<number>(), n = counts[c] - out.size;
    if (n === 0) continue;
    estimated += n;
    const sum = Array.from({ length: d }, (_, j) => counts[c] * toValue(valueMeans[c * d + j]) - [...out].reduce((a, r) => a + toValue(values[r * d + j]), 0));
    let mass: number;
    if (out.size > 0 && rows) {
      const rest = restRows(h, c, out);
      scanned += rest.length;
      mass = rest.reduce((a, r) => a + Math.exp(scale * q.reduce((s, x, j) => s + x * toValue(keys![r * d + j]), 0)), 0);
    } else mass = n * Math.exp(scale * dotC(c));
    den += mass;
    for (let j = 0; j < d; j++) num[j] += (mass / n) * sum[j];
  }
  return { lse: Math.log(den), out: Array.from(num, (x) => x / den), estimated, scanned };
}

function restRows(h: ReturnType<typeof head>, c: number, out: Set<number>): number[] {
  const { offsets, members } = h.args;
  return Array.from(members!.subarray(offsets![c], offsets![c + 1])).filter((r) => !out.has(r));
}

describe('estimate split over tasks', () => {
  for (const rows of [true, false])
    it(`equals float64 over 9001 clusters a head, ${rows ? 'partly attended clusters by their rows' : 'first order'}`, async () => {
      const rng = new Rng(seed + (rows ? 0 : 1));
      const heads = [head(rng), head(rng)];
      const q = Float32Array.from({ length: qHeads * d }, () => rng.normal());
      const out = new Float32Array(qHeads * d), lse = new Float32Array(qHeads), estimated = new Float32Array(kvHeads), scanned = new Float32Array(kvHeads);
      const segments = [heads.map((h) => (rows ? h.args : { ...h.args, keys: undefined, keyVars: undefined, offsets: undefined, members: undefined }))];
      await estimateClusters({ q, qHeads, kvHeads, headDim: d, centroidStride: stride, dtype: 'f16', scale, segments, out, lse, estimated, scanned });
      for (let qh = 0; qh < qHeads; qh++) {
        const h = Math.floor(qh / G), r = reference(heads[h], Float64Array.from(q.subarray(qh * d, (qh + 1) * d)), rows);
        if (qh % G === 0) {
          expect(estimated[h]).toBe(r.estimated);
          expect(scanned[h]).toBe(r.scanned);
        }
        // Float32 logits against float64: 1e-5 of the lse, 1e-4 of out's entries.
        expect(Math.abs(lse[qh] - r.lse)).toBeLessThan(1e-5 * Math.max(1, Math.abs(r.lse)));
        for (let j = 0; j < d; j++) expect(Math.abs(out[qh * d + j] - r.out[j])).toBeLessThan(1e-4 * (1 + Math.abs(r.out[j])));
      }
    });

  it('refuses member lists whose offsets run past the tokens or whose counts are negative', async () => {
    const { args } = head(new Rng(seed + 2));
    const call = (h: ClusterHeadArgs) =>
      estimateClusters({ q: new Float32Array(G * d), qHeads: G, kvHeads: 1, headDim: d, centroidStride: stride, dtype: 'f16', scale, segments: [[h]], out: new Float32Array(G * d), lse: new Float32Array(G), estimated: new Float32Array(1) });
    const counts = args.counts.slice(), offsets = args.offsets!.slice();
    counts[C - 1] += 1;
    offsets[C] += 1;
    await expect(async () => call({ ...args, counts, offsets })).rejects.toThrow(/offsets\[clusters\] is past the tokens/);
    const negative = args.counts.slice(), shifted = args.offsets!.slice();
    negative[0] = -1;
    for (let c = 1; c <= C; c++) shifted[c] = shifted[c] - args.counts[0] - 1;
    await expect(async () => call({ ...args, counts: negative, offsets: shifted })).rejects.toThrow(/counts\[0\]/);
  });
});
