// A decode step's launches replayed as one CUDA graph. A layer-step issues
// dozens of small kernels, memsets and scans; launched one by one they cost
// the host ~6 us each and leave the device a gap between dependent kernels.
// Captured once and replayed, the step is one launch. Everything a launch
// bakes in (grid sizes, kernel arguments by value, buffer pointers and copy
// sizes) must be in the key: a key unlike the last one's captures anew.
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
  StepGraph() = default;
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;
  ~StepGraph() { Drop(); }

  // Runs `enqueue(stream)`'s work on `s`: from the graph captured for `key`,
  // capturing it first when the key differs from the last run's. `enqueue`
  // may only issue stream work on its argument (no synchronisation, no event
  // queries); it throws on a failed call. Throws std::runtime_error.
  template <typename Enqueue>
  void Run(cudaStream_t s, const void* key, size_t keyBytes, Enqueue&& enqueue) {
    const auto* k = static_cast<const unsigned char*>(key);
    if (!exec_ || keyBytes != key_.size() || std::memcmp(k, key_.data(), keyBytes) != 0) {
      Capture(s, std::forward<Enqueue>(enqueue));
      key_.assign(k, k + keyBytes);
    }
    Check(cudaGraphLaunch(exec_, s), "cudaGraphLaunch");
  }
  int64_t Captures() const { return captures_; }

 private:
  template <typename Enqueue>
  void Capture(cudaStream_t s, Enqueue&& enqueue) {
    // A capture that fails must still end, or the stream stays in capture mode.
    Check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    try {
      enqueue(s);
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(s, &g);
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
      Drop();
      throw;
    }
    cudaGraph_t g = nullptr;
    Check(cudaStreamEndCapture(s, &g), "cudaStreamEndCapture");
    // Same topology (the usual case: a pointer or a size moved): update in
    // place, which costs far less than instantiating.
    bool updated = false;
    if (exec_) {
      cudaGraphExecUpdateResultInfo info{};
      updated = cudaGraphExecUpdate(exec_, g, &info) == cudaSuccess;
      if (!updated) {
        cudaGetLastError();
        Drop();
      }
    }
    cudaError_t e = cudaSuccess;
    if (!updated) e = cudaGraphInstantiate(&exec_, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
      exec_ = nullptr;
      Drop();
      Check(e, "cudaGraphInstantiate");
    }
    ++captures_;
  }
  void Drop() {
    if (exec_) cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
    key_.clear();
  }
  std::vector<unsigned char> key_;
  cudaGraphExec_t exec_ = nullptr;
  int64_t captures_ = 0;
};

}  // namespace cuda
}  // namespace kvr
