// RaGraph::Search: a beam search over the CSR graph (see ra_graph.h).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "indexes/ra_graph.h"
#include "indexes/ra_graph_beam.h"
#include "indexes/ra_graph_dot.h"

namespace kvr {

int64_t RaGraph::maxDegree() const {
  int64_t best = 0;
  for (int64_t u = 0; u < n_; ++u) best = std::max(best, offsets_[size_t(u) + 1] - offsets_[size_t(u)]);
  return best;
}

RaSearchResult RaGraph::Search(const uint16_t* keys, Dtype dtype, const float* q, int group, int k, int64_t ef,
                               int32_t* outIds, float* outScores, const int32_t* seeds, size_t seedCount,
                               float margin) const {
  RaSearchOptions opt;
  opt.seeds = seeds;
  opt.seedCount = seedCount;
  opt.margin = margin;
  return Search(keys, dtype, q, group, k, ef, outIds, outScores, opt);
}

RaSearchResult RaGraph::Search(const uint16_t* keys, Dtype dtype, const float* q, int group, int k, int64_t ef,
                               int32_t* outIds, float* outScores, const RaSearchOptions& opt) const {
  if (opt.aggregate == RaAggregate::kAttention) return SearchAttention(keys, dtype, q, group, k, ef, outIds, outScores, opt);
  RaSearchResult res;
  const int64_t keep = std::min<int64_t>(k, n_);
  if (keep <= 0 || group <= 0) return res;
  const size_t beam = size_t(std::min<int64_t>(std::max<int64_t>(ef, keep), n_));
  thread_local std::vector<float> row;
  thread_local std::vector<Hit> top;
  row.resize(size_t(d_));
  const int d = d_;
  float x[64];
  res.scanned = ragraph::BeamSearch(
      ragraph::CsrView{offsets_.data(), neighbors_.data()}, n_, entries_.data(), entries_.size(), opt.seeds,
      opt.seedCount, beam, keys, d,
      [&](int32_t id) {
        // Exactly topk.cc's arithmetic (Dot over the widened row), so
        // exhaustive results match it bit for bit; rows in chunks of 64.
        float s = -std::numeric_limits<float>::infinity();
        for (int g0 = 0; g0 < group; g0 += 64) {
          const int c = std::min(64, group - g0);
          ragraph::ScaledDots(q + size_t(g0) * d, c, keys + size_t(id) * d, dtype, d, 1.f, x, row.data());
          for (int gi = 0; gi < c; ++gi) s = std::max(s, x[gi]);
        }
        return s;
      },
      top, size_t(keep), opt.margin, std::max<int64_t>(0, opt.maxScanned), opt.freeSeeds, opt.freeSeedCount,
      size_t(std::max(1, opt.expandWidth)));
  res.count = WriteBest(top, keep, outIds, outScores);
  return res;
}

}  // namespace kvr
