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
//  1. CacheNeed (8 lanes a cluster), right after the clusters' cut: every member of every
//     cluster the cut took (all of them: the cut cluster's rest too, which
//     PartialLogits reads when one of its rows is kept) and of every `exact`
//     row's cluster (PartialLogits reads those clusters' members, the
//     attention and the estimate the exact rows): a superset of every row a
//     later kernel reads. With a page cap (WaveStoreConfig::pageCapBytes)
//     the cap's need runs here instead (wave_page_cap.cuh): the same rows
//     until the cap applies, then at most the cap's. A cached row's slot is stamped with the step; a
//     missing one is claimed (atomicCAS -1 -> kPending, so a row listed
//     twice is appended once) and appended to the miss list.
//  2. CacheCountFree then CacheAssign, a CTA per span of slots from the
//     clock hand: the first counts each span's slots not stamped this step
//     (not read by this step), the second gives its span's free slots, in
//     order, to the misses after those of the spans before it, and unmaps
//     each slot's previous owner: miss j gets the j-th free slot from the
//     hand. Slots are enough
//     when `rows` ≥ the step's needed rows (CacheRowsBound); otherwise the
//     overflow flag is set, the rows left without a slot read the dump slot,
//     and the host fails the step and empties the cache.
//  3. CacheCopy: the given misses' K rows then V rows as one list of
//     16-byte words, kCopyUnroll loads a thread in flight over a grid that
//     fills the GPU (the zero-copy reads' latency needs ~MiBs in flight to
//     fill PCIe); it also advances the step and the clock hand (the
//     allocation's CTAs read them).
// These replaced a one-CTA allocation (CacheAllocate), a warp a miss's copy
// (CacheGather) and a lane a cluster's need, with the same state and
// answers: a layer-step at 1M went 4.43-4.45 -> 3.17 ms on an H100 (visit N,
// the two alternated on one store by KVRECALL_WAVE_CACHE_LEGACY=1,
// bench/results/wave-gpu-paged-ab-h100-cs16-p4.md); that switch and the
// kernels only it ran were removed after it.
// The later kernels read the same words as the dense store's (only their
// addresses differ), so the answers are bit for bit the dense store's
// (uncapped, or while every row the cut takes is cached).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_buffers.cuh"
#include "cuda/wave_step.h"
#include "cuda/wave_step_kernels.cuh"

