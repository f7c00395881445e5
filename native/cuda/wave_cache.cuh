// The paged wave store's row cache (WaveStoreConfig::cacheRows > 0, issue
// #13's "GPU memory for the layer ≤ 20% of its K/V"). Included once, by
// wave_step.cu, after the step's kernels.
//
// The layer's K and V stay in pinned, mapped host memory (filled once at
// construction); the device holds `rows` slots of one (head, row)'s K and V
// each, shared by the heads: slot s is row s + 1 of the cache's K and V, whose
// row 0, zeroed, is what a row without a slot reads (after an overflow only,
// whose step fails). Every kernel reads a row through KvRow
// (wave_step_kernels.cuh): cache row max(rowSlot[h·N + t], 0), so that the
// accessor holds no more than the map's pointer. Per step, on the step's
// stream and inside its graph
// (fixed launch shapes; the counts live on the device):
//  1. CacheNeed, right after the clusters' cut: every member of every
//     cluster the cut took (all of them: the cut cluster's rest too, which
//     PartialLogits reads when one of its rows is kept) and of every `exact`
//     row's cluster (PartialLogits reads those clusters' members, the
//     attention and the estimate the exact rows): a superset of every row a
//     later kernel reads. A cached row's slot is stamped with the step; a
//     missing one is claimed (atomicCAS -1 -> kPending, so a row listed
//     twice is appended once) and appended to the miss list.
//  2. CacheAllocate, one CTA: a block-wide scan over the slots from the
//     clock hand, skipping those stamped this step (read by this step), gives
//     each miss a slot and unmaps the slot's previous owner. Slots are enough
//     when `rows` ≥ the step's needed rows (CacheRowsBound); otherwise the
//     overflow flag is set, the rows left without a slot read the dump slot,
//     and the host fails the step and empties the cache.
//  3. CacheGather: a warp per miss (grid-stride over the device's count)
//     copies its K and V rows from the mapped host memory into its slot.
// The later kernels read the same words as the dense store's (only their
// addresses differ), so the answers are bit for bit the dense store's.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_buffers.cuh"
#include "cuda/wave_step.h"
#include "cuda/wave_step_kernels.cuh"

