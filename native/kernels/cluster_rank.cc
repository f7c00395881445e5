#include "kernels/cluster_rank.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/moment_code.h"
#include "common/ranked_hits.h"
#include "common/simd_math.h"

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

// A problem's best `keep` clusters into its outputs, and with outRows their
// members, best cluster first, up to maxRows.
void WriteRanked(const ClusterRankProblem& pr, std::vector<Hit>& all, int64_t keep, ClusterRankCounts& counts) {
  counts.ids = WriteBest(all, keep, pr.outIds, pr.outScores);
  counts.rows = 0;
  if (!pr.outRows) return;
  int64_t r = 0;
  for (int64_t i = 0; i < counts.ids && r < pr.maxRows; ++i) {
    const int32_t c = pr.outIds[i];
    const int64_t take = std::min<int64_t>(pr.offsets[c + 1] - pr.offsets[c], pr.maxRows - r);
    std::copy(pr.members + pr.offsets[c], pr.members + pr.offsets[c] + take, pr.outRows + r);
    r += take;
  }
  counts.rows = r;
}

}  // namespace

void RankClustersMany(const ClusterRankProblem* problems, size_t n, ClusterRankCounts* counts) {
  auto keepOf = [&](size_t p) { return std::min<int64_t>(problems[p].k, problems[p].clusters); };
  RankInChunks(
      n, kTaskClusters, [&](size_t p) { return keepOf(p) > 0 ? problems[p].clusters : 0; },
      [&](size_t p, int64_t begin, int64_t end, std::vector<Hit>& local) { ScanClusters(problems[p], begin, end, keepOf(p), local); },
      [&](size_t p, std::vector<Hit>& all) { WriteRanked(problems[p], all, keepOf(p), counts[p]); });
}

}  // namespace kvr