namespace kvr {
namespace cuda {
namespace {

constexpr int32_t kPending = -2;         // a miss claimed this step, not yet given a slot
// Counters the step reads back (in its output buffer): misses, overflow, bytes in, misses given a slot.
constexpr int kCacheCounters = 4;
// The parallel allocation: a CTA per span of at least kSlotSpan slots (at most kMaxAllocCtas spans).
constexpr int kSlotThreads = 256, kSlotPer = 16, kSlotSpan = kSlotThreads * kSlotPer, kMaxAllocCtas = 1024;
constexpr int kNeedLanes = 8;                       // CacheNeed: lanes a cluster
constexpr int kCopyThreads = 256, kCopyUnroll = 4;  // CacheCopy: 16-byte loads a thread in flight

struct CacheParams {
  int32_t* rowSlot;  // [H·N]: the row's slot + 1 (its row in cacheK/V), -1 (not cached) or kPending
  int32_t* owner;    // [rows]: the slot's row h·N + t, -1 free
  int32_t* stamp;    // [rows]: the last step that read the slot
  int32_t* miss;     // [rows]: the step's misses (rows h·N + t)
  int32_t* state;    // [3]: the step's number, the clock hand, the next hand (CacheAssign's)
  int32_t* spanFree; // [kMaxAllocCtas]: each span's free slots (CacheCountFree's)
  int64_t allocSpan; // slots a span (allocCtas spans)
  int allocCtas, copyCtas;
  unsigned long long* counters;  // [kCacheCounters]
  uint16_t *cacheK, *cacheV;     // [rows + 1, d] (device): row 0 zeroed, slot s at row s + 1
  const uint16_t *hostK, *hostV; // [H·N, d] (mapped host memory)
  const int32_t *counts, *memberStart, *exact;
  ClusterMaps maps;
  const int64_t *base, *cnt;
  int64_t rows, N, cmax, exactCount;  // exactCount: the step's bucket (the grid); its own count at exactN (null: exactCount)
  const int64_t* exactN;
  int d;
};

// Whether this call listed the row as a miss (the capped need counts them, wave_page_cap.cuh).
__device__ __forceinline__ bool NeedRow(const CacheParams& c, int64_t key, int32_t step) {
  const int32_t r = c.rowSlot[key];
  if (r > 0) {
    c.stamp[r - 1] = step;  // no slot changes owner before CacheAssign
  } else if (r == -1 && atomicCAS(&c.rowSlot[key], -1, kPending) == -1) {
    const unsigned long long i = atomicAdd(&c.counters[0], 1ull);
    if (i < (unsigned long long)c.rows) c.miss[i] = int32_t(key);
    return true;
  }
  return false;
}

// blockIdx.y: the kv head; x: kLanes lanes for each of its clusters (those
// the cut took), then for each exact row (its cluster); a cluster's lanes
// stride its members, so that its rows are looked up side by side.
template <int kLanes>
__global__ void CacheNeed(CacheParams c) {
  const int h = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, i = t / kLanes, b = c.base[h];
  const int sub = int(t % kLanes);
  int64_t cl = -1;
  if (i < c.cmax) {
    if (i < c.base[h + 1] - b && c.cnt[b + i] > 0) cl = b + i;
  } else if (i < c.cmax + (c.exactN ? *c.exactN : c.exactCount)) {
    cl = b + TokenCluster(c.maps, c.N, h, c.exact[i - c.cmax]);
  }
  if (cl < 0) return;
  const int32_t step = c.state[0], n = c.counts[cl];
  const int32_t start = c.memberStart[cl];
  for (int32_t k = sub; k < n; k += kLanes) NeedRow(c, int64_t(h) * c.N + MemberToken(c.maps, c.N, h, start + k), step);
}

// Miss `key` takes slot s: the slot's old row unmapped, the slot stamped
// with the step.
__device__ __forceinline__ void TakeSlot(const CacheParams& c, int32_t key, int64_t s, int32_t step) {
  const int32_t old = c.owner[s];
  if (old >= 0) c.rowSlot[old] = -1;
  c.owner[s] = key;
  c.stamp[s] = step;
  c.rowSlot[key] = int32_t(s + 1);
}

// Slot i places from the hand (hand < rows, i < rows).
__device__ __forceinline__ int64_t FromHand(const CacheParams& c, int32_t hand, int64_t i) {
  const int64_t s = hand + i;
  return s >= c.rows ? s - c.rows : s;
}

// Each span's free slots (not stamped this step). Nothing to count without misses.
__global__ void __launch_bounds__(kSlotThreads) CacheCountFree(CacheParams c) {
  using Reduce = cub::BlockReduce<int, kSlotThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int32_t step = c.state[0], hand = c.state[1];
  if (blockIdx.x == 0 && threadIdx.x == 0) c.state[2] = hand;  // unless CacheAssign gives the last miss a slot
  if (c.counters[0] == 0) {
    if (threadIdx.x == 0) c.spanFree[blockIdx.x] = 0;
    return;
  }
  const int64_t from = int64_t(blockIdx.x) * c.allocSpan, to = min(from + c.allocSpan, c.rows);
  int n = 0;
  for (int64_t i = from + threadIdx.x; i < to; i += kSlotThreads) n += c.stamp[FromHand(c, hand, i)] != step;
  const int total = Reduce(tmp).Sum(n);
  if (threadIdx.x == 0) c.spanFree[blockIdx.x] = total;
}

// A span's free slots, in order, to the misses after the spans' before it
// (each thread kSlotPer consecutive slots a round, a block scan for their
// ranks, in slot order within the span). Spans are
// disjoint, so every slot, its owner's rowSlot and the miss's are written by
// one thread; a slot stamped this step is never given (the rule that keeps a
// row this step reads where it is).
__global__ void __launch_bounds__(kSlotThreads) CacheAssign(CacheParams c) {
  using Scan = cub::BlockScan<int, kSlotThreads>;
  using Reduce = cub::BlockReduce<long long, kSlotThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  __shared__ long long sBefore;
  const unsigned long long misses = c.counters[0];
  const int64_t M = misses < (unsigned long long)c.rows ? int64_t(misses) : c.rows;
  long long part = 0;
  for (int k = threadIdx.x; k < int(blockIdx.x); k += kSlotThreads) part += c.spanFree[k];
  const long long before = Reduce(tmp.reduce).Sum(part);
  if (threadIdx.x == 0) {
    sBefore = before;
    if (blockIdx.x == gridDim.x - 1) {  // every span counted: the step's totals
      const long long free = before + c.spanFree[blockIdx.x];
      const int64_t given = free < M ? int64_t(free) : M;
      c.counters[1] = misses > (unsigned long long)given ? 1ull : 0ull;
      c.counters[2] = (unsigned long long)given * 4ull * (unsigned long long)c.d;  // K and V, 2 bytes a word
      c.counters[3] = (unsigned long long)given;
    }
  }
  __syncthreads();
  int64_t j0 = sBefore;
  if (j0 >= M) return;
  const int32_t step = c.state[0], hand = c.state[1];
  const int64_t from = int64_t(blockIdx.x) * c.allocSpan, to = min(from + c.allocSpan, c.rows);
  for (int64_t at = from; at < to && j0 < M; at += kSlotSpan) {
    const int64_t i0 = at + int64_t(threadIdx.x) * kSlotPer;
    int mask = 0, n = 0;
#pragma unroll
    for (int k = 0; k < kSlotPer; ++k) {
      const int64_t i = i0 + k;
      if (i < to && c.stamp[FromHand(c, hand, i)] != step) mask |= 1 << k, ++n;
    }
    int rank = 0, total = 0;
    Scan(tmp.scan).ExclusiveSum(n, rank, total);
#pragma unroll
    for (int k = 0; k < kSlotPer; ++k) {
      if (!(mask >> k & 1)) continue;
      const int64_t j = j0 + rank++, i = i0 + k, s = FromHand(c, hand, i);
      if (j >= M) break;
      TakeSlot(c, c.miss[j], s, step);
      if (j == M - 1) c.state[2] = int32_t(FromHand(c, hand, i + 1 < c.rows ? i + 1 : 0));
    }
    j0 += total;
    __syncthreads();  // tmp reused
  }
}

// The given misses' K rows, then their V rows, as one list of 16-byte words
// (consecutive threads, consecutive words of a row): each thread loads
// kCopyUnroll words (grid-stride) before it stores any, so the grid keeps
// ~MiBs of zero-copy reads in flight. Block 0 also moves the step and the
// hand on: every kernel that reads them has run.
__global__ void __launch_bounds__(kCopyThreads) CacheCopy(CacheParams c) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    c.state[1] = c.state[2];
    // In [0, 2^31) without a signed overflow, never a reset stamp's -1 (a
    // stamp 2^31 steps old that matches only keeps its slot one step).
    c.state[0] = int32_t((uint32_t(c.state[0]) + 1u) & 0x7fffffffu);
  }
  const int64_t given = int64_t(c.counters[3]);
  const int nd = c.d / 8;
  const int64_t plane = given * nd, total = 2 * plane, stride = int64_t(gridDim.x) * kCopyThreads;
  const uint4* __restrict__ hostK = reinterpret_cast<const uint4*>(c.hostK);
  const uint4* __restrict__ hostV = reinterpret_cast<const uint4*>(c.hostV);
  uint4* cacheK = reinterpret_cast<uint4*>(c.cacheK);
  uint4* cacheV = reinterpret_cast<uint4*>(c.cacheV);
  for (int64_t at = int64_t(blockIdx.x) * kCopyThreads + threadIdx.x; at < total; at += stride * kCopyUnroll) {
    int64_t src[kCopyUnroll], dst[kCopyUnroll];
    bool isV[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t w = at + u * stride;
      src[u] = -1;
      if (w >= total) continue;
      isV[u] = w >= plane;
      const int64_t r = isV[u] ? w - plane : w, j = r / nd, x = r - j * nd;
      const int32_t key = c.miss[j];
      src[u] = int64_t(key) * nd + x;
      dst[u] = int64_t(c.rowSlot[key]) * nd + x;  // awaited only by the store, beside the host load
    }
    uint4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (src[u] >= 0) v[u] = (isV[u] ? hostV : hostK)[src[u]];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (src[u] >= 0) (isV[u] ? cacheV : cacheK)[dst[u]] = v[u];
  }
}

// The cache's device and host memory, and its part of a step.
struct RowCache {
  int64_t rows = 0;
  uint16_t* host = nullptr;  // pinned, mapped: K [H·N, d] then V [H·N, d]
  // KVRECALL_WAVE_HOST_THP=1 at the store's construction (an experiment):
  // the host copy mmapped 2 MiB-aligned with MADV_HUGEPAGE and registered,
  // for fewer translations per random row read than cudaHostAlloc's pages.
  void* mapped = nullptr;
  size_t mappedBytes = 0;
  DevBuf dev;                // cacheK, cacheV, rowSlot, owner, stamp, miss, spanFree, state
  CacheParams c{};
  cudaEvent_t ev[4] = {};    // around the need, the allocation and the copy (a step with stage times)
  ~RowCache() {
    if (mapped) {
      cudaHostUnregister(host);
      munmap(mapped, mappedBytes);
    } else if (host) {
      cudaFreeHost(host);
    }
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
  }

