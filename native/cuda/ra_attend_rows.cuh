// Attention over listed rows of a device store's keys and values: what a
// retrieval-attention step selected (the code scan's answer, trimmed by the
// method), attended where the store already holds the document layer, so
// the step's scattered rows never go through the host (on the host, ~86K
// rows of 512 bytes gathered at 1M keys, 8 kv heads, d = 128). Split-K as
// flash decoding does it: each CTA folds a tile of a head's rows into one
// (max, normaliser, numerator) per q row with an online softmax, and a merge
// per q row combines the tiles by log-sum-exp. Included by ra_scan.cu.
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace kvr {
namespace cuda {
namespace {

constexpr int kAttendThreads = 256;
constexpr int kAttendRowsPerWarp = 16;
// q rows a pass: a lane's numerators are kAttendGC × 8 floats (registers); a
// group wider than that reads its rows again, from L1/L2, once a pass.
constexpr int kAttendGC = 4;

struct AttendParams {
  int H = 0, G = 0, d = 0;
  float scale = 0.f;
  const uint16_t* keys = nullptr;    // [H, n, d]
  const uint16_t* values = nullptr;  // [H, n, d]
  int64_t n = 0;
  const float* q = nullptr;          // [H * G, d]
  const int32_t* ids = nullptr;      // heads' lists back to back
  const int64_t* start = nullptr;    // [H + 1]
  int64_t tiles = 0;                 // tiles of the longest list: the partials' stride
  float* partial = nullptr;          // [H, tiles, G, d + 2]: max, normaliser, numerator
  float* out = nullptr;              // [H * G, d]
  float* lse = nullptr;              // [H * G]
};

// Lanes a row: d / 8 chunks of 8 channels (one 16-byte load each), rounded
// up to a power of two; 32 / that rows a warp pass.
__host__ __device__ inline int AttendLanes(int d) {
  int l = 1;
  while (l < d / 8) l *= 2;
  return l;
}

__host__ __device__ inline int64_t AttendRowsPerCta(int d) { return int64_t(kAttendThreads / 32) * kAttendRowsPerWarp * (32 / AttendLanes(d)); }

// Shared memory: q [G, d] floats, then a (max, normaliser, numerator[d]) per
// (row lane group of the CTA, q row of the pass).
__host__ inline size_t AttendSmem(int G, int d) {
  const int groups = (kAttendThreads / 32) * (32 / AttendLanes(d));
  return size_t(G) * d * 4 + size_t(groups) * kAttendGC * (d + 2) * 4;
}

// Grid (tiles, H). Head h's rows [tile * R, (tile + 1) * R) of its list.
template <bool kBf16>
__global__ void __launch_bounds__(kAttendThreads) AttendRows(AttendParams p) {
  extern __shared__ __align__(16) float sm[];
  const int h = blockIdx.y, G = p.G, d = p.d;
  const int64_t begin = p.start[h], count = p.start[h + 1] - begin;
  const int64_t R = AttendRowsPerCta(d), first = int64_t(blockIdx.x) * R;
  if (first >= count) return;  // past this head's list: the merge reads only its tiles
  float* sq = sm;
  float* sPart = sm + G * d;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) sq[i] = p.q[size_t(h) * G * d + i];
  __syncthreads();
  const int lanes = AttendLanes(d), chunks = d / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane / lanes, c = lane % lanes;  // the row lane group, and this lane's chunk
  const int groups = (kAttendThreads / 32) * (32 / lanes), group = warp * (32 / lanes) + sub;
  const bool hasChunk = c < chunks;
  const uint16_t* K = p.keys + size_t(h) * p.n * d;
  const uint16_t* V = p.values + size_t(h) * p.n * d;
  // This group's rows: first + group, + groups, ... (kAttendRowsPerWarp of them at most).
  for (int g0 = 0; g0 < G; g0 += kAttendGC) {
    const int gc = min(kAttendGC, G - g0);
    float m[kAttendGC], l[kAttendGC], acc[kAttendGC][8];
#pragma unroll
    for (int g = 0; g < kAttendGC; ++g) {
      m[g] = -CUDART_INF_F;
      l[g] = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    }
    for (int i = 0; i < kAttendRowsPerWarp; ++i) {
      const int64_t r = first + int64_t(i) * groups + group;
      const bool live = r < count && r < first + R;
      const int64_t t = live ? p.ids[begin + r] : 0;
      float kf[8] = {0, 0, 0, 0, 0, 0, 0, 0}, vf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (live && hasChunk) {
        Widen8Words<kBf16>(*reinterpret_cast<const uint4*>(K + size_t(t) * d + c * 8), kf);
        Widen8Words<kBf16>(*reinterpret_cast<const uint4*>(V + size_t(t) * d + c * 8), vf);
      }
#pragma unroll
      for (int g = 0; g < kAttendGC; ++g) {
        if (g >= gc) break;  // uniform over the warp: every lane shuffles
        float dot = 0.f;
        if (hasChunk) {
          const float* qr = sq + (g0 + g) * d + c * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) dot = fmaf(qr[j], kf[j], dot);
        }
        for (int o = lanes / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (!live) continue;
        const float x = p.scale * dot;
        const float mn = fmaxf(m[g], x);
        const float corr = expf(m[g] - mn), e = expf(x - mn);
        l[g] = l[g] * corr + e;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(e, vf[j], acc[g][j] * corr);
        m[g] = mn;
      }
    }
    // Each group's (m, l, numerator) into shared memory, then folded over the groups per (q row, channel).
#pragma unroll
    for (int g = 0; g < kAttendGC; ++g) {
      if (g >= gc) break;
      float* slot = sPart + (size_t(group) * kAttendGC + g) * (d + 2);
      if (c == 0) {
        slot[0] = m[g];
        slot[1] = l[g];
      }
      if (hasChunk)
#pragma unroll
        for (int j = 0; j < 8; ++j) slot[2 + c * 8 + j] = acc[g][j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < gc * (d + 1); i += blockDim.x) {
      const int g = i / (d + 1), ch = i % (d + 1);  // ch == d: the normaliser
      float M = -CUDART_INF_F;
      for (int s = 0; s < groups; ++s) M = fmaxf(M, sPart[(size_t(s) * kAttendGC + g) * (d + 2)]);
      float sum = 0.f;
      if (M > -CUDART_INF_F)
        for (int s = 0; s < groups; ++s) {
          const float* slot = sPart + (size_t(s) * kAttendGC + g) * (d + 2);
          if (slot[0] == -CUDART_INF_F) continue;
          sum += expf(slot[0] - M) * (ch == d ? slot[1] : slot[2 + ch]);
        }
      float* dst = p.partial + ((size_t(h) * p.tiles + blockIdx.x) * G + g0 + g) * (d + 2);
      if (ch == d) {
        dst[0] = M;
        dst[1] = sum;
      } else {
        dst[2 + ch] = sum;
      }
    }
    __syncthreads();
  }
}

// Grid H * G, d threads at least: q row hg's tiles combined by log-sum-exp.
// A head with no rows answers lse -inf and a zero output (the host kernel's
// empty selection).
__global__ void MergeRows(AttendParams p) {
  const int hg = blockIdx.x, h = hg / p.G, g = hg % p.G, d = p.d;
  const int64_t count = p.start[h + 1] - p.start[h], R = AttendRowsPerCta(d);
  const int64_t tiles = (count + R - 1) / R;
  const float* base = p.partial + (size_t(h) * p.tiles * p.G + g) * (d + 2);
  const size_t stride = size_t(p.G) * (d + 2);
  float M = -CUDART_INF_F;
  for (int64_t t = 0; t < tiles; ++t) M = fmaxf(M, base[t * stride]);
  float L = 0.f;
  if (M > -CUDART_INF_F)
    for (int64_t t = 0; t < tiles; ++t)
      if (base[t * stride] > -CUDART_INF_F) L += expf(base[t * stride] - M) * base[t * stride + 1];
  for (int ch = threadIdx.x; ch < d; ch += blockDim.x) {
    float num = 0.f;
    if (M > -CUDART_INF_F)
      for (int64_t t = 0; t < tiles; ++t)
        if (base[t * stride] > -CUDART_INF_F) num += expf(base[t * stride] - M) * base[t * stride + 2 + ch];
    p.out[size_t(hg) * d + ch] = L > 0.f ? num / L : 0.f;
  }
  if (threadIdx.x == 0) p.lse[hg] = L > 0.f ? M + logf(L) : -CUDART_INF_F;
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
