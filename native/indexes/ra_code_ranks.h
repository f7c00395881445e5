// Internal to the code-gated walk (ra_graph_code_walk.h): the walk scores of
// keys read as codes, eight keys a step, in float.
//
// A key's walk score is log Σ_h e^(x_h − c0_h) over the group's rows (the
// exact keys' Ranks in ra_graph_attention.cc, in double there). The code walk
// ranks ~420K codes a search at 1M keys; in double, four lanes a key, the
// ranks and the partition sums of the keys read only as codes took ~25% of
// its CPU (2-core VM). Here the lanes are keys, the rows a loop, and the
// exponential and logarithm are float polynomials (relative error ~1e-7):
// a code's score is itself within ~0.1 logits of the key's, and the queue
// bins scores 0.003 apart. Each SIMD function has a scalar twin doing the
// same IEEE operations in the same order (std::fma where the lanes fuse), so
// a build without AVX2 ranks the codes as this one does.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/half.h"
#include "common/simd_math.h"

namespace kvr {
namespace ragraph {

// Exp8's (common/simd_math.h) operations on one float.
inline float ExpLane(float x) {
  const bool under = x < -87.0f;
  x = x > -87.0f ? x : -87.0f;  // _mm256_max_ps(x, lo), NaN to lo as it does
  x = x < 88.0f ? x : 88.0f;
  const float fx = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(-fx, 0.693359375f, x);
  r = std::fma(-fx, -2.12194440e-4f, r);
  float y = 1.0f / 720;
  y = std::fma(y, r, 1.0f / 120);
  y = std::fma(y, r, 1.0f / 24);
  y = std::fma(y, r, 1.0f / 6);
  y = std::fma(y, r, 0.5f);
  y = std::fma(y, r, 1.0f);
  y = std::fma(y, r, 1.0f);
  const uint32_t e = uint32_t(int32_t(fx) + 127) << 23;
  float p;
  std::memcpy(&p, &e, sizeof p);
  return under ? 0.0f : y * p;
}

// ln x for a positive normal float: Cephes' logf (x = 2^e·m, m in
// [√½, √2), a degree-8 polynomial in m − 1).
inline float LogLane(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = int32_t((bits >> 23) & 0xff) - 126;
  const uint32_t mb = (bits & 0x007fffffu) | 0x3f000000u;  // [0.5, 1)
  float m;
  std::memcpy(&m, &mb, sizeof m);
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = (m - 1.0f) + (small ? m : 0.0f);
  float p = 7.0376836292e-2f;
  p = std::fma(p, m, -1.1514610310e-1f);
  p = std::fma(p, m, 1.1676998740e-1f);
  p = std::fma(p, m, -1.2420140846e-1f);
  p = std::fma(p, m, 1.4249322787e-1f);
  p = std::fma(p, m, -1.6668057665e-1f);
  p = std::fma(p, m, 2.0000714765e-1f);
  p = std::fma(p, m, -2.4999993993e-1f);
  p = std::fma(p, m, 3.3333331174e-1f);
  const float z = m * m, fe = float(e);
  float y = (p * m) * z;
  y = std::fma(fe, -2.12194440e-4f, y);
  y = std::fma(z, -0.5f, y);
  float r = m + y;
  return std::fma(fe, 0.693359375f, r);
}

#ifdef KVR_X86_SIMD
// LogLane, eight lanes.
inline __m256 Log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(126));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // −1 where small
  m = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(small, m));
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 z = _mm256_mul_ps(m, m), fe = _mm256_cvtepi32_ps(e);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
  y = _mm256_fmadd_ps(fe, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
  const __m256 r = _mm256_add_ps(m, y);
  return _mm256_fmadd_ps(fe, _mm256_set1_ps(0.693359375f), r);
}
#endif

constexpr int kCodeRankRows = 64;  // the most rows a group has (ra_graph_attention.cc's kMaxGroup)

