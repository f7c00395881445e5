#include "kernels/attention_mass.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {
constexpr int64_t kTaskTokens = 1024;
}

void AttentionMass(const MassProblem& p) {
  const int d = p.headDim;
  const int64_t tasks = (p.count + kTaskTokens - 1) / kTaskTokens;
  // Scores [rows, count]: the rows are few (question tokens × group), the
  // candidates many, so one pass over the keys scores every row.
  std::vector<float> scores(size_t(p.rows) * p.count);
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t t) {
    std::vector<float> row(d);
    const int64_t end = std::min(p.count, int64_t(t + 1) * kTaskTokens);
    for (int64_t i = int64_t(t) * kTaskTokens; i < end; ++i) {
      WidenRow(p.keys + size_t(p.ids[i]) * d, p.dtype, d, row.data());
      for (int64_t r = 0; r < p.rows; ++r) scores[size_t(r) * p.count + i] = Dot(p.q + size_t(r) * d, row.data(), d) * p.scale;
    }
  });
  std::vector<double> mass(p.count, 0.0);
  for (int64_t r = 0; r < p.rows; ++r) {
    float* s = scores.data() + size_t(r) * p.count;
    float m = *std::max_element(s, s + p.count);
    double z = ExpShiftSum(s, m, s, size_t(p.count));
    for (int64_t i = 0; i < p.count; ++i) mass[i] += s[i] / z;
  }
  for (int64_t i = 0; i < p.count; ++i) p.out[i] = float(mass[i]);
}

}  // namespace kvr
