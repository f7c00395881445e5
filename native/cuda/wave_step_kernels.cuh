// Kernels of the wave decode step's selection and what the estimate shares
// with it, included once, by wave_step.cu (which describes the step's order
// and the score summation); the estimate's kernels are in
// wave_step_estimate.cuh.
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
constexpr int kPartialWarps = 4;           // PartialLogits: warps per CTA, each with [2, d] floats of shared memory

// One 16-bit word as a float (exact).
template <bool kBf16>
__device__ __forceinline__ float WidenWord(uint16_t w) {
  if (kBf16) return __uint_as_float(uint32_t(w) << 16);
  return __half2float(__ushort_as_half(w));
}


// A score's rank key within head h: ascending key = head, then score
// descending. -0 and +0 rank equal, as they compare on the host.
__device__ __forceinline__ uint64_t RankKey(int h, float s) {
  uint32_t u = __float_as_uint(s);
  if ((u << 1) == 0) u = 0;
  const uint32_t order = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(h) << 32) | uint64_t(~order);
}
__device__ __forceinline__ uint64_t PadKey(int h) { return (uint64_t(h) << 32) | 0xffffffffull; }

// acc[g] += q rows g0.. · row over the chunks c in [c0, c1) with c % 2 == half;
// kSquare: the q rows' squares (each rounded to f32, as the host's q2).
template <bool kBf16, bool kSquare = false>
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
        float qv[8] = {a.x, a.y, a.z, a.w, z.x, z.y, z.z, z.w};
        if (kSquare)
#pragma unroll
          for (int j = 0; j < 8; ++j) qv[j] = __fmul_rn(qv[j], qv[j]);
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
// The same horizontal sum over 16 lanes of a warp (lane bit 3: the
// accumulator, bits 0-2: its lane j); lane 0 of each 16 gets the sum. Every
// thread of the warp must call it.
__device__ __forceinline__ float ReduceSixteen(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 8);  // acc0_j + acc1_j
  x += __shfl_xor_sync(0xffffffffu, x, 4);  // h_j = s_j + s_{j+4}
  x += __shfl_xor_sync(0xffffffffu, x, 2);  // h0 + h2, h1 + h3
  x += __shfl_xor_sync(0xffffffffu, x, 1);  // (h0 + h2) + (h1 + h3)
  return x;
}