namespace kvr {
namespace cuda {
namespace {

constexpr int32_t kPending = -2;         // a miss claimed this step, not yet given a slot
constexpr int kAllocThreads = 1024, kAllocPer = 8;
constexpr int kGatherCtas = 264, kGatherThreads = 256;  // a warp per row; fixed, for the graph
// Counters the step reads back (in its output buffer): misses, overflow, bytes in, misses given a slot.
constexpr int kCacheCounters = 4;

struct CacheParams {
  int32_t* rowSlot;  // [H·N]: the row's slot + 1 (its row in cacheK/V), -1 (not cached) or kPending
  int32_t* owner;    // [rows]: the slot's row h·N + t, -1 free
  int32_t* stamp;    // [rows]: the last step that read the slot
  int32_t* miss;     // [rows]: the step's misses (rows h·N + t)
  int32_t* state;    // [2]: the step's number, the clock hand
  unsigned long long* counters;  // [kCacheCounters]
  uint16_t *cacheK, *cacheV;     // [rows + 1, d] (device): row 0 zeroed, slot s at row s + 1
  const uint16_t *hostK, *hostV; // [H·N, d] (mapped host memory)
  const int32_t *counts, *memberStart, *members, *tokCl, *exact;
  const int64_t *base, *cnt;
  int64_t rows, N, cmax, exactCount;
  int d;
};

__device__ __forceinline__ void NeedRow(const CacheParams& c, int64_t key, int32_t step) {
  const int32_t r = c.rowSlot[key];
  if (r > 0) {
    c.stamp[r - 1] = step;  // no slot changes owner before CacheAllocate
  } else if (r == -1 && atomicCAS(&c.rowSlot[key], -1, kPending) == -1) {
    const unsigned long long i = atomicAdd(&c.counters[0], 1ull);
    if (i < (unsigned long long)c.rows) c.miss[i] = int32_t(key);
  }
}

// blockIdx.y: the kv head; x: its clusters (those the cut took), then the exact rows (their clusters).
__global__ void CacheNeed(CacheParams c) {
  const int h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = c.base[h];
  int64_t cl = -1;
  if (i < c.cmax) {
    if (i < c.base[h + 1] - b && c.cnt[b + i] > 0) cl = b + i;
  } else if (i < c.cmax + c.exactCount) {
    cl = b + c.tokCl[size_t(h) * c.N + c.exact[i - c.cmax]];
  }
  if (cl < 0) return;
  const int32_t step = c.state[0], n = c.counts[cl];
  const int32_t* mem = c.members + size_t(h) * c.N + c.memberStart[cl];
  for (int32_t k = 0; k < n; ++k) NeedRow(c, int64_t(h) * c.N + mem[k], step);
}

// One CTA: slots from the clock hand, those not read this step, one per
// miss, in slot order (each thread looks at kAllocPer consecutive slots a
// round: with a cache barely above a step's rows few slots are free, and the
// scan may pass most of them before it finds enough).
__global__ void __launch_bounds__(kAllocThreads) CacheAllocate(CacheParams c) {
  using Scan = cub::BlockScan<int, kAllocThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t sLast;
  const int32_t step = c.state[0], hand = c.state[1];
  const unsigned long long misses = c.counters[0];
  const int64_t M = misses < (unsigned long long)c.rows ? int64_t(misses) : c.rows;
  if (threadIdx.x == 0) sLast = -1;
  __syncthreads();
  int64_t assigned = 0;
  for (int64_t at = 0; assigned < M && at < c.rows; at += int64_t(kAllocThreads) * kAllocPer) {
    const int64_t i0 = at + int64_t(threadIdx.x) * kAllocPer;
    int mask = 0, n = 0;
#pragma unroll
    for (int k = 0; k < kAllocPer; ++k) {
      const int64_t i = i0 + k;
      if (i < c.rows && c.stamp[(hand + i) % c.rows] != step) mask |= 1 << k, ++n;
    }
    int rank = 0, total = 0;
    Scan(tmp).ExclusiveSum(n, rank, total);
#pragma unroll
    for (int k = 0; k < kAllocPer; ++k) {
      if (!(mask >> k & 1)) continue;
      const int64_t j = assigned + rank++, i = i0 + k, s = (hand + i) % c.rows;
      if (j >= M) break;
      const int32_t key = c.miss[j], old = c.owner[s];
      if (old >= 0) c.rowSlot[old] = -1;
      c.owner[s] = key;
      c.stamp[s] = step;
      c.rowSlot[key] = int32_t(s + 1);
      if (j == M - 1) sLast = i;
    }
    assigned += total;
    __syncthreads();  // tmp reused; each slot is looked at by one thread, once
  }
  if (threadIdx.x == 0) {
    const int64_t given = assigned < M ? assigned : M;
    c.counters[1] = misses > (unsigned long long)given ? 1ull : 0ull;
    c.counters[2] = (unsigned long long)given * 4ull * (unsigned long long)c.d;  // K and V, 2 bytes a word
    c.counters[3] = (unsigned long long)given;
    if (sLast >= 0) c.state[1] = int32_t((int64_t(hand) + sLast + 1) % c.rows);
    // In [0, 2^31) without a signed overflow, never a reset stamp's -1 (a
    // stamp 2^31 steps old that matches only keeps its slot one step).
    c.state[0] = int32_t((uint32_t(step) + 1u) & 0x7fffffffu);
  }
}

// A warp per miss: its K and V rows, 16 bytes a lane, from the host into its slot.
__global__ void __launch_bounds__(kGatherThreads) CacheGather(CacheParams c) {
  const unsigned long long misses = c.counters[0];
  const int64_t M = misses < (unsigned long long)c.rows ? int64_t(misses) : c.rows;
  const int lane = threadIdx.x & 31, nd = c.d / 8;
  const int64_t warps = int64_t(gridDim.x) * (kGatherThreads / 32);
  for (int64_t i = int64_t(blockIdx.x) * (kGatherThreads / 32) + (threadIdx.x >> 5); i < M; i += warps) {
    const int32_t key = c.miss[i], s = c.rowSlot[key];  // its row in cacheK/V
    if (s <= 0) continue;  // left without a slot (overflow)
    const uint4* k = reinterpret_cast<const uint4*>(c.hostK + size_t(key) * c.d);
    const uint4* v = reinterpret_cast<const uint4*>(c.hostV + size_t(key) * c.d);
    uint4* dk = reinterpret_cast<uint4*>(c.cacheK + size_t(s) * c.d);
    uint4* dv = reinterpret_cast<uint4*>(c.cacheV + size_t(s) * c.d);
    for (int w = lane; w < nd; w += 32) dk[w] = k[w], dv[w] = v[w];
  }
}

// The cache's device and host memory, and its part of a step.
struct RowCache {
  int64_t rows = 0;
  uint16_t* host = nullptr;  // pinned, mapped: K [H·N, d] then V [H·N, d]
  DevBuf dev;                // cacheK, cacheV, rowSlot, owner, stamp, miss, state
  CacheParams c{};
  ~RowCache() { if (host) cudaFreeHost(host); }

