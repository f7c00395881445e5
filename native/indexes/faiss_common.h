// Shared helpers for the faiss-backed code (ivf_index, kmeans): widening
// 16-bit keys to f32 and scoping the OpenMP thread count that faiss uses.
//
// OpenMP's thread count (nthreads-var) belongs to the calling thread, so a
// scope set on one libuv thread never changes what faiss uses on another.
#pragma once

#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"

namespace kvr {

// omp_set_num_threads(threads) for the calling thread until the scope ends.
class OmpThreads {
 public:
  explicit OmpThreads(int threads) : previous_(omp_get_max_threads()) { omp_set_num_threads(std::max(1, threads)); }
  ~OmpThreads() { omp_set_num_threads(previous_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int previous_;
};

// OpenBLAS on one thread while any scope lives. faiss's assignment step is
// an sgemm; when several k-means problems run side by side on the native
// pool, each sgemm would also fan out over OpenBLAS's own pool of one thread
// a core (the pthread build ignores OpenMP's count), oversubscribing the
// cores: on the 2-core VM 16 problems took 22-27% longer and 15-19% more CPU
// time than with OPENBLAS_NUM_THREADS=1. OpenBLAS's count is process-wide,
// so scopes are counted: the first saves and sets it, the last restores it.
// Found by name at run time, so a faiss linked to another BLAS is untouched.
class SingleThreadBlas {
 public:
  SingleThreadBlas() {
    if (!Set() || !Get()) return;
    std::lock_guard<std::mutex> lock(Mutex());
    if (Depth()++ == 0) {
      Saved() = Get()();
      Set()(1);
    }
  }
  ~SingleThreadBlas() {
    if (!Set() || !Get()) return;
    std::lock_guard<std::mutex> lock(Mutex());
    if (--Depth() == 0) Set()(Saved());
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  using SetFn = void (*)(int);
  using GetFn = int (*)();
  static SetFn Set() {
    static const SetFn fn = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    return fn;
  }
  static GetFn Get() {
    static const GetFn fn = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    return fn;
  }
  static std::mutex& Mutex() {
    static std::mutex m;
    return m;
  }
  static int& Depth() {
    static int depth = 0;
    return depth;
  }
  static int& Saved() {
    static int saved = 1;
    return saved;
  }
};

// Threads for one heavy faiss call (training, adding, k-means): the
// machine's cores, counted as the native thread pool counts them.
inline int FaissThreads() { return int(ThreadPool::Get().Threads()); }

constexpr int64_t kWidenTaskRows = 4096;

// Widens rows [begin, end) of keys [*, d] into dst [end - begin, d], spread
// over the native thread pool.
inline void WidenRows(const uint16_t* keys, Dtype dtype, int d, int64_t begin, int64_t end, float* dst) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t tasks = (n + kWidenTaskRows - 1) / kWidenTaskRows;
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t t) {
    const int64_t r0 = int64_t(t) * kWidenTaskRows, r1 = std::min(n, r0 + kWidenTaskRows);
    WidenRow(keys + size_t(begin + r0) * d, dtype, size_t(r1 - r0) * d, dst + size_t(r0) * d);
  });
}

// Widens the listed rows, in order, into dst [rows.size(), d].
inline void WidenRows(const uint16_t* keys, Dtype dtype, int d, const std::vector<int64_t>& rows, float* dst) {
  const int64_t n = int64_t(rows.size());
  const int64_t tasks = (n + kWidenTaskRows - 1) / kWidenTaskRows;
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t t) {
    const int64_t r1 = std::min(n, int64_t(t + 1) * kWidenTaskRows);
    for (int64_t r = int64_t(t) * kWidenTaskRows; r < r1; ++r)
      WidenRow(keys + size_t(rows[r]) * d, dtype, size_t(d), dst + size_t(r) * d);
  });
}

}  // namespace kvr
