#include "kernels/cluster_rank.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/moment_code.h"
#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {

constexpr int64_t kTaskClusters = 2048;

// Clusters [begin, end) of one problem into a local heap of its best `keep`.
void ScanClusters(const ClusterRankProblem& p, int64_t begin, int64_t end, int64_t keep, std::vector<Hit>& heap) {
  const size_t d = size_t(p.headDim);
  std::vector<float> mu(d), axis(d), var(d), q2(size_t(p.group) * d);
  for (size_t i = 0; i < q2.size(); ++i) q2[i] = p.q[i] * p.q[i];
  heap.reserve(size_t(std::max<int64_t>(keep, 0)) + 1);
  for (int64_t c = begin; c < end; ++c) {
    WidenRow(p.centroids + size_t(c) * p.centroidStride, p.dtype, d, mu.data());
    DecodeAxisRow(p.axes + size_t(c) * d, p.axisScales[c], d, axis.data());
    DecodeVarRow(p.vars + size_t(c) * d, p.varScales[c], d, var.data());
    float s = -std::numeric_limits<float>::infinity();
    for (int g = 0; g < p.group; ++g) {
      const float* q = p.q + size_t(g) * d;
      const float along = Dot(q, axis.data(), d), channels = Dot(q2.data() + size_t(g) * d, var.data(), d);
      // Fused multiply-adds written out: the GPU wave step sums the same way,
      // so both rank clusters bit for bit alike whatever the compiler contracts.
      s = std::max(s, std::fma(p.spread, std::sqrt(std::max(0.f, std::fma(along, along, channels))), Dot(q, mu.data(), d)));
    }
    Offer(heap, size_t(keep), Hit{s, int32_t(c)});
  }
}

}  // namespace

void RankClustersMany(const ClusterRankProblem* problems, size_t n, ClusterRankCounts* counts) {
  struct Task {
    size_t problem;
    int64_t begin, end;
  };
  auto keepOf = [&](size_t p) { return std::min<int64_t>(problems[p].k, problems[p].clusters); };
  std::vector<Task> tasks;
  for (size_t p = 0; p < n; ++p)
    for (int64_t b = 0; keepOf(p) > 0 && b < problems[p].clusters; b += kTaskClusters)
      tasks.push_back({p, b, std::min(problems[p].clusters, b + kTaskClusters)});
  std::vector<std::vector<Hit>> local(tasks.size());
  ThreadPool::Get().ParallelFor(tasks.size(), [&](size_t t) {
    const Task& task = tasks[t];
    ScanClusters(problems[task.problem], task.begin, task.end, keepOf(task.problem), local[t]);
  });
  size_t t = 0;
  for (size_t p = 0; p < n; ++p) {
    std::vector<Hit> all;
    for (; t < tasks.size() && tasks[t].problem == p; ++t) all.insert(all.end(), local[t].begin(), local[t].end());
    const ClusterRankProblem& pr = problems[p];
    counts[p].ids = WriteBest(all, keepOf(p), pr.outIds, pr.outScores);
    counts[p].rows = 0;
    if (!pr.outRows) continue;
    int64_t r = 0;
    for (int64_t i = 0; i < counts[p].ids && r < pr.maxRows; ++i) {
      const int32_t c = pr.outIds[i];
      const int64_t take = std::min<int64_t>(pr.offsets[c + 1] - pr.offsets[c], pr.maxRows - r);
      std::copy(pr.members + pr.offsets[c], pr.members + pr.offsets[c] + take, pr.outRows + r);
      r += take;
    }
    counts[p].rows = r;
  }
}

}  // namespace kvr
