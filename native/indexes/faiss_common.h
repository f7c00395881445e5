// Shared helpers for the faiss-backed code (ivf_index, kmeans): widening
// 16-bit keys to f32, scoping the OpenMP thread count that faiss uses, and
// the gate every BLAS-reaching faiss call passes.
//
// OpenMP's thread count (nthreads-var) belongs to the calling thread, so a
// scope set on one libuv thread never changes what faiss uses on another.
#pragma once

#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <condition_variable>
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

// Who may call into BLAS (faiss's k-means and IVF training and adds are
// sgemms) and with how many OpenBLAS threads. Debian's OpenBLAS 0.3.21
// (pthread build) has one process-wide thread count and one pool of its own
// threads, and it is not safe against overlapping calls: changing the count
// while another thread's sgemm is in flight, or two callers' multithreaded
// calls sharing its pool, can corrupt results (OpenMathLib/OpenBLAS #5836,
// whose per-kernel locks were only made one lock in 2026). A corrupted sgemm
// would give faiss NaN distances, and its k-means then aborts the process on
// an assertion. (Not seen here: session 33's CI abort on that assertion was
// keys past what f32 clusters, key_range.h; this closes the other way in.)
//
// So every BLAS-reaching faiss call holds a scope of one of two kinds:
// - kWide: OpenBLAS's own threads at the count it started with (one large
//   problem: a head's IVF training, squeezed's k-means). Runs alone.
// - kNarrow: OpenBLAS on one thread (many small problems side by side on
//   the native pool: a wave head's segments; their own threads would
//   oversubscribe the cores, 22-27% slower on the 2-core VM). Runs beside
//   other narrow scopes, never beside a wide one.
// The count is changed only while no scope is held, so it never changes
// under a call in flight. A waiting wide scope holds back new narrow ones
// (seals' trainings are not starved by a stream of segment batches).
// The OpenBLAS functions are found by name at run time, so a faiss linked to
// another BLAS only gets the serialisation.
class BlasScope {
 public:
  enum class Kind { kWide, kNarrow };

  explicit BlasScope(Kind kind) : kind_(kind) {
    Gate& g = TheGate();
    std::unique_lock<std::mutex> lock(g.mutex);
    if (kind_ == Kind::kWide) {
      ++g.wideWaiting;
      g.changed.wait(lock, [&] { return !g.wide && g.narrow == 0; });
      --g.wideWaiting;
      g.wide = true;  // at startThreads: the last narrow scope restored it
    } else {
      g.changed.wait(lock, [&] { return !g.wide && g.wideWaiting == 0; });
      if (g.narrow++ == 0) g.SetThreads(1);
    }
  }
  ~BlasScope() {
    Gate& g = TheGate();
    {
      std::lock_guard<std::mutex> lock(g.mutex);
      if (kind_ == Kind::kWide) {
        g.wide = false;
      } else if (--g.narrow == 0) {
        g.SetThreads(g.startThreads);
      }
    }
    g.changed.notify_all();
  }
  BlasScope(const BlasScope&) = delete;
  BlasScope& operator=(const BlasScope&) = delete;

 private:
  using SetFn = void (*)(int);
  using GetFn = int (*)();
  struct Gate {
    std::mutex mutex;
    std::condition_variable changed;
    bool wide = false;
    int narrow = 0, wideWaiting = 0;
    SetFn set = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    GetFn get = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    int startThreads = set && get ? get() : 0;
    int threads = startThreads;
    // Called with the mutex held and no scope's call in flight.
    void SetThreads(int n) {
      if (!set || n < 1 || n == threads) return;
      set(n);
      threads = n;
    }
  };
  static Gate& TheGate() {
    static Gate gate;
    return gate;
  }
  Kind kind_;
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
