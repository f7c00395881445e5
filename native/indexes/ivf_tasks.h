// What the IVF searches (ivf_index.cc, ivf_attention.cc) share: the work
// above which a group search spreads over the native pool, the pool runner
// and a bounded top-k heap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include "common/ranked_hits.h"
#include "common/thread_pool.h"

namespace kvr {

// A group search runs in the calling thread unless it scores at least this
// many key elements (probed keys * d over all rows, or centroids * d * G).
// Measured on the 2-core dev box (64K keys, d=128, G=4), spreading even the
// largest searches (8M elements, ~2.4 ms) over the pool was slower, and the
// pool is shared with attention; callers parallelise across kv heads instead.
#ifndef KVR_IVF_PARALLEL_WORK
#define KVR_IVF_PARALLEL_WORK (int64_t(1) << 24)
#endif
constexpr int64_t kIvfParallelWork = KVR_IVF_PARALLEL_WORK;

// Keeps the `keep` best hits seen; the worst kept hit sits on top.
struct TopHeap {
  explicit TopHeap(int64_t keep) : keep(keep) { hits.reserve(size_t(keep) + 1); }
  void Push(float score, int32_t id) { Offer(hits, size_t(keep), Hit{score, id}); }
  int64_t keep;
  std::vector<Hit> hits;
};

// Runs fn(t) for t in [0, tasks) on the pool, or inline for one task;
// rethrows the first exception in the caller.
template <typename F>
void RunTasks(size_t tasks, const F& fn) {
  if (tasks <= 1) {
    for (size_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  std::vector<std::exception_ptr> errors(tasks);
  ThreadPool::Get().ParallelFor(tasks, [&](size_t t) {
    try {
      fn(t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  });
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace kvr
