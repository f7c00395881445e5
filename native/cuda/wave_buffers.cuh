// The wave step's buffers on the device and the host, and how a step carves
// them (wave_step.cu's Step, wave_rest.cuh's Rest). Included by wave_step.cu,
// and by ra_scan.cu for its grow-only buffers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace kvr {
namespace cuda {
namespace {

int64_t Cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A device buffer that only grows (the stream is idle between steps).
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  void Need(size_t n, const char* what) {
    if (n <= bytes) return;
    if (p) cudaFree(p);
    p = nullptr;
    bytes = 0;
    Check(cudaMalloc(&p, n), what);
    bytes = n;
  }
  ~DevBuf() { if (p) cudaFree(p); }
};
struct HostBuf {
  void* p = nullptr;
  size_t bytes = 0;
  void Need(size_t n, const char* what) {
    if (n <= bytes) return;
    if (p) cudaFreeHost(p);
    p = nullptr;
    bytes = 0;
    Check(cudaHostAlloc(&p, n, cudaHostAllocDefault), what);
    bytes = n;
  }
  ~HostBuf() { if (p) cudaFreeHost(p); }
};

// Carves one buffer into aligned arrays: first Add every array, then Bind.
struct Layout {
  size_t at = 0;
  size_t Add(size_t bytes) {
    const size_t o = at;
    at += Align(bytes);
    return o;
  }
  template <typename T> static T* At(void* base, size_t off) { return reinterpret_cast<T*>(static_cast<char*>(base) + off); }
};

}  // namespace
}  // namespace cuda
}  // namespace kvr
