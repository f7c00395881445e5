// Scored rows and the one order every search here ranks them by: higher
// score first, then lower id. topk, the IVF index and the graph index share
// it, so an exhaustive search of any of them returns the same ids in the
// same order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/thread_pool.h"

namespace kvr {

struct Hit {
  float score;
  int32_t id;
};

inline bool Better(const Hit& a, const Hit& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }
inline bool Worse(const Hit& a, const Hit& b) { return Better(b, a); }

// Pushes h into a heap that keeps the best `cap` hits (the worst on top).
inline void Offer(std::vector<Hit>& heap, size_t cap, const Hit& h) {
  if (heap.size() < cap) {
    heap.push_back(h);
    std::push_heap(heap.begin(), heap.end(), Better);
  } else if (Better(h, heap.front())) {
    std::pop_heap(heap.begin(), heap.end(), Better);
    heap.back() = h;
    std::push_heap(heap.begin(), heap.end(), Better);
  }
}

// Writes the best min(keep, hits) of `all`, best first; returns how many.
inline int64_t WriteBest(std::vector<Hit>& all, int64_t keep, int32_t* ids, float* scores) {
  const int64_t count = std::max<int64_t>(0, std::min<int64_t>(keep, int64_t(all.size())));
  std::partial_sort(all.begin(), all.begin() + count, all.end(), Better);
  for (int64_t i = 0; i < count; ++i) {
    ids[i] = all[size_t(i)].id;
    scores[i] = all[size_t(i)].score;
  }
  return count;
}

// Ranks the rows of n problems on the pool in tasks of `chunk` rows each, so
// a step's kv heads share the cores instead of taking turns: rows(p) is how
// many rows problem p scans (0: none), scan(p, begin, end, local) puts rows
// [begin, end)'s best into the task's own list, and done(p, all) gets each
// problem's lists joined, problems in order, on the calling thread.
template <typename Rows, typename Scan, typename Done>
void RankInChunks(size_t n, int64_t chunk, Rows rows, Scan scan, Done done) {
  struct Task {
    size_t problem;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (size_t p = 0; p < n; ++p) {
    const int64_t count = rows(p);
    for (int64_t b = 0; b < count; b += chunk) tasks.push_back({p, b, std::min(count, b + chunk)});
  }
  std::vector<std::vector<Hit>> local(tasks.size());
  ThreadPool::Get().ParallelFor(tasks.size(), [&](size_t t) { scan(tasks[t].problem, tasks[t].begin, tasks[t].end, local[t]); });
  size_t t = 0;
  for (size_t p = 0; p < n; ++p) {
    std::vector<Hit> all;
    for (; t < tasks.size() && tasks[t].problem == p; ++t) all.insert(all.end(), local[t].begin(), local[t].end());
    done(p, all);
  }
}

}  // namespace kvr
