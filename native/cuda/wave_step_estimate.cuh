// Kernels of the wave decode step's estimation zone, included once, by
// wave_step.cu after wave_step_kernels.cuh (StepParams, the shared helpers).
#pragma once

#include "cuda/wave_step_kernels.cuh"
#include "cuda/wave_tile_mma.cuh"

namespace kvr {
namespace cuda {
namespace {

// A partly attended cluster whose members were all rescored (the whole
// cluster taken by the cut: every probed one but the cut's own) has its
// restRows logit from the dots RescoreCandidates kept (PartialLogitsFromDots);
// PartialLogits does the others.
__device__ __forceinline__ bool FromDots(const StepParams& p, int64_t c, int32_t n) {
  return p.dotsOn && p.restRows && p.cnt[c] == n && PagedWhole(p, c);  // capped: every member rescored
}

// kMode 0: owner[t] = the first position listing t; 1: that position counts
// its row against its cluster, and the first to count a cluster lists it in
// touched (the clusters PartialLogits looks at, in no particular order: each
// is worked on its own): PartialLogitsFromDots's at the front, the others at
// the back, so that PartialLogits walks only its few (the cut's own cluster,
// those of sinks/window rows) with a grid sized for them instead of a warp
// per listed cluster finding out, through a chain of loads, that it is not
// its; the two parts never meet (at most one entry per row); 2: all undone
// for the next step. Row position j of kv head h (of heads).
template <int kMode>
__device__ __forceinline__ void ExactRowAt(const StepParams& p, int h, int64_t j, int heads) {
  const int64_t kept = Kept(p, h);
  if (j >= kept + ExactCount(p)) return;
  const int32_t t = ExactRow(p, h, j, kept);
  int32_t* owner = p.owner + size_t(h) * p.N + t;
  const int32_t cl = TokenCluster(p.maps, p.N, h, t);
  const int64_t c = p.base[h] + cl;
  if (kMode == 0) atomicMin(owner, int32_t(j));
  if (kMode == 1 && *owner == int32_t(j) && atomicAdd(p.removed + c, 1) == 0) {
    int32_t* const list = p.touched + size_t(h) * p.rowsMax;
    if (FromDots(p, c, p.counts[c])) list[atomicAdd(p.touchedN + h, 1)] = cl;
    else list[p.rowsMax - 1 - atomicAdd(p.touchedN + heads + h, 1)] = cl;
  }
  if (kMode == 2) {
    *owner = kNoOwner;
    p.removed[c] = 0;
  }
}
template <int kMode>
__global__ void ExactRows(StepParams p) {
  AfterPrior();
  ExactRowAt<kMode>(p, blockIdx.y, int64_t(blockIdx.x) * blockDim.x + threadIdx.x, gridDim.y);
}
template <bool kBf16, bool kPaged>
__device__ __forceinline__ void PartialLogit(const StepParams& p, int h, int32_t cl, float* rest, int lane);

// The running max and sum of exps of a cluster's members, 16 at a time (a
// thread pair each, half 0 counting; w = -inf for a member not left), summed
// over the warp. The roundings are explicit so that both kernels that call
// it get the same bits (nvcc would contract sum·x + e on its own terms).
__device__ __forceinline__ void Absorb(float w, bool live, int half, float& m, float& sum) {
  float top = w;
  for (int o = 16; o > 1; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
  const float next = fmaxf(m, top);
  float e = half == 0 && live ? expf(w - next) : 0.f;
  for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
  if (next != -INFINITY) sum = __fadd_rn(m == -INFINITY ? 0.f : __fmul_rn(sum, expf(m - next)), e);
  m = next;
}

// A warp per touched cluster of kv head blockIdx.y at the back of the list
// (ExactRows<1>: none FromDots), striding over them: a warp per exact row,
// most of them with nothing to do, spent longer finding that out (a chain of
// dependent loads each) than the others worked.
template <bool kBf16, bool kPaged = false>
__global__ void __launch_bounds__(kPartialWarps * 32) PartialLogits(StepParams p) {
  AfterPrior();
  extern __shared__ __align__(16) float rest[];  // [kPartialWarps, 2, d]: the rest's mean key, then its variance
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, h = blockIdx.y;
  const int32_t listed = p.touchedN[gridDim.y + h];
  const int32_t* const back = p.touched + size_t(h) * p.rowsMax + p.rowsMax - 1;
  for (int32_t k = int32_t(blockIdx.x) * kPartialWarps + warp; k < listed; k += int32_t(gridDim.x) * kPartialWarps)
    PartialLogit<kBf16, kPaged>(p, h, back[-k], rest + size_t(warp) * 2 * p.d, lane);
}

// The second-order logit of a partly attended cluster (0 < removed < n),
// per q head, over the one ScoreClusters wrote: with restRows from the rows
// the cluster has left, each by its own logit; else from the moments of the
// rows it has left, as native/kernels/cluster_estimate.cc's Rest computes
// them (float64, the exact rows taken out in ascending row order: the
// members are listed ascending; FMAs where GCC contracts the host's), then
// SecondOrderLogit with the whole cluster's centroid and radius in the cap.
// The whole warp works on it (every return is uniform over it). Lanes hold
// channels lane, lane + 32, ... for the moments; for the moments' dots, lane
// = 16·(q head of the pair) + 8·(the host's accumulator) + (its lane), as
// ReduceSixteen sums them; for the rows' own logits, a thread pair per member.
template <bool kBf16, bool kPaged>
__device__ __forceinline__ void PartialLogit(const StepParams& p, int h, int32_t cl, float* rest, int lane) {
  const int64_t c = p.base[h] + cl;
  const int32_t n = p.counts[c], removed = p.removed[c];
  if (!(removed > 0 && removed < n)) return;
  const int32_t* own = p.owner + size_t(h) * p.N;
  float* mean = rest;
  float* var = mean + p.d;
  const int32_t start = p.memberStart[c];  // the cluster's members: MemberToken(.., start + i)
  const uint16_t* cent = p.cent + size_t(c) * p.stride;
  const uint8_t* kv = p.vars + size_t(c) * p.d;
  const float varScale = p.varScales[c];
  const double whole = double(n), left = double(n - removed);
  const int nd = p.d / 8;
  const bool rowsRead = PagedWhole(p, c);  // the page cap may have left some rows unread: then the moments
  if (p.restRows && !rowsRead && p.momentList && lane == 0)
    p.momentList[size_t(h) * p.rowsMax + atomicAdd(p.momentN + h, 1ull)] = cl;
  if (p.restRows && rowsRead) {
    // The rows left by their own logits s·q·k, as one logit per cluster:
    // log(Σ exp(s·q·k_r) / left), so that the tile's (n − removed)·exp(logit)
    // is their mass and its numerator the rest's value sum times mass / left,
    // as cluster_estimate.cc weighs them. A thread pair per member, 16
    // members at once (each dot in the host's Dot order, as ScoreClusters
    // sums a row); the members' exps summed over the warp. A warp that walked
    // the members one by one spent the step's largest stage waiting on loads.
    const float* qg = p.qAug + size_t(h) * p.group * p.stride;
    const int half = lane & 1;
    for (int g0 = 0; g0 < p.group; g0 += kGC) {
      const int gc = min(kGC, p.group - g0);  // uniform over the warp: the shuffles see every lane
      float m[kGC], sum[kGC];
#pragma unroll
      for (int g = 0; g < kGC; ++g) m[g] = -INFINITY, sum[g] = 0.f;
      for (int32_t i0 = 0; i0 < n; i0 += 16) {
        const int32_t i = i0 + (lane >> 1);
        const int32_t u = i < n ? MemberToken(p.maps, p.N, h, start + i) : 0;
        const bool live = i < n && own[u] == kNoOwner;
        float acc[kGC][8];
        Zero(acc);
        Accumulate<kBf16>(p.keys + KvRow<kPaged>(p, h, u), qg, p.stride, g0, gc, 0, nd, half, live, acc);
#pragma unroll
        for (int g = 0; g < kGC; ++g) {
          if (g >= gc) break;
          const float dot = ReducePair(acc[g]);
          const float w = live ? __fmul_rn(p.scale, dot) : -INFINITY;
          Absorb(w, live, half, m[g], sum[g]);
        }
      }
      if (lane < gc) {
        float mg = m[0], sg = sum[0];
#pragma unroll
        for (int g = 1; g < kGC; ++g)
          if (g == lane) mg = m[g], sg = sum[g];
        p.logits[(size_t(h) * p.group + g0 + lane) * p.cmax + cl] = mg + logf(sg) - logf(float(left));
      }
    }
    return;
  }
  __syncwarp();  // the warp's last cluster has been read out of rest
  for (int ch = lane; ch < p.d; ch += 32) {
    const double m = double(WidenWord<kBf16>(cent[ch]));
    double s1 = __dmul_rn(whole, m);
    double s2 = __dmul_rn(whole, fma(m, m, double(DecodeVar(kv[ch], varScale))));
    for (int32_t i = 0; i < n; ++i) {
      const int32_t u = MemberToken(p.maps, p.N, h, start + i);
      if (own[u] == kNoOwner) continue;
      const double k = double(WidenWord<kBf16>(p.keys[KvRow<kPaged>(p, h, u) + ch]));
      s1 = __dsub_rn(s1, k);
      s2 = fma(-k, k, s2);
    }
    const double mu = __ddiv_rn(s1, left), v = fma(-mu, mu, __ddiv_rn(s2, left));
    mean[ch] = __double2float_rn(mu);
    var[ch] = __double2float_rn(0.0 < v ? v : 0.0);  // std::max(0.0, v)
  }
  __syncwarp();
  const float radius = WidenWord<kBf16>(cent[p.d]);
  for (int g0 = 0; g0 < p.group; g0 += 2) {
    const int g = g0 + (lane >> 4);
    const bool on = g < p.group;
    const float* q = p.qAug + (size_t(h) * p.group + (on ? g : g0)) * p.stride;
    float aMu = 0.f, aVar = 0.f, aCen = 0.f;
    for (int cc = (lane >> 3) & 1; cc < nd; cc += 2) {
      const int i = cc * 8 + (lane & 7);
      const float qv = q[i];
      aMu = fmaf(qv, mean[i], aMu);
      aVar = fmaf(__fmul_rn(qv, qv), var[i], aVar);
      aCen = fmaf(qv, WidenWord<kBf16>(cent[i]), aCen);
    }
    const float dMu = ReduceSixteen(aMu), dVar = ReduceSixteen(aVar), dCen = ReduceSixteen(aCen);
    if (on && (lane & 15) == 0)
      p.logits[(size_t(h) * p.group + g) * p.cmax + cl] = SecondOrderLogit(p.scale, p.shares[h], dMu, dVar, dCen, q[p.d], radius);
  }
}

// The tile rows this thread holds (src[k] >= 0: two per thread) compacted
// into sSrc in thread order, so a tile's sums do not depend on timing;
// at[k]: each one's place. Returns the tile's rows. Every thread calls it.
__device__ __forceinline__ int CompactRows(const int64_t (&src)[2], int64_t* sSrc, int* scratch, int (&at)[2]) {
  int live = 0;
  const int pos = BlockExclusiveScan(int(src[0] >= 0) + int(src[1] >= 0), scratch, live);
  at[0] = pos;
  at[1] = pos + int(src[0] >= 0);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (src[k] >= 0) sSrc[at[k]] = src[k];
  return live;
}

// The numerators of one tile for q heads qh0 .. qh0 + gc: sign · Σ_i sE[g, i]
// · row_i over its `live` compacted rows (rows + sSrc[i]), d/8 lanes per row,
// row groups summed apart and added in group order (deterministic). Every
// thread of the CTA calls it; it ends on a barrier.
template <bool kBf16>
__device__ void TileNumerators(const StepParams& p, const uint16_t* rows, const int64_t* sSrc, const float* sE, float* sRed, int live,
                               int gc, size_t qh0, int part, float sign) {
  const int lanes = p.d / 8, groups = kThreads / lanes, lane = threadIdx.x % lanes, rg = threadIdx.x / lanes;
  float acc[kGC][8];
#pragma unroll
  for (int g = 0; g < kGC; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
  if (rg < groups) {
    for (int i0 = rg; i0 < live; i0 += 4 * groups) {
      uint4 x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * groups;
        x[u] = i < live ? __ldg(reinterpret_cast<const uint4*>(rows + sSrc[i] + lane * 8)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * groups;
        if (i >= live) break;
        float v[8];
        Widen8Words<kBf16>(x[u], v);
#pragma unroll
        for (int g = 0; g < kGC; ++g) {
          const float e = g < gc ? sE[g * kTile + i] : 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(e, v[j], acc[g][j]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGC; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) sRed[(size_t(rg) * kGC + g) * p.d + lane * 8 + j] = acc[g][j];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < gc * p.d; i += blockDim.x) {
    const int g = i / p.d, col = i % p.d;
    float sum = 0;
    for (int r = 0; r < groups; ++r) sum += sRed[(size_t(r) * kGC + g) * p.d + col];
    p.pnum[((qh0 + g) * p.parts + part) * p.d + col] = sign * sum;
  }
  __syncthreads();
}

// A tile's numerators by TileNumerators, or on the tensor cores (kMma: the
// launch checked MmaTilesApply).
template <bool kBf16, bool kMma>
__device__ __forceinline__ void Numerators(const StepParams& p, const uint16_t* rows, const int64_t* sSrc, const float* sE, float* sRed, int live,
                                           int gc, size_t qh0, int part, float sign) {
  if constexpr (kMma) TileNumeratorsMma<kBf16>(p, rows, sSrc, sE, sRed, live, gc, qh0, part, sign);
  else TileNumerators<kBf16>(p, rows, sSrc, sE, sRed, live, gc, qh0, part, sign);
}

// One tile's partial estimate for every q head of kv head h: the
// tile's max logit m, the normaliser and numerator shifted by it. kRows: the
// exact rows of partly kept clusters, each -e·v (their count already left the
// normaliser through n - r). Thread t looks at tile rows 2t and 2t+1; the
// rows left are compacted in order, so the sums do not depend on timing.
static_assert(kTile == 2 * kThreads, "two tile rows per thread");
// The body of EstimatePart, for tile `tile` (EstimatePart's blockIdx.x;
// AttendAndClusters runs a kRows tile after the attention tile of the same
// positions) of kv head h (its blockIdx.y).
template <bool kBf16, bool kRows, bool kPaged, bool kMma = false>
__device__ __forceinline__ void EstimateTile(const StepParams& p, int tile, int h) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* sSrc = reinterpret_cast<int64_t*>(smem);  // [kTile] first word of each row left, compacted
  float* sE = reinterpret_cast<float*>(sSrc + kTile);  // [kGC, kTile] its numerator weight n·e (or e)
  float* sRed = sE + kGC * kTile;                     // [rowGroups, kGC, d]
  __shared__ float fScratch[32 * kGC];
  __shared__ long long iScratch[32];
  __shared__ int nScratch[32];
  const int64_t b = p.base[h], C = p.base[h + 1] - b, kept = kRows ? Kept(p, h) : 0;
  int64_t src[2] = {-1, -1};
  int32_t lc[2] = {0, 0};
  float wd[2] = {0, 0}, wn[2] = {0, 0};
  long long est = 0;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t at = int64_t(tile) * kTile + 2 * threadIdx.x + k;
    if (!kRows) {
      if (at < C) {
        // The tile's 128 KiB asked of L2 while its setup runs; not with the
        // tiles on the tensor cores, where it measured slower (0.151 ->
        // 0.140 ms a step's tiles without: bench/results/wave-tiles-h100-s27.md).
        if (p.prefetchRows && !kMma) PrefetchRow(p.means + (b + at) * p.d, p.d * 2);
        const int32_t n = p.counts[b + at], r = p.removed[b + at];
        if (n > 0 && r < n) src[k] = (b + at) * p.d, lc[k] = int32_t(at), wd[k] = float(n - r), wn[k] = float(n), est += n - r;
      }
    } else if (at < kept + ExactCount(p)) {
      const int32_t t = ExactRow(p, h, at, kept);
      if (p.owner[size_t(h) * p.N + t] == int32_t(at)) {
        const int32_t c = TokenCluster(p.maps, p.N, h, t), n = p.counts[b + c], r = p.removed[b + c];
        if (n > 0 && r < n) src[k] = KvRow<kPaged>(p, h, t), lc[k] = c, wn[k] = 1.f;
      }
    }
  }
  if (!kRows) {
    est = BlockReduce(est, Add(), iScratch);
    if (threadIdx.x == 0) p.pest[size_t(h) * p.nMain + tile] = est;
  }
  int at[2];
  const int live = CompactRows(src, sSrc, nScratch, at);
  const int part = (kRows ? p.nMain : 0) + tile;
  for (int g0 = 0; g0 < p.group; g0 += kGC) {
    const int gc = min(kGC, p.group - g0);
    const size_t qh0 = size_t(h) * p.group + g0;
    float w[kGC][2], mx[kGC], den[kGC];
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      mx[g] = -INFINITY;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        w[g][k] = g < gc && src[k] >= 0 ? p.logits[(qh0 + g) * p.cmax + lc[k]] : -INFINITY;
        mx[g] = fmaxf(mx[g], w[g][k]);
      }
    }
    BlockReduceGC(mx, Max(), fScratch);
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      den[g] = 0;
#pragma unroll
      for (int k = 0; k < 2; ++k)
        if (g < gc && src[k] >= 0) {
          const float e = expf(w[g][k] - mx[g]);
          sE[g * kTile + at[k]] = e * wn[k];
          den[g] += e * wd[k];
        }
    }
    BlockReduceGC(den, Add(), fScratch);  // its barriers publish sSrc and sE too
    if (threadIdx.x < gc) {
      p.pm[(qh0 + threadIdx.x) * p.parts + part] = mx[threadIdx.x];
      p.pden[(qh0 + threadIdx.x) * p.parts + part] = den[threadIdx.x];
    }
    Numerators<kBf16, kMma>(p, kRows ? p.values : p.means, sSrc, sE, sRed, live, gc, qh0, part, kRows ? -1.f : 1.f);
  }
}
template <bool kBf16, bool kRows, bool kPaged = false>
__global__ void __launch_bounds__(kThreads, 3) EstimatePart(StepParams p) {
  AfterPrior();
  EstimateTile<kBf16, kRows, kPaged>(p, blockIdx.x, blockIdx.y);
}

// One CTA per q head and 32 output columns (blockIdx.y): the tiles merged by
// log-sum-exp in float64. Warp w sums the tiles i ≡ w (mod warps) of its
// lane's column, the warps' sums added in warp order (deterministic); a CTA
// per q head whose threads each walked every tile left most of the GPU idle.
// A warp's parts (every warps-th) are summed in order, their numerators read
// kMergeBatch at a time, the first batch before the block's reductions: one
// load at a time, a warp's ~parts/8 L2 reads were the kernel's chain.
constexpr int kMergeBatch = 16;
__device__ __forceinline__ void MergeAt(const StepParams& p, int qh, int colBlock) {
  extern __shared__ double sf[];  // [parts]
  __shared__ float fScratch[32];
  __shared__ double dScratch[32];
  __shared__ long long iScratch[32];
  __shared__ double colSum[32][33];  // [warp][lane]
  const int h = qh / p.group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int col = colBlock * 32 + lane;
  const float* const num0 = p.pnum + size_t(qh) * p.parts * p.d + col;  // part i's at [i * d]
  float v[kMergeBatch];
  const auto load = [&](int i0) {
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      const int i = i0 + u * warps;
      v[u] = col < p.d && i < p.parts ? num0[size_t(i) * p.d] : 0.f;
    }
  };
  load(warp);
  const float* pm = p.pm + size_t(qh) * p.parts;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < p.parts; i += blockDim.x) mx = fmaxf(mx, pm[i]);
  mx = BlockReduce(mx, Max(), fScratch);
  double den = 0;
  long long est = 0;
  for (int i = threadIdx.x; i < p.parts; i += blockDim.x) {
    sf[i] = pm[i] == -INFINITY ? 0.0 : exp(double(pm[i]) - double(mx));
    den += double(p.pden[size_t(qh) * p.parts + i]) * sf[i];
  }
  if (p.estimateOn)
    for (int i = threadIdx.x; i < p.nMain; i += blockDim.x) est += p.pest[size_t(h) * p.nMain + i];
  den = BlockReduce(den, Add(), dScratch);  // its barriers publish sf too
  est = BlockReduce(est, Add(), iScratch);
  // The estimate alone is empty when it covers no token (every cluster attended).
  const bool ok = mx != -INFINITY && den > 0 && (p.attendOn || est > 0);
  double num = 0;
  for (int i0 = warp; i0 < p.parts; i0 += kMergeBatch * warps) {
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      const int i = i0 + u * warps;
      if (col < p.d && i < p.parts) num += double(v[u]) * sf[i];
    }
    load(i0 + kMergeBatch * warps);
  }
  colSum[warp][lane] = num;
  __syncthreads();
  if (warp == 0 && col < p.d) {
    double total = 0;
    for (int w = 0; w < warps; ++w) total += colSum[w][lane];
    p.out[size_t(qh) * p.d + col] = ok ? float(total / den) : 0.f;
  }
  if (threadIdx.x == 0 && colBlock == 0) {
    p.lse[qh] = ok ? float(double(mx) + log(den)) : -INFINITY;
    if (qh % p.group == 0) p.est[h] = est;
  }
}
__global__ void MergeEstimate(StepParams p) { AfterPrior(); MergeAt(p, blockIdx.x, blockIdx.y); }

// MergeEstimate's CTAs (the first mergeCtas, colBlocks a q head) and then
// ExactRows<2>'s (rowCtas a kv head) in one launch: the clear touches only
// owner and removed, which the merge does not read, and the merge, a chain
// of waits on ~128 CTAs, leaves most of the GPU idle while it runs.
__global__ void MergeAndClear(StepParams p, int colBlocks, int mergeCtas, int rowCtas) {
  AfterPrior();
  const int b = blockIdx.x;
  if (b < mergeCtas) {
    MergeAt(p, b / colBlocks, b % colBlocks);
  } else {
    const int r = b - mergeCtas;
    ExactRowAt<2>(p, r / rowCtas, int64_t(r % rowCtas) * blockDim.x + threadIdx.x, 0);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
