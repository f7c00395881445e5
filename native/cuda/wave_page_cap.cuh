// The paged store's cap on the rows a step pages (WaveStoreConfig::
// pageCapBytes > 0; issue #13's "<= 2 MiB host->device a step after the
// first 16 steps"). Included once, by wave_step.cu, after wave_cache.cuh
// (CacheParams, NeedRow) and wave_select.cuh (the cut kernels).
//
// Uncapped, a step pages every member of the cut's clusters (the rescoring
// reads them all from exact keys): 7-70 MiB a layer-step at 1M. Capped, from
// the store's step `pageCapFrom` on, each kv head pages at most its share of
// the cap (capBytes / kvHeads, in rows of K and V): the rows it must read
// first (every member of each sinks/window row's cluster, as uncapped: what
// the attention and PartialLogits read there; after the first step they are
// cached), then the rows the cache lacks among the cut's clusters, best
// clusters first (the cluster cut's rank order, ties towards the lower
// index), a cluster's in member order, until the share is spent. A cut
// cluster's member the cache holds costs nothing and is rescored as before;
// a candidate the cache lacks past the share is not paged and not rescored
// (GatherCandidates' entry becomes ~t; the rescoring kernels skip it, so it
// is never kept): the estimate covers it with its cluster's summary. A
// cluster with rows left unpaged is not "whole": a partly attended one's
// rest takes its moments (PartialLogit's moments branch, which reads only
// the attended rows' keys) instead of its rows' own logits. A step whose
// cut's rows are all cached pages none and is the uncapped step bit for
// bit. bench/results/wave-code-rescore-vm.md (host replay, exact:4:0:2)
// measured this at 1M and 8 kv heads: 2.00 MiB a step, error 0.0356
// against 0.0290 uncapped, no new device data.
//
// Per head, not across heads: the heads' cluster scores come from different
// queries and keys, so there is no common order to take the best rows of all
// heads by; an equal share bounds each head's loss and is what the replay
// measured. The sinks/window rows are always paged: a head whose share they
// exceed pages them and nothing else (only the first steps of a store, or a
// window larger than the share).
//
// Launches (fixed shapes, the counts on the device; inside the step's graph):
//  1. CapNeedExact: the sinks/window rows' clusters, counting each head's misses.
//  2. CapCount: each cut cluster's members the cache lacks (CacheNeed's
//     kPending counts as held: 1 pages it anyway), the held ones stamped.
//  3. The miss cut: wave_select.cuh's radix select over the clusters (MissCut:
//     weight = the misses, target = the head's share less 1's misses);
//     TakeWeights gives each cluster the misses it pages (capAdm).
//  4. CapAdmit: those misses claimed into the miss list (in member order),
//     the candidates past them marked, each head's rescored candidates counted.
// A later rescoring from codes (PQ) slots in at 4: the marked candidates
// would be scored from their codes rather than skipped.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_buffers.cuh"
#include "cuda/wave_cache.cuh"
#include "cuda/wave_select.cuh"
#include "cuda/wave_step_kernels.cuh"

