#include "kernels/topk.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "common/ranked_hits.h"
#include "common/simd_math.h"

namespace kvr {
namespace {

// Small enough that block summaries (16K rows at 1M tokens) spread over the cores.
constexpr int64_t kTaskTokens = 2048;


}  // namespace

// Rows [begin, end) of one problem into a local list of its best `keep`:
// a heap, or, where most rows would enter it anyway (a block summary's
// candidates: k·reps rows of a few thousand), every row and one selection
// at the end (the same set: the order is total).
void ScanRows(const TopkProblem& p, int64_t begin, int64_t end, int64_t keep, std::vector<Hit>& heap) {
  std::vector<float> row(p.headDim);
  const bool collect = keep > 0 && keep * 4 >= end - begin;
  heap.reserve(collect ? size_t(end - begin) : size_t(std::max<int64_t>(keep, 0)) + 1);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t r = p.hasRows ? p.rows[i] : i;
    WidenRow(p.keys + size_t(r) * p.headDim, p.dtype, p.headDim, row.data());
    float s = -std::numeric_limits<float>::infinity();
    for (int g = 0; g < p.group; ++g) s = std::max(s, Dot(p.q + size_t(g) * p.headDim, row.data(), p.headDim));
    if (p.allScores) p.allScores[r] = s;
    if (collect) heap.push_back(Hit{s, int32_t(r)});
    else if (keep > 0) Offer(heap, size_t(keep), Hit{s, int32_t(r)});
  }
  if (collect && int64_t(heap.size()) > keep) {
    std::nth_element(heap.begin(), heap.begin() + keep, heap.end(), Better);
    heap.resize(size_t(keep));
  }
}

void TopKMany(const TopkProblem* problems, size_t n, int64_t* counts) {
  auto keepOf = [&](size_t p) { return std::min<int64_t>(problems[p].k, ScanCount(problems[p])); };
  RankInChunks(
      n, kTaskTokens,
      [&](size_t p) { return keepOf(p) > 0 || problems[p].allScores ? ScanCount(problems[p]) : 0; },
      [&](size_t p, int64_t begin, int64_t end, std::vector<Hit>& local) { ScanRows(problems[p], begin, end, keepOf(p), local); },
      [&](size_t p, std::vector<Hit>& all) { counts[p] = WriteBest(all, keepOf(p), problems[p].outIds, problems[p].outScores); });
}

int64_t TopK(const TopkProblem& p) {
  int64_t count = 0;
  TopKMany(&p, 1, &count);
  return count;
}

}  // namespace kvr
