// k-means of many problems on the GPU (see kmeans_device.h).
//
// All problems' keys go to the device once, back to back. Each iteration:
//  1. Assign: a CTA per tile of 64 keys of one problem; the problem's
//     centroids stream through shared memory 64 at a time, 64 channels at a
//     time; each thread holds a 4 keys x 4 centroids tile of dot products and
//     keeps, per key, the centroid with the least |c|^2 - 2 x.c (ties: the
//     lower centroid), reduced over the 16 threads that share its keys.
//  2. Update: the keys sorted by their centroid (a stable radix sort, so a
//     cluster's members stay in key order), counted and scanned; a warp per
//     centroid sums its members' rows in that order and divides (an empty
//     cluster keeps its centroid). No atomics on floats: runs are repeatable.
// After the last iteration the keys are assigned once more, so assign and
// sizes agree with the centroids returned (as the host's Kmeans does).
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/kmeans_device.h"
#include "indexes/key_range.h"

namespace kvr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileKeys = 64, kTileCents = 64, kChunk = 64, kPad = 4;  // 4 x 4 dots a thread
constexpr int kRow = kChunk + kPad;  // a shared row: 64 channels, padded (float4 aligned, banks spread)

template <bool kBf16>
__device__ __forceinline__ float Widen(uint16_t w) {
  if (kBf16) return __uint_as_float(uint32_t(w) << 16);
  return __half2float(__ushort_as_half(w));
}

struct Problems {
  const uint16_t* x;          // [keys, d], every problem's keys back to back
  const int64_t* keyStart;    // [problems + 1]
  const int32_t* centStart;   // [problems + 1]
  const int2* tiles;          // {problem, first key}
  float* cent;                // [centroids, d]
  float* norm;                // [centroids]: |c|^2
  int32_t* assign;            // [keys]: the global centroid
  int d;
};

template <bool kBf16>
__global__ void InitCentroids(Problems p, const int64_t* pick, int64_t centroids) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < centroids * p.d; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i / p.d, k = i % p.d;
    p.cent[i] = Widen<kBf16>(p.x[pick[c] * p.d + k]);
  }
}

// A warp per centroid: |c|^2, summed lane-strided then over the warp (fixed order).
__global__ void Norms(Problems p, int64_t centroids) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (c >= centroids) return;
  float s = 0.f;
  for (int k = lane; k < p.d; k += 32) s = fmaf(p.cent[c * p.d + k], p.cent[c * p.d + k], s);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) p.norm[c] = s;
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads) Assign(Problems p) {
  __shared__ __align__(16) float sx[kTileKeys * kRow];
  __shared__ __align__(16) float sc[kTileCents * kRow];
  __shared__ float sn[kTileCents];
  const int2 tile = p.tiles[blockIdx.x];
  const int64_t first = tile.y, left = p.keyStart[tile.x + 1] - first, keys = left < kTileKeys ? left : kTileKeys;
  const int c0 = p.centStart[tile.x], cents = p.centStart[tile.x + 1] - c0;
  const int kg = threadIdx.x >> 4, cg = threadIdx.x & 15;  // keys kg*4.., centroids cg*4.. of the chunk
  float best[4];
  int bestAt[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) best[i] = INFINITY, bestAt[i] = -1;
  for (int cb = 0; cb < cents; cb += kTileCents) {
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.d; k0 += kChunk) {
      const int kw = min(kChunk, p.d - k0);
      __syncthreads();
      for (int i = threadIdx.x; i < kTileKeys * kChunk; i += kThreads) {
        const int r = i / kChunk, k = i % kChunk;
        sx[r * kRow + k] = r < keys && k < kw ? Widen<kBf16>(p.x[(first + r) * p.d + k0 + k]) : 0.f;
        sc[r * kRow + k] = cb + r < cents && k < kw ? p.cent[int64_t(c0 + cb + r) * p.d + k0 + k] : 0.f;
      }
      if (k0 == 0 && threadIdx.x < kTileCents) sn[threadIdx.x] = cb + int(threadIdx.x) < cents ? p.norm[c0 + cb + threadIdx.x] : 0.f;
      __syncthreads();
      for (int k = 0; k < kChunk; k += 4) {
        float4 xv[4], cv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          xv[i] = *reinterpret_cast<const float4*>(sx + (kg * 4 + i) * kRow + k);
          cv[i] = *reinterpret_cast<const float4*>(sc + (cg * 4 + i) * kRow + k);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[i][j] = fmaf(xv[i].x, cv[j].x, acc[i][j]);
            acc[i][j] = fmaf(xv[i].y, cv[j].y, acc[i][j]);
            acc[i][j] = fmaf(xv[i].z, cv[j].z, acc[i][j]);
            acc[i][j] = fmaf(xv[i].w, cv[j].w, acc[i][j]);
          }
      }
    }
    // Centroids ascending within the thread: a strict < keeps the lower one on a tie.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = cb + cg * 4 + j;
      if (c >= cents) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float v = fmaf(-2.f, acc[i][j], sn[cg * 4 + j]);
        if (v < best[i]) best[i] = v, bestAt[i] = c;
      }
    }
  }
  // Over the 16 threads sharing these keys (one half-warp): the least, then the lower centroid.