  // Copies K and V to the host memory and lays the cache out; sets p's keys,
  // values and rowSlot to the cache's.
  void Setup(const WaveStoreConfig& cfg, const WaveHeadHost* heads, StepParams& p) {
    const int H = cfg.kvHeads, d = cfg.headDim;
    const size_t N = size_t(cfg.tokens), all = size_t(H) * N;
    rows = std::min<int64_t>(cfg.cacheRows, int64_t(all));
    const size_t plane = all * d;
    Check(cudaHostAlloc(reinterpret_cast<void**>(&host), plane * 4, cudaHostAllocMapped), "cudaHostAlloc (wave K/V, mapped)");
    for (int h = 0; h < H; ++h) {
      std::memcpy(host + size_t(h) * N * d, heads[h].keys, N * d * 2);
      std::memcpy(host + plane + size_t(h) * N * d, heads[h].values, N * d * 2);
    }
    void* dh = nullptr;
    Check(cudaHostGetDevicePointer(&dh, host, 0), "cudaHostGetDevicePointer");
    Layout L;
    const size_t oK = L.Add(size_t(rows + 1) * d * 2), oV = L.Add(size_t(rows + 1) * d * 2), oSlot = L.Add(all * 4),
                 oOwner = L.Add(size_t(rows) * 4), oStamp = L.Add(size_t(rows) * 4), oMiss = L.Add(size_t(rows) * 4), oState = L.Add(8);
    dev.Need(L.at, "cudaMalloc (wave row cache)");
    c.cacheK = Layout::At<uint16_t>(dev.p, oK);
    c.cacheV = Layout::At<uint16_t>(dev.p, oV);
    c.rowSlot = Layout::At<int32_t>(dev.p, oSlot);
    c.owner = Layout::At<int32_t>(dev.p, oOwner);
    c.stamp = Layout::At<int32_t>(dev.p, oStamp);
    c.miss = Layout::At<int32_t>(dev.p, oMiss);
    c.state = Layout::At<int32_t>(dev.p, oState);
    c.hostK = static_cast<const uint16_t*>(dh);
    c.hostV = c.hostK + plane;
    c.rows = rows;
    c.N = cfg.tokens;
    c.d = d;
    Check(cudaMemset(dev.p, 0, oSlot), "cudaMemset");  // row 0, what a row without a slot reads: zeros
    Reset(nullptr);
    p.keys = c.cacheK;
    p.values = c.cacheV;
    p.rowSlot = c.rowSlot;
  }

  // Every slot free, every row uncached (construction, and after an overflow).
  void Reset(cudaStream_t s) {
    const size_t from = reinterpret_cast<char*>(c.rowSlot) - static_cast<char*>(dev.p);
    Check(cudaMemsetAsync(c.rowSlot, 0xff, dev.bytes - from, s), "cudaMemset");  // rowSlot, owner, stamp, miss: -1
    Check(cudaMemsetAsync(c.state, 0, 8, s), "cudaMemset");
    Check(cudaStreamSynchronize(s), "wave row cache reset");
  }

  // A paged step's watch over the cache: unless it reaches its end (done), the
  // cache is emptied as after an overflow. A step that stops between its need
  // and its allocation (a launch or a copy that fails) leaves rows claimed
  // (kPending) without a slot, which CacheNeed never claims again: every later
  // step would read them as the zeroed row, and no overflow would say so.
  struct StepGuard {
    RowCache& cache;
    cudaStream_t s;
    bool done = false;
    ~StepGuard() {
      if (done || cache.rows == 0) return;
      try {
        cache.Reset(s);
      } catch (...) {  // a device that failed the step may fail this too; the step's own error is the one thrown
      }
    }
  };

  // The step's need, allocate and gather, after the clusters' cut (p.cnt set).
  void Enqueue(const StepParams& p, int H, unsigned long long* counters, cudaStream_t s) {
    CacheParams k = c;
    k.counters = counters;
    k.counts = p.counts, k.memberStart = p.memberStart, k.members = p.members, k.tokCl = p.tokCl, k.exact = p.exact;
    k.base = p.base, k.cnt = p.cnt, k.cmax = p.cmax, k.exactCount = p.exactCount;
    Check(cudaMemsetAsync(counters, 0, kCacheCounters * 8, s), "memset");
    CacheNeed<<<dim3(unsigned(Cdiv(p.cmax + p.exactCount, kThreads)), unsigned(H)), kThreads, 0, s>>>(k);
    CacheAllocate<<<1, kAllocThreads, 0, s>>>(k);
    CacheGather<<<kGatherCtas, kGatherThreads, 0, s>>>(k);
  }
};

// Rows a paged store's step reads at most per kv head: the clusters the cut
// takes hold fewer than target + the largest cluster's count; each exact row
// brings its cluster.
inline int64_t CacheRowsBound(int64_t target, int64_t largest, int64_t exact, int64_t tokens) {
  return std::min(tokens, target + largest + exact * largest);
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
