#include "kernels/cluster_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {

// A cluster some of whose rows were attended exactly: its terms lose them.
struct Partial {
  int32_t cluster;
  std::vector<int32_t> rows;
};

// What one (segment, kv head) leaves to estimate: the clusters left out
// whole, and the partially attended ones. Shared by the head's query rows.
struct HeadPlan {
  std::vector<uint8_t> skip;  // [clusters]: retrieved, or every row attended exactly
  std::vector<Partial> partial;
  double estimated = 0;
};

HeadPlan Plan(const ClusterHead& c) {
  HeadPlan plan;
  plan.skip.assign(size_t(c.clusters), 0);
  for (int64_t i = 0; i < c.retrievedCount; ++i) plan.skip[size_t(c.retrieved[i])] = 1;
  std::vector<std::pair<int32_t, int32_t>> byCluster;  // (cluster, row)
  byCluster.reserve(size_t(c.exactCount));
  for (int64_t i = 0; i < c.exactCount; ++i) {
    int32_t row = c.exact[i], cl = c.tokenCluster[row];
    if (!plan.skip[size_t(cl)]) byCluster.emplace_back(cl, row);
  }
  std::sort(byCluster.begin(), byCluster.end());
  // A row listed twice is attended once: count it once.
  byCluster.erase(std::unique(byCluster.begin(), byCluster.end()), byCluster.end());
  for (size_t i = 0; i < byCluster.size();) {
    size_t j = i;
    while (j < byCluster.size() && byCluster[j].first == byCluster[i].first) ++j;
    int32_t cl = byCluster[i].first;
    if (int64_t(j - i) >= c.counts[cl]) plan.skip[size_t(cl)] = 1;
    else {
      Partial p{cl, {}};
      for (size_t k = i; k < j; ++k) p.rows.push_back(byCluster[k].second);
      plan.partial.push_back(std::move(p));
    }
    i = j;
  }
  for (int64_t cl = 0; cl < c.clusters; ++cl)
    if (!plan.skip[size_t(cl)]) plan.estimated += c.counts[cl];
  for (const auto& p : plan.partial) plan.estimated -= double(p.rows.size());
  return plan;
}

// One query row over one (segment, head): adds its terms to (m, den, num),
// a running state in float64 with max shift m.
void Accumulate(const float* q, const ClusterHead& c, const HeadPlan& plan, const EstimateProblem& p,
                std::vector<float>& logits, std::vector<float>& row, double& m, double& den, std::vector<double>& num) {
  const int d = p.headDim;
  logits.resize(size_t(c.clusters));
  row.resize(size_t(d));
  float hi = -std::numeric_limits<float>::infinity();
  row.resize(size_t(p.centroidStride));
  for (int64_t cl = 0; cl < c.clusters; ++cl) {
    if (plan.skip[size_t(cl)] || c.counts[cl] <= 0) continue;
    const uint16_t* cr = c.centroids + size_t(cl) * p.centroidStride;
    WidenRow(cr, p.dtype, size_t(d), row.data());
    float w = p.scale * Dot(q, row.data(), size_t(d));
    logits[size_t(cl)] = w;
    hi = std::max(hi, w);
  }
  if (hi == -std::numeric_limits<float>::infinity()) return;
  if (double(hi) > m) {
    double r = std::exp(m - double(hi));
    den *= r;
    for (auto& x : num) x *= r;
    m = hi;
  }
  for (int64_t cl = 0; cl < c.clusters; ++cl) {
    if (plan.skip[size_t(cl)] || c.counts[cl] <= 0) continue;
    double e = std::exp(double(logits[size_t(cl)]) - m), n = c.counts[cl];
    den += n * e;
    WidenRow(c.valueMeans + size_t(cl) * d, p.dtype, size_t(d), row.data());
    for (int i = 0; i < d; ++i) num[size_t(i)] += n * e * double(row[size_t(i)]);
  }
  // Rows attended exactly leave their (partially kept) cluster's terms.
  for (const auto& part : plan.partial) {
    double e = std::exp(double(logits[size_t(part.cluster)]) - m);
    den -= e * double(part.rows.size());
    for (int32_t r : part.rows) {
      WidenRow(c.values + size_t(r) * d, p.dtype, size_t(d), row.data());
      for (int i = 0; i < d; ++i) num[size_t(i)] -= e * double(row[size_t(i)]);
    }
  }
}

}  // namespace

void EstimateClusters(const EstimateProblem& p) {
  const int G = p.qHeads / p.kvHeads, d = p.headDim;
  const size_t S = p.segments.size();
  std::vector<HeadPlan> plans(S * size_t(p.kvHeads));
  ThreadPool::Get().ParallelFor(plans.size(), [&](size_t i) { plans[i] = Plan(p.segments[i / p.kvHeads][i % p.kvHeads]); });
  for (int h = 0; h < p.kvHeads; ++h) {
    double n = 0;
    for (size_t s = 0; s < S; ++s) n += plans[s * p.kvHeads + h].estimated;
    p.estimated[h] = n;
  }
  ThreadPool::Get().ParallelFor(size_t(p.qHeads), [&](size_t qh) {
    const int h = int(qh) / G;
    const float* q = p.q + qh * d;
    std::vector<float> logits, row;
    std::vector<double> num(size_t(d), 0.0);
    double m = -std::numeric_limits<double>::infinity(), den = 0;
    for (size_t s = 0; s < S; ++s) Accumulate(q, p.segments[s][h], plans[s * p.kvHeads + h], p, logits, row, m, den, num);
    float* out = p.out + qh * d;
    // Nothing left to estimate (or only rounding left of it).
    if (!(den > 0) || p.estimated[h] <= 0) {
      std::fill(out, out + d, 0.f);
      p.lse[qh] = -std::numeric_limits<float>::infinity();
      return;
    }
    for (int i = 0; i < d; ++i) out[i] = float(num[size_t(i)] / den);
    p.lse[qh] = float(m + std::log(den));
  });
}

}  // namespace kvr
