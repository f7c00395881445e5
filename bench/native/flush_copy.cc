// The block pool's staging copy (native/cuda/block_pool_impl.cuh Flush):
// n missed blocks, each a K and a V block of 16 KiB (64 tokens x 128 dims,
// 16-bit) read from random places of a layer's host rows, written back to
// back into a staging buffer. Copied inline on the calling thread, or spread
// over the project's thread pool (ThreadPool::ParallelFor: every worker
// woken for the batch). The two alternate call by call (A B B A ...), each
// on fresh random blocks of a source far larger than the last-level cache,
// as a decode step's misses are. Prints per n the median microseconds of
// each and their ratio. No GPU needed (the pinned staging is plain memory
// here: the copy into it costs the same).
//
//   g++ -O2 -std=c++17 -Inative bench/native/flush_copy.cc native/common/thread_pool.cc -lpthread -o /tmp/flush_copy
//   /tmp/flush_copy [sourceMiB=1024] [trials=301]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "common/thread_pool.h"

namespace {

constexpr size_t kBlock = 64 * 128 * 2;  // bytes of one K (or V) block

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const size_t sourceMiB = argc > 1 ? size_t(atol(argv[1])) : 1024;
  const int trials = argc > 2 ? atoi(argv[2]) : 301;
  const size_t blocks = (sourceMiB << 20) / kBlock / 2;  // K and V halves
  std::vector<uint8_t> k(blocks * kBlock, 1), v(blocks * kBlock, 2);
  const std::vector<int> ns = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128};
  std::vector<uint8_t> stage(size_t(ns.back()) * 2 * kBlock, 0);
  std::mt19937_64 rng(7);
  std::vector<std::vector<double>> inl(ns.size()), par(ns.size());
  std::vector<size_t> pick(size_t(ns.back()));
  kvr::ThreadPool& pool = kvr::ThreadPool::Get();
  pool.ParallelFor(64, [](size_t) {});  // workers started
  auto run = [&](int n, bool parallel) {
    for (int i = 0; i < n; ++i) pick[size_t(i)] = size_t(rng() % blocks);
    auto copy = [&](size_t i) {
      std::memcpy(stage.data() + i * 2 * kBlock, k.data() + pick[i] * kBlock, kBlock);
      std::memcpy(stage.data() + i * 2 * kBlock + kBlock, v.data() + pick[i] * kBlock, kBlock);
    };
    const auto t0 = std::chrono::steady_clock::now();
    if (parallel) pool.ParallelFor(size_t(n), copy);
    else for (int i = 0; i < n; ++i) copy(size_t(i));
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };
  for (int t = 0; t < trials; ++t)
    for (size_t j = 0; j < ns.size(); ++j) {
      const bool parFirst = (t + int(j)) % 2;
      // A pause between calls, as between a step's flushes: the workers are asleep again at each call.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      if (parFirst) par[j].push_back(run(ns[j], true));
      else inl[j].push_back(run(ns[j], false));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      if (parFirst) inl[j].push_back(run(ns[j], false));
      else par[j].push_back(run(ns[j], true));
    }
  printf("threads %zu (hardware %u), source %zu MiB, %d trials; median us per flush\n", pool.Threads(),
         std::thread::hardware_concurrency(), sourceMiB, trials);
  printf("| blocks | KiB | inline us | ParallelFor us | parallel / inline | inline GB/s |\n| ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (size_t j = 0; j < ns.size(); ++j) {
    const double a = Median(inl[j]), b = Median(par[j]);
    printf("| %d | %zu | %.1f | %.1f | %.2f | %.1f |\n", ns[j], size_t(ns[j]) * 2 * kBlock / 1024, a, b, b / a,
           double(ns[j]) * 2 * kBlock / (a * 1e3));
  }
}