namespace kvr {
namespace cuda {
namespace {

// Counters after the cache's (kCacheCounters), per kv head: the misses of the
// sinks/window rows' clusters, the candidates rescored, the partly attended
// clusters whose rest took moments (reported with WaveStepArgs::detail).
__host__ __device__ constexpr int CapCounters(int H) { return 3 * H; }

// The miss cut's elements: head h's clusters, in the cluster cut's rank order
// (kExcluded for those the cut did not take), weighing the rows the cache
// lacks; taken until the head's share is spent.
struct MissCut {
  static constexpr bool kUnit = false;
  const uint32_t* ord;  // [ctot]: CapCount's
  const int64_t* base;
  const int32_t* mis;
  const unsigned long long* headMiss;  // [kvHeads]: CapNeedExact's
  const int32_t* state;                // the cache's: state[0], the store's step
  int64_t share;                       // rows a head a step
  int32_t from;                        // the first capped step
  __device__ int64_t Begin(int h) const { return base[h]; }
  __device__ int64_t Len(int h) const { return base[h + 1] - base[h]; }
  __device__ uint32_t Index(int h, int64_t i) const { return uint32_t(i - base[h]); }
  __device__ int64_t Weight(int64_t i) const { return mis[i]; }
  __device__ int64_t Target(int h) const {
    if (state[0] < from) return LLONG_MAX / 4;  // not yet capped: every miss
    const int64_t left = share - int64_t(headMiss[h]);
    return left > 0 ? left : 0;
  }
  __device__ int64_t Cap(int h) const { return Len(h) + 1; }  // never the count
  __device__ int IndexBits(int h) const { return Len(h) > 1 ? 32 - __clz(uint32_t(Len(h) - 1)) : 0; }
};

struct CapParams {
  uint32_t* ord;
  int32_t *mis, *adm;
  uint32_t* range;  // [kvHeads, 2]: the miss cut's order range
  int32_t* cand;    // the step's candidates [kvHeads, tmax]
  const int64_t* cum;
  const uint32_t* ord1;
  int64_t tmax;
  int H;
};

// blockIdx.y: the kv head; kNeedLanes lanes an exact row, its cluster's
// members (CacheNeed's second part), each miss counted for the head.
__global__ void CapNeedExact(CacheParams c, CapParams k) {
  const int h = blockIdx.y;
  if (blockIdx.x == 0 && threadIdx.x < 2) k.range[h * 2 + threadIdx.x] = 0xffffffffu;  // for OrderRange<MissCut>
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, i = t / kNeedLanes, b = c.base[h];
  const int sub = int(t % kNeedLanes);
  if (i >= (c.exactN ? *c.exactN : c.exactCount)) return;
  const int64_t cl = b + TokenCluster(c.maps, c.N, h, c.exact[i]);
  const int32_t step = c.state[0], n = c.counts[cl], start = c.memberStart[cl];
  unsigned long long mine = 0;
  for (int32_t m = sub; m < n; m += kNeedLanes) mine += NeedRow(c, int64_t(h) * c.N + MemberToken(c.maps, c.N, h, start + m), step);
  if (mine) atomicAdd(&c.counters[kCacheCounters + h], mine);
}

// kNeedLanes lanes a cluster of head blockIdx.y: a cut cluster's members the
// cache lacks (rowSlot -1) counted into mis, the ones it holds stamped;
// every cluster's miss-cut order (kExcluded outside the cut). The lanes of a
// warp stay together to the end (the shuffles).
__global__ void CapCount(CacheParams c, CapParams k) {
  const int h = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, i = t / kNeedLanes, b = c.base[h], C = c.base[h + 1] - b;
  const int sub = int(t % kNeedLanes);
  const bool in = i < C && c.cnt[b + i] > 0;
  const int32_t step = c.state[0], n = in ? c.counts[b + i] : 0, start = in ? c.memberStart[b + i] : 0;
  int mine = 0;
  for (int32_t m = sub; m < n; m += kNeedLanes) {
    const int64_t key = int64_t(h) * c.N + MemberToken(c.maps, c.N, h, start + m);
    const int32_t r = c.rowSlot[key];
    if (r > 0) c.stamp[r - 1] = step;
    mine += r == -1;
  }
#pragma unroll
  for (int o = kNeedLanes / 2; o > 0; o >>= 1) mine += __shfl_xor_sync(0xffffffffu, mine, o, kNeedLanes);
  if (sub == 0 && i < C) {
    k.mis[b + i] = mine;
    k.ord[b + i] = in ? k.ord1[b + i] : kExcluded;
  }
}

// kNeedLanes lanes a cut cluster of head blockIdx.y: of its members the cache
// lacks, the first adm (member order) claimed into the miss list; its
// candidates past them marked ~t (not rescored); the head's rescored
// candidates counted. The members' cache state is CapCount's (nothing else
// changes a cut cluster's rows in between: each row is one cluster's).
__global__ void CapAdmit(CacheParams c, CapParams k) {
  const int h = blockIdx.y, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, i = t / kNeedLanes, b = c.base[h], C = c.base[h + 1] - b;
  const int sub = int(t % kNeedLanes), shift = lane / kNeedLanes * kNeedLanes;
  const int64_t cnt = i < C ? c.cnt[b + i] : 0;
  const int32_t n = cnt > 0 ? c.counts[b + i] : 0, start = cnt > 0 ? c.memberStart[b + i] : 0;
  const int32_t adm = cnt > 0 ? k.adm[b + i] : 0;
  const int64_t at = cnt > 0 ? k.cum[b + i] - cnt : 0;  // the cluster's first candidate (GatherCandidates)
  const int32_t nMax = __reduce_max_sync(0xffffffffu, n);
  int32_t before = 0;
  unsigned rescored = 0;
  for (int32_t m0 = 0; m0 < nMax; m0 += kNeedLanes) {  // uniform over the warp: the ballots
    const int32_t m = m0 + sub;
    const int32_t u = m < n ? MemberToken(c.maps, c.N, h, start + m) : 0;
    const int64_t key = int64_t(h) * c.N + u;
    const bool lacks = m < n && c.rowSlot[key] == -1;
    const unsigned group = (__ballot_sync(0xffffffffu, lacks) >> shift) & ((1u << kNeedLanes) - 1);
    const int32_t rank = before + __popc(group & ((1u << sub) - 1));
    const bool paged = m < n && (!lacks || rank < adm);
    if (lacks && paged && atomicCAS(&c.rowSlot[key], -1, kPending) == -1) {
      const unsigned long long j = atomicAdd(&c.counters[0], 1ull);
      if (j < (unsigned long long)c.rows) c.miss[j] = int32_t(key);
    }
    if (m < cnt) {
      if (!paged) k.cand[size_t(h) * k.tmax + at + m] = ~u;
      rescored += paged;
    }
    before += __popc(group);
  }
  for (int o = 16; o > 0; o >>= 1) rescored += __shfl_xor_sync(0xffffffffu, rescored, o);
  if (lane == 0 && rescored) atomicAdd(&c.counters[kCacheCounters + k.H + h], (unsigned long long)rescored);
}

// The cap's scratch and its part of a step.
struct PageCap {
  int64_t share = 0;  // rows a kv head a step; 0: no cap
  int32_t from = 0;
  DevBuf dev;         // ord, mis, adm [ctot]; the miss cut's tile sums [kvHeads, Tiles(cmax)]; its cut states and order range
  uint32_t* ord = nullptr;
  int32_t *mis = nullptr, *adm = nullptr, *tiles = nullptr;
  CutState* cuts = nullptr;
  uint32_t* range = nullptr;

