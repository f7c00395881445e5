// Kernels of the wave decode step, included once, by wave_step.cu (which
// describes the step's order and the score summation).
#pragma once

#include "cuda/cuda_common.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerCta = kThreads / 2;  // thread pairs
constexpr int kGC = 4;                     // q heads summed per pass over a row
constexpr int kMaxQueryFloats = 12288;     // group * (headDim + 8) in shared memory
constexpr int kTile = 512;                 // clusters (or exact rows) per estimate CTA
constexpr int32_t kNoOwner = 0x7f7f7f7f;   // owner[] when no exact row claims a token
// EstimatePart's shared memory: per tile row its source (8 bytes) and kGC
// weights, and the row groups' partial sums (at most kThreads / (d / 8)
// groups × kGC × d floats, 32 KiB for any d).
constexpr size_t kEstimateSmem = size_t(kTile) * 8 + size_t(kGC) * kTile * 4 + size_t(kThreads) * 8 * kGC * 4;


// A score's rank key within head h: ascending key = head, then score
// descending. -0 and +0 rank equal, as they compare on the host.
__device__ __forceinline__ uint64_t RankKey(int h, float s) {
  uint32_t u = __float_as_uint(s);
  if ((u << 1) == 0) u = 0;
  const uint32_t order = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(h) << 32) | uint64_t(~order);
}
__device__ __forceinline__ uint64_t PadKey(int h) { return (uint64_t(h) << 32) | 0xffffffffull; }

// acc[g] += q rows g0.. · row over the chunks c in [c0, c1) with c % 2 == half.
template <bool kBf16>
__device__ __forceinline__ void Accumulate(const uint16_t* row, const float* qs, int qStride, int g0, int gc, int c0,
                                           int c1, int half, bool live, float (&acc)[kGC][8]) {
  for (int c = c0 + ((c0 ^ half) & 1); c < c1; c += 8) {
    uint4 w[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      w[u] = live && c + 2 * u < c1 ? __ldg(reinterpret_cast<const uint4*>(row + (c + 2 * u) * 8)) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (c + 2 * u >= c1) break;
      float kf[8];
      Widen8Words<kBf16>(w[u], kf);
      const float* qr = qs + (c + 2 * u) * 8;
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        // Two 16-byte broadcast reads of the q row (rows are 32-byte aligned: stride % 8 == 0).
        const float4 a = *reinterpret_cast<const float4*>(qr + (g0 + g) * qStride);
        const float4 z = *reinterpret_cast<const float4*>(qr + (g0 + g) * qStride + 4);
        const float qv[8] = {a.x, a.y, a.z, a.w, z.x, z.y, z.z, z.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(qv[j], kf[j], acc[g][j]);
      }
    }
  }
}

// The host's horizontal sum of acc0 + acc1 (the pair's two threads); every
// thread of the warp must call it.
__device__ __forceinline__ float ReducePair(const float (&a)[8]) {
  float s[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j] = a[j] + __shfl_xor_sync(0xffffffffu, a[j], 1);
  const float h0 = s[0] + s[4], h1 = s[1] + s[5], h2 = s[2] + s[6], h3 = s[3] + s[7];
  return (h0 + h2) + (h1 + h3);
}

