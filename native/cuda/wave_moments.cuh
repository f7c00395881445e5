// ScoreClusters' reads of the 8-bit key moments (native/common/moment_code.h:
// int8 axis codes, uint8 variance codes, an f32 scale per cluster): the same
// dots as wave_step_kernels.cuh's Accumulate over 16-bit words, each code
// decoded to the f32 value the host's DecodeAxisRow / DecodeVarRow gives and
// summed into the same accumulators in the same order, so the scores stay
// the host's bit for bit. A chunk is 8 channels: 8 bytes here (a uint2)
// where a word row's is 16.
//
// The swizzled tile (kSwz): a code row's 16-byte piece p (chunks 2p, 2p+1)
// sits at p ^ (r & mask) (CodeSwizzle). A 64-bit shared load is served a
// half-warp at a time: eight thread pairs, rows 8k..8k+7 (kScoreRows' CTA at
// d=128: 8 pieces a row, mask 7), each pair the two chunks of one piece,
// which land in 8 different pieces: all 32 banks once. Unswizzled, the eight
// rows' pieces fall in the same four banks.
#pragma once

#include "common/moment_code.h"
#include "cuda/cuda_common.cuh"

#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

enum class MomentCode { kAxis, kVar };

// The 8 codes of a chunk as floats.
template <MomentCode kCode>
__device__ __forceinline__ void Decode8Codes(uint2 w, float scale, float* f) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t b = ((i < 4 ? w.x : w.y) >> (8 * (i & 3))) & 0xffu;
    f[i] = kCode == MomentCode::kAxis ? DecodeAxis(int8_t(b), scale) : DecodeVar(uint8_t(b), scale);
  }
}

// The swizzle mask of a code row of nd chunks (nd / 2 pieces, d % 64 == 0:
// a multiple of 4): within eight pieces where the row has a multiple of
// eight, else within four.
__host__ __device__ __forceinline__ int CodeSwizzleMask(int nd) { return (nd / 2) % 8 == 0 ? 7 : 3; }
// Chunk c's position (in chunks) in row r of the swizzled tile.
__device__ __forceinline__ int CodeChunkAt(int c, int x) { return (((c >> 1) ^ x) << 1) | (c & 1); }

// Accumulate over a code row's chunks [0, nd) with c % 2 == half (as
// Accumulate<kBf16, kShared, kSwz> with c0 = 0, c1 = nd). x: the row's
// swizzle (r & CodeSwizzleMask) with kSwz.
template <MomentCode kCode, bool kShared = false, bool kSwz = false, int kG>
__device__ __forceinline__ void AccumulateCodes(const uint8_t* row, float scale, const float* qs, int qStride, int g0, int gc, int nd, int half,
                                                bool live, float (&acc)[kG][8], int x = 0) {
  constexpr int kL = 8;  // chunks loaded before any is used, as Accumulate's kLoads
  for (int c = half; c < nd; c += 2 * kL) {
    uint2 w[kL];
#pragma unroll
    for (int u = 0; u < kL; ++u) {
      const uint2* at = reinterpret_cast<const uint2*>(row + (kSwz ? CodeChunkAt(c + 2 * u, x) : c + 2 * u) * 8);
      w[u] = live && c + 2 * u < nd ? (kShared ? *at : __ldg(at)) : make_uint2(0, 0);
    }
#pragma unroll
    for (int u = 0; u < kL; ++u) {
      if (c + 2 * u >= nd) break;
      float kf[8];
      Decode8Codes<kCode>(w[u], scale, kf);
      FmaChunk(qs + (c + 2 * u) * 8, qStride, g0, gc, kf, acc);
    }
  }
}

// The fused pass over the swizzled tile (ScoreClusters<kFuse>): the
// centroid row ra (16-bit words, chunk swizzle sw) and the axis code row rb
// (swizzle x) against the same q chunks, read once for both. Every
// accumulator takes what Accumulate and AccumulateCodes would give it, in
// the same order: the same sums.
template <bool kBf16, int kG>
__device__ __forceinline__ void AccumulateCentroidAxis(const uint16_t* ra, const uint8_t* rb, float scaleB, const float* qs, int qStride, int g0,
                                                       int gc, int c1, int half, bool live, float (&accA)[kG][8], float (&accB)[kG][8], int sw,
                                                       int x) {
  constexpr int kL = 2;  // shared loads: a short wait, and two rows' chunks take twice the registers
  for (int c = half; c < c1; c += 2 * kL) {
    uint4 wa[kL];
    uint2 wb[kL];
#pragma unroll
    for (int u = 0; u < kL; ++u) {
      const bool in = live && c + 2 * u < c1;
      wa[u] = in ? *reinterpret_cast<const uint4*>(ra + ((c + 2 * u) ^ sw) * 8) : make_uint4(0, 0, 0, 0);
      wb[u] = in ? *reinterpret_cast<const uint2*>(rb + CodeChunkAt(c + 2 * u, x) * 8) : make_uint2(0, 0);
    }
#pragma unroll
    for (int u = 0; u < kL; ++u) {
      if (c + 2 * u >= c1) break;
      float ka[8], kb[8];
      Widen8Words<kBf16>(wa[u], ka);
      Decode8Codes<MomentCode::kAxis>(wb[u], scaleB, kb);
      const float* qr = qs + (c + 2 * u) * 8;
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (g >= gc) break;
        const float4 a = *reinterpret_cast<const float4*>(qr + (g0 + g) * qStride);
        const float4 z = *reinterpret_cast<const float4*>(qr + (g0 + g) * qStride + 4);
        const float qv[8] = {a.x, a.y, a.z, a.w, z.x, z.y, z.z, z.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          accA[g][j] = fmaf(qv[j], ka[j], accA[g][j]);
          accB[g][j] = fmaf(qv[j], kb[j], accB[g][j]);
        }
      }
    }
  }
}

// A tile's code rows [0, rows) of nd chunks copied into shared memory with
// cp.async by the CTA's threads (not committed here). kSwz: 16-byte pieces,
// piece p of row r at p ^ (r & mask) (d % 64 == 0); else 8-byte chunks in
// place (any d % 8 == 0: rows are 8-byte aligned).
template <bool kSwz>
__device__ __forceinline__ void StageCodes(uint8_t* dst, const uint8_t* src, int rows, int nd) {
  if (kSwz) {
    const int np = nd / 2, mask = CodeSwizzleMask(nd);
    for (int i = threadIdx.x; i < rows * np; i += blockDim.x) {
      const int r = i / np, pc = i % np;
      __pipeline_memcpy_async(dst + (size_t(r) * np + (pc ^ (r & mask))) * 16, src + size_t(i) * 16, 16);
    }
  } else {
    for (int i = threadIdx.x; i < rows * nd; i += blockDim.x) __pipeline_memcpy_async(dst + size_t(i) * 8, src + size_t(i) * 8, 8);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
