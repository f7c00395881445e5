// Internal to ra_graph_attention.cc: e^x and ln x for four doubles at once.
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
// float64 reference either way. The same holds for the log (one per key
// scored and per key given a final score): fdlibm's, four lanes at once,
// within 1 ulp; on 8M arguments in each of [1, 4), [1, 64), [1, 1e6) and
// e^[-60, 0) it differs from libm's in the last bit of 8.5%, 3.9%, 0.9% and
// 0.2% of the doubles, and in none of the floats they round to.
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

#ifdef KVR_X86_SIMD
// ln x for four positive normal doubles: fdlibm's e_log.c (x = 2^k·(1 + f),
// 1 + f in [√2/2, √2), ln(1 + f) = f − f²/2 + s·(f²/2 + R(s²)) for
// s = f/(2 + f), R its degree-14 minimax polynomial), lane by lane the same
// operations, so within 1 ulp of the true value as fdlibm is.
inline __m256d Log4d(__m256d x) {
  const __m256i bits = _mm256_castpd_si256(x);
  // The high word moved so that the mantissa's split at √2 carries into the exponent.
  __m256i hx = _mm256_add_epi64(_mm256_srli_epi64(bits, 32), _mm256_set1_epi64x(0x3ff00000 - 0x3fe6a09e));
  const __m256i k = _mm256_sub_epi64(_mm256_srli_epi64(hx, 20), _mm256_set1_epi64x(0x3ff));
  hx = _mm256_add_epi64(_mm256_and_si256(hx, _mm256_set1_epi64x(0x000fffff)), _mm256_set1_epi64x(0x3fe6a09e));
  const __m256d m = _mm256_castsi256_pd(
      _mm256_or_si256(_mm256_slli_epi64(hx, 32), _mm256_and_si256(bits, _mm256_set1_epi64x(0xffffffff))));
  const __m256d f = _mm256_sub_pd(m, _mm256_set1_pd(1.0));
  // k to double: the bits of 1.5·2^52 + k, less 1.5·2^52 (|k| < 2^31, either sign).
  const __m256d magic = _mm256_set1_pd(6755399441055744.0);
  const __m256d dk = _mm256_sub_pd(
      _mm256_castsi256_pd(_mm256_add_epi64(k, _mm256_castpd_si256(magic))), magic);
  const __m256d hfsq = _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.5), f), f);
  const __m256d sv = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
  const __m256d z = _mm256_mul_pd(sv, sv), w = _mm256_mul_pd(z, z);
  auto c = [](double v) { return _mm256_set1_pd(v); };
  const __m256d t1 = _mm256_mul_pd(
      w, _mm256_add_pd(c(3.999999999940941908e-01),
                       _mm256_mul_pd(w, _mm256_add_pd(c(2.222219843214978396e-01), _mm256_mul_pd(w, c(1.531383769920937332e-01))))));
  const __m256d t2 = _mm256_mul_pd(
      z, _mm256_add_pd(c(6.666666666666735130e-01),
                       _mm256_mul_pd(w, _mm256_add_pd(c(2.857142874366239149e-01),
                                                      _mm256_mul_pd(w, _mm256_add_pd(c(1.818357216161805012e-01),
                                                                                     _mm256_mul_pd(w, c(1.479819860511658591e-01))))))));
  const __m256d R = _mm256_add_pd(t2, t1);
  // dk·ln2_hi − ((hfsq − (s·(hfsq + R) + dk·ln2_lo)) − f)
  const __m256d inner = _mm256_add_pd(_mm256_mul_pd(sv, _mm256_add_pd(hfsq, R)), _mm256_mul_pd(dk, c(1.90821492927058770002e-10)));
  return _mm256_sub_pd(_mm256_mul_pd(dk, c(6.93147180369123816490e-01)), _mm256_sub_pd(_mm256_sub_pd(hfsq, inner), f));
}
#endif

// y[i] = ln x[i] for i < count, four at a time; std::log's for x that is
// not a positive normal finite double.
inline void LogN(const double* x, int count, double* y) {
  int i = 0;
#ifdef KVR_X86_SIMD
  for (; i + 4 <= count; i += 4) _mm256_storeu_pd(y + i, Log4d(_mm256_loadu_pd(x + i)));
  if (i < count) {
    alignas(32) double in[4] = {1, 1, 1, 1}, out[4];
    for (int j = i; j < count; ++j) in[j - i] = x[j];
    _mm256_store_pd(out, Log4d(_mm256_load_pd(in)));
    for (int j = i; j < count; ++j) y[j] = out[j - i];
  }
  for (int j = 0; j < count; ++j)
    if (!(x[j] >= 2.2250738585072014e-308 && x[j] <= 1.7976931348623157e308)) y[j] = std::log(x[j]);
  return;
#endif
  for (; i < count; ++i) y[i] = std::log(x[i]);
}

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
      const __m256d added = _mm256_add_pd(sv, e);
      // A new reference is rare once the walk is under way: branching on it
      // (not blending) keeps the next key's e^(x − ref) off this one's chain.
      if (_mm256_movemask_pd(up) == 0) {
        _mm256_storeu_pd(sum + h, added);
        continue;
      }
      const __m256d grown = _mm256_fmadd_pd(sv, e, _mm256_set1_pd(1.0));
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
