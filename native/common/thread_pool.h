// A process-wide pool of worker threads with a reentrant parallel-for.
// Several callers (libuv threads running different requests) may submit at
// once; each caller also works on its own job, so a job never waits for a
// free worker to make progress.
#pragma once

#include <cstddef>
#include <functional>

namespace kvr {

class ThreadPool {
 public:
  static ThreadPool& Get();

  // Runs fn(i) for every i in [0, n). Returns when all calls have returned.
  // Which thread runs which i is unspecified; callers must write results by i.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn);

  size_t Threads() const;
};

}  // namespace kvr
