// Element types, and f16 and bf16 <-> f32 for one value and for rows. KV is
// stored as 16-bit words; every kernel widens to f32 before it computes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define KVR_X86_SIMD 1
#endif

namespace kvr {

// The one numbering of element types. JS passes these codes
// (addon/kernels.ts's DTYPE_CODE restates them; binding_args.h's ParseDtype is
// the only place a code becomes a Dtype), and the CUDA pool takes them too.
enum class Dtype : int { kF16 = 0, kBf16 = 1, kF32 = 2 };
constexpr int kDtypeCount = 3;

// f16 and bf16: the 16-bit word types that K and V are stored as.
constexpr bool IsWordDtype(Dtype d) { return d == Dtype::kF16 || d == Dtype::kBf16; }
constexpr size_t DtypeBytes(Dtype d) { return d == Dtype::kF32 ? 4 : 2; }

inline float F16ToF32(uint16_t h) {
#ifdef KVR_X86_SIMD
  return _cvtsh_ss(h);
#else
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400) == 0) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t F32ToF16(float f) {
#ifdef KVR_X86_SIMD
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = int32_t((x >> 23) & 0xff) - 127 + 15;
  uint32_t man = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00u | (man ? 0x200u : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000u;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t half = sign | (uint32_t(exp) << 10) | (man >> 13), rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return uint16_t(half);
#endif
}

inline float Bf16ToF32(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1);  // round to nearest even
  return uint16_t(x >> 16);
}

// Widens n 16-bit values to f32.
inline void WidenRow(const uint16_t* src, Dtype dtype, size_t n, float* dst) {
  size_t i = 0;
#ifdef KVR_X86_SIMD
  if (dtype == Dtype::kF16) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  } else {
    for (; i + 8 <= n; i += 8) {
      __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
#endif
  if (dtype == Dtype::kF16)
    for (; i < n; ++i) dst[i] = F16ToF32(src[i]);
  else
    for (; i < n; ++i) dst[i] = Bf16ToF32(src[i]);
}

inline float ToF32(uint16_t w, Dtype dtype) { return dtype == Dtype::kF16 ? F16ToF32(w) : Bf16ToF32(w); }
inline uint16_t FromF32(float f, Dtype dtype) { return dtype == Dtype::kF16 ? F32ToF16(f) : F32ToBf16(f); }

}  // namespace kvr
