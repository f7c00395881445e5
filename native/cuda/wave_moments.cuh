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

// The 8 codes of a chunk as floats: DecodeAxis / DecodeVar's values, bit
// for bit, without their int-to-float conversions (I2F, issued to a pipe
// narrower than FP32's, in a kernel bound by its issue: ncu, visit B2).
// A byte u under the exponent of 2^23 is the float 2^23 + u, so
// (2^23 + u) - 2^23 is float(u) exactly (both operands and the difference
// are integers below 2^24); one PRMT places the byte. An int8 code c is
// u ^ 0x80 = c + 128 so placed, less 2^23 + 128; a variance code's c² is
// float(c)·float(c), exact below 2^24 (c² <= 65025). The product with the
// scale is DecodeAxis / DecodeVar's own single rounding. Checked over
// every byte and many scales on the host: bench/wave-score-lean-check.cc.
template <MomentCode kCode>
__device__ __forceinline__ void Decode8Codes(uint2 w, float scale, float* f) {
  const uint32_t flip = kCode == MomentCode::kAxis ? 0x80808080u : 0u;  // int8: c + 128
  const uint32_t words[2] = {w.x ^ flip, w.y ^ flip};
  constexpr float kBias = kCode == MomentCode::kAxis ? 8388736.0f : 8388608.0f;  // 2^23 + 128, 2^23
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    // selector nibbles i & 3, 4, 4, 7: the code's byte, then 0x4b000000's bytes 0, 0, 3
    const float c = __fsub_rn(__uint_as_float(__byte_perm(words[i >> 2], 0x4b000000u, 0x7440u | (i & 3))), kBias);
    f[i] = kCode == MomentCode::kAxis ? __fmul_rn(c, scale) : __fmul_rn(__fmul_rn(c, c), scale);
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
    // np is a power of two (d % 64 == 0 and d / 8 divides the CTA): a
    // shift and a mask where i / np, i % np cost a division's sequence.
    const int np = nd / 2, mask = CodeSwizzleMask(nd), shift = __ffs(np) - 1;
    for (int i = threadIdx.x; i < rows * np; i += blockDim.x) {
      const int r = i >> shift, pc = i & (np - 1);
      __pipeline_memcpy_async(dst + (size_t(r) * np + (pc ^ (r & mask))) * 16, src + size_t(i) * 16, 16);
    }
  } else {
    for (int i = threadIdx.x; i < rows * nd; i += blockDim.x) __pipeline_memcpy_async(dst + size_t(i) * 8, src + size_t(i) * 8, 8);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