  // Copies K and V to the host memory and lays the cache out; sets p's keys,
  // values and rowSlot to the cache's.
  void Setup(const WaveStoreConfig& cfg, const WaveHeadHost* heads, StepParams& p) {
    const int H = cfg.kvHeads, d = cfg.headDim;
    const size_t N = size_t(cfg.tokens), all = size_t(H) * N;
    rows = std::min<int64_t>(cfg.cacheRows, int64_t(all));
    const size_t plane = all * d;
    const char* thp = std::getenv("KVRECALL_WAVE_HOST_THP");
    if (thp && thp[0] == '1') {
      constexpr size_t kHuge = size_t(2) << 20;
      const size_t bytes = (plane * 4 + kHuge - 1) / kHuge * kHuge;
      mappedBytes = bytes + kHuge;
      void* m = mmap(nullptr, mappedBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) throw std::runtime_error("mmap (wave K/V, huge pages)");
      mapped = m;
      char* at = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(m) + kHuge - 1) / kHuge * kHuge);
      madvise(at, bytes, MADV_HUGEPAGE);  // advice: without THP the pages stay small
      host = reinterpret_cast<uint16_t*>(at);
      Check(cudaHostRegister(host, bytes, cudaHostRegisterMapped), "cudaHostRegister (wave K/V, mapped)");
    } else {
      Check(cudaHostAlloc(reinterpret_cast<void**>(&host), plane * 4, cudaHostAllocMapped), "cudaHostAlloc (wave K/V, mapped)");
    }
    for (int h = 0; h < H; ++h) {
      std::memcpy(host + size_t(h) * N * d, heads[h].keys, N * d * 2);
      std::memcpy(host + plane + size_t(h) * N * d, heads[h].values, N * d * 2);
    }
    void* dh = nullptr;
    Check(cudaHostGetDevicePointer(&dh, host, 0), "cudaHostGetDevicePointer");
    Layout L;
    const size_t oK = L.Add(size_t(rows + 1) * d * 2), oV = L.Add(size_t(rows + 1) * d * 2), oSlot = L.Add(all * 4),
                 oOwner = L.Add(size_t(rows) * 4), oStamp = L.Add(size_t(rows) * 4), oMiss = L.Add(size_t(rows) * 4),
                 oSpan = L.Add(size_t(kMaxAllocCtas) * 4), oState = L.Add(16);
    dev.Need(L.at, "cudaMalloc (wave row cache)");
    c.cacheK = Layout::At<uint16_t>(dev.p, oK);
    c.cacheV = Layout::At<uint16_t>(dev.p, oV);
    c.rowSlot = Layout::At<int32_t>(dev.p, oSlot);
    c.owner = Layout::At<int32_t>(dev.p, oOwner);
    c.stamp = Layout::At<int32_t>(dev.p, oStamp);
    c.miss = Layout::At<int32_t>(dev.p, oMiss);
    c.spanFree = Layout::At<int32_t>(dev.p, oSpan);
    c.state = Layout::At<int32_t>(dev.p, oState);
    c.allocCtas = int(std::clamp<int64_t>(Cdiv(rows, kSlotSpan), 1, kMaxAllocCtas));
    c.allocSpan = Cdiv(rows, c.allocCtas);
    int sms = 0, perSm = 0;  // CacheCopy's grid: every CTA the GPU holds at once, each thread kCopyUnroll loads
    Check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
    Check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, CacheCopy, kCopyThreads, 0), "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    c.copyCtas = std::max(1, sms) * std::max(1, perSm);
    for (cudaEvent_t& e : ev) Check(cudaEventCreate(&e), "cudaEventCreate");
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
    Check(cudaMemsetAsync(c.state, 0, 16, s), "cudaMemset");
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

  // The step's parameters for the cache's kernels (counters: the step's, in its output buffer).
  CacheParams For(const StepParams& p, unsigned long long* counters) const {
    CacheParams k = c;
    k.counters = counters;
    k.counts = p.counts, k.memberStart = p.memberStart, k.maps = p.maps, k.exact = p.exact;
    k.base = p.base, k.cnt = p.cnt, k.cmax = p.cmax, k.exactCount = p.exactCount, k.exactN = p.exactN;
    return k;
  }

  // The step's need, allocate and copy, after the clusters' cut (p.cnt set);
  // with events around each (timed: a step launched one by one), Times()
  // reads them after the step. need(k) launches the need (CacheNeed where
  // no cap applies; the capped one is wave_page_cap.cuh's); nCounters: the
  // step's counters (kCacheCounters, and the cap's after them), cleared here.
  template <class Need>
  void Enqueue(const StepParams& p, int H, unsigned long long* counters, int nCounters, cudaStream_t s, bool timed, Need&& need) {
    const CacheParams k = For(p, counters);
    Check(cudaMemsetAsync(counters, 0, size_t(nCounters) * 8, s), "memset");
    const auto mark = [&](int i) {
      if (timed) Check(cudaEventRecord(ev[i], s), "event");
    };
    mark(0);
    need(k);
    mark(1);
    CacheCountFree<<<unsigned(c.allocCtas), kSlotThreads, 0, s>>>(k);
    CacheAssign<<<unsigned(c.allocCtas), kSlotThreads, 0, s>>>(k);
    mark(2);
    CacheCopy<<<unsigned(c.copyCtas), kCopyThreads, 0, s>>>(k);
    mark(3);
  }
  void Enqueue(const StepParams& p, int H, unsigned long long* counters, cudaStream_t s, bool timed) {
    Enqueue(p, H, counters, kCacheCounters, s, timed, [&](const CacheParams& k) {
      CacheNeed<kNeedLanes><<<dim3(unsigned(Cdiv((p.cmax + p.exactCount) * kNeedLanes, kThreads)), unsigned(H)), kThreads, 0, s>>>(k);
    });
  }

  // The cache kernels' times of a timed step (after it synchronised).
  void Times(std::vector<std::pair<std::string, float>>& out) const {
    static const char* const kNames[] = {"cache.need", "cache.allocate", "cache.copy"};
    for (int i = 0; i < 3; ++i) {
      float ms = 0;
      Check(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]), "event time");
      out.emplace_back(kNames[i], ms);
    }
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
