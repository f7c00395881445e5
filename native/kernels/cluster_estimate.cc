#include "kernels/cluster_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {

enum : uint8_t { kWhole = 0, kSkip = 1, kPartial = 2 };

// A cluster some of whose rows were attended exactly: it is estimated from
// the rows it has left, by their own logits when the member lists are
// given, else by their moments.
struct Partial {
  int32_t cluster;
  double count = 0;            // rows left
  std::vector<double> values;  // [d]: their value sum
  std::vector<int32_t> rest;   // the rows left (with member lists)
  std::vector<float> mean;     // [d]: their mean key (second order, no member lists)
  std::vector<float> var;      // [d]: their per-channel key variance (second order, no member lists)
};

// What one (segment, kv head) leaves to estimate: the clusters left out
// whole, and the partially attended ones. Shared by the head's query rows.
struct HeadPlan {
  std::vector<uint8_t> mode;  // [clusters]: kWhole, kSkip (retrieved, or every row attended), kPartial
  std::vector<Partial> partial;
  double estimated = 0;
  double scanned = 0;  // rows whose logits the partial clusters read
};

void Widen(const uint16_t* w, Dtype dt, int d, std::vector<float>& out) {
  out.resize(size_t(d));
  WidenRow(w, dt, size_t(d), out.data());
}

// The rest of cluster cl once `rows` (ascending) leave it: count and value
// sum, and with keyVars its rows (member lists given) or else its mean key
// and per-channel variance (float64 moments).
Partial Rest(const ClusterHead& c, int32_t cl, const std::vector<int32_t>& rows, const EstimateProblem& e) {
  const Dtype dt = e.dtype;
  const int d = e.headDim;
  Partial p;
  p.cluster = cl;
  const double n = c.counts[cl];
  p.count = n - double(rows.size());
  std::vector<float> row;
  Widen(c.valueMeans + size_t(cl) * d, dt, d, row);
  p.values.resize(size_t(d));
  for (int i = 0; i < d; ++i) p.values[size_t(i)] = n * double(row[size_t(i)]);
  for (int32_t r : rows) {
    Widen(c.values + size_t(r) * d, dt, d, row);
    for (int i = 0; i < d; ++i) p.values[size_t(i)] -= double(row[size_t(i)]);
  }
  if (!c.keyVars) return p;
  if (c.members) {
    for (int32_t i = c.offsets[cl]; i < c.offsets[cl + 1]; ++i)
      if (!std::binary_search(rows.begin(), rows.end(), c.members[i])) p.rest.push_back(c.members[i]);
    return p;
  }
  std::vector<float> mu, var;
  Widen(c.centroids + size_t(cl) * e.centroidStride, dt, d, mu);
  Widen(c.keyVars + size_t(cl) * d, dt, d, var);
  std::vector<double> s1(static_cast<size_t>(d)), s2(static_cast<size_t>(d));
  for (int i = 0; i < d; ++i) {
    const double m = mu[size_t(i)];
    s1[size_t(i)] = n * m;
    s2[size_t(i)] = n * (double(var[size_t(i)]) + m * m);
  }
  for (int32_t r : rows) {
    Widen(c.keys + size_t(r) * d, dt, d, row);
    for (int i = 0; i < d; ++i) {
      const double k = row[size_t(i)];
      s1[size_t(i)] -= k;
      s2[size_t(i)] -= k * k;
    }
  }
  p.mean.resize(size_t(d));
  p.var.resize(size_t(d));
  for (int i = 0; i < d; ++i) {
    const double m = s1[size_t(i)] / p.count;
    p.mean[size_t(i)] = float(m);
    p.var[size_t(i)] = float(std::max(0.0, s2[size_t(i)] / p.count - m * m));
  }
  return p;
}

HeadPlan Plan(const ClusterHead& c, const EstimateProblem& e) {
  HeadPlan plan;
  plan.mode.assign(size_t(c.clusters), kWhole);
  for (int64_t i = 0; i < c.retrievedCount; ++i) plan.mode[size_t(c.retrieved[i])] = kSkip;
  std::vector<std::pair<int32_t, int32_t>> byCluster;  // (cluster, row)
  byCluster.reserve(size_t(c.exactCount));
  for (int64_t i = 0; i < c.exactCount; ++i) {
    int32_t row = c.exact[i], cl = c.tokenCluster[row];
    if (plan.mode[size_t(cl)] != kSkip) byCluster.emplace_back(cl, row);
  }
  std::sort(byCluster.begin(), byCluster.end());
  // A row listed twice is attended once: count it once.
  byCluster.erase(std::unique(byCluster.begin(), byCluster.end()), byCluster.end());
  std::vector<int32_t> rows;
  for (size_t i = 0; i < byCluster.size();) {
    size_t j = i;
    while (j < byCluster.size() && byCluster[j].first == byCluster[i].first) ++j;
    int32_t cl = byCluster[i].first;
    if (int64_t(j - i) >= c.counts[cl]) plan.mode[size_t(cl)] = kSkip;
    else {
      rows.clear();
      for (size_t k = i; k < j; ++k) rows.push_back(byCluster[k].second);
      plan.mode[size_t(cl)] = kPartial;
      plan.partial.push_back(Rest(c, cl, rows, e));
    }
    i = j;
  }
  for (int64_t cl = 0; cl < c.clusters; ++cl)
    if (plan.mode[size_t(cl)] == kWhole && c.counts[cl] > 0) plan.estimated += c.counts[cl];
  for (const auto& p : plan.partial) plan.estimated += p.count, plan.scanned += double(p.rest.size());
  return plan;
}

// The query row as the logits read it: q, its squares (for the variance
// term) and its norm (for the cap).
struct QueryRow {
  const float* q;
  std::vector<float> q2;
  float norm;
};

