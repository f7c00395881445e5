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

}  // namespace cuda
}  // namespace kvr
