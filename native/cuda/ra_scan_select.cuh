// The device code scan's two cuts (ra_scan.h), included once, by ra_scan.cu
// through ra_scan_kernels.cuh: wave_select.cuh's radix select over a policy
// of their own, then what is taken placed in index order, so the lists and
// the sums over them do not depend on the order atomics ran in.
//  - The candidates: the keys the scan kept (every key at or above a
//    threshold from the sample, in the order atomics appended them), the
//    best `want`; their ids marked in a bitmap and read back in id order.
//  - The answer: the candidates and the unreached sample, the best k;
//    placed by a count per tile, a scan of the tiles and a placement.
#pragma once

#include "cuda/wave_select.cuh"

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kTileThreads = 512;  // ScanTiles: one CTA a head (1024 spilled)

__device__ __forceinline__ int IdBits(int64_t n) { return n > 1 ? 32 - __clz(uint32_t(n - 1)) : 0; }

// The candidates' cut over the keys the scan kept: head h's at h·n, count[h] of them.
struct KeptCut {
  static constexpr bool kUnit = true;
  const uint32_t* ord;
  const int32_t* ids;
  const unsigned long long* count;
  int64_t n, want;
  __device__ int64_t Begin(int h) const { return int64_t(h) * n; }
  __device__ int64_t Len(int h) const { return int64_t(count[h]); }
  __device__ uint32_t Index(int, int64_t i) const { return uint32_t(ids[i]); }
  __device__ int64_t Weight(int64_t) const { return 1; }
  __device__ int64_t Target(int) const { return want; }
  __device__ int64_t Cap(int) const { return want; }
  __device__ int IndexBits(int) const { return IdBits(n); }
};
// The answer's cut: the keys scored and the unreached sample, the best k.
struct ScanFinalCut {
  static constexpr bool kUnit = true;
  const uint32_t* ord;
  const int32_t* ids;
  const int64_t* count;
  int64_t cap, k, n;
  __device__ int64_t Begin(int h) const { return int64_t(h) * cap; }
  __device__ int64_t Len(int h) const { return count[h]; }
  __device__ uint32_t Index(int, int64_t i) const { return uint32_t(ids[i]); }
  __device__ int64_t Weight(int64_t) const { return 1; }
  __device__ int64_t Target(int) const { return k; }
  __device__ int64_t Cap(int) const { return k; }
  __device__ int IndexBits(int) const { return IdBits(n); }
};

// The kept keys a cut takes (the candidates', or the PQ pass's), as bits of head h's bitmap.
template <typename S>
__global__ void MarkTaken(S s, const uint32_t* range, const CutState* cuts, uint32_t* bits, int64_t words) {
  AfterPrior();
  const int h = blockIdx.y;
  const uint32_t low = SpanOf(range, h).low;
  const int64_t b = s.Begin(h), n = s.Len(h);
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x)
    if (Taken(s, low, cuts[h], h, b + j)) {
      const int32_t id = s.ids[b + j];
      atomicOr(bits + size_t(h) * words + (id >> 5), 1u << (id & 31));
    }
}

// tiles[h, t]: the bits set in head h's words [t·kThreads, (t+1)·kThreads).
__global__ void CountBits(const uint32_t* bits, int64_t words, int64_t* tiles, int64_t tilesPerHead) {
  AfterPrior();
  __shared__ int64_t scratch[32];
  const int h = blockIdx.y;
  const int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = BlockReduce(int64_t(w < words ? __popc(bits[size_t(h) * words + w]) : 0), Add(), scratch);
  if (threadIdx.x == 0) tiles[size_t(h) * tilesPerHead + blockIdx.x] = c;
}

// The tiles' exclusive scan within each head, in place (one CTA a head):
// `used` tiles of counts[h] (or fixedCount) elements of kThreads each.
__global__ void __launch_bounds__(kTileThreads) ScanTiles(int64_t* tiles, int64_t tilesPerHead, const int64_t* counts, int64_t fixedCount) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kTileThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int64_t carry;
  const int h = blockIdx.x;
  const int64_t n = counts ? counts[h] : fixedCount, used = (n + kThreads - 1) / kThreads;
  int64_t* row = tiles + size_t(h) * tilesPerHead;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < used; base += kTileThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < used ? row[i] : 0;
    int64_t at, total;
    Scan(temp).ExclusiveSum(v, at, total);
    if (i < used) row[i] = carry + at;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
}

// Head h's marked ids in ascending order into cand[h·cap ..], the bitmap
// cleared behind them for the next step.
__global__ void PlaceBits(uint32_t* bits, int64_t words, const int64_t* tiles, int64_t tilesPerHead, int32_t* cand, int64_t cap) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int h = blockIdx.y;
  const int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t v = w < words ? bits[size_t(h) * words + w] : 0u;
  int64_t at;
  Scan(temp).ExclusiveSum(int64_t(__popc(v)), at);
  if (v == 0) return;
  bits[size_t(h) * words + w] = 0u;
  int32_t* dst = cand + size_t(h) * cap + tiles[size_t(h) * tilesPerHead + blockIdx.x] + at;
  for (; v; v &= v - 1) *dst++ = int32_t(w * 32 + __ffs(v) - 1);
}

// tiles[h, t]: elements of head h's tile t (kThreads of them) that its cut takes.
template <typename S>
__global__ void CountTaken(S s, const uint32_t* range, const CutState* cuts, int64_t* tiles, int64_t tilesPerHead) {
  AfterPrior();
  __shared__ int64_t scratch[32];
  const int h = blockIdx.y;
  const uint32_t low = SpanOf(range, h).low;
  const int64_t b = s.Begin(h), n = s.Len(h);
  for (int64_t t = blockIdx.x; t * blockDim.x < n; t += gridDim.x) {  // uniform over the CTA: its reduction
    const int64_t j = t * blockDim.x + threadIdx.x;
    int64_t w = j < n ? Taken(s, low, cuts[h], h, b + j) : 0;
    w = BlockReduce(w, Add(), scratch);
    if (threadIdx.x == 0) tiles[size_t(h) * tilesPerHead + t] = w;
  }
}

// Places what head h's cut takes at its rank in index order: write(h, i, at).
template <typename S, typename W>
__global__ void PlaceTaken(S s, const uint32_t* range, const CutState* cuts, const int64_t* tiles, int64_t tilesPerHead, W write) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int h = blockIdx.y;
  const uint32_t low = SpanOf(range, h).low;
  const int64_t b = s.Begin(h), n = s.Len(h);
  for (int64_t t = blockIdx.x; t * blockDim.x < n; t += gridDim.x) {  // uniform over the CTA
    const int64_t j = t * blockDim.x + threadIdx.x;
    const int64_t take = j < n ? Taken(s, low, cuts[h], h, b + j) : 0;
    int64_t at;
    Scan(temp).ExclusiveSum(take, at);
    __syncthreads();
    if (take) write(h, b + j, tiles[size_t(h) * tilesPerHead + t] + at);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
