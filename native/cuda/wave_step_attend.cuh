// The wave decode step's retrieval and steady zones attended exactly, from
// the K and V the store holds, as more tiles of the same (max, normaliser,
// numerator) parts the estimate writes: MergeEstimate combines them all, so
// one layer-step answers attention over the whole context (the session's
// own tokens aside, which the host holds). Included once, by wave_step.cu
// after wave_step_estimate.cuh (TileNumerators, the block reductions).
#pragma once

#include "cuda/wave_step_estimate.cuh"

namespace kvr {
namespace cuda {
namespace {

// One tile of exact-row positions of kv head blockIdx.y (the selection, then
// the sinks/window rows; a row listed twice is attended once, at the first
// position owner[] names): per q head the row's logit s·q·k, the tile's max,
// its normaliser and numerator. The dots run a thread pair per row (the
// step's other dots' layout); the logits wait in sE until the tile's max is
// known.
template <bool kBf16>
__device__ __forceinline__ void AttendTile(const StepParams& p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* sSrc = reinterpret_cast<int64_t*>(smem);    // [kTile] the row's first word in keys and values, compacted
  float* sE = reinterpret_cast<float*>(sSrc + kTile);  // [kGC, kTile] logits, then their exps
  float* sRed = sE + kGC * kTile;                     // TileNumerators' scratch
  __shared__ float fScratch[32 * kGC];
  __shared__ int nScratch[32];
  __shared__ int32_t sPos[kTile];  // with dotsOn: a kept row's candidate position (its dots), else -1
  const int h = blockIdx.y;
  const int64_t kept = Kept(p, h);
  int64_t src[2] = {-1, -1};
  int32_t pos[2] = {-1, -1};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t at = int64_t(blockIdx.x) * kTile + 2 * threadIdx.x + k;
    if (at < kept + p.exactCount) {
      const int32_t t = ExactRow(p, h, at, kept);
      if (p.owner[size_t(h) * p.N + t] == int32_t(at)) {
        src[k] = (int64_t(h) * p.N + t) * p.d;
        if (p.dotsOn && at < kept) pos[k] = p.keptPos[size_t(h) * p.width + at];
      }
    }
  }
  int at[2];
  const int live = CompactRows(src, sSrc, nScratch, at);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (src[k] >= 0) sPos[at[k]] = pos[k];
  // Whether any row here has no dots kept (the sinks/window rows, or all without dotsOn).
  const bool summed = __syncthreads_or((src[0] >= 0 && pos[0] < 0) || (src[1] >= 0 && pos[1] < 0));
  const int part = p.attendPart0 + blockIdx.x;
  const int half = threadIdx.x & 1, pair = threadIdx.x >> 1, nd = p.d / 8;
  const float* qg = p.qAug + size_t(h) * p.group * p.stride;
  for (int g0 = 0; g0 < p.group; g0 += kGC) {
    const int gc = min(kGC, p.group - g0);
    const size_t qh0 = size_t(h) * p.group + g0;
    // The kept rows' logits from the dots RescoreCandidates summed for them
    // (the same dot this loop's pairs would sum: the same code and q rows).
    for (int i = threadIdx.x; i < live; i += blockDim.x) {
      const int32_t dp = sPos[i];
      if (dp < 0) continue;
#pragma unroll
      for (int g = 0; g < kGC; ++g)
        if (g < gc) sE[g * kTile + i] = __fmul_rn(p.scale, p.dots[(qh0 + g) * p.tmax + dp]);
    }
    // The others by pairs; the bound is uniform over the CTA, so every lane shuffles.
    for (int i0 = 0; summed && i0 < live; i0 += kRowsPerCta) {
      const int i = i0 + pair;
      const bool on = i < live && sPos[i] < 0;
      float acc[kGC][8];
      Zero(acc);
      Accumulate<kBf16>(p.keys + (on ? sSrc[i] : 0), qg, p.stride, g0, gc, 0, nd, half, on, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float dot = ReducePair(acc[g]);
        if (on && half == 0) sE[g * kTile + i] = __fmul_rn(p.scale, dot);
      }
    }
    __syncthreads();
    float mx[kGC], den[kGC];
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      mx[g] = -INFINITY;
      if (g < gc)
        for (int i = threadIdx.x; i < live; i += blockDim.x) mx[g] = fmaxf(mx[g], sE[g * kTile + i]);
    }
    BlockReduceGC(mx, Max(), fScratch);
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      den[g] = 0.f;
      if (g < gc)
        for (int i = threadIdx.x; i < live; i += blockDim.x) {
          const float e = expf(sE[g * kTile + i] - mx[g]);
          sE[g * kTile + i] = e;
          den[g] += e;
        }
    }
    BlockReduceGC(den, Add(), fScratch);  // its barriers publish sE too
    if (threadIdx.x < gc) {
      p.pm[(qh0 + threadIdx.x) * p.parts + part] = mx[threadIdx.x];
      p.pden[(qh0 + threadIdx.x) * p.parts + part] = den[threadIdx.x];
    }
    TileNumerators<kBf16>(p, p.values, sSrc, sE, sRed, live, gc, qh0, part, 1.f);
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads) AttendPart(StepParams p) {
  AttendTile<kBf16>(p);
}

// With the estimate and the attention both on, their exact-row tiles are the
// same positions: tile blockIdx.x attended, then the estimate's -e·v over the
// same rows' values (those of partly attended clusters), read again while
// the L2 still holds them (128 KiB a tile) instead of from memory by a
// separate EstimatePart<kRows> launch (its 42 x 8 CTAs read 69 MB at 1M, up
// to 43 MB of them these value rows: ncu, H200, 32 us). Each part's sums as
// in the separate kernels: the same bits.
template <bool kBf16>
__global__ void __launch_bounds__(kThreads) AttendAndRows(StepParams p) {
  AttendTile<kBf16>(p);  // ends on a barrier: its shared memory is free
  EstimateTile<kBf16, true>(p);
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
