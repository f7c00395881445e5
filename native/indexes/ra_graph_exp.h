// Internal to ra_graph_attention.cc: e^x for four doubles at once.
//
// The attention-ranked search spends about nine exponentials on every key it
// scores (its rank over the group's rows, each row's running partition sum)
// and four more on each key that may enter the result; called one at a time
// through libm they were the larger part of scoring a key. This one takes
// four lanes per call. It is within ~1 ulp of the true value (libm's within
// ~0.5), so a sum of exponentials may differ from libm's in its last bit;
// the ranks are rounded to float after a log, where such a difference
// almost never shows (at 1M keys the ids are the libm version's in every
// configuration of bench/ra-search.ts), and the tests hold the scores to a
// float64 reference either way.
#pragma once

#include <cmath>

#include "common/half.h"

namespace kvr {
namespace ragraph {

#ifdef KVR_X86_SIMD
// Range reduction x = n·ln2 + r, |r| <= ln2/2, then e^r by its Taylor series
// to r^13 (the next term is below 2^-60 relative) and 2^n applied as two
// factors 2^(n/2) so that results down to the smallest subnormal come out.
// x below -746 (and -inf) gives 0; x above 709.78 is clamped (not reached:
// the callers' arguments are differences against a maximum or a partition).
inline __m256d Exp4d(__m256d x) {
  x = _mm256_max_pd(_mm256_min_pd(x, _mm256_set1_pd(709.78)), _mm256_set1_pd(-746.0));
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634074)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  static constexpr double kInvFact[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                        1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                                        1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
                                        1.0,                1.0};
  __m256d p = _mm256_set1_pd(kInvFact[0]);
  for (int i = 1; i < 14; ++i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[i]));
  const __m128i ni = _mm256_cvtpd_epi32(n);
  const __m128i n1 = _mm_srai_epi32(ni, 1), n2 = _mm_sub_epi32(ni, n1);
  auto pow2 = [](__m128i e) {
    return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(e), _mm256_set1_epi64x(1023)), 52));
  };
  return _mm256_mul_pd(_mm256_mul_pd(p, pow2(n1)), pow2(n2));
}
#endif

// y[i] = e^(x[i]) for i < count (count <= 4).
inline void Exp4(const double* x, int count, double* y) {
#ifdef KVR_X86_SIMD
  if (count == 4) {
    _mm256_storeu_pd(y, Exp4d(_mm256_loadu_pd(x)));
    return;
  }
  alignas(32) double in[4] = {0, 0, 0, 0}, out[4];
  for (int i = 0; i < count; ++i) in[i] = x[i];
  _mm256_store_pd(out, Exp4d(_mm256_load_pd(in)));
  for (int i = 0; i < count; ++i) y[i] = out[i];
#else
  for (int i = 0; i < count; ++i) y[i] = std::exp(x[i]);
#endif
}

// y[i] = e^(x[i]) for i < count, four at a time.
inline void ExpN(const double* x, int count, double* y) {
  for (int i = 0; i < count; i += 4) Exp4(x + i, count - i < 4 ? count - i : 4, y + i);
}

// log Σ e^(x_i) for several rows at once, each kept relative to a reference
// as LogSum (ra_graph_attention.cc) keeps one: Add(x) does, lane by lane,
// exactly LogSum::Add's arithmetic with this file's exponential.
struct LogSums {
  double ref[64], sum[64];
  explicit LogSums(int rows) {
    for (int h = 0; h < rows; ++h) ref[h] = -HUGE_VAL, sum[h] = 0;
  }
  void Add(const float* x, int rows) {
    int h = 0;
#ifdef KVR_X86_SIMD
    for (; h + 4 <= rows; h += 4) {
      const __m256d xv = _mm256_cvtps_pd(_mm_loadu_ps(x + h)), rv = _mm256_loadu_pd(ref + h), sv = _mm256_loadu_pd(sum + h);
      const __m256d up = _mm256_cmp_pd(xv, rv, _CMP_GT_OQ);
      // e^(ref − x) when x > ref (x becomes the reference), else e^(x − ref): both e^-|x − ref|.
      const __m256d diff = _mm256_sub_pd(xv, rv);
      const __m256d e = Exp4d(_mm256_sub_pd(_mm256_setzero_pd(), _mm256_andnot_pd(_mm256_set1_pd(-0.0), diff)));
      const __m256d grown = _mm256_fmadd_pd(sv, e, _mm256_set1_pd(1.0)), added = _mm256_add_pd(sv, e);
      _mm256_storeu_pd(sum + h, _mm256_blendv_pd(added, grown, up));
      _mm256_storeu_pd(ref + h, _mm256_blendv_pd(rv, xv, up));
    }
#endif
    for (; h < rows; ++h) {
      const double v = x[h];
      double e;
      if (v > ref[h]) {
        const double a = ref[h] - v;
        Exp4(&a, 1, &e);
        sum[h] = sum[h] * e + 1.0;
        ref[h] = v;
      } else {
        const double a = v - ref[h];
        Exp4(&a, 1, &e);
        sum[h] += e;
      }
    }
  }
};

}  // namespace ragraph
}  // namespace kvr
