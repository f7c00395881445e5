#include "kernels/cluster_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common/moment_code.h"
#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {

// What one (segment, kv head) leaves to estimate, as lists: no array of the
// head's size is made or walked per step (131072 clusters a head at 1M).
// `excluded` (ascending, unique): the clusters a whole-cluster task skips:
// retrieved ones and every cluster with a row attended exactly. `rows`: the
// (cluster << 32 | row) keys of the exact rows outside retrieved clusters,
// ascending, unique (a row listed twice is attended once); a partly
// attended cluster's rows are rows[begin, end).
struct PartialRef {
  int32_t cluster;
  uint32_t begin, end;
};

struct HeadPlan {
  std::vector<int32_t> excluded;
  std::vector<uint64_t> rows;
  std::vector<PartialRef> partial;
};

constexpr int32_t RowOf(uint64_t key) { return int32_t(uint32_t(key)); }

HeadPlan Plan(const ClusterHead& c) {
  HeadPlan plan;
  std::vector<int32_t> retrieved(c.retrieved, c.retrieved + c.retrievedCount);
  std::sort(retrieved.begin(), retrieved.end());
  retrieved.erase(std::unique(retrieved.begin(), retrieved.end()), retrieved.end());
  plan.rows.reserve(size_t(c.exactCount));
  for (int64_t i = 0; i < c.exactCount; ++i) {
    const int32_t row = c.exact[i], cl = c.tokenCluster[row];
    if (!std::binary_search(retrieved.begin(), retrieved.end(), cl)) plan.rows.push_back(uint64_t(uint32_t(cl)) << 32 | uint32_t(row));
  }
  std::sort(plan.rows.begin(), plan.rows.end());
  plan.rows.erase(std::unique(plan.rows.begin(), plan.rows.end()), plan.rows.end());
  std::vector<int32_t> touched;
  for (size_t i = 0; i < plan.rows.size();) {
    size_t j = i;
    const int32_t cl = int32_t(plan.rows[i] >> 32);
    while (j < plan.rows.size() && int32_t(plan.rows[j] >> 32) == cl) ++j;
    touched.push_back(cl);
    // Every row attended: nothing left of the cluster to estimate.
    if (int64_t(j - i) < c.counts[cl]) plan.partial.push_back({cl, uint32_t(i), uint32_t(j)});
    i = j;
  }
  plan.excluded.resize(retrieved.size() + touched.size());
  std::merge(retrieved.begin(), retrieved.end(), touched.begin(), touched.end(), plan.excluded.begin());
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
// read them group times. Partly attended clusters likewise, in chunks: one
// task per head was the step's longest (each reads its rows' keys), and at
// 1M tokens with 16 threads it alone took most of the step.
constexpr int64_t kChunk = 4096;
constexpr int64_t kPartialChunk = 256;

// What a task adds to its head's counts: tokens estimated, rows read.
struct TaskCounts {
  double estimated = 0, scanned = 0;
};

// Clusters [b, e) left out whole, for the group's rows: into parts[g].
void WholeClusters(const ClusterHead& c, const HeadPlan& plan, const std::vector<QueryRow>& rows, int64_t b, int64_t e, const EstimateProblem& p, Part* parts, TaskCounts& counts) {
  const int d = p.headDim, G = int(rows.size());
  const bool second = c.keyVars != nullptr;
  std::vector<float> row(static_cast<size_t>(p.centroidStride)), var(static_cast<size_t>(d)), logits(static_cast<size_t>(G) * static_cast<size_t>(e - b));
  std::vector<float> hi(static_cast<size_t>(G), -std::numeric_limits<float>::infinity());
  // live[cl - b]: left out whole (not excluded, not empty); the excluded list is walked alongside.
  std::vector<uint8_t> live(static_cast<size_t>(e - b));
  auto ex = std::lower_bound(plan.excluded.begin(), plan.excluded.end(), int32_t(b));
  for (int64_t cl = b; cl < e; ++cl) {
    const bool skip = ex != plan.excluded.end() && *ex == cl;
    if (skip) ++ex;
    live[size_t(cl - b)] = !skip && c.counts[cl] > 0;
    if (live[size_t(cl - b)]) counts.estimated += c.counts[cl];
  }
  for (int64_t cl = b; cl < e; ++cl) {
    if (!live[size_t(cl - b)]) continue;
    WidenRow(c.centroids + size_t(cl) * p.centroidStride, p.dtype, size_t(d) + 1, row.data());
    if (second) DecodeVarRow(c.keyVars + size_t(cl) * d, c.varScales[cl], size_t(d), var.data());
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
    if (!live[size_t(cl - b)]) continue;
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

// Per-task scratch of PartialClusters, sized once per task.
struct PartialScratch {
  std::vector<float> row, key, mu, var;
  std::vector<double> s1, s2, mx, sum, values;
  // Member lists: the chunk's remaining rows, slot by slot in (cluster, member) order; cluster j's are
  // slots [first[j], first[j + 1]); logits[slot * G + g] their logits; order the (row, slot) keys by row.
  std::vector<uint32_t> first;
  std::vector<uint64_t> order;
  std::vector<double> logits;
  explicit PartialScratch(const EstimateProblem& p, int G)
      : row(size_t(p.centroidStride)), key(size_t(p.headDim)), mu(size_t(p.headDim)), var(size_t(p.headDim)), s1(size_t(p.headDim)), s2(size_t(p.headDim)),
        mx(size_t(G)), sum(size_t(G)), values(size_t(p.headDim)) {}
};

// The rows a partly attended cluster reads lie at random in its segment
// (without member lists its exact rows' keys; its exact rows' values): each
// a cache miss, which a cluster's few dot products did not hide. Requested
// kAhead clusters early.
constexpr int64_t kAhead = 2;

void PrefetchRow(const uint16_t* row, int d) {
  const char* at = reinterpret_cast<const char*>(row);
  for (int off = 0; off < 2 * d; off += 64) __builtin_prefetch(at + off);
  __builtin_prefetch(at + 2 * d - 1);
}

void PrefetchRest(const ClusterHead& c, const HeadPlan& plan, const PartialRef& ref, const EstimateProblem& p, bool keys) {
  const int d = p.headDim;
  if (!keys) {
    PrefetchRow(c.valueMeans + size_t(ref.cluster) * d, d);
    for (uint32_t k = ref.begin; k < ref.end; ++k) PrefetchRow(c.values + size_t(RowOf(plan.rows[k])) * d, d);
    return;
  }
  PrefetchRow(c.centroids + size_t(ref.cluster) * p.centroidStride, d);
  if (c.keys)
    for (uint32_t k = ref.begin; k < ref.end; ++k) PrefetchRow(c.keys + size_t(RowOf(plan.rows[k])) * d, d);
}

// With member lists: the logits of the rows partly attended clusters
// plan.partial[b, e) have left, into s.logits by slot. Computed in row
// order: the rows lie at random in their segments, and each read in
// cluster order was a cache and TLB miss that prefetching did not hide
// (2-core VM); by row, neighbours share pages and lines come in order.
// The sums over them stay in member order (RestMass), so the answer is
// the same to the bit.
void RestLogits(const ClusterHead& c, const HeadPlan& plan, const std::vector<QueryRow>& rows, int64_t b, int64_t e, const EstimateProblem& p, PartialScratch& s) {
  const int d = p.headDim, G = int(rows.size());
  s.first.assign(size_t(e - b) + 1, 0);
  s.order.clear();
  uint32_t slot = 0;
  for (int64_t j = b; j < e; ++j) {
    const PartialRef& ref = plan.partial[size_t(j)];
    const int32_t cl = ref.cluster;
    const uint64_t* ex = plan.rows.data() + ref.begin;
    const size_t exN = ref.end - ref.begin;
    s.first[size_t(j - b)] = slot;
    for (int32_t i = c.offsets[cl]; i < c.offsets[cl + 1]; ++i) {
      const int32_t r = c.members[i];
      const uint64_t* at = std::lower_bound(ex, ex + exN, uint64_t(uint32_t(cl)) << 32 | uint32_t(r));
      if (at != ex + exN && RowOf(*at) == r) continue;
      s.order.push_back(uint64_t(uint32_t(r)) << 32 | slot++);
    }
  }
  s.first[size_t(e - b)] = slot;
  std::sort(s.order.begin(), s.order.end());
  s.logits.resize(size_t(slot) * size_t(G));
  constexpr size_t kRowsAhead = 8;
  for (size_t k = 0; k < s.order.size(); ++k) {
    if (k + kRowsAhead < s.order.size()) PrefetchRow(c.keys + size_t(s.order[k + kRowsAhead] >> 32) * d, d);
    const size_t r = size_t(s.order[k] >> 32), at = size_t(uint32_t(s.order[k])) * size_t(G);
    WidenRow(c.keys + r * d, p.dtype, size_t(d), s.key.data());
    for (int g = 0; g < G; ++g) s.logits[at + size_t(g)] = double(p.scale * Dot(rows[size_t(g)].q, s.key.data(), size_t(d)));
  }
}

// log of cluster ref.cluster's rest's mass for each row g, into lm[g]: with
// member lists log Σ_r exp(w_r) over the rows it has left (their logits
// from RestLogits, slots of chunk cluster j),
// else one logit from the rest's moments (float64, the exact rows' keys
// taken out) plus log(count). Returns the rows read.
double RestMass(const ClusterHead& c, const HeadPlan& plan, const PartialRef& ref, int64_t j, const std::vector<QueryRow>& rows, const EstimateProblem& p, PartialScratch& s, double* lm) {
  const int d = p.headDim, G = int(rows.size());
  const int32_t cl = ref.cluster;
  const double n = c.counts[cl], count = n - double(ref.end - ref.begin);
  const uint64_t* ex = plan.rows.data() + ref.begin;
  const size_t exN = ref.end - ref.begin;
  if (c.members) {
    // The rows it has left, in member order: their logits (RestLogits) summed as the rows come.
    std::fill(s.mx.begin(), s.mx.end(), -std::numeric_limits<double>::infinity());
    std::fill(s.sum.begin(), s.sum.end(), 0.0);
    for (uint32_t slot = s.first[size_t(j)]; slot < s.first[size_t(j) + 1]; ++slot)
      for (int g = 0; g < G; ++g) {
        const double x = s.logits[size_t(slot) * size_t(G) + size_t(g)];
        double& mx = s.mx[size_t(g)];
        double& sum = s.sum[size_t(g)];
        if (x > mx) sum = sum * std::exp(mx - x) + 1.0, mx = x;
        else sum += std::exp(x - mx);
      }
    for (int g = 0; g < G; ++g) lm[g] = s.mx[size_t(g)] + std::log(s.sum[size_t(g)]);
    return double(s.first[size_t(j) + 1] - s.first[size_t(j)]);
  }
  WidenRow(c.centroids + size_t(cl) * p.centroidStride, p.dtype, size_t(d) + 1, s.row.data());
  const bool second = c.keyVars != nullptr;
  if (second) {
    DecodeVarRow(c.keyVars + size_t(cl) * d, c.varScales[cl], size_t(d), s.var.data());
    for (int i = 0; i < d; ++i) {
      const double m = s.row[size_t(i)];
      s.s1[size_t(i)] = n * m;
      s.s2[size_t(i)] = n * (double(s.var[size_t(i)]) + m * m);
    }
    for (size_t k = 0; k < exN; ++k) {
      WidenRow(c.keys + size_t(RowOf(ex[k])) * d, p.dtype, size_t(d), s.key.data());
      for (int i = 0; i < d; ++i) {
        const double x = s.key[size_t(i)];
        s.s1[size_t(i)] -= x;
        s.s2[size_t(i)] -= x * x;
      }
    }
    for (int i = 0; i < d; ++i) {
      const double m = s.s1[size_t(i)] / count;
      s.mu[size_t(i)] = float(m);
      s.var[size_t(i)] = float(std::max(0.0, s.s2[size_t(i)] / count - m * m));
    }
  }
  for (int g = 0; g < G; ++g) {
    const QueryRow& qr = rows[size_t(g)];
    const float x = second ? Logit(qr, s.mu.data(), s.var.data(), c.varianceShare, Dot(qr.q, s.row.data(), size_t(d)), s.row[size_t(d)], p)
                           : Logit(qr, s.row.data(), nullptr, 0.f, 0.f, 0.f, p);
    lm[g] = double(x) + std::log(count);
  }
  return 0;
}

// The rest's value sum of a partly attended cluster: n × its value mean less the exact rows' values (float64).
void RestValues(const ClusterHead& c, const HeadPlan& plan, const PartialRef& ref, const EstimateProblem& p, PartialScratch& s) {
  const int d = p.headDim;
  const double n = c.counts[ref.cluster];
  WidenRow(c.valueMeans + size_t(ref.cluster) * d, p.dtype, size_t(d), s.key.data());
  for (int i = 0; i < d; ++i) s.values[size_t(i)] = n * double(s.key[size_t(i)]);
  for (uint32_t k = ref.begin; k < ref.end; ++k) {
    WidenRow(c.values + size_t(RowOf(plan.rows[k])) * d, p.dtype, size_t(d), s.key.data());
    for (int i = 0; i < d; ++i) s.values[size_t(i)] -= double(s.key[size_t(i)]);
  }
}

// Partly attended clusters plan.partial[b, e), for the group's rows: into
// parts[g]. Each weighs its rest's mass (RestMass) and carries its rest's
// mean value.
void PartialClusters(const ClusterHead& c, const HeadPlan& plan, const std::vector<QueryRow>& rows, int64_t b, int64_t e, const EstimateProblem& p, Part* parts, TaskCounts& counts) {
  const int d = p.headDim, G = int(rows.size());
  PartialScratch s(p, G);
  // Per partial cluster and row g: the log of its mass, before the shift.
  std::vector<double> lmass(size_t(e - b) * size_t(G));
  std::vector<double> hi(static_cast<size_t>(G), -std::numeric_limits<double>::infinity());
  if (c.members) RestLogits(c, plan, rows, b, e, p, s);
  for (int64_t j = b; j < e; ++j) {
    if (!c.members && j + kAhead < e) PrefetchRest(c, plan, plan.partial[size_t(j + kAhead)], p, true);
    const PartialRef& ref = plan.partial[size_t(j)];
    double* lm = lmass.data() + size_t(j - b) * size_t(G);
    counts.scanned += RestMass(c, plan, ref, j - b, rows, p, s, lm);
    counts.estimated += double(c.counts[ref.cluster]) - double(ref.end - ref.begin);
    for (int g = 0; g < G; ++g) hi[size_t(g)] = std::max(hi[size_t(g)], lm[g]);
  }
  for (int g = 0; g < G; ++g) parts[g] = Part{hi[size_t(g)], 0.0, std::vector<double>(size_t(d), 0.0)};
  for (int64_t j = b; j < e; ++j) {
    if (j + kAhead < e) PrefetchRest(c, plan, plan.partial[size_t(j + kAhead)], p, false);
    const PartialRef& ref = plan.partial[size_t(j)];
    RestValues(c, plan, ref, p, s);
    const double count = double(c.counts[ref.cluster]) - double(ref.end - ref.begin);
    for (int g = 0; g < G; ++g) {
      // The mass, and the rest's value sum times mass / count (its mean value).
      const double mass = std::exp(lmass[size_t(j - b) * size_t(G) + size_t(g)] - parts[g].m);
      parts[g].den += mass;
      double* num = parts[g].num.data();
      for (int i = 0; i < d; ++i) num[i] += mass / count * s.values[size_t(i)];
    }
  }
}

}  // namespace

void EstimateClusters(const EstimateProblem& p) {
  const int G = p.qHeads / p.kvHeads, d = p.headDim;
  const size_t S = p.segments.size();
  std::vector<HeadPlan> plans(S * size_t(p.kvHeads));
  ThreadPool::Get().ParallelFor(plans.size(), [&](size_t i) { plans[i] = Plan(p.segments[i / p.kvHeads][i % p.kvHeads]); });
  // The query rows as the logits read them, once.
  std::vector<QueryRow> rows;
  for (int qh = 0; qh < p.qHeads; ++qh) {
    QueryRow qr{p.q + size_t(qh) * d, std::vector<float>(size_t(d)), 0.f};
    for (int i = 0; i < d; ++i) qr.q2[size_t(i)] = qr.q[i] * qr.q[i];
    qr.norm = std::sqrt(Dot(qr.q, qr.q, size_t(d)));
    rows.push_back(std::move(qr));
  }
  // Tasks: per (segment, kv head), chunks of whole clusters, then chunks of its partly attended ones.
  struct Task {
    size_t plan;
    bool partial;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < plans.size(); ++i) {
    const ClusterHead& c = p.segments[i / p.kvHeads][i % p.kvHeads];
    for (int64_t b = 0; b < c.clusters; b += kChunk) tasks.push_back({i, false, b, std::min(c.clusters, b + kChunk)});
    const int64_t np = int64_t(plans[i].partial.size());
    for (int64_t b = 0; b < np; b += kPartialChunk) tasks.push_back({i, true, b, std::min(np, b + kPartialChunk)});
  }
  std::vector<Part> parts(tasks.size() * size_t(G));
  std::vector<TaskCounts> counts(tasks.size());
  ThreadPool::Get().ParallelFor(tasks.size(), [&](size_t t) {
    const Task& task = tasks[t];
    const int h = int(task.plan % size_t(p.kvHeads));
    const ClusterHead& c = p.segments[task.plan / p.kvHeads][size_t(h)];
    const std::vector<QueryRow> group(rows.begin() + h * G, rows.begin() + (h + 1) * G);
    if (task.partial) PartialClusters(c, plans[task.plan], group, task.begin, task.end, p, parts.data() + t * size_t(G), counts[t]);
    else WholeClusters(c, plans[task.plan], group, task.begin, task.end, p, parts.data() + t * size_t(G), counts[t]);
  });
  for (int h = 0; h < p.kvHeads; ++h) p.estimated[h] = 0;
  if (p.scanned)
    for (int h = 0; h < p.kvHeads; ++h) p.scanned[h] = 0;
  for (size_t t = 0; t < tasks.size(); ++t) {
    const int h = int(tasks[t].plan % size_t(p.kvHeads));
    p.estimated[h] += counts[t].estimated;
    if (p.scanned) p.scanned[h] += counts[t].scanned;
  }
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