template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* scratch /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}
struct Add { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

struct StepParams {
  // store
  const uint16_t *cent, *means, *keys, *values;
  const int32_t *counts, *memberStart, *members, *tokCl;
  const int64_t* base;  // [kvHeads + 1]: head h's clusters are base[h] .. base[h+1]
  int64_t N, cmax;
  int d, stride, group;
  float scale;
  // step inputs (device)
  const float* qAug;       // [qHeads, stride]
  const int64_t* params;   // [kvHeads, 3]: budget, target, cluster cap
  const int32_t* exact;
  int64_t exactCount, tmax, width;
  // scratch
  float* logits;           // [qHeads, cmax]
  uint64_t *key1, *key1s, *key2, *key2s;
  int32_t *val1, *val1s, *cand, *val2s, *owner, *removed;
  int64_t *cnt, *cum, *sel;  // sel [kvHeads, 2]: clusters taken, candidates
  float *pm, *pden, *pnum;
  int64_t* pest;
  int nMain, parts;
  // outputs (device)
  int32_t* outIds;
  int64_t* outCounts;  // [kvHeads, 2]: ids kept, candidates
  float *out, *lse;
  int64_t* est;
};

__device__ __forceinline__ int64_t Kept(const StepParams& p, int h) { return min(p.params[h * 3], p.sel[h * 2 + 1]); }
// Exact row j of head h: the selection, then the sinks/window rows.
__device__ __forceinline__ int32_t ExactRow(const StepParams& p, int h, int64_t j, int64_t kept) {
  return j < kept ? p.val2s[h * p.tmax + j] : p.exact[j - kept];
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads) ScoreClusters(StepParams p) {
  extern __shared__ __align__(16) float qs[];  // [group, stride]
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < p.group * p.stride; i += blockDim.x) qs[i] = p.qAug[size_t(h) * p.group * p.stride + i];
  __syncthreads();
  const int64_t b = p.base[h], C = p.base[h + 1] - b;
  const int half = threadIdx.x & 1;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  const bool live = r < C;
  const uint16_t* row = p.cent + size_t(b + (live ? r : 0)) * p.stride;
  const int nd = p.d / 8, ns = p.stride / 8;
  float best = -INFINITY;
  for (int g0 = 0; g0 < p.group; g0 += kGC) {
    const int gc = min(kGC, p.group - g0);
    float acc[kGC][8];
#pragma unroll
    for (int g = 0; g < kGC; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    Accumulate<kBf16>(row, qs, p.stride, g0, gc, 0, nd, half, live, acc);
    for (int g = 0; g < gc; ++g) {
      const float dot = ReducePair(acc[g]);
      if (half == 0 && live) p.logits[size_t(h * p.group + g0 + g) * p.cmax + r] = p.scale * dot;
    }
    Accumulate<kBf16>(row, qs, p.stride, g0, gc, nd, ns, half, live, acc);
    for (int g = 0; g < gc; ++g) {
      const float s = ReducePair(acc[g]);
      best = best < s ? s : best;  // std::max
    }
  }
  if (half == 0 && live) {
    p.key1[b + r] = RankKey(h, best);
    p.val1[b + r] = int32_t(r);
  }
}

__global__ void GatherCounts(StepParams p, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int h = int(p.key1s[i] >> 32);
  p.cnt[i] = p.counts[p.base[h] + p.val1s[i]];
}

// The ranked cluster where head h's tokens reach its target (or its cap).
__global__ void CutClusters(StepParams p, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int h = int(p.key1s[i] >> 32);
  const int64_t b = p.base[h], r = i - b, cb = b == 0 ? 0 : p.cum[b - 1];
  const int64_t before = r == 0 ? 0 : p.cum[i - 1] - cb, upto = p.cum[i] - cb;
  const int64_t target = p.params[h * 3 + 1], cap = p.params[h * 3 + 2];
  if (target > 0 && r < cap && before < target && (upto >= target || r == cap - 1)) {
    p.sel[h * 2] = r + 1;
    p.sel[h * 2 + 1] = min(target, upto);
  }
}

// Members of the taken clusters, best cluster first, into cand[h, 0 .. m).
__global__ void GatherCandidates(StepParams p) {
  const int h = blockIdx.y;
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.sel[h * 2]) return;
  const int64_t m = p.sel[h * 2 + 1], b = p.base[h], i = b + r, cb = b == 0 ? 0 : p.cum[b - 1];
  const int64_t before = r == 0 ? 0 : p.cum[i - 1] - cb;
  if (before >= m) return;
  const int32_t c = p.val1s[i];
  const int64_t take = min(int64_t(p.counts[b + c]), m - before);
  const int32_t* src = p.members + size_t(h) * p.N + p.memberStart[b + c];
  int32_t* dst = p.cand + size_t(h) * p.tmax + before;
  for (int64_t k = 0; k < take; ++k) dst[k] = src[k];
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads) RescoreCandidates(StepParams p) {
  extern __shared__ __align__(16) float qs[];  // [group, stride]: the plain q is the first d of each row
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < p.group * p.stride; i += blockDim.x) qs[i] = p.qAug[size_t(h) * p.group * p.stride + i];
  __syncthreads();
  const int half = threadIdx.x & 1;
  const int64_t j = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  const bool live = j < p.sel[h * 2 + 1];
  const int32_t t = live ? p.cand[size_t(h) * p.tmax + j] : 0;
  const uint16_t* row = p.keys + (size_t(h) * p.N + t) * p.d;
  float best = -INFINITY;
  for (int g0 = 0; g0 < p.group; g0 += kGC) {
    const int gc = min(kGC, p.group - g0);
    float acc[kGC][8];
#pragma unroll
    for (int g = 0; g < kGC; ++g)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) acc[g][jj] = 0.f;
    Accumulate<kBf16>(row, qs, p.stride, g0, gc, 0, p.d / 8, half, live, acc);
    for (int g = 0; g < gc; ++g) {
      const float s = ReducePair(acc[g]);
      best = best < s ? s : best;
    }
  }
  if (half == 0 && j < p.tmax) {
    p.key2[size_t(h) * p.tmax + j] = live ? RankKey(h, best) : PadKey(h);
    if (!live) p.cand[size_t(h) * p.tmax + j] = INT32_MAX;
  }
}

