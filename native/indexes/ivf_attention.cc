// IvfIndex's search ranked by the group's attention (Search with an
// attention scale): a key's score is log sum_g exp(scale q_g·k - lse_g) over
// the rows that probed its list. The max over the rows of q·k, the plain
// ranking, lets one row with a large |q| crowd out the keys the other rows
// put their mass on: on kvrecall-code-13M at 16K bytes ivf's pass-key layer
// held 0.86 of the attention where the exact top-k by the group's mean
// probability holds 0.94 (retrieval-attention, which ranks this way: 0.96).
#include <faiss/IndexIVFFlat.h>
#include <faiss/invlists/InvertedLists.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/simd_math.h"
#include "indexes/ivf_index.h"
#include "indexes/ivf_tasks.h"

namespace kvr {
namespace {

// A row's partition over the lists it did not probe is estimated from every
// kSampleStride-th key of each (from the first), weighted by the list's size
// over the keys sampled: 1/32 of them, a small part of the 8x-the-budget
// lists a default search probes.
constexpr int64_t kSampleStride = 32;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// log sum w·exp(x), one weighted term at a time; NaN and -inf add no mass.
struct Lse {
  double m = kNegInf, s = 0;
  void Add(double x, double w = 1) {
    if (!(x > kNegInf)) return;
    if (x > m) {
      s = s * std::exp(m - x) + w;
      m = x;
    } else {
      s += w * std::exp(x - m);
    }
  }
  void Merge(const Lse& o) { Add(o.m, o.s); }
  double Value() const { return s > 0 ? m + std::log(s) : kNegInf; }
};

}  // namespace

IvfSearchResult IvfIndex::SearchAttention(const float* q, int group, int64_t keep, const ProbePlan& plan,
                                          float scale, int32_t* outIds, float* outScores) const {
  IvfSearchResult res;
  res.scanned = plan.scanned;
  const int d = int(index_->d);
  const int64_t nlist = int64_t(index_->nlist);
  const auto& lists = plan.lists;
  const auto& rows = plan.rows;
  const auto& bounds = plan.bounds;
  const size_t tasks = bounds.size() - 1, G = size_t(group);
  std::vector<float> shift(G);
  for (size_t g = 0; g < G; ++g) shift[g] = RowShift(q + g * d);

  // 1. The logit of every probed (key, row), kept for step 3, and each task's
  //    per-row partition over what it scored.
  std::vector<size_t> at(lists.size() + 1, 0);
  for (size_t i = 0; i < lists.size(); ++i) at[i + 1] = at[i] + size_t(lists[i].size) * (lists[i].rows1 - lists[i].rows0);
  std::vector<float> logit(at.back());
  std::vector<Lse> part(tasks * G);
  RunTasks(tasks, [&](size_t t) {
    Lse* lse = &part[t * G];
    for (size_t i = bounds[t]; i < bounds[t + 1]; ++i) {
      const ProbePlan::List& p = lists[i];
      faiss::InvertedLists::ScopedCodes codes(index_->invlists, size_t(p.list));
      const float* x = reinterpret_cast<const float*>(codes.get());
      const size_t nr = p.rows1 - p.rows0;
      float* out = logit.data() + at[i];
      for (int64_t j = 0; j < p.size; ++j, x += d)
        for (size_t r = 0; r < nr; ++r) {
          const size_t g = size_t(rows[p.rows0 + r]);
          const float v = scale * (Dot(q + g * d, x, size_t(d)) + shift[g]);
          out[size_t(j) * nr + r] = v;
          lse[g].Add(v);
        }
    }
  });

  // 2. Each row's partition over the lists it did not probe, from a sample.
  std::vector<uint8_t> probed(G * size_t(nlist), 0);
  for (const auto& p : lists)
    for (size_t r = p.rows0; r < p.rows1; ++r) probed[size_t(rows[r]) * size_t(nlist) + size_t(p.list)] = 1;
  std::vector<Lse> rest(G);
  std::vector<int64_t> sampled(G, 0);
  auto sampleRow = [&](size_t g) {
    for (int64_t l = 0; l < nlist; ++l) {
      const int64_t size = int64_t(index_->invlists->list_size(size_t(l)));
      if (probed[g * size_t(nlist) + size_t(l)] || size == 0) continue;
      faiss::InvertedLists::ScopedCodes codes(index_->invlists, size_t(l));
      const float* x = reinterpret_cast<const float*>(codes.get());
      const int64_t count = (size + kSampleStride - 1) / kSampleStride;
      const double w = double(size) / double(count);
      for (int64_t j = 0; j < size; j += kSampleStride)
        rest[g].Add(scale * (Dot(q + g * d, x + size_t(j) * d, size_t(d)) + shift[g]), w);
      sampled[g] += count;
    }
  };
  const bool parallelRows = G > 1 && int64_t(G) * (index_->ntotal / kSampleStride) * d >= kIvfParallelWork;
  RunTasks(parallelRows ? G : 1, [&](size_t t) {
    if (parallelRows)
      sampleRow(t);
    else
      for (size_t g = 0; g < G; ++g) sampleRow(g);
  });
  std::vector<double> lse(G);
  for (size_t g = 0; g < G; ++g) {
    Lse all = rest[g];
    for (size_t t = 0; t < tasks; ++t) all.Merge(part[t * G + g]);
    lse[g] = all.Value();
    res.scanned += sampled[g];
  }

  // 3. Each probed key's share of the group's attention, summed over the rows
  //    that probed it (a row with no finite partition adds nothing).
  std::vector<TopHeap> heaps(tasks, TopHeap(keep));
  RunTasks(tasks, [&](size_t t) {
    TopHeap& heap = heaps[t];
    for (size_t i = bounds[t]; i < bounds[t + 1]; ++i) {
      const ProbePlan::List& p = lists[i];
      faiss::InvertedLists::ScopedIds ids(index_->invlists, size_t(p.list));
      const size_t nr = p.rows1 - p.rows0;
      const float* in = logit.data() + at[i];
      for (int64_t j = 0; j < p.size; ++j) {
        double mass = 0;
        for (size_t r = 0; r < nr; ++r) {
          const double l = lse[size_t(rows[p.rows0 + r])], v = in[size_t(j) * nr + r];
          if (std::isfinite(l) && v > kNegInf) mass += std::exp(v - l);
        }
        heap.Push(mass > 0 ? float(std::log(mass)) : -std::numeric_limits<float>::infinity(), int32_t(ids[size_t(j)]));
      }
    }
  });
  std::vector<Hit> all;  // each key lives in one list: the heaps hold distinct ids
  for (auto& h : heaps) all.insert(all.end(), h.hits.begin(), h.hits.end());
  res.count = WriteBest(all, keep, outIds, outScores);
  return res;
}

}  // namespace kvr
