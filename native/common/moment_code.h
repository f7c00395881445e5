// The wave index's key moments in 8 bits (issue #13: the layer-step's
// device time and the layer's memory): each cluster's principal key axis
// (scaled by its std) as int8 codes and its per-channel key variances as
// uint8 codes, each row with one f32 scale (index/wave/moment-code.ts
// encodes them). One decode for the host's ranking and estimate and the
// device's kernels, so both read the same f32 values and the device's sums
// stay bit for bit the host's:
//   axis_j = float(code_j) * scale              (symmetric linear, |code| <= 127)
//   var_j  = float(code_j * code_j) * scale     (the std linear: var = (code·sqrt(scale))²)
// each one f32 product of exact operands, rounded once (code² <= 65025 is
// exact in f32), on the device with __fmul_rn so nothing contracts it.
// Variances are coded by their square root: the second-order term weighs
// each channel's variance by q_j², and queries lie along channels where keys
// barely vary (cluster_estimate.h), so a channel at 1/100 of the row's
// largest variance keeps ~4% relative precision instead of ~20% with a
// linear code (bench/results/wave-8bit-moments-vm.md measures the three codes).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define KVR_MOMENT_FN __host__ __device__ __forceinline__
#else
#define KVR_MOMENT_FN inline
#endif

namespace kvr {

KVR_MOMENT_FN float DecodeAxis(int8_t code, float scale) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(float(code), scale);
#else
  return float(code) * scale;
#endif
}

KVR_MOMENT_FN float DecodeVar(uint8_t code, float scale) {
  const int c = int(code);
#ifdef __CUDA_ARCH__
  return __fmul_rn(float(c * c), scale);
#else
  return float(c * c) * scale;
#endif
}

// A row of d codes as floats (the host's ranking and estimate).
inline void DecodeAxisRow(const int8_t* codes, float scale, size_t d, float* out) {
  for (size_t j = 0; j < d; ++j) out[j] = DecodeAxis(codes[j], scale);
}
inline void DecodeVarRow(const uint8_t* codes, float scale, size_t d, float* out) {
  for (size_t j = 0; j < d; ++j) out[j] = DecodeVar(codes[j], scale);
}

}  // namespace kvr