// Runs of equal scores that start inside the kept prefix, ordered by id.
__global__ void FixTies(StepParams p) {
  const int h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, kept = Kept(p, h), m = p.sel[h * 2 + 1];
  if (i >= kept) return;
  const uint64_t* k = p.key2s + size_t(h) * p.tmax;
  int32_t* v = p.val2s + size_t(h) * p.tmax;
  if (i > 0 && k[i - 1] == k[i]) return;
  int64_t e = i + 1;
  while (e < m && k[e] == k[i]) ++e;
  for (int64_t a = i + 1; a < e; ++a) {
    const int32_t x = v[a];
    int64_t z = a;
    for (; z > i && v[z - 1] > x; --z) v[z] = v[z - 1];
    v[z] = x;
  }
}

__global__ void PackIds(StepParams p) {
  const int h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, kept = Kept(p, h);
  if (i < p.width) p.outIds[size_t(h) * p.width + i] = i < kept ? p.val2s[size_t(h) * p.tmax + i] : -1;
  if (i == 0) {
    p.outCounts[h * 2] = kept;
    p.outCounts[h * 2 + 1] = p.sel[h * 2 + 1];
  }
}

// kMode 0: owner[t] = the first position listing t; 1: that position counts
// its row against its cluster; 2: both undone for the next step.
template <int kMode>
__global__ void ExactRows(StepParams p) {
  const int h = blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, kept = Kept(p, h);
  if (j >= kept + p.exactCount) return;
  const int32_t t = ExactRow(p, h, j, kept);
  int32_t* owner = p.owner + size_t(h) * p.N + t;
  const int64_t c = p.base[h] + p.tokCl[size_t(h) * p.N + t];
  if (kMode == 0) atomicMin(owner, int32_t(j));
  if (kMode == 1 && *owner == int32_t(j)) atomicAdd(p.removed + c, 1);
  if (kMode == 2) {
    *owner = kNoOwner;
    p.removed[c] = 0;
  }
}

// kGC values reduced over the block at once; every thread gets the results.
template <typename Op>
__device__ void BlockReduceGC(float (&v)[kGC], Op op, float* scratch /* [32 * kGC] */) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
#pragma unroll
  for (int g = 0; g < kGC; ++g)
    for (int o = 16; o > 0; o >>= 1) v[g] = op(v[g], __shfl_down_sync(0xffffffffu, v[g], o));
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < kGC; ++g) scratch[warp * kGC + g] = v[g];
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kGC; ++g) {
    float r = scratch[g];
    for (int w = 1; w < warps; ++w) r = op(r, scratch[w * kGC + g]);
    v[g] = r;
  }
  __syncthreads();
}

// Exclusive prefix of x over the block, in thread order; total: the sum.
__device__ int BlockExclusiveScan(int x, int* scratch /* [32] */, int& total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  int inc = x;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  __syncthreads();
  return before + inc - x;
}