#pragma unroll
  for (int i = 0; i < 4; ++i)
    for (int o = 8; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best[i], o);
      const int oc = __shfl_xor_sync(0xffffffffu, bestAt[i], o);
      if (oc >= 0 && (bestAt[i] < 0 || ov < best[i] || (ov == best[i] && oc < bestAt[i]))) best[i] = ov, bestAt[i] = oc;
    }
  if (cg == 0)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (kg * 4 + i < keys) p.assign[first + kg * 4 + i] = c0 + max(bestAt[i], 0);
}

__global__ void Count(const int32_t* assign, int64_t keys, int32_t* counts) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < keys; i += int64_t(gridDim.x) * blockDim.x) atomicAdd(counts + assign[i], 1);
}

__global__ void Iota(int32_t* v, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) v[i] = int32_t(i);
}

// A warp per centroid: its members' rows summed in key order (each lane its
// channels), divided by their count; an empty cluster keeps its centroid.
template <bool kBf16>
__global__ void Means(Problems p, const int32_t* order, const int32_t* counts, const int32_t* offsets, int64_t centroids) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (c >= centroids || counts[c] == 0) return;
  const int32_t n = counts[c], at = offsets[c];
  for (int k = lane; k < p.d; k += 32) {
    float s = 0.f;
    for (int32_t m = 0; m < n; ++m) s += Widen<kBf16>(p.x[int64_t(order[at + m]) * p.d + k]);
    p.cent[c * p.d + k] = s / float(n);
  }
}

