// No fused multiply-adds: each product is rounded before its sum, as in the
// TypeScript loops these replace (wave_build.h).
#pragma GCC optimize("fp-contract=off")

#include "kernels/wave_build.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/thread_pool.h"

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

namespace {

// Clusters [c0, c1) of EncodeMoments; returns the first with a non-finite value there, or -1.
int64_t EncodeRange(const float* axes, const float* vars, int64_t c0, int64_t c1, int d, int8_t* keyAxes, float* axisScales, uint8_t* keyVars,
                    float* varScales) {
  constexpr double kAxisMax = 127, kVarMax = 255;
  // Each loop branch-free over j (selects, no early exit), so that the compiler can run it 4 lanes wide: the
  // divisions, square roots and floors are IEEE operations, the same in a lane as alone.
  std::vector<double> code(static_cast<size_t>(d));
  for (int64_t c = c0; c < c1; ++c) {
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

}  // namespace

int64_t EncodeMoments(const float* axes, const float* vars, int64_t clusters, int d, int8_t* keyAxes, float* axisScales, uint8_t* keyVars,
                      float* varScales) {
  // Clusters apart on the pool (each row's codes its own): a 1M-token head has ~70K of them.
  constexpr int64_t kChunk = 2048;
  const size_t chunks = size_t((clusters + kChunk - 1) / kChunk);
  std::vector<int64_t> bad(chunks, -1);
  ThreadPool::Get().ParallelFor(chunks, [&](size_t k) {
    const int64_t c0 = int64_t(k) * kChunk;
    bad[k] = EncodeRange(axes, vars, c0, std::min(clusters, c0 + kChunk), d, keyAxes, axisScales, keyVars, varScales);
  });
  for (int64_t b : bad)
    if (b >= 0) return b;
  return -1;
}

void RowDots(const double* q, int rows, int d, const float* x, int64_t n, int64_t stride, double s, double* out) {
  // q transposed, so that the rows' sums sit side by side (one vector op adds a term to several), each still in j order.
  std::vector<double> qt(size_t(rows) * size_t(d));
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < d; ++j) qt[size_t(j) * rows + r] = q[size_t(r) * d + j];
  constexpr int64_t kChunk = 1024;
  ThreadPool::Get().ParallelFor(size_t((n + kChunk - 1) / kChunk), [&](size_t k) {
    std::vector<double> acc(static_cast<size_t>(rows));
    double* __restrict a = acc.data();
    const int64_t t1 = std::min(n, int64_t(k + 1) * kChunk);
    for (int64_t t = int64_t(k) * kChunk; t < t1; ++t) {
      const float* xt = x + t * stride;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int j = 0; j < d; ++j) {
        const double xj = xt[j];
        const double* __restrict qj = qt.data() + size_t(j) * rows;
        for (int r = 0; r < rows; ++r) a[r] += qj[r] * xj;
      }
      for (int r = 0; r < rows; ++r) out[size_t(r) * n + t] = s * a[r];
    }
  });
}

void WeightedRowSums(const double* w, const uint8_t* mask, int rows, int64_t n, const float* x, int64_t stride, int d, double* out) {
  // Rows apart on the pool: each row's sums are its own, over t in order.
  ThreadPool::Get().ParallelFor(size_t(rows), [&](size_t r) {
    double* __restrict o = out + r * size_t(d);
    const double* wr = w + r * size_t(n);
    const uint8_t* mr = mask ? mask + r * size_t(n) : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      if (mr && !mr[t]) continue;
      const double wt = wr[t];
      const float* __restrict xt = x + t * stride;
      for (int j = 0; j < d; ++j) o[j] += wt * double(xt[j]);
    }
  });
}

}  // namespace kvr
