// Small pieces the CUDA files share: turning a CUDA error into an exception
// (the bindings map it to a JS error), byte alignment of carved buffers, and
// widening eight 16-bit words of one 16-byte load to floats.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kvr {
namespace cuda {

inline void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
  }
}

inline size_t Align(size_t x, size_t a = 256) { return (x + a - 1) / a * a; }

// Eight 16-bit words (one 16-byte load, lowest address first) as floats.
template <bool kBf16>
__device__ __forceinline__ void Widen8Words(uint4 w, float* f) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = words[i] & 0xffffu, hi = words[i] >> 16;
    if (kBf16) {
      f[2 * i] = __uint_as_float(lo << 16);
      f[2 * i + 1] = __uint_as_float(hi << 16);
    } else {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(lo)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(hi)));
    }
  }
}

// acc[g] += q row (g0 + g)'s chunk at qr (8 floats, rows qStride apart) ·
// kf, for the gc rows of the group: the per-chunk step of the wave step's
// row dots (wave_step_kernels.cuh Accumulate, wave_moments.cuh AccumulateCodes),
// so every such dot sums in one order.
template <int kG>
__device__ __forceinline__ void FmaChunk(const float* qr, int qStride, int g0, int gc, const float (&kf)[8], float (&acc)[kG][8]) {
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    if (g >= gc) break;
    // Two 16-byte broadcast reads of the q row (rows are 32-byte aligned: stride % 8 == 0).
    const float4 a = *reinterpret_cast<const float4*>(qr + (g0 + g) * qStride);
    const float4 z = *reinterpret_cast<const float4*>(qr + (g0 + g) * qStride + 4);
    const float qv[8] = {a.x, a.y, a.z, a.w, z.x, z.y, z.z, z.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(qv[j], kf[j], acc[g][j]);
  }
}

}  // namespace cuda
}  // namespace kvr