// The logit of a cluster's tokens: s q.mu first order; with variances
// s q.mu + share s^2 q^2.var / 2, capped at s (q.mu_c + |q| r_c) (the bound of
// every member's logit, from the whole cluster's centroid and radius).
float Logit(const QueryRow& qr, const float* mu, const float* var, float share, float centroidDot, float radius, const EstimateProblem& p) {
  const size_t d = size_t(p.headDim);
  float w = p.scale * Dot(qr.q, mu, d);
  if (!var) return w;
  w += share * 0.5f * p.scale * p.scale * Dot(qr.q2.data(), var, d);
  return std::min(w, p.scale * (centroidDot + qr.norm * radius));
}

// One query row over one (segment, head): adds its terms to (m, den, num),
// a running state in float64 with max shift m.
void Accumulate(const QueryRow& qr, const ClusterHead& c, const HeadPlan& plan, const EstimateProblem& p,
                std::vector<float>& logits, std::vector<float>& row, std::vector<float>& var, double& m, double& den, std::vector<double>& num) {
  const int d = p.headDim;
  const bool second = c.keyVars != nullptr;
  logits.resize(size_t(c.clusters));
  row.resize(size_t(p.centroidStride));
  var.resize(size_t(d));
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t cl = 0; cl < c.clusters; ++cl) {
    if (plan.mode[size_t(cl)] != kWhole || c.counts[cl] <= 0) continue;
    WidenRow(c.centroids + size_t(cl) * p.centroidStride, p.dtype, size_t(d) + 1, row.data());
    float w;
    if (second) {
      WidenRow(c.keyVars + size_t(cl) * d, p.dtype, size_t(d), var.data());
      w = Logit(qr, row.data(), var.data(), c.varianceShare, Dot(qr.q, row.data(), size_t(d)), row[size_t(d)], p);
    } else {
      w = Logit(qr, row.data(), nullptr, 0.f, 0.f, 0.f, p);
    }
    logits[size_t(cl)] = w;
    hi = std::max(hi, w);
  }
  // The rows partly attended clusters have left, by their own logits (after the clusters' in `logits`).
  size_t rows = 0;
  for (const auto& part : plan.partial) rows += part.rest.size();
  logits.resize(size_t(c.clusters) + rows);
  size_t at = size_t(c.clusters);
  for (const auto& part : plan.partial) {
    if (c.members) {
      for (int32_t r : part.rest) {
        WidenRow(c.keys + size_t(r) * d, p.dtype, size_t(d), var.data());
        const float w = p.scale * Dot(qr.q, var.data(), size_t(d));
        logits[at++] = w;
        hi = std::max(hi, w);
      }
      continue;
    }
    WidenRow(c.centroids + size_t(part.cluster) * p.centroidStride, p.dtype, size_t(d) + 1, row.data());
    const float w = second ? Logit(qr, part.mean.data(), part.var.data(), c.varianceShare, Dot(qr.q, row.data(), size_t(d)), row[size_t(d)], p)
                           : Logit(qr, row.data(), nullptr, 0.f, 0.f, 0.f, p);
    logits[size_t(part.cluster)] = w;
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
    if (plan.mode[size_t(cl)] != kWhole || c.counts[cl] <= 0) continue;
    double e = std::exp(double(logits[size_t(cl)]) - m), n = c.counts[cl];
    den += n * e;
    WidenRow(c.valueMeans + size_t(cl) * d, p.dtype, size_t(d), row.data());
    for (int i = 0; i < d; ++i) num[size_t(i)] += n * e * double(row[size_t(i)]);
  }
  at = size_t(c.clusters);
  for (const auto& part : plan.partial) {
    if (c.members) {
      // Each row's own weight; its value is the rest's mean.
      double mass = 0;
      for (size_t i = 0; i < part.rest.size(); ++i) mass += std::exp(double(logits[at++]) - m);
      den += mass;
      for (int i = 0; i < d; ++i) num[size_t(i)] += mass / part.count * part.values[size_t(i)];
      continue;
    }
    double e = std::exp(double(logits[size_t(part.cluster)]) - m);
    den += part.count * e;
    for (int i = 0; i < d; ++i) num[size_t(i)] += e * part.values[size_t(i)];
  }
}

}  // namespace

void EstimateClusters(const EstimateProblem& p) {
  const int G = p.qHeads / p.kvHeads, d = p.headDim;
  const size_t S = p.segments.size();
  std::vector<HeadPlan> plans(S * size_t(p.kvHeads));
  ThreadPool::Get().ParallelFor(plans.size(), [&](size_t i) { plans[i] = Plan(p.segments[i / p.kvHeads][i % p.kvHeads], p); });
  for (int h = 0; h < p.kvHeads; ++h) {
    double n = 0, read = 0;
    for (size_t s = 0; s < S; ++s) n += plans[s * p.kvHeads + h].estimated, read += plans[s * p.kvHeads + h].scanned;
    p.estimated[h] = n;
    if (p.scanned) p.scanned[h] = read;
  }
  ThreadPool::Get().ParallelFor(size_t(p.qHeads), [&](size_t qh) {
    const int h = int(qh) / G;
    QueryRow qr{p.q + qh * d, std::vector<float>(size_t(d)), 0.f};
    for (int i = 0; i < d; ++i) qr.q2[size_t(i)] = qr.q[i] * qr.q[i];
    qr.norm = std::sqrt(Dot(qr.q, qr.q, size_t(d)));
    std::vector<float> logits, row, var;
    std::vector<double> num(size_t(d), 0.0);
    double m = -std::numeric_limits<double>::infinity(), den = 0;
    for (size_t s = 0; s < S; ++s) Accumulate(qr, p.segments[s][h], plans[s * p.kvHeads + h], p, logits, row, var, m, den, num);
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