int64_t Cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { Check(cudaMalloc(&ptr, std::max<size_t>(bytes, 1)), "cudaMalloc (k-means)"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T> T* As() const { return static_cast<T*>(ptr); }
};

template <bool kBf16>
void Run(std::vector<KmeansProblem>& ps, int d, int iterations) {
  const size_t P = ps.size();
  std::vector<int64_t> keyStart(P + 1, 0);
  std::vector<int32_t> centStart(P + 1, 0);
  for (size_t i = 0; i < P; ++i) {
    keyStart[i + 1] = keyStart[i] + ps[i].tokens;
    if (int64_t(centStart[i]) + ps[i].clusters >= (int64_t(1) << 31)) throw std::runtime_error("k-means on the device: more than 2^31 centroids");
    centStart[i + 1] = centStart[i] + ps[i].clusters;
  }
  const int64_t N = keyStart[P], C = centStart[P];
  if (N >= (int64_t(1) << 31)) throw std::runtime_error("k-means on the device: more than 2^31 keys");
  // Initial centroids: a seeded sample of each problem's keys, distinct rows (a partial Fisher-Yates shuffle).
  std::vector<int64_t> pick(static_cast<size_t>(C));
  std::vector<int2> tiles;
  for (size_t i = 0; i < P; ++i) {
    std::mt19937_64 rng(ps[i].seed);
    std::vector<int64_t> perm(static_cast<size_t>(ps[i].tokens));
    for (int64_t t = 0; t < ps[i].tokens; ++t) perm[size_t(t)] = t;
    for (int c = 0; c < ps[i].clusters; ++c) {
      const int64_t j = c + int64_t(rng() % uint64_t(ps[i].tokens - c));
      std::swap(perm[size_t(c)], perm[size_t(j)]);
      pick[size_t(centStart[i] + c)] = keyStart[i] + perm[size_t(c)];
    }
    for (int64_t t = 0; t < ps[i].tokens; t += kTileKeys) tiles.push_back(make_int2(int(i), int(keyStart[i] + t)));
  }
  Check(cudaSetDevice(0), "cudaSetDevice");
  cudaStream_t s = nullptr;
  Check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{s};
  DeviceBuffer x(size_t(N) * d * 2), cent(size_t(C) * d * 4), norm(size_t(C) * 4), assign(size_t(N) * 4), sorted(size_t(N) * 4),
      iota(size_t(N) * 4), order(size_t(N) * 4), counts(size_t(C) * 4), offsets(size_t(C) * 4), kStart((P + 1) * 8), cStart((P + 1) * 4),
      tileBuf(tiles.size() * sizeof(int2)), pickBuf(size_t(C) * 8);
  for (size_t i = 0; i < P; ++i)
    Check(cudaMemcpyAsync(x.As<uint16_t>() + keyStart[i] * d, ps[i].keys, size_t(ps[i].tokens) * d * 2, cudaMemcpyHostToDevice, s), "copy keys");
  Check(cudaMemcpyAsync(kStart.ptr, keyStart.data(), (P + 1) * 8, cudaMemcpyHostToDevice, s), "copy");
  Check(cudaMemcpyAsync(cStart.ptr, centStart.data(), (P + 1) * 4, cudaMemcpyHostToDevice, s), "copy");
  Check(cudaMemcpyAsync(tileBuf.ptr, tiles.data(), tiles.size() * sizeof(int2), cudaMemcpyHostToDevice, s), "copy");
  Check(cudaMemcpyAsync(pickBuf.ptr, pick.data(), size_t(C) * 8, cudaMemcpyHostToDevice, s), "copy");
  const Problems p{x.As<uint16_t>(), kStart.As<int64_t>(), cStart.As<int32_t>(), tileBuf.As<int2>(), cent.As<float>(), norm.As<float>(), assign.As<int32_t>(), d};
  int bits = 1;
  while ((int64_t(1) << bits) < C) ++bits;
  size_t sortBytes = 0, scanBytes = 0;
  Check(cub::DeviceRadixSort::SortPairs(nullptr, sortBytes, p.assign, sorted.As<int32_t>(), iota.As<int32_t>(), order.As<int32_t>(), int(N), 0, bits, s), "cub sizing");
  Check(cub::DeviceScan::ExclusiveSum(nullptr, scanBytes, counts.As<int32_t>(), offsets.As<int32_t>(), int(C), s), "cub sizing");
  DeviceBuffer temp(std::max(sortBytes, scanBytes));
  const unsigned grid = unsigned(std::min<int64_t>(Cdiv(std::max(N, C * d), kThreads), 4096));
  const unsigned warpsGrid = unsigned(Cdiv(C * 32, kThreads));
  InitCentroids<kBf16><<<grid, kThreads, 0, s>>>(p, pickBuf.As<int64_t>(), C);
  Iota<<<grid, kThreads, 0, s>>>(iota.As<int32_t>(), N);
  for (int it = 0; it <= iterations; ++it) {
    Norms<<<warpsGrid, kThreads, 0, s>>>(p, C);
    Assign<kBf16><<<unsigned(tiles.size()), kThreads, 0, s>>>(p);
    Check(cudaMemsetAsync(counts.ptr, 0, size_t(C) * 4, s), "memset");
    Count<<<grid, kThreads, 0, s>>>(p.assign, N, counts.As<int32_t>());
    if (it == iterations) break;  // the last assignment, to the centroids returned
    size_t tb = sortBytes;
    Check(cub::DeviceRadixSort::SortPairs(temp.ptr, tb, p.assign, sorted.As<int32_t>(), iota.As<int32_t>(), order.As<int32_t>(), int(N), 0, bits, s), "sort");
    tb = scanBytes;
    Check(cub::DeviceScan::ExclusiveSum(temp.ptr, tb, counts.As<int32_t>(), offsets.As<int32_t>(), int(C), s), "scan");
    Means<kBf16><<<warpsGrid, kThreads, 0, s>>>(p, order.As<int32_t>(), counts.As<int32_t>(), offsets.As<int32_t>(), C);
  }
  Check(cudaGetLastError(), "k-means launch");
  std::vector<float> centHost(size_t(C) * d);
  std::vector<int32_t> assignHost(static_cast<size_t>(N)), countsHost(static_cast<size_t>(C));
  Check(cudaMemcpyAsync(centHost.data(), cent.ptr, centHost.size() * 4, cudaMemcpyDeviceToHost, s), "copy back");
  Check(cudaMemcpyAsync(assignHost.data(), assign.ptr, assignHost.size() * 4, cudaMemcpyDeviceToHost, s), "copy back");
  Check(cudaMemcpyAsync(countsHost.data(), counts.ptr, countsHost.size() * 4, cudaMemcpyDeviceToHost, s), "copy back");
  Check(cudaStreamSynchronize(s), "k-means");
  for (size_t i = 0; i < P; ++i) {
    const KmeansProblem& q = ps[i];
    std::memcpy(q.centroids, centHost.data() + size_t(centStart[i]) * d, size_t(q.clusters) * d * 4);
    std::memcpy(q.sizes, countsHost.data() + centStart[i], size_t(q.clusters) * 4);
    for (int64_t t = 0; t < q.tokens; ++t) q.assign[t] = assignHost[size_t(keyStart[i] + t)] - centStart[i];
  }
}

}  // namespace

void KmeansManyDevice(std::vector<KmeansProblem>& problems) {
  if (problems.empty()) return;
  const KmeansProblem& a = problems.front();
  if (a.headDim < 4 || a.headDim > 1024 || a.headDim % 4 != 0) throw std::runtime_error("k-means on the device: headDim must be a multiple of 4 in [4, 1024]");
  if (!IsWordDtype(a.dtype)) throw std::runtime_error("k-means on the device: keys must be f16 or bf16");
  if (a.iterations < 1) throw std::runtime_error("k-means on the device: iterations must be >= 1");
  for (const KmeansProblem& q : problems) {
    if (q.headDim != a.headDim || q.dtype != a.dtype || q.iterations != a.iterations)
      throw std::runtime_error("k-means on the device: every problem needs the same headDim, dtype and iterations");
    if (q.tokens < 1 || q.clusters < 1 || q.clusters > q.tokens) throw std::runtime_error("k-means on the device: clusters must be in [1, tokens]");
    CheckClusterableKeys(q.keys, q.dtype, q.tokens * q.headDim);  // as the host's k-means refuses them
  }
  if (a.dtype == Dtype::kBf16) Run<true>(problems, a.headDim, a.iterations);
  else Run<false>(problems, a.headDim, a.iterations);
}

}  // namespace cuda
}  // namespace kvr
