// The block pool's host work for a block method's step, a call a kv head
// (Ensure then Pin per head, as GpuBackend did) against one call for all
// heads (EnsureMany, PinMany), on the CPU: native/cuda/block_pool*.cu over
// test/native/pool-host's stand-in for the CUDA runtime with
// KVR_STUB_NO_DEVICE_COPY=1 (copies to the device and the scatter move no
// bytes; the CUDA calls themselves cost nothing here, 4 a flush on a device).
// What is timed: page-table lookups, LRU moves, pins, the staging copy of the
// misses (inline or over the thread pool) and the calls' overhead.
//
// Shape: a 1M-token layer, 8 kv heads, d=128, f16, blocks of 64; a pool of
// 5% of the layer's K/V (6553 slots); each head selects 164 blocks (1%) a
// step, 4 of them new (a hit rate of ~0.975, as nosa's at 1M on an H100).
// The two ways alternate step by step on the same pool (A B A B ...).
//
//   d=$(mktemp -d); for f in block_pool block_pool_ranges; do nvcc -std=c++17 -O2 -arch=sm_90 -Xcompiler -fPIC -Inative \
//     -c native/cuda/$f.cu -o $d/$f.o; done
//   for f in test/native/pool-host/cuda_stub.cc native/common/thread_pool.cc bench/native/pool_step.cc; do \
//     g++ -std=c++17 -O2 -Inative -I/usr/local/cuda/include -c $f -o $d/$(basename $f).o; done
//   g++ -o /tmp/pool_step $d/*.o -lpthread && KVR_STUB_NO_DEVICE_COPY=1 /tmp/pool_step [steps=400] [new=4]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "common/thread_pool.h"
#include "cuda/block_pool.h"

using namespace kvr::cuda;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? atoi(argv[1]) : 400, fresh = argc > 2 ? atoi(argv[2]) : 4;
  constexpr int kHeads = 8, kPick = 164, kBlocks = 16384, kWarm = 100;
  constexpr size_t kWords = 64 * 128;
  PoolConfig c;
  c.blockSize = 64;
  c.headDim = 128;
  c.budgetBytes = int64_t(kBlocks) * kHeads * kWords * 2 * 2 / 20;
  c.stagingBytes = int64_t(256) << 20;  // as bench/gpu-decode.ts's backend
  BlockPool pool(c);
  // One head's rows (256 MiB), read by every head: far past the last-level cache, as a layer's are.
  std::vector<uint16_t> rows(size_t(kBlocks) * kWords, 1);
  std::mt19937_64 rng(5);
  std::vector<std::set<int32_t>> pick(kHeads);
  for (auto& p : pick)
    while (int(p.size()) < kPick) p.insert(int32_t(rng() % kBlocks));
  std::vector<std::vector<int32_t>> ids(kHeads);
  std::vector<std::vector<uint8_t>> cls(kHeads);
  std::vector<int32_t> slots(size_t(kHeads) * kPick);
  std::vector<double> times[2];
  long misses[2] = {0, 0};
  for (int s = 0; s < kWarm + steps; ++s) {
    for (int h = 0; h < kHeads; ++h) {
      auto& p = pick[h];
      for (int i = 0; i < fresh; ++i) {  // `fresh` leave, as many new come
        auto it = p.begin();
        std::advance(it, rng() % p.size());
        p.erase(it);
      }
      while (int(p.size()) < kPick) p.insert(int32_t(rng() % kBlocks));
      ids[h].assign(p.begin(), p.end());
      cls[h].resize(ids[h].size());
      for (size_t i = 0; i < ids[h].size(); ++i) cls[h][i] = uint8_t(ids[h][i] % 7 == 0);
    }
    const bool batch = s % 2 == 1;
    std::vector<BlockPool::ClientBlocks> items(kHeads);
    for (int h = 0; h < kHeads; ++h) items[h] = {h, ids[h].data(), int64_t(ids[h].size()), rows.data(), rows.data(), cls[h].data()};
    const long m0 = pool.Stats().misses;
    std::this_thread::sleep_for(std::chrono::microseconds(300));  // the thread pool's workers asleep, as between steps
    const auto t0 = std::chrono::steady_clock::now();
    BlockPool::EnsureOptions o;
    o.hold = true;
    if (batch) {
      pool.EnsureMany(items.data(), kHeads, o, slots.data());
      pool.PinMany(items.data(), kHeads, false);
    } else {
      o.source = BlockPool::Source::kIndexed;
      for (int h = 0; h < kHeads; ++h) {
        o.priorities = cls[h].data();
        pool.Ensure(h, ids[h].data(), int64_t(ids[h].size()), rows.data(), rows.data(), slots.data() + h * kPick, o);
      }
      for (int h = 0; h < kHeads; ++h) pool.Pin(h, ids[h].data(), int64_t(ids[h].size()), false);
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (s >= kWarm) times[batch].push_back(us), misses[batch] += pool.Stats().misses - m0;
  }
  const PoolStats st = pool.Stats();
  printf("threads %zu, %d steps a way after %d, %d new blocks a head a step; pool %ld slots, %ld evictions\n",
         kvr::ThreadPool::Get().Threads(), steps / 2, kWarm, fresh, long(st.slots), long(st.evictions));
  printf("| way | misses/step | p50 us | p90 us |\n| --- | ---: | ---: | ---: |\n");
  const char* name[2] = {"a call a head (Ensure x8, Pin x8)", "one call (EnsureMany, PinMany)"};
  for (int b = 0; b < 2; ++b) {
    auto t = times[b];
    std::sort(t.begin(), t.end());
    printf("| %s | %.1f | %.1f | %.1f |\n", name[b], double(misses[b]) / double(t.size()), t[t.size() / 2],
           t[t.size() * 9 / 10]);
  }
}
