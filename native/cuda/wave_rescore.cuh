// The wave decode step's candidate rescoring (every candidate row's score,
// max over the group of q·k, and its rank order for the candidate cut),
// included once, by wave_step.cu after wave_step_kernels.cuh (StepParams,
// Accumulate, ReducePair, TakeRange).
#pragma once

#include "cuda/wave_step_kernels.cuh"

namespace kvr {
namespace cuda {
namespace {

template <bool kBf16, bool kPaged = false>
__global__ void __launch_bounds__(kThreads) RescoreCandidates(StepParams p) {
  AfterPrior();
  extern __shared__ __align__(16) float qs[];  // [group, stride]: the plain q is the first d of each row
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < p.group * p.stride; i += blockDim.x) qs[i] = p.qAug[size_t(h) * p.group * p.stride + i];
  __syncthreads();
  const int half = threadIdx.x & 1;
  const int64_t j = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  // kPaged: a candidate the page cap left unread is listed as ~t (wave_page_cap.cuh): not rescored.
  const bool listed = j < p.sel[h * 2 + 1];
  const int32_t t0 = listed ? p.cand[size_t(h) * p.tmax + j] : 0;
  const bool live = listed && (!kPaged || t0 >= 0);
  const int32_t t = live ? t0 : 0;
  const uint16_t* row = p.keys + KvRow<kPaged>(p, h, t);
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
      if (p.dotsOn && half == 0 && live) p.dots[(size_t(h) * p.group + g0 + g) * p.dotStride + j] = s;
    }
  }
  // Rows inside the skip ranges are not candidates: the kept ids are then
  // the best `keep` of the rest, what staticPlusRetrieved keeps of a search
  // for keep + skipped ids (WaveStore::Step checks the budget leaves room).
  const bool skipped = (t >= p.skip[0] && t < p.skip[1]) || (t >= p.skip[2] && t < p.skip[3]);
  if (half == 0 && j < p.tmax) p.ord2[size_t(h) * p.tmax + j] = live && !skipped ? RankOrder(best) : 0xffffffffu;
}

// RescoreCandidates with the thread's half of the row held in registers
// (d <= 128: at most kLoads chunks, all loaded at once as there) and the q
// heads taken one after another: 8 accumulators live instead of kGC x 8, so
// 80 registers fit (launch bounds: three CTAs an SM, 24 warps, instead of
// two at 105), and each SM has half as many rows' loads again in flight
// through the kernel's two dependent loads (the candidate's id, then its
// key row). Each head's dot takes the same words in the same order
// (chunks half, half + 2, ... ascending from 0, then ReducePair), and best
// takes the heads in the same order: the same dots and rank keys. CTAs past
// the candidates' (the launch adds them with dots and attention) do
// ExactDots' rows, the same dots into its columns (tmax + e): one launch less.
template <bool kBf16, bool kPaged = false>
__global__ void __launch_bounds__(kThreads, 3) RescoreHeld(StepParams p) {
  AfterPrior();
  extern __shared__ __align__(16) float qs[];  // [group, stride]: the plain q is the first d of each row
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < p.group * p.stride; i += blockDim.x) qs[i] = p.qAug[size_t(h) * p.group * p.stride + i];
  __syncthreads();
  const int half = threadIdx.x & 1, nd = p.d / 8;
  const int64_t candCtas = (p.tmax + kRowsPerCta - 1) / kRowsPerCta;
  const bool exact = blockIdx.x >= candCtas;  // uniform over the block
  const int64_t j = (blockIdx.x - (exact ? candCtas : 0)) * kRowsPerCta + (threadIdx.x >> 1), col = exact ? p.tmax + j : j;
  const bool listed = exact ? j < ExactCount(p) : j < p.sel[h * 2 + 1];
  const int32_t t0 = !listed ? 0 : exact ? p.exact[j] : p.cand[size_t(h) * p.tmax + j];
  const bool live = listed && (!kPaged || t0 >= 0);  // as RescoreCandidates
  const int32_t t = live ? t0 : 0;
  const uint16_t* row = p.keys + KvRow<kPaged>(p, h, t);
  uint4 w[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int c = half + 2 * u;
    w[u] = live && c < nd ? __ldg(reinterpret_cast<const uint4*>(row + c * 8)) : make_uint4(0, 0, 0, 0);
  }
  float best = -INFINITY;
  for (int g = 0; g < p.group; ++g) {  // uniform over the block: ReducePair's shuffles see every lane
    // An empty asm that "changes" the words: nvcc would otherwise widen them
    // once, outside the loop, into 64 live floats (and spill).
#pragma unroll
    for (int u = 0; u < kLoads; ++u) asm volatile("" : "+r"(w[u].x), "+r"(w[u].y), "+r"(w[u].z), "+r"(w[u].w));
    float acc[8];
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) acc[jj] = 0.f;
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = half + 2 * u;
      if (c >= nd) break;
      float kf[8];
      Widen8Words<kBf16>(w[u], kf);
      const float* qr = qs + size_t(g) * p.stride + c * 8;
      const float4 a = *reinterpret_cast<const float4*>(qr);
      const float4 z = *reinterpret_cast<const float4*>(qr + 4);
      const float qv[8] = {a.x, a.y, a.z, a.w, z.x, z.y, z.z, z.w};
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) acc[jj] = fmaf(qv[jj], kf[jj], acc[jj]);
    }
    const float s = ReducePair(acc);
    best = best < s ? s : best;
    if (p.dotsOn && half == 0 && live) p.dots[(size_t(h) * p.group + g) * p.dotStride + col] = s;
  }
  const bool skipped = (t >= p.skip[0] && t < p.skip[1]) || (t >= p.skip[2] && t < p.skip[3]);  // as RescoreCandidates
  const uint32_t order = live && !skipped ? RankOrder(best) : 0xffffffffu;
  if (!exact && half == 0 && j < p.tmax) p.ord2[size_t(h) * p.tmax + j] = order;
  // The candidates' range (after the clusters'): OrderRange<CandidateCut>
  // reads the orders of j < sel, which are these (live); the rest are excluded.
  if (p.range && !exact) TakeRange(p.range + 2 * gridDim.y, h, half == 0 ? order : 0xffffffffu);  // uniform over the block
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