  // Its scratch; p's capMis and capAdm point into it.
  void Setup(const WaveStoreConfig& cfg, int64_t ctot, int64_t cmax, StepParams& p) {
    const int H = cfg.kvHeads;
    const int64_t rowBytes = int64_t(cfg.headDim) * 4;  // K and V, 2 bytes a word
    share = cfg.pageCapBytes / H / rowBytes;
    if (share < 1) throw std::runtime_error("wave store: pageCapBytes must allow every kv head a row (K and V)");
    from = cfg.pageCapFrom;
    Layout L;
    const size_t oOrd = L.Add(size_t(ctot) * 4), oMis = L.Add(size_t(ctot) * 4), oAdm = L.Add(size_t(ctot) * 4),
                 oTiles = L.Add(size_t(H) * Tiles(cmax) * 4), oCuts = L.Add(size_t(H) * sizeof(CutState)), oRange = L.Add(size_t(H) * 8);
    dev.Need(L.at, "cudaMalloc (wave page cap)");
    ord = Layout::At<uint32_t>(dev.p, oOrd);
    mis = Layout::At<int32_t>(dev.p, oMis);
    adm = Layout::At<int32_t>(dev.p, oAdm);
    tiles = Layout::At<int32_t>(dev.p, oTiles);
    cuts = Layout::At<CutState>(dev.p, oCuts);
    range = Layout::At<uint32_t>(dev.p, oRange);
    Check(cudaMemset(dev.p, 0, L.at), "cudaMemset");
    p.capMis = mis;
    p.capAdm = adm;
    Check(cudaFuncSetAttribute(ResolveCut<MissCut>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(ResolveSmem<MissCut>())),
          "cudaFuncSetAttribute");
  }

