// No fused multiply-adds: the sums keep the roundings of the TypeScript
// loops this replaced (see the header), which the artifacts were built with.
#pragma GCC optimize("fp-contract=off")

#include "kernels/cluster_summary.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/thread_pool.h"

namespace kvr {
namespace {

void Widen(const uint16_t* src, Dtype dtype, int d, float* dst) {
  for (int j = 0; j < d; ++j) dst[j] = ToF32(src[j], dtype);
}

// One cluster: members rows[0..m) in token order.
void Summarize(const ClusterSummaryProblem& p, int64_t c, const int64_t* rows, int64_t m) {
  const int d = p.headDim;
  float* cent = p.centroids + c * p.stride;
  float* vmean = p.valueMeans + c * d;
  float* var = p.keyVars + c * d;
  float* axis = p.keyAxes + c * d;
  std::vector<float> keys(size_t(m) * d), row(d);
  for (int64_t r = 0; r < m; ++r) Widen(p.keys + rows[r] * d, p.dtype, d, keys.data() + r * d);
  std::fill(cent, cent + d + 1, 0.f);
  std::fill(vmean, vmean + d, 0.f);
  std::fill(var, var + d, 0.f);
  std::fill(axis, axis + d, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    const float* k = keys.data() + r * d;
    Widen(p.values + rows[r] * d, p.dtype, d, row.data());
    for (int j = 0; j < d; ++j) cent[j] += k[j], vmean[j] += row[j];
  }
  const float count = float(m);
  for (int j = 0; j < d; ++j) cent[j] /= count, vmean[j] /= count;
  // Radius and per-channel variance: float64 squares, float32 sums per channel.
  for (int64_t r = 0; r < m; ++r) {
    const float* k = keys.data() + r * d;
    double s = 0;
    for (int j = 0; j < d; ++j) {
      const double diff = double(k[j]) - double(cent[j]);
      const double x = diff * diff;
      s += x;
      var[j] = float(double(var[j]) + x);
    }
    cent[d] = float(std::max(double(cent[d]), std::sqrt(s)));
  }
  for (int j = 0; j < d; ++j) var[j] /= count;
  if (m < 2) return;
  // Principal axis: power iteration on the offsets, from the farthest member.
  std::vector<float> off(size_t(m) * d), u(d), next(d);
  for (int64_t r = 0; r < m; ++r)
    for (int j = 0; j < d; ++j) off[r * d + j] = keys[r * d + j] - cent[j];
  double far = -1;
  for (int64_t r = 0; r < m; ++r) {
    const float* o = off.data() + r * d;
    double s = 0;
    for (int j = 0; j < d; ++j) s += double(o[j]) * double(o[j]);
    if (s > far) far = s, std::copy(o, o + d, u.begin());
  }
  if (!(far > 0)) return;
  double variance = 0;
  for (int it = 0; it <= p.axisIterations; ++it) {
    double norm = 0;
    for (int j = 0; j < d; ++j) norm += double(u[j]) * double(u[j]);
    norm = std::sqrt(norm);
    if (!(norm > 0)) break;
    for (int j = 0; j < d; ++j) u[j] = float(double(u[j]) / norm);
    std::fill(next.begin(), next.end(), 0.f);
    variance = 0;
    for (int64_t r = 0; r < m; ++r) {
      const float* o = off.data() + r * d;
      double proj = 0;
      for (int j = 0; j < d; ++j) proj += double(o[j]) * double(u[j]);
      variance += (proj * proj) / double(m);
      for (int j = 0; j < d; ++j) {
        const double t = proj * double(o[j]);
        next[j] = float(double(next[j]) + t);
      }
    }
    if (it < p.axisIterations) u = next;
  }
  const double sd = std::sqrt(variance);
  for (int j = 0; j < d; ++j) axis[j] = float(sd * double(u[j]));
}

}  // namespace

void ClusterSummary(const ClusterSummaryProblem& p) {
  if (p.tokens < 0 || p.clusters < 0 || p.headDim < 1 || p.stride < p.headDim + 1) throw std::invalid_argument("cluster summary: bad shape");
  // Members grouped per cluster, in token order (a counting sort).
  std::vector<int64_t> at(size_t(p.clusters) + 1, 0), rows(size_t(p.tokens));
  for (int64_t i = 0; i < p.tokens; ++i) {
    const int32_t c = p.cluster[i];
    if (c < 0 || c >= p.clusters) throw std::invalid_argument("cluster summary: a row's cluster is outside [0, clusters)");
    ++at[size_t(c) + 1];
  }
  for (int64_t c = 0; c < p.clusters; ++c) at[size_t(c) + 1] += at[size_t(c)];
  std::vector<int64_t> fill(at.begin(), at.end() - 1);
  for (int64_t i = 0; i < p.tokens; ++i) rows[size_t(fill[size_t(p.cluster[i])]++)] = i;
  constexpr int64_t kPerTask = 64;
  const int64_t tasks = (p.clusters + kPerTask - 1) / kPerTask;
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t t) {
    const int64_t c0 = int64_t(t) * kPerTask, c1 = std::min(p.clusters, c0 + kPerTask);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t m = at[size_t(c) + 1] - at[size_t(c)];
      if (m > 0) Summarize(p, c, rows.data() + at[size_t(c)], m);
    }
  });
}

}  // namespace kvr
