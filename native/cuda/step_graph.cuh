// A decode step's launches replayed as one CUDA graph. A layer-step issues
// dozens of small kernels, memsets and scans; launched one by one they cost
// the host ~6 us each and leave the device a gap between dependent kernels.
// Captured once and replayed, the step is one launch. Everything a launch
// bakes in (grid sizes, kernel arguments by value, buffer pointers and copy
// sizes) must be in the key: a key unlike every cached one captures anew.
// A few graphs are kept: a layer's store is shared by the document's
// sessions, and sessions with other budgets (other shapes) take turns on it.
//
// A wave step's key changed every step while a session's own tokens were
// fewer than its window (the document's share of the window shrinks by a
// row a step; its sizes are now bucketed, native/cuda/wave_sizes.cuh, so
// the key holds for up to 256 such steps), and a graph captured and
// instantiated (or updated) for one step only cost more than launching that
// step one by one: on the H100 at 1M a captured-anew step's kernels took
// 0.64-0.74 ms against 0.56 replayed
// (bench/results/wave-step-host-own-ab-h100.md, decode-full-llama3.2-1b-
// h100-16layers-outproc.md). So by default a key is captured only when it
// comes back: its first step runs one by one and leaves a hash of the key
// behind. Stores whose keys do not churn so (the block scorer, the rest
// estimate) capture at once; KVRECALL_STEP_GRAPH_EAGER=1 makes every
// StepGraph capture at once (the A/B of bench/wave-step-host.ts).
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "cuda/cuda_common.cuh"

namespace kvr {
namespace cuda {

class StepGraph {
 public:
  static constexpr size_t kMaxGraphs = 8;
  // Keys seen once and not captured, remembered by hash (a collision only captures early).
  static constexpr size_t kSeen = 16;
  enum class Capture { kOnRepeat, kAtOnce };

  explicit StepGraph(Capture when = Capture::kOnRepeat) : atOnce_(when == Capture::kAtOnce || EagerFromEnv()) {}
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;
  ~StepGraph() {
    for (Entry& e : entries_) cudaGraphExecDestroy(e.exec);
  }

  // Runs `enqueue(stream)`'s work on `s`: from the graph captured for `key`,
  // capturing it first when no cached graph has that key (the least recently
  // used one makes room). `enqueue` may only issue stream work on its
  // argument (no synchronisation, no event queries); it throws on a failed
  // call. Throws std::runtime_error.
  template <typename Enqueue>
  void Run(cudaStream_t s, const void* key, size_t keyBytes, Enqueue&& enqueue) {
    const auto* k = static_cast<const unsigned char*>(key);
    Entry* hit = nullptr;
    for (Entry& e : entries_)
      if (e.key.size() == keyBytes && std::memcmp(e.key.data(), k, keyBytes) == 0) hit = &e;
    if (!hit && !atOnce_) {
      const uint64_t h = Hash(k, keyBytes);
      bool seen = false;
      for (uint64_t x : seen_) seen |= x == h;
      if (!seen) {
        seen_[seenAt_++ % kSeen] = h;
        ++direct_;
        enqueue(s);
        return;
      }
    }
    if (!hit) hit = &Capture(s, k, keyBytes, std::forward<Enqueue>(enqueue));
    hit->used = ++clock_;
    Check(cudaGraphLaunch(hit->exec, s), "cudaGraphLaunch");
  }
  int64_t Captures() const { return captures_; }
  // Steps run one by one because their key was new (Capture::kOnRepeat).
  int64_t Direct() const { return direct_; }

 private:
  struct Entry {
    std::vector<unsigned char> key;
    cudaGraphExec_t exec = nullptr;
    uint64_t used = 0;
  };

  template <typename Enqueue>
  Entry& Capture(cudaStream_t s, const unsigned char* key, size_t keyBytes, Enqueue&& enqueue) {
    // A capture that fails must still end, or the stream stays in capture mode.
    Check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    try {
      enqueue(s);
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(s, &g);
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
      throw;
    }
    cudaGraph_t g = nullptr;
    Check(cudaStreamEndCapture(s, &g), "cudaStreamEndCapture");
    Entry* slot = nullptr;
    if (entries_.size() < kMaxGraphs) {
      entries_.emplace_back();
      slot = &entries_.back();
    } else {
      slot = &entries_.front();
      for (Entry& e : entries_)
        if (e.used < slot->used) slot = &e;
      // Destroyed and instantiated anew, never updated in place: the least
      // recently used graph is typically one whose buffers have since grown
      // and been freed (the key holds their old pointers, so it cannot come
      // back), and updating such an exec made the next cudaGraphLaunch crash
      // inside the driver (SIGSEGV; H100, CUDA 13, bench/wave-gpu.ts --check
      // with a third budget past the first two's sizes, session 19 visit AH).
      cudaGraphExecDestroy(slot->exec);
      slot->exec = nullptr;
    }
    slot->key.clear();  // unusable until instantiated
    cudaError_t e = cudaSuccess;
    if (!slot->exec) e = cudaGraphInstantiate(&slot->exec, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
      slot->exec = nullptr;
      entries_.erase(entries_.begin() + (slot - entries_.data()));
      Check(e, "cudaGraphInstantiate");
    }
    slot->key.assign(key, key + keyBytes);
    ++captures_;
    return *slot;
  }

  static bool EagerFromEnv() {
    const char* v = std::getenv("KVRECALL_STEP_GRAPH_EAGER");
    return v && v[0] == '1';
  }
  // FNV-1a over the key's bytes.
  static uint64_t Hash(const unsigned char* k, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; ++i) h = (h ^ k[i]) * 1099511628211ull;
    return h;
  }

  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
  int64_t captures_ = 0;
  const bool atOnce_;
  std::array<uint64_t, kSeen> seen_{};
  size_t seenAt_ = 0;
  int64_t direct_ = 0;
};

}  // namespace cuda
}  // namespace kvr
