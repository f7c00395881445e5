// A decode step's launches replayed as one CUDA graph. A layer-step issues
// dozens of small kernels, memsets and scans; launched one by one they cost
// the host ~6 us each and leave the device a gap between dependent kernels.
// Captured once and replayed, the step is one launch. Everything a launch
// bakes in (grid sizes, kernel arguments by value, buffer pointers and copy
// sizes) must be in the key: a key unlike every cached one captures anew.
// A few graphs are kept: a layer's store is shared by the document's
// sessions, and sessions with other budgets (other shapes) take turns on it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cuda/cuda_common.cuh"

namespace kvr {
namespace cuda {

class StepGraph {
 public:
  static constexpr size_t kMaxGraphs = 8;

  StepGraph() = default;
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
    if (!hit) hit = &Capture(s, k, keyBytes, std::forward<Enqueue>(enqueue));
    hit->used = ++clock_;
    Check(cudaGraphLaunch(hit->exec, s), "cudaGraphLaunch");
  }
  int64_t Captures() const { return captures_; }

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
      // The evicted graph's topology is often the new one's (a pointer or a
      // size moved): updated in place, which costs far less than instantiating.
      cudaGraphExecUpdateResultInfo info{};
      if (cudaGraphExecUpdate(slot->exec, g, &info) != cudaSuccess) {
        cudaGetLastError();
        cudaGraphExecDestroy(slot->exec);
        slot->exec = nullptr;
      }
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

  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
  int64_t captures_ = 0;
};

}  // namespace cuda
}  // namespace kvr
