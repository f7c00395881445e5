#include "common/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvr {
namespace {

struct Job {
  const std::function<void(size_t)>* fn;
  size_t n;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::mutex mu;
  std::condition_variable finished;

  // Claims and runs indices until none are left. Returns after the last one
  // this thread claimed has run.
  void Drain() {
    for (;;) {
      size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      (*fn)(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        finished.notify_all();
      }
    }
  }
};

class Pool {
 public:
  Pool() {
    unsigned hw = std::thread::hardware_concurrency();
    size_t workers = hw > 1 ? hw - 1 : 0;  // the caller is the last worker
    for (size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void Run(size_t n, const std::function<void(size_t)>& fn) {
    if (n == 0) return;
    if (n == 1 || threads_.empty()) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(job);
    }
    wake_.notify_all();
    job->Drain();
    {
      std::unique_lock<std::mutex> lock(job->mu);
      job->finished.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == n; });
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (*it == job) {
        jobs_.erase(it);
        break;
      }
    }
  }

  size_t Threads() const { return threads_.size() + 1; }

 private:
  void Loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || HasWork(); });
        if (stop_) return;
        for (auto& j : jobs_) {
          if (j->next.load(std::memory_order_relaxed) < j->n) {
            job = j;
            break;
          }
        }
      }
      if (job) job->Drain();
    }
  }

  bool HasWork() const {
    for (auto& j : jobs_)
      if (j->next.load(std::memory_order_relaxed) < j->n) return true;
    return false;
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> jobs_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
};

Pool& Instance() {
  static Pool* pool = new Pool();  // never destroyed: workers may outlive static teardown
  return *pool;
}

}  // namespace

ThreadPool& ThreadPool::Get() {
  static ThreadPool facade;
  return facade;
}

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t)>& fn) { Instance().Run(n, fn); }

size_t ThreadPool::Threads() const { return Instance().Threads(); }

}  // namespace kvr
