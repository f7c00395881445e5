// RaGraph::Search ranked by the group's attention (RaAggregate::kAttention,
// see ra_graph.h): the key's softmax probability summed over the group's
// query rows, with each row's log-partition estimated from a strided sample
// of the keys and refined after the walk.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "indexes/ra_graph.h"
#include "indexes/ra_graph_beam.h"

namespace kvr {
namespace {

// Sample size: n / kSampleShare keys, within [kSampleMin, kSampleMax] (all
// keys when n is smaller). At 1M keys 2048 (0.2% scanned): the bulk's mean
// exp-score, log-normal with a logit std near 1, is then known to a few
// percent, a few hundredths of a logit in lse.
constexpr int64_t kSampleShare = 512, kSampleMin = 64, kSampleMax = 4096;
// The best sample keys start the walk besides the entry points: a coarse
// layer scored anyway, whose best keys sit near the query's region. At most
// one in kSampleSeedShare of the sample: a seeded key counts as reached, so
// the unreached sample that stands for the unreached keys loses its best
// (at 40K keys, 16 seeds of a 78-key sample put the partitions 0.5 logits
// low).
constexpr int64_t kSampleSeeds = 16, kSampleSeedShare = 64;
constexpr int kMaxGroup = 64;

// log Σ exp(x_i) of a running sum kept relative to a fixed reference.
struct LogSum {
  double ref = -std::numeric_limits<double>::infinity(), sum = 0;
  void Add(double x) {
    if (x > ref) {
      sum = sum * std::exp(ref - x) + 1.0;
      ref = x;
    } else {
      sum += std::exp(x - ref);
    }
  }
  void AddScaled(double x, double times) {  // times · exp(x)
    if (times <= 0) return;
    Add(x + std::log(times));
  }
  double Value() const { return sum > 0 ? ref + std::log(sum) : -std::numeric_limits<double>::infinity(); }
};

}  // namespace

RaSearchResult RaGraph::SearchAttention(const uint16_t* keys, Dtype dtype, const float* q, int group, int k,
                                        int64_t ef, int32_t* outIds, float* outScores,
                                        const RaSearchOptions& opt) const {
  RaSearchResult res;
  const int64_t keep = std::min<int64_t>(k, n_);
  if (keep <= 0 || group <= 0) return res;
  const int G = std::min(group, kMaxGroup);
  const int d = d_;
  const int64_t n = n_;
  const float scale = opt.scale > 0 ? opt.scale : 1.f / std::sqrt(float(d));
  thread_local std::vector<float> row;
  row.resize(size_t(d));
  // x_h = scale·q_h·k for the G rows, exactly the kernels' dot products.
  auto logits = [&](int32_t id, float* x) {
    WidenRow(keys + size_t(id) * d, dtype, size_t(d), row.data());
    for (int h = 0; h < G; ++h) x[h] = scale * Dot(q + size_t(h) * d, row.data(), size_t(d));
  };

  // 1. The strided sample: keys off + j·stride, j < m.
  const int64_t want = std::min<int64_t>(n, std::min(kSampleMax, std::max(kSampleMin, n / kSampleShare)));
  const int64_t stride = std::max<int64_t>(1, n / want), off = stride / 2;
  const int64_t m = (n - off + stride - 1) / stride;
  thread_local std::vector<float> sampleX;
  thread_local std::vector<uint8_t> sampleReached;
  sampleX.resize(size_t(m) * G);
  sampleReached.assign(size_t(m), 0);
  std::vector<LogSum> sampleSum(static_cast<size_t>(G));
  for (int64_t j = 0; j < m; ++j) {
    float* x = sampleX.data() + size_t(j) * G;
    logits(int32_t(off + j * stride), x);
    for (int h = 0; h < G; ++h) sampleSum[size_t(h)].Add(x[h]);
  }
  // lse_h before the walk: the sample's mean exp-score times n.
  float c0[kMaxGroup];
  for (int h = 0; h < G; ++h) c0[h] = float(sampleSum[size_t(h)].Value() + std::log(double(n) / double(m)));
  auto rank = [&](const float* x) {
    float best = -std::numeric_limits<float>::infinity();
    for (int h = 0; h < G; ++h) best = std::max(best, x[h] - c0[h]);
    double s = 0;
    for (int h = 0; h < G; ++h) s += std::exp(double(x[h] - c0[h] - best));
    return best + float(std::log(s));
  };
  auto sampleIndex = [&](int32_t id) -> int64_t {
    const int64_t r = int64_t(id) - off;
    return r >= 0 && r % stride == 0 && r / stride < m ? r / stride : -1;
  };

  // 2. The walk, ranked by the estimated log of the group's summed
  //    probability; every key it scores is kept with its G logits.
  thread_local std::vector<int32_t> walkIds;
  thread_local std::vector<float> walkX;
  walkIds.clear();
  walkX.clear();
  int64_t reusedSample = 0;
  std::vector<int32_t> seeds(opt.seeds, opt.seeds + opt.seedCount);
  {
    std::vector<Hit> best;
    const size_t take = size_t(std::min(kSampleSeeds, m / kSampleSeedShare));
    for (int64_t j = 0; j < m && take > 0; ++j) Offer(best, take, Hit{rank(sampleX.data() + size_t(j) * G), int32_t(off + j * stride)});
    for (const Hit& h : best) seeds.push_back(h.id);
  }
  const size_t beam = size_t(std::min<int64_t>(std::max<int64_t>(ef, keep), n));
  thread_local std::vector<Hit> top;
  const int64_t walked = ragraph::BeamSearch(
      ragraph::CsrView{offsets_.data(), neighbors_.data()}, n, entries_.data(), entries_.size(), seeds.data(),
      seeds.size(), beam, keys, d,
      [&](int32_t id) {
        const size_t at = walkX.size();
        walkX.resize(at + size_t(G));
        float* x = walkX.data() + at;
        const int64_t j = sampleIndex(id);
        if (j >= 0) {
          std::copy_n(sampleX.data() + size_t(j) * G, G, x);
          sampleReached[size_t(j)] = 1;
          ++reusedSample;
        } else {
          logits(id, x);
        }
        walkIds.push_back(id);
        return rank(x);
      },
      top, size_t(keep), opt.margin, opt.maxScanned > 0 ? std::max<int64_t>(1, opt.maxScanned - m) : 0);
  res.scanned = m + walked - reusedSample;

  // 3. lse_h refined: the walk's keys exactly, the sample's unreached keys
  //    exactly, and the rest of the unreached keys at the unreached sample's
  //    mean (they are, like it, a uniform draw from what the walk missed).
  const int64_t reached = int64_t(walkIds.size());
  int64_t unreachedSample = 0;
  for (int64_t j = 0; j < m; ++j) unreachedSample += sampleReached[size_t(j)] ? 0 : 1;
  const int64_t rest = n - reached - unreachedSample;
  float c[kMaxGroup];
  for (int h = 0; h < G; ++h) {
    LogSum all, miss;
    for (int64_t i = 0; i < reached; ++i) all.Add(walkX[size_t(i) * G + h]);
    for (int64_t j = 0; j < m; ++j)
      if (!sampleReached[size_t(j)]) miss.Add(sampleX[size_t(j) * G + h]);
    if (unreachedSample > 0) {
      all.Add(miss.Value());
      if (rest > 0) all.AddScaled(miss.Value(), double(rest) / double(unreachedSample));
    }
    c[h] = float(all.Value());
  }

  // 4. The best keep of every key scored, by log of the mean probability.
  const float logG = std::log(float(group));
  auto finalScore = [&](const float* x) {
    double s = 0;
    for (int h = 0; h < G; ++h) s += std::exp(double(x[h]) - double(c[h]));
    return s > 0 ? float(std::log(s)) - logG : -std::numeric_limits<float>::infinity();
  };
  thread_local std::vector<Hit> all;
  all.clear();
  all.reserve(size_t(reached + unreachedSample));
  for (int64_t i = 0; i < reached; ++i) all.push_back(Hit{finalScore(walkX.data() + size_t(i) * G), walkIds[size_t(i)]});
  for (int64_t j = 0; j < m; ++j)
    if (!sampleReached[size_t(j)]) all.push_back(Hit{finalScore(sampleX.data() + size_t(j) * G), int32_t(off + j * stride)});
  res.count = WriteBest(all, keep, outIds, outScores);
  return res;
}

}  // namespace kvr
