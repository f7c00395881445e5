#include "kernels/convert.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/thread_pool.h"

namespace kvr {
namespace {

constexpr size_t kChunk = 1 << 16;

float Load(const uint8_t* src, Dtype d, size_t i) {
  if (d == Dtype::kF32) {
    float f;
    std::memcpy(&f, src + 4 * i, 4);
    return f;
  }
  uint16_t w;
  std::memcpy(&w, src + 2 * i, 2);
  return ToF32(w, d);
}

void Store(uint8_t* dst, Dtype d, size_t i, float f) {
  if (d == Dtype::kF32) {
    std::memcpy(dst + 4 * i, &f, 4);
    return;
  }
  uint16_t w = FromF32(f, d);
  std::memcpy(dst + 2 * i, &w, 2);
}

// Elements [i, end), 8 at a time where F16C does it in one instruction (f16
// <-> f32, the decode path's q and out: one by one, a 4096-value row took
// ~4.6 us on the 2-core VM), the rest one by one. The same rounding either
// way: _mm256_cvtps_ph and _cvtss_sh are one conversion.
void ConvertRange(const uint8_t* src, Dtype from, uint8_t* dst, Dtype to, size_t i, size_t end) {
#ifdef KVR_X86_SIMD
  if (from == Dtype::kF16 && to == Dtype::kF32) {
    for (; i + 8 <= end; i += 8)
      _mm256_storeu_ps(reinterpret_cast<float*>(dst + 4 * i), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i))));
  } else if (from == Dtype::kF32 && to == Dtype::kF16) {
    for (; i + 8 <= end; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm256_cvtps_ph(_mm256_loadu_ps(reinterpret_cast<const float*>(src + 4 * i)), _MM_FROUND_TO_NEAREST_INT));
  } else if (from == Dtype::kBf16 && to == Dtype::kF32) {
    for (; i + 8 <= end; i += 8) {
      __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i)));
      _mm256_storeu_ps(reinterpret_cast<float*>(dst + 4 * i), _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
#endif
  for (; i < end; ++i) Store(dst, to, i, Load(src, from, i));
}

}  // namespace

void Convert(const uint8_t* src, Dtype from, uint8_t* dst, Dtype to, size_t n) {
  if (from == to) {
    std::memcpy(dst, src, n * DtypeBytes(from));
    return;
  }
  size_t chunks = (n + kChunk - 1) / kChunk;
  ThreadPool::Get().ParallelFor(chunks, [&](size_t c) { ConvertRange(src, from, dst, to, c * kChunk, std::min(n, (c + 1) * kChunk)); });
}

namespace {

// A word is NaN or infinite when its exponent bits are all ones. Each block
// is scanned without an early exit (the loop vectorizes: a 16 MiB upload's
// check took ~5 ms word by word, a third of its server time on the 2-core
// VM), and only a block with a hit is searched for its first one.
template <typename W>
int64_t FirstAllOnes(const uint8_t* src, size_t n, W mask) {
  constexpr size_t kBlock = 4096;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t end = std::min(n, b + kBlock);
    W hit = 0;
    for (size_t i = b; i < end; ++i) {
      W w;
      std::memcpy(&w, src + sizeof(W) * i, sizeof(W));
      hit |= W((w & mask) == mask);
    }
    if (!hit) continue;
    for (size_t i = b; i < end; ++i) {
      W w;
      std::memcpy(&w, src + sizeof(W) * i, sizeof(W));
      if ((w & mask) == mask) return int64_t(i);
    }
  }
  return -1;
}

}  // namespace

int64_t FirstNonFinite(const uint8_t* src, Dtype dtype, size_t n) {
  if (dtype == Dtype::kF32) return FirstAllOnes<uint32_t>(src, n, 0x7f800000u);
  return FirstAllOnes<uint16_t>(src, n, dtype == Dtype::kF16 ? uint16_t(0x7c00u) : uint16_t(0x7f80u));
}

}  // namespace kvr
