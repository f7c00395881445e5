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
float SecondOrder(const QueryRow& qr, float muDot, const float* var, float share, float centroidDot, float radius, const EstimateProblem& p) {
  const float w = p.scale * muDot + share * 0.5f * p.scale * p.scale * Dot(qr.q2.data(), var, size_t(p.headDim));
  return std::min(w, p.scale * (centroidDot + qr.norm * radius));
}

float Logit(const QueryRow& qr, const float* mu, const float* var, float share, float centroidDot, float radius, const EstimateProblem& p) {
  const float muDot = Dot(qr.q, mu, size_t(p.headDim));
  return var ? SecondOrder(qr, muDot, var, share, centroidDot, radius, p) : p.scale * muDot;
}

// A partial softmax over some of the estimated tokens for one query row:
// max shift m, normaliser and numerator (float64), merged by log-sum-exp.
struct Part {
  double m = -std::numeric_limits<double>::infinity();
  double den = 0;
  std::vector<double> num;
};

void Merge(Part& into, const Part& from) {
  if (!(from.den > 0)) return;
  if (!(into.den > 0)) {
    into = from;
    return;
  }
  const double m = std::max(into.m, from.m), a = std::exp(into.m - m), b = std::exp(from.m - m);
  into.den = into.den * a + from.den * b;
  for (size_t i = 0; i < into.num.size(); ++i) into.num[i] = into.num[i] * a + from.num[i] * b;
  into.m = m;
}

// Whole clusters per task: a task reads each cluster's summaries once for
// every query row of its kv head (the group), where a task per query row
// read them group times.
constexpr int64_t kChunk = 4096;

// Clusters [b, e) left out whole, for the group's rows: into parts[g].
void WholeClusters(const ClusterHead& c, const HeadPlan& plan, const std::vector<QueryRow>& rows, int64_t b, int64_t e, const EstimateProblem& p, Part* parts) {
  const int d = p.headDim, G = int(rows.size());
  const bool second = c.keyVars != nullptr;
  std::vector<float> row(static_cast<size_t>(p.centroidStride)), var(static_cast<size_t>(d)), logits(static_cast<size_t>(G) * static_cast<size_t>(e - b));
  std::vector<float> hi(static_cast<size_t>(G), -std::numeric_limits<float>::infinity());
  auto live = [&](int64_t cl) { return plan.mode[size_t(cl)] == kWhole && c.counts[cl] > 0; };
  for (int64_t cl = b; cl < e; ++cl) {
    if (!live(cl)) continue;
    WidenRow(c.centroids + size_t(cl) * p.centroidStride, p.dtype, size_t(d) + 1, row.data());
    if (second) WidenRow(c.keyVars + size_t(cl) * d, p.dtype, size_t(d), var.data());
    for (int g = 0; g < G; ++g) {
      const QueryRow& qr = rows[size_t(g)];
      // The centroid is the mean here: one dot serves the logit and its cap.
      const float dot = Dot(qr.q, row.data(), size_t(d));
      const float w = second ? SecondOrder(qr, dot, var.data(), c.varianceShare, dot, row[size_t(d)], p) : p.scale * dot;
      logits[size_t(g) * size_t(e - b) + size_t(cl - b)] = w;
      hi[size_t(g)] = std::max(hi[size_t(g)], w);
    }
  }
  for (int g = 0; g < G; ++g) parts[g] = Part{double(hi[size_t(g)]), 0.0, std::vector<double>(size_t(d), 0.0)};
  for (int64_t cl = b; cl < e; ++cl) {
    if (!live(cl)) continue;
    WidenRow(c.valueMeans + size_t(cl) * d, p.dtype, size_t(d), row.data());
    const double n = c.counts[cl];
    for (int g = 0; g < G; ++g) {
      const double w = n * std::exp(double(logits[size_t(g) * size_t(e - b) + size_t(cl - b)]) - parts[g].m);
      parts[g].den += w;
      double* num = parts[g].num.data();
      for (int i = 0; i < d; ++i) num[i] += w * double(row[size_t(i)]);
    }
  }
}

