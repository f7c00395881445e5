#include "topk.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "simd_math.h"
#include "thread_pool.h"

namespace kvr {
namespace {

// Small enough that block summaries (16K rows at 1M tokens) spread over the cores.
constexpr int64_t kTaskTokens = 2048;

struct Hit {
  float score;
  int32_t id;
};

// Better = higher score, then lower id. A heap ordered by Better keeps the
// worst hit on top.
inline bool Better(const Hit& a, const Hit& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

}  // namespace

int64_t TopK(const TopkProblem& p) {
  const int64_t keep = std::min<int64_t>(p.k, p.tokens);
  if (keep <= 0 && !p.allScores) return 0;
  const int64_t tasks = (p.tokens + kTaskTokens - 1) / kTaskTokens;
  std::vector<std::vector<Hit>> local(tasks);
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t t) {
    std::vector<float> row(p.headDim);
    std::vector<Hit>& heap = local[t];
    heap.reserve(keep + 1);
    const int64_t end = std::min(p.tokens, int64_t(t + 1) * kTaskTokens);
    for (int64_t i = int64_t(t) * kTaskTokens; i < end; ++i) {
      WidenRow(p.keys + size_t(i) * p.headDim, p.dtype, p.headDim, row.data());
      float s = -std::numeric_limits<float>::infinity();
      for (int g = 0; g < p.group; ++g) s = std::max(s, Dot(p.q + size_t(g) * p.headDim, row.data(), p.headDim));
      if (p.allScores) p.allScores[i] = s;
      Hit h{s, int32_t(i)};
      if (int64_t(heap.size()) < keep) {
        heap.push_back(h);
        std::push_heap(heap.begin(), heap.end(), Better);
      } else if (Better(h, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), Better);
        heap.back() = h;
        std::push_heap(heap.begin(), heap.end(), Better);
      }
    }
  });
  std::vector<Hit> all;
  for (auto& l : local) all.insert(all.end(), l.begin(), l.end());
  if (keep <= 0) return 0;
  std::partial_sort(all.begin(), all.begin() + keep, all.end(), Better);
  for (int64_t i = 0; i < keep; ++i) {
    p.outIds[i] = all[i].id;
    p.outScores[i] = all[i].score;
  }
  return keep;
}

}  // namespace kvr
