// Scored rows and the one order every search here ranks them by: higher
// score first, then lower id. topk, the IVF index and the graph index share
// it, so an exhaustive search of any of them returns the same ids in the
// same order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

}  // namespace kvr
