#include "kernels/outlier_scores.h"

#include <algorithm>
#include <vector>

#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {

void OutlierScores(const uint16_t* keys, Dtype dtype, int64_t n, int d, float* z) {
  if (n <= 0) return;
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  // Channel sums per block in float64, summed in block order (deterministic).
  std::vector<double> sum(static_cast<size_t>(blocks * d), 0.0), sq(static_cast<size_t>(blocks * d), 0.0);
  ThreadPool::Get().ParallelFor(size_t(blocks), [&](size_t t) {
    std::vector<float> r(static_cast<size_t>(d));
    double* s1 = sum.data() + t * d;
    double* s2 = sq.data() + t * d;
    for (int64_t i = int64_t(t) * kBlock; i < std::min<int64_t>(n, int64_t(t + 1) * kBlock); ++i) {
      WidenRow(keys + size_t(i) * d, dtype, size_t(d), r.data());
      for (int c = 0; c < d; ++c) s1[c] += r[size_t(c)], s2[c] += double(r[size_t(c)]) * r[size_t(c)];
    }
  });
  std::vector<float> mu(static_cast<size_t>(d)), inv(static_cast<size_t>(d));
  for (int c = 0; c < d; ++c) {
    double a = 0, b = 0;
    for (int64_t t = 0; t < blocks; ++t) a += sum[size_t(t) * d + c], b += sq[size_t(t) * d + c];
    const double m = a / double(n), v = std::max(b / double(n) - m * m, 1e-12);
    mu[size_t(c)] = float(m);
    inv[size_t(c)] = float(1.0 / v);
  }
  ThreadPool::Get().ParallelFor(size_t(blocks), [&](size_t t) {
    std::vector<float> r(static_cast<size_t>(d));
    for (int64_t i = int64_t(t) * kBlock; i < std::min<int64_t>(n, int64_t(t + 1) * kBlock); ++i) {
      WidenRow(keys + size_t(i) * d, dtype, size_t(d), r.data());
      float acc = 0.f;
      for (int c = 0; c < d; ++c) {
        const float x = r[size_t(c)] - mu[size_t(c)];
        acc += x * x * inv[size_t(c)];
      }
      z[i] = acc;
    }
  });
}

}  // namespace kvr