// CodeRanks, one key at a time (what a build without AVX2 runs; the tests'
// reference for the lanes).
inline void CodeRanksScalar(const float* xs, size_t ld, size_t count, int G, const float* c0, float gate, float* out,
                            float* part) {
  for (int h = 0; h < G; ++h) part[h] = 0.f;
  size_t i = 0;
  // acc[h][k]: the sum of lane k.
  float acc[kCodeRankRows][8] = {}, e[kCodeRankRows];
  for (; i < count; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (int h = 0; h < G; ++h) {
      e[h] = xs[size_t(h) * ld + i] - c0[h];
      m = m > e[h] ? m : e[h];  // _mm256_max_ps(m, e[h])
    }
    float s = 0.f;
    for (int h = 0; h < G; ++h) {
      e[h] = ExpLane(e[h] - m);
      s += e[h];
    }
    const float r = m + LogLane(s);
    out[i] = r;
    if (!(r < gate)) continue;
    const float scale = ExpLane(m);
    for (int h = 0; h < G; ++h) acc[h][i % 8] = std::fma(e[h], scale, acc[h][i % 8]);
  }
  for (int h = 0; h < G; ++h)
    for (int k = 0; k < 8; ++k) part[h] += acc[h][k];
}

#ifdef KVR_X86_SIMD
// CodeRanks, eight keys a step.
inline void CodeRanksLanes(const float* xs, size_t ld, size_t count, int G, const float* c0, float gate, float* out,
                           float* part) {
  for (int h = 0; h < G; ++h) part[h] = 0.f;
  size_t i = 0;
  __m256 acc[kCodeRankRows], e[kCodeRankRows];
  for (int h = 0; h < G; ++h) acc[h] = _mm256_setzero_ps();
  const __m256 vgate = _mm256_set1_ps(gate);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i < count; i += 8) {
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int h = 0; h < G; ++h) {
      e[h] = _mm256_sub_ps(_mm256_loadu_ps(xs + size_t(h) * ld + i), _mm256_set1_ps(c0[h]));
      m = _mm256_max_ps(m, e[h]);
    }
    __m256 s = _mm256_setzero_ps();
    for (int h = 0; h < G; ++h) {
      e[h] = Exp8(_mm256_sub_ps(e[h], m));
      s = _mm256_add_ps(s, e[h]);
    }
    const __m256 r = _mm256_add_ps(m, Log8(s));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, r);
    const size_t n = count - i < 8 ? count - i : 8;
    for (size_t k = 0; k < n; ++k) out[i + k] = lanes[k];
    // Queued: below the gate, and a key (not a lane past count).
    const __m256 queued = _mm256_and_ps(
        _mm256_cmp_ps(r, vgate, _CMP_LT_OQ),
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lane)));
    if (_mm256_movemask_ps(queued) == 0) continue;
    const __m256 scale = Exp8(m);
    for (int h = 0; h < G; ++h) acc[h] = _mm256_blendv_ps(acc[h], _mm256_fmadd_ps(e[h], scale, acc[h]), queued);
  }
  for (int h = 0; h < G; ++h) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[h]);
    for (int k = 0; k < 8; ++k) part[h] += lanes[k];
  }
}
#endif

// For keys i < count with approximate logits xs[h·ld + i] (ld a multiple of 8,
// the lanes past count any finite value): out[i] = m_i + ln Σ_h e^(x_hi − c0_h − m_i),
// m_i = max_h (x_hi − c0_h), the rows summed in order. For each key whose
// score is below `gate` (queued by its code alone), part[h] += e^(x_hi − c0_h),
// as e^(x_hi − c0_h − m_i) · e^(m_i); part[h] is summed eight keys apart
// (each key fused in), then the eight lanes in order. x − c0 is the log of
// the key's share of the row's estimated partition: a term below e^-87 is
// dropped (Exp8's range; against a partition of ~1 it is nothing), and m_i
// is at most the score, below the gate, so e^(m_i) stays in range unless
// the gate is above 88 (only with a moving cutoff far out of its use), where
// it clamps.
inline void CodeRanks(const float* xs, size_t ld, size_t count, int G, const float* c0, float gate, float* out,
                      float* part) {
#ifdef KVR_X86_SIMD
  CodeRanksLanes(xs, ld, count, G, c0, gate, out, part);
#else
  CodeRanksScalar(xs, ld, count, G, c0, gate, out, part);
#endif
}

}  // namespace ragraph
}  // namespace kvr
