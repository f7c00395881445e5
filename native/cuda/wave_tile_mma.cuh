// A tile's numerators on the tensor cores (on by default; KVRECALL_WAVE_MMA_TILES=0
// turns it off, wave_paths.cuh): what TileNumerators (wave_step_estimate.cuh) sums, sign ·
// Σ_i e[g, i] · row_i for the q heads g of a pass, as one matrix product a
// tile: [d × rows] · [rows × heads], the rows' channels in the mma's M, the
// rows in its K, the heads' weights in its N.
//
// Why: the estimate's cluster tiles and the attention's tiles (one launch,
// AttendAndClusters) are ~22% of the step and reach ~40% of DRAM's peak
// (ncu, bench/results/wave-step-ncu-d64-h100-b2.md): per row and q head
// TileNumerators does d FMAs on channels widened one by one, 32 f32
// accumulators a thread at d = 64 with four rows' loads in flight, and it
// spills. Here a warp takes 16 rows per mma.m16n8k16 for every q head of
// the pass at once, with 16 accumulators a thread.
//
// No shared-memory staging: the rows (the contraction) are in the mma's K,
// whose fragment pairs hold two rows' values of one channel, and which
// channel each of the M rows is is free. So a thread loads 16 bytes (8
// channels) of each of its four rows of a k-step (rows 2t, 2t+1, 2t+8,
// 2t+9) straight from memory, channels 8g .. 8g+7 of its 64, and one PRMT
// pairs two rows' halves: in a warp's block of 64 channels (from 64·b),
// m-tile j's row g is channel 64·b + 8g + 2j and its row g + 8 channel
// 64·b + 8g + 2j + 1. Eight lanes of one t read 128 bytes of a row.
//
// Precision: the rows go in exactly (f16 or bf16 stores); a weight e (f32)
// goes in as two parts of the store's type, hi + lo, in the mma's 8 columns
// (q heads 0-3 hi, then lo), ~22 bits of it for f16, ~16 for bf16; the
// tensor core sums in f32 in its own order. So the numerators differ from
// TileNumerators' by a few f32 ulps of their terms (bf16: ~1e-5 relative),
// within the step's tolerance against the host (1e-4), not bit for bit. A
// weight below f16's subnormals (e < 6e-8 of the tile's largest) is lost.
//
// Runs for d = 64 and 128 (llama3.2-1b, llama3-8b, the issue's shape,
// kvrecall-code-13M); else TileNumerators.
#pragma once

#include "cuda/mma_fragments.cuh"
#include "cuda/wave_step_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kTileWarps = kThreads / 32;
static_assert(kGC == 4, "the q heads' hi and lo parts fill the mma's 8 columns");
static_assert(size_t(kTileWarps) * kGC * 128 <= size_t(kThreads) * 8 * kGC, "the warps' sums fit TileNumerators' scratch at d = 128");

inline bool MmaTilesApply(int d) { return d == 64 || d == 128; }
// AttendAndClusters' shared memory with the tiles on: EstimateTile's sources and weights, and the warps' sums
// (kTileWarps × kGC × d floats, not TileNumerators' row groups').
inline size_t MmaTileSmem(int d) { return size_t(kTile) * 8 + size_t(kGC) * kTile * 4 + size_t(kTileWarps) * kGC * size_t(d) * 4; }

// x's part (hi, or lo = x − hi) in the store's 16-bit type, as raw bits.
template <bool kBf16>
__device__ __forceinline__ uint32_t WeightPart(float x, bool lo) {
  if (kBf16) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    return __bfloat16_as_ushort(lo ? __float2bfloat16_rn(x - __bfloat162float(h)) : h);
  }
  const __half h = __float2half_rn(x);
  return __half_as_ushort(lo ? __float2half_rn(x - __half2float(h)) : h);
}

// Rows 16s + 2t, +1, +8, +9 (k-step s) of a warp's channel block, 16
// bytes each (sSrc[i]: row i's first word), or zeros past `live`.
__device__ __forceinline__ void LoadStep(uint4 (&x)[4], const uint16_t* base, const int64_t* sSrc, int s, int live, int t) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = s * 16 + 2 * t + (r & 1) + 8 * (r >> 1);
    x[r] = i < live ? __ldg(reinterpret_cast<const uint4*>(base + sSrc[i])) : make_uint4(0, 0, 0, 0);
  }
}