  // A step's counters (cc: the cache's, then CapCounters) into its result;
  // list (detail): the clusters whose rest took moments, [H, rowsMax].
  static void Read(const unsigned long long* cc, int H, const int32_t* list, int64_t rowsMax, WaveStepResult& r) {
    for (int h = 0; h < H; ++h) {
      r.exactMisses.push_back(int64_t(cc[kCacheCounters + h]));
      r.rescored.push_back(int64_t(cc[kCacheCounters + H + h]));
    }
    if (!list) return;
    r.momentClusters.resize(size_t(H));
    for (int h = 0; h < H; ++h) {
      const size_t n = size_t(std::min<unsigned long long>(cc[kCacheCounters + 2 * H + h], (unsigned long long)rowsMax));
      r.momentClusters[size_t(h)].assign(list + size_t(h) * rowsMax, list + size_t(h) * rowsMax + n);
    }
  }

  // The capped need (RowCache::Enqueue's need): after GatherCandidates.
  // hist: [kvHeads, kBins, 2] free here (the cluster cut's, done), cleared
  // for the miss cut; buf, bufW: the cluster cut's, free after its
  // ResolveCut. p: the step's (cand, cum, ord1, cnt).
  void Need(const CacheParams& c, const StepParams& p, int H, int64_t cmax, uint32_t* hist, uint64_t* buf, int64_t* bufW,
            cudaStream_t s) const {
    CapParams k{ord, mis, adm, range, p.cand, p.cum, p.ord1, p.tmax, H};
    const MissCut mc{ord, p.base, mis, c.counters + kCacheCounters, c.state, share, from};
    const auto grid = [&](int64_t n) { return dim3(unsigned(std::max<int64_t>(1, Cdiv(n * kNeedLanes, kThreads))), unsigned(H)); };
    const auto cutGrid = [&](int per) { return dim3(unsigned(std::clamp<int64_t>(Cdiv(cmax, int64_t(per) * kThreads), 1, 65535)), unsigned(H)); };
    CapNeedExact<<<grid(p.exactCount), kThreads, 0, s>>>(c, k);
    CapCount<<<grid(cmax), kThreads, 0, s>>>(c, k);
    Check(cudaMemsetAsync(hist, 0, size_t(H) * kBins * 8, s), "memset");
    OrderRange<MissCut><<<cutGrid(kRangePer), kThreads, 0, s>>>(mc, range);
    Histogram<MissCut><<<cutGrid(kHistPer), kThreads, 0, s>>>(mc, range, hist);
    FindBin<MissCut><<<unsigned(H), kFindThreads, 0, s>>>(mc, hist, cuts);
    CollectBin<MissCut><<<cutGrid(kScanPer), kThreads, 0, s>>>(mc, range, cuts, buf, bufW);
    ResolveCut<MissCut><<<unsigned(H), kResolveThreads, ResolveSmem<MissCut>(), s>>>(mc, range, cuts, buf, bufW, true);
    TakeWeights<MissCut, int32_t><<<cutGrid(kScanPer), kThreads, 0, s>>>(mc, range, cuts, adm, 0, tiles, cmax);
    if (p.tmax > 0) CapAdmit<<<grid(cmax), kThreads, 0, s>>>(c, k);
  }
};

}  // namespace
}  // namespace cuda
}  // namespace kvr