// The partly attended clusters, for the group's rows: into parts[g]. With
// member lists each row left weighs by its own logit (value: the rest's
// mean); else the rest's moments give one logit.
void PartialClusters(const ClusterHead& c, const HeadPlan& plan, const std::vector<QueryRow>& rows, const EstimateProblem& p, Part* parts) {
  const int d = p.headDim, G = int(rows.size());
  const bool second = c.keyVars != nullptr;
  std::vector<float> row(static_cast<size_t>(p.centroidStride)), key(static_cast<size_t>(d));
  // Per partial cluster and row g: the log of its mass, before the shift.
  std::vector<double> lmass(plan.partial.size() * static_cast<size_t>(G));
  std::vector<double> hi(static_cast<size_t>(G), -std::numeric_limits<double>::infinity());
    for (size_t j = 0; j < plan.partial.size(); ++j) {
    const Partial& part = plan.partial[j];
    double* lm = lmass.data() + j * size_t(G);
    if (c.members) {
      // log Σ_r exp(w_r), per row g, with its own max shift.
      std::vector<double> mx(static_cast<size_t>(G), -std::numeric_limits<double>::infinity()), sum(static_cast<size_t>(G), 0.0);
      for (int32_t r : part.rest) {
        WidenRow(c.keys + size_t(r) * d, p.dtype, size_t(d), key.data());
        for (int g = 0; g < G; ++g) {
          const double x = double(p.scale * Dot(rows[size_t(g)].q, key.data(), size_t(d)));
          if (x > mx[size_t(g)]) sum[size_t(g)] = sum[size_t(g)] * std::exp(mx[size_t(g)] - x) + 1.0, mx[size_t(g)] = x;
          else sum[size_t(g)] += std::exp(x - mx[size_t(g)]);
        }
      }
      for (int g = 0; g < G; ++g) lm[g] = mx[size_t(g)] + std::log(sum[size_t(g)]);
    } else {
      WidenRow(c.centroids + size_t(part.cluster) * p.centroidStride, p.dtype, size_t(d) + 1, row.data());
      for (int g = 0; g < G; ++g) {
        const QueryRow& qr = rows[size_t(g)];
        const float x = second ? Logit(qr, part.mean.data(), part.var.data(), c.varianceShare, Dot(qr.q, row.data(), size_t(d)), row[size_t(d)], p)
                               : Logit(qr, row.data(), nullptr, 0.f, 0.f, 0.f, p);
        lm[g] = double(x) + std::log(part.count);
      }
    }
    for (int g = 0; g < G; ++g) hi[size_t(g)] = std::max(hi[size_t(g)], lm[g]);
  }
  for (int g = 0; g < G; ++g) parts[g] = Part{hi[size_t(g)], 0.0, std::vector<double>(size_t(d), 0.0)};
  for (size_t j = 0; j < plan.partial.size(); ++j) {
    const Partial& part = plan.partial[j];
    for (int g = 0; g < G; ++g) {
      // The mass, and the rest's value sum times mass / count (its mean value).
      const double mass = std::exp(lmass[j * size_t(G) + size_t(g)] - parts[g].m);
      parts[g].den += mass;
      double* num = parts[g].num.data();
      for (int i = 0; i < d; ++i) num[i] += mass / part.count * part.values[size_t(i)];
    }
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
  // The query rows as the logits read them, once.
  std::vector<QueryRow> rows;
  for (int qh = 0; qh < p.qHeads; ++qh) {
    QueryRow qr{p.q + size_t(qh) * d, std::vector<float>(size_t(d)), 0.f};
    for (int i = 0; i < d; ++i) qr.q2[size_t(i)] = qr.q[i] * qr.q[i];
    qr.norm = std::sqrt(Dot(qr.q, qr.q, size_t(d)));
    rows.push_back(std::move(qr));
  }
  // Tasks: per (segment, kv head), chunks of whole clusters, then its partly attended clusters (begin = -1).
  struct Task {
    size_t plan;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < plans.size(); ++i) {
    const ClusterHead& c = p.segments[i / p.kvHeads][i % p.kvHeads];
    for (int64_t b = 0; b < c.clusters; b += kChunk) tasks.push_back({i, b, std::min(c.clusters, b + kChunk)});
    if (!plans[i].partial.empty()) tasks.push_back({i, -1, -1});
  }
  std::vector<Part> parts(tasks.size() * size_t(G));
  ThreadPool::Get().ParallelFor(tasks.size(), [&](size_t t) {
    const Task& task = tasks[t];
    const int h = int(task.plan % size_t(p.kvHeads));
    const ClusterHead& c = p.segments[task.plan / p.kvHeads][size_t(h)];
    const std::vector<QueryRow> group(rows.begin() + h * G, rows.begin() + (h + 1) * G);
    if (task.begin < 0) PartialClusters(c, plans[task.plan], group, p, parts.data() + t * size_t(G));
    else WholeClusters(c, plans[task.plan], group, task.begin, task.end, p, parts.data() + t * size_t(G));
  });
  // Per q head, its parts merged in task order (deterministic).
  ThreadPool::Get().ParallelFor(size_t(p.qHeads), [&](size_t qh) {
    const int h = int(qh) / G, g = int(qh) % G;
    Part all{-std::numeric_limits<double>::infinity(), 0.0, std::vector<double>(size_t(d), 0.0)};
    for (size_t t = 0; t < tasks.size(); ++t)
      if (int(tasks[t].plan % size_t(p.kvHeads)) == h) Merge(all, parts[t * size_t(G) + size_t(g)]);
    float* out = p.out + qh * d;
    // Nothing left to estimate (or only rounding left of it).
    if (!(all.den > 0) || p.estimated[h] <= 0) {
      std::fill(out, out + d, 0.f);
      p.lse[qh] = -std::numeric_limits<float>::infinity();
      return;
    }
    for (int i = 0; i < d; ++i) out[i] = float(all.num[size_t(i)] / all.den);
    p.lse[qh] = float(all.m + std::log(all.den));
  });
}

}  // namespace kvr