// One k-step's mma over the rows in x (zeros past `live`) with the weights
// of rows i0 .. i0 + 15 from e.
template <bool kBf16>
__device__ __forceinline__ void MmaStep(float (&acc)[4][4], const uint4 (&x)[4], const float* e, bool on, bool lo, int i0, int live, int t) {
  const int ia = i0 + 2 * t, ib = ia + 8;
  // Rows past `live` hold stale weights: 0 there (their values are 0 too).
  const float w0 = on && ia < live ? e[ia] : 0.f, w1 = on && ia + 1 < live ? e[ia + 1] : 0.f;
  const float w2 = on && ib < live ? e[ib] : 0.f, w3 = on && ib + 1 < live ? e[ib + 1] : 0.f;
  const uint32_t b0 = WeightPart<kBf16>(w0, lo) | (WeightPart<kBf16>(w1, lo) << 16);
  const uint32_t b1 = WeightPart<kBf16>(w2, lo) | (WeightPart<kBf16>(w3, lo) << 16);
  const uint32_t* r0 = reinterpret_cast<const uint32_t*>(&x[0]);
  const uint32_t* r1 = reinterpret_cast<const uint32_t*>(&x[1]);
  const uint32_t* r2 = reinterpret_cast<const uint32_t*>(&x[2]);
  const uint32_t* r3 = reinterpret_cast<const uint32_t*>(&x[3]);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // Word j of a row: channels 8g + 2j (low half) and 8g + 2j + 1.
    const uint32_t a0 = __byte_perm(r0[j], r1[j], 0x5410), a1 = __byte_perm(r0[j], r1[j], 0x7632);
    const uint32_t a2 = __byte_perm(r2[j], r3[j], 0x5410), a3 = __byte_perm(r2[j], r3[j], 0x7632);
    if (kBf16) Mma16816Bf16(acc[j], a0, a1, a2, a3, b0, b1);
    else Mma16816(acc[j], a0, a1, a2, a3, b0, b1);
  }
}

// A warp takes one 64-channel block (kB of them) and every kW-th k-step:
// 16 accumulators and one k-step's loads (16 registers) a thread at any d.
// Two k-steps' loads at once spilled ~140 bytes a thread at AttendAndClusters'
// 80 registers (ptxas), and issuing a tile's reads at once (its counts,
// logits and first rows together, the rows not compacted) measured no faster
// (visit 4, bench/results/wave-tiles-h100-s27.md). sSrc[i]: row i's first
// word in rows (compacted by the tile).
template <bool kBf16, int kB>
__device__ void TileNumeratorsMmaD(const StepParams& p, const uint16_t* rows, const int64_t* sSrc, const float* sE, float* sRed, int live, int gc, size_t qh0,
                                   int part, float sign) {
  constexpr int kW = kTileWarps / kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int block = warp / kW;
  const int head = g & 3;  // this lane's B column: q head `head`'s hi part (g < 4) or lo part
  const bool lo = g >= 4, on = head < gc;
  const float* const e = sE + head * kTile;
  const uint16_t* const base = rows + 64 * block + 8 * g;
  float acc[4][4];
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[m][j] = 0.f;
  const int steps = (live + 15) / 16;
  for (int s = warp % kW; s < steps; s += kW) {  // uniform over the warp
    uint4 x[4];
    LoadStep(x, base, sSrc, s, live, t);
    MmaStep<kBf16>(acc, x, e, on, lo, s * 16, live, t);
  }
  // Columns 2t, 2t+1 of lanes t = 2, 3 are the lo parts of t - 2's heads.
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[m][j] += __shfl_xor_sync(0xffffffffu, acc[m][j], 2);
  if (t < 2) {
    const int h0 = 2 * t;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = 64 * block + 8 * g + 2 * j;
      if (h0 < gc) *reinterpret_cast<float2*>(sRed + (size_t(warp) * kGC + h0) * p.d + c) = make_float2(acc[j][0], acc[j][2]);
      if (h0 + 1 < gc) *reinterpret_cast<float2*>(sRed + (size_t(warp) * kGC + h0 + 1) * p.d + c) = make_float2(acc[j][1], acc[j][3]);
    }
  }
  __syncthreads();
  // Column col's sums are those of its block's warps, added in warp order.
  for (int i = threadIdx.x; i < gc * p.d; i += blockDim.x) {
    const int h = i / p.d, col = i % p.d, w0 = (col / 64) * kW;
    float sum = 0;
    for (int w = w0; w < w0 + kW; ++w) sum += sRed[(size_t(w) * kGC + h) * p.d + col];
    p.pnum[((qh0 + h) * p.parts + part) * p.d + col] = sign * sum;
  }
  __syncthreads();
}

// TileNumerators' contract (every thread of the CTA calls it; it ends on a
// barrier), for d = 64 and 128 (MmaTilesApply): rows + sSrc[i].
template <bool kBf16>
__device__ void TileNumeratorsMma(const StepParams& p, const uint16_t* rows, const int64_t* sSrc, const float* sE, float* sRed, int live,
                                  int gc, size_t qh0, int part, float sign) {
  if (p.d == 64) TileNumeratorsMmaD<kBf16, 1>(p, rows, sSrc, sE, sRed, live, gc, qh0, part, sign);
  else TileNumeratorsMmaD<kBf16, 2>(p, rows, sSrc, sE, sRed, live, gc, qh0, part, sign);
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