// One tile's partial estimate for every q head of kv head blockIdx.y: the
// tile's max logit m, the normaliser and numerator shifted by it. kRows: the
// exact rows of partly kept clusters, each -e·v (their count already left the
// normaliser through n - r). Thread t looks at tile rows 2t and 2t+1; the
// rows left are compacted in order, so the sums do not depend on timing.
static_assert(kTile == 2 * kThreads, "two tile rows per thread");
template <bool kBf16, bool kRows>
__global__ void __launch_bounds__(kThreads, 3) EstimatePart(StepParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* sSrc = reinterpret_cast<int64_t*>(smem);  // [kTile] first word of each row left, compacted
  float* sE = reinterpret_cast<float*>(sSrc + kTile);  // [kGC, kTile] its numerator weight n·e (or e)
  float* sRed = sE + kGC * kTile;                     // [rowGroups, kGC, d]
  __shared__ float fScratch[32 * kGC];
  __shared__ long long iScratch[32];
  __shared__ int nScratch[32];
  const int h = blockIdx.y;
  const int64_t b = p.base[h], C = p.base[h + 1] - b, kept = kRows ? Kept(p, h) : 0;
  int64_t src[2] = {-1, -1};
  int32_t lc[2] = {0, 0};
  float wd[2] = {0, 0}, wn[2] = {0, 0};
  long long est = 0;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t at = int64_t(blockIdx.x) * kTile + 2 * threadIdx.x + k;
    if (!kRows) {
      if (at < C) {
        const int32_t n = p.counts[b + at], r = p.removed[b + at];
        if (n > 0 && r < n) src[k] = (b + at) * p.d, lc[k] = int32_t(at), wd[k] = float(n - r), wn[k] = float(n), est += n - r;
      }
    } else if (at < kept + p.exactCount) {
      const int32_t t = ExactRow(p, h, at, kept);
      if (p.owner[size_t(h) * p.N + t] == int32_t(at)) {
        const int32_t c = p.tokCl[size_t(h) * p.N + t], n = p.counts[b + c], r = p.removed[b + c];
        if (n > 0 && r < n) src[k] = (int64_t(h) * p.N + t) * p.d, lc[k] = c, wn[k] = 1.f;
      }
    }
  }
  if (!kRows) {
    est = BlockReduce(est, Add(), iScratch);
    if (threadIdx.x == 0) p.pest[size_t(h) * p.nMain + blockIdx.x] = est;
  }
  int live = 0;
  const int pos = BlockExclusiveScan(int(src[0] >= 0) + int(src[1] >= 0), nScratch, live);
  int at[2];
  at[0] = pos;
  at[1] = pos + int(src[0] >= 0);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (src[k] >= 0) sSrc[at[k]] = src[k];
  const int part = (kRows ? p.nMain : 0) + blockIdx.x;
  const int lanes = p.d / 8, groups = kThreads / lanes, lane = threadIdx.x % lanes, rg = threadIdx.x / lanes;
  const uint16_t* rows = kRows ? p.values : p.means;
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
      p.pnum[((qh0 + g) * p.parts + part) * p.d + col] = kRows ? -sum : sum;
    }
    __syncthreads();
  }
}

// One CTA per q head: the tiles merged by log-sum-exp in float64.
__global__ void MergeEstimate(StepParams p) {
  extern __shared__ double sf[];  // [parts]
  __shared__ float fScratch[32];
  __shared__ double dScratch[32];
  __shared__ long long iScratch[32];
  const int qh = blockIdx.x, h = qh / p.group;
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
  for (int i = threadIdx.x; i < p.nMain; i += blockDim.x) est += p.pest[size_t(h) * p.nMain + i];
  den = BlockReduce(den, Add(), dScratch);  // its barriers publish sf too
  est = BlockReduce(est, Add(), iScratch);
  const bool ok = mx != -INFINITY && den > 0 && est > 0;
  for (int col = threadIdx.x; col < p.d; col += blockDim.x) {
    double num = 0;
    for (int i = 0; i < p.parts; ++i) num += double(p.pnum[(size_t(qh) * p.parts + i) * p.d + col]) * sf[i];
    p.out[size_t(qh) * p.d + col] = ok ? float(num / den) : 0.f;
  }
  if (threadIdx.x == 0) {
    p.lse[qh] = ok ? float(double(mx) + log(den)) : -INFINITY;
    if (qh % p.group == 0) p.est[h] = est;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