__device__ __forceinline__ void Zero(float (&acc)[kGC][8]) {
#pragma unroll
  for (int g = 0; g < kGC; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
}

// The second-order logit of a cluster's tokens, with the host's roundings
// (native/kernels/cluster_estimate.cc's Logit as GCC compiles it: C++ with
// -mfma contracts a*b + c into one FMA): w = s·dot, then
// fma(((share·0.5)·s)·s, channels, w), capped at s·fma(norm, radius,
// centroidDot). share = 1 rounds as the host's 0.5·s·s (1·0.5 is exact).
__device__ __forceinline__ float SecondOrderLogit(float scale, float share, float dot, float channels, float centroidDot, float norm,
                                                  float radius) {
  const float coef = __fmul_rn(__fmul_rn(__fmul_rn(share, 0.5f), scale), scale);
  const float w = fmaf(coef, channels, __fmul_rn(scale, dot));
  const float cap = __fmul_rn(scale, fmaf(norm, radius, centroidDot));
  return cap < w ? cap : w;  // std::min(w, cap)
}

struct Add { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

struct StepParams {
  // store
  const uint16_t *cent, *means, *keys, *values;
  const uint16_t *axes, *vars;  // [ctot, d]: scaled principal axes, per-channel key variances
  const int32_t *counts, *memberStart, *members, *tokCl;
  const int64_t* base;  // [kvHeads + 1]: head h's clusters are base[h] .. base[h+1]
  const float* shares;  // [kvHeads]: the second-order term's share per head
  int64_t N, cmax;
  int d, stride, group;
  float scale;
  // kSpread: the spread ranking and the second-order estimate (else the
  // radius ranking and the first-order estimate)
  bool spreadMode;
  float spread;
  // kSpread: partly attended clusters by their remaining rows' own logits (else their moments)
  bool restRows;
  // step inputs (device)
  const float* qAug;       // [qHeads, stride]
  const int64_t* params;   // [kvHeads, 3]: budget, target, cluster cap
  const int32_t* exact;
  int64_t exactCount, tmax, width;
  // scratch
  float* logits;           // [qHeads, cmax]
  uint64_t *key1, *key1s, *key2, *key2s;
  int32_t *val1, *val1s, *cand, *val2s, *owner, *removed;
  int32_t* lead;  // [ctot]: the first position of the exact rows owning a row of the cluster (kNoOwner: none)
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

// One thread pair per cluster (blockIdx.y: the kv head): its rank key, and
// per q head the estimate's logit. kSpread: max over the group of
// fma(spread, sqrt(max(0, fma(along, along, channels))), dot) with dot = q·mu,
// along = q·a, channels = q²·var, the host's cluster_rank.cc as GCC compiles
// it; the logit is second order. kRadius: the optimistic row [q, share·‖q‖]
// against [centroid, radius], the logit s·q·mu.
template <bool kBf16>
__global__ void __launch_bounds__(kThreads) ScoreClusters(StepParams p) {
  extern __shared__ __align__(16) float qs[];  // [group, stride]: q, then column d: the norm term
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < p.group * p.stride; i += blockDim.x) qs[i] = p.qAug[size_t(h) * p.group * p.stride + i];
  __syncthreads();
  const int64_t b = p.base[h], C = p.base[h + 1] - b;
  const int half = threadIdx.x & 1;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  const bool live = r < C;
  const size_t c = size_t(b + (live ? r : 0));  // a dead pair reads the head's cluster 0 (C >= 1) and writes nothing
  const uint16_t* row = p.cent + c * p.stride;
  const int nd = p.d / 8, ns = p.stride / 8;
  float best = -INFINITY;
  float acc[kGC][8];
  if (p.spreadMode) {
    const uint16_t* axis = p.axes + c * p.d;
    const uint16_t* var = p.vars + c * p.d;
    const float radius = WidenWord<kBf16>(row[p.d]), share = p.shares[h];
    for (int g0 = 0; g0 < p.group; g0 += kGC) {
      const int gc = min(kGC, p.group - g0);  // uniform over the block: the shuffles below see every lane
      float dot[kGC], along[kGC];
      Zero(acc);
      Accumulate<kBf16>(row, qs, p.stride, g0, gc, 0, nd, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g)
        if (g < gc) dot[g] = ReducePair(acc[g]);
      Zero(acc);
      Accumulate<kBf16>(axis, qs, p.stride, g0, gc, 0, nd, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g)
        if (g < gc) along[g] = ReducePair(acc[g]);
      Zero(acc);
      Accumulate<kBf16, true>(var, qs, p.stride, g0, gc, 0, nd, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float channels = ReducePair(acc[g]);
        const float v = fmaf(along[g], along[g], channels);
        const float sd = __fsqrt_rn(0.f < v ? v : 0.f);  // std::max(0.f, v)
        const float s = fmaf(p.spread, sd, dot[g]);
        best = best < s ? s : best;  // std::max
        if (half == 0 && live)
          p.logits[size_t(h * p.group + g0 + g) * p.cmax + r] =
              SecondOrderLogit(p.scale, share, dot[g], channels, dot[g], qs[(g0 + g) * p.stride + p.d], radius);
      }
    }
  } else {
    for (int g0 = 0; g0 < p.group; g0 += kGC) {
      const int gc = min(kGC, p.group - g0);
      Zero(acc);
      Accumulate<kBf16>(row, qs, p.stride, g0, gc, 0, nd, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float dot = ReducePair(acc[g]);
        if (half == 0 && live) p.logits[size_t(h * p.group + g0 + g) * p.cmax + r] = __fmul_rn(p.scale, dot);
      }
      // The radius chunk continues the same accumulators: the host's Dot over stride words.
      Accumulate<kBf16>(row, qs, p.stride, g0, gc, nd, ns, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float s = ReducePair(acc[g]);
        best = best < s ? s : best;  // std::max
      }
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

}  // namespace
}  // namespace cuda
}  // namespace kvr
