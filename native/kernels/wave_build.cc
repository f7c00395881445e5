// No fused multiply-adds: each product is rounded before its sum, as in the
// TypeScript loops these replace (wave_build.h).
#pragma GCC optimize("fp-contract=off")

#include "kernels/wave_build.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvr {

namespace {

// JavaScript's Math.round: the nearest integer, halves toward +infinity
// (x - floor(x) is exact for these magnitudes).
inline double RoundHalfUp(double x) {
  const double f = std::floor(x);
  return f + (x - f >= 0.5 ? 1.0 : 0.0);
}

// moment-code.ts's decodeVar: the f32 of code² · scale (exact in float64).
inline double DecodeVarF64(double code, float scale) { return double(float(code * code * double(scale))); }

}  // namespace

int64_t EncodeMoments(const float* axes, const float* vars, int64_t clusters, int d, int8_t* keyAxes, float* axisScales, uint8_t* keyVars,
                      float* varScales) {
  constexpr double kAxisMax = 127, kVarMax = 255;
  // Each loop branch-free over j (selects, no early exit), so that the compiler can run it 4 lanes wide: the
  // divisions, square roots and floors are IEEE operations, the same in a lane as alone.
  std::vector<double> code(static_cast<size_t>(d));
  for (int64_t c = 0; c < clusters; ++c) {
    const float* a = axes + c * d;
    const float* v = vars + c * d;
    double ma = 0, mv = 0;
    int bad = 0;
    for (int j = 0; j < d; ++j) {
      const double x = std::fabs(double(a[j])), y = double(v[j]);
      bad |= !(x <= 3.5e38) | !(std::fabs(y) <= 3.5e38);  // not NaN nor infinite (float32's largest is 3.4e38)
      ma = x > ma ? x : ma;
      mv = y > mv ? y : mv;
    }
    if (bad) return c;
    const float sa = float(ma / kAxisMax), sv = float(mv / (kVarMax * kVarMax));
    axisScales[c] = sa;
    varScales[c] = sv;
    int8_t* ka = keyAxes + c * d;
    uint8_t* kv = keyVars + c * d;
    double* k = code.data();
    if (sa > 0) {
      for (int j = 0; j < d; ++j) k[j] = std::max(-kAxisMax, std::min(kAxisMax, RoundHalfUp(double(a[j]) / double(sa))));
      for (int j = 0; j < d; ++j) ka[j] = int8_t(k[j]);
    } else {
      std::fill(ka, ka + d, int8_t(0));
    }
    if (sv > 0) {
      for (int j = 0; j < d; ++j) {
        const double y = v[j] > 0 ? double(v[j]) : 0.0, r = std::sqrt(y / double(sv));
        const double lo = std::min(kVarMax, std::floor(r)), hi = std::min(kVarMax, lo + 1);
        k[j] = std::fabs(DecodeVarF64(hi, sv) - y) < std::fabs(DecodeVarF64(lo, sv) - y) ? hi : lo;
      }
      for (int j = 0; j < d; ++j) kv[j] = uint8_t(k[j]);
    } else {
      std::fill(kv, kv + d, uint8_t(0));
    }
  }
  return -1;
}

void RowDots(const double* q, int rows, int d, const float* x, int64_t n, int64_t stride, double s, double* out) {
  // q transposed, so that the rows' sums sit side by side (one vector op adds a term to several), each still in j order.
  std::vector<double> qt(size_t(rows) * size_t(d));
  std::vector<double> acc(static_cast<size_t>(rows));
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < d; ++j) qt[size_t(j) * rows + r] = q[size_t(r) * d + j];
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * stride;
    std::fill(acc.begin(), acc.end(), 0.0);
    double* __restrict a = acc.data();
    for (int j = 0; j < d; ++j) {
      const double xj = xt[j];
      const double* __restrict qj = qt.data() + size_t(j) * rows;
      for (int r = 0; r < rows; ++r) a[r] += qj[r] * xj;
    }
    for (int r = 0; r < rows; ++r) out[size_t(r) * n + t] = s * a[r];
  }
}

void WeightedRowSums(const double* w, const uint8_t* mask, int rows, int64_t n, const float* x, int64_t stride, int d, double* out) {
  for (int r = 0; r < rows; ++r) {
    double* __restrict o = out + size_t(r) * d;
    const double* wr = w + size_t(r) * n;
    const uint8_t* mr = mask ? mask + size_t(r) * n : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      if (mr && !mr[t]) continue;
      const double wt = wr[t];
      const float* __restrict xt = x + t * stride;
      for (int j = 0; j < d; ++j) o[j] += wt * double(xt[j]);
    }
  }
}

}  // namespace kvr
