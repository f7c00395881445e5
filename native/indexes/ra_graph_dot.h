// Internal to the ra_graph_*.cc searches: one key row against a group of
// query rows in one pass, the key widened once in registers.
//
// The graph's searches score one key at a time against the G query rows that
// share its kv head. Widening the row to a buffer and calling Dot G times
// reads it G + 1 times and reduces G accumulator pairs one after another;
// here each 8-wide piece of the key is widened once and feeds up to four
// rows' accumulators. Every row's sum is formed exactly as Dot(q_h, row)
// forms it (common/simd_math.h: two accumulators over 16-wide steps, the same
// reduction, the same scalar tail), so the scores are the same floats bit for
// bit and a search returns the same ids as with WidenRow + Dot.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/half.h"
#include "common/simd_math.h"

namespace kvr {
namespace ragraph {

#ifdef KVR_X86_SIMD
inline __m256 Widen8(const uint16_t* src, Dtype dtype) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  if (dtype == Dtype::kF16) return _mm256_cvtph_ps(w);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
}

inline float HorizontalSum(__m256 acc0, __m256 acc1) {
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// out[c] = q_c · key for the C rows q_c = q + c·d.
template <int C>
inline void DotChunk(const float* q, const uint16_t* key, Dtype dtype, size_t d, float* out) {
  __m256 a0[C], a1[C];
  for (int c = 0; c < C; ++c) a0[c] = a1[c] = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m256 k0 = Widen8(key + i, dtype), k1 = Widen8(key + i + 8, dtype);
    for (int c = 0; c < C; ++c) {
      a0[c] = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * d + i), k0, a0[c]);
      a1[c] = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * d + i + 8), k1, a1[c]);
    }
  }
  for (; i + 8 <= d; i += 8) {
    const __m256 k0 = Widen8(key + i, dtype);
    for (int c = 0; c < C; ++c) a0[c] = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * d + i), k0, a0[c]);
  }
  for (int c = 0; c < C; ++c) out[c] = HorizontalSum(a0[c], a1[c]);
  for (; i < d; ++i) {
    const float k = ToF32(key[i], dtype);
    for (int c = 0; c < C; ++c) out[c] += q[c * d + i] * k;
  }
}
#endif

// x[h] = scale · (q_h · key) for h < G, q [G, d] f32, key d 16-bit words:
// the floats scale * Dot(q_h, WidenRow(key)) gives. `row` (d floats) is
// scratch for builds without AVX2/F16C.
inline void ScaledDots(const float* q, int G, const uint16_t* key, Dtype dtype, int d, float scale, float* x,
                       float* row) {
#ifdef KVR_X86_SIMD
  (void)row;
  const size_t dd = size_t(d);
  int h = 0;
  for (; h + 4 <= G; h += 4) DotChunk<4>(q + size_t(h) * dd, key, dtype, dd, x + h);
  switch (G - h) {
    case 3: DotChunk<3>(q + size_t(h) * dd, key, dtype, dd, x + h); break;
    case 2: DotChunk<2>(q + size_t(h) * dd, key, dtype, dd, x + h); break;
    case 1: DotChunk<1>(q + size_t(h) * dd, key, dtype, dd, x + h); break;
    default: break;
  }
#else
  WidenRow(key, dtype, size_t(d), row);
  for (int h = 0; h < G; ++h) x[h] = Dot(q + size_t(h) * d, row, size_t(d));
#endif
  for (int h = 0; h < G; ++h) x[h] *= scale;
}

}  // namespace ragraph
}  // namespace kvr
