// The wave step's two cuts without sorting: which clusters are probed (ranked
// by score, taken until their tokens reach the candidate target or the
// cluster cap) and which candidates are kept (the best `keep` by their own
// score). Both used to be full CUB radix sorts (8 heads x 65K-131K clusters,
// then 8 x 168K candidates: a third of the step at 1M) though only the cut
// matters: what falls before it is attended or estimated as a set.
//
// Every element has a unique 64-bit key, (rank order - the head's lowest
// << 32) | index: the score's order (ascending = better) and, for equal
// scores, the lower cluster index or token id first, the order the host's
// stable sort gives. Per kv head the cut is the first element, in key order,
// where the summed weight (a cluster's tokens; 1 per candidate) reaches the
// target or the count reaches the cap. It is found as a radix select: the
// orders' range (OrderRange), a histogram of 4096 bins spanning it, in
// shared memory (Histogram: scores crowd a few bins, and global atomics on
// them serialize), the bin the cut falls in (FindBin), that bin's elements
// gathered (CollectBin), and the rest of their key resolved by 8-bit digits
// in one CTA (ResolveCut), usually in one or two. Then each element takes
// its whole weight before the cut, the cut element the remainder up to the
// target, nothing after (TakeWeights); a scan of those places the taken
// elements, in index order, so the result does not depend on the order
// atomics ran in. The scan is per head, in the kernels that already run:
// TakeWeights sums each tile of kThreads elements, and the kernel placing
// the tile's elements adds the tiles before it to a block scan of its own
// (PlaceInHead; CUB's device scan was two more launches a cut, ~19 us of the
// step on an H100 for integer sums any order gives alike).
#pragma once

#include "cuda/wave_step_kernels.cuh"

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kBinBits = 12;
constexpr int kBins = 1 << kBinBits;
constexpr uint32_t kExcluded = 0xffffffffu;  // an order no score has (a NaN's): never taken
constexpr int kFindThreads = 1024, kBinsPerThread = kBins / kFindThreads;
// ResolveCut's CTA: the cut's bin can hold thousands of keys and each digit's
// pass reads them all; 1024 threads took the two cuts' share of the step from
// 0.203 to 0.161 ms on an H100 (bench/results/wave-gpu-h100-cs16-resolve*.md).
constexpr int kResolveThreads = 1024;
// The bin's first keys (and weights) ResolveCut holds in shared memory, so
// that its digit passes after the first, and the last match, read them there
// rather than from L2 one round trip a key a thread after another: the
// candidates' bin held ~8000 keys at 1M (ncu: ResolveCut<CandidateCut> 50 us
// on 256 threads). 96 KiB: 12288 keys, or 6144 keys and their weights for
// the clusters' cut; keys past them are read from buf as before.
template <typename S>
__host__ __device__ constexpr int64_t ResolveHeld() { return S::kUnit ? 12288 : 6144; }
template <typename S>
constexpr size_t ResolveSmem() { return size_t(ResolveHeld<S>()) * (S::kUnit ? 8 : 16); }
// Elements a thread at most in the cuts' streaming kernels (their grids,
// wave_step.cu): OrderRange's warps each end in two atomics on the head's two
// words, so fewer of them; Histogram's CTAs each clear and flush 32 KiB of
// bins, so a few elements each; CollectBin and TakeWeights two (a load, a
// compare, a store: more CTAs hide the chain).
constexpr int kRangePer = 8, kHistPer = 4, kScanPer = 2;

// Per kv head: the cut of one selection.
struct CutState {
  int64_t wBefore, cBefore;  // weight and count of the elements before the cut's bin, then before the cut
  uint64_t cut;              // the cut element's key
  int64_t take;              // weight the cut element gives (the rest of the target, or all of it)
  int64_t total;             // weight taken in all
  int32_t bin;               // the cut's bin; kAll: none to resolve (cut ~0: every element taken; cut 0: none)
  int32_t n;                 // elements gathered from the bin
};
constexpr int32_t kAll = -1;

// range[h]: {lowest order, ~highest order} of head h's elements (both kept
// by atomicMin: memset to 0xff before OrderRange). A bin is (order - lowest) >> shift.
struct OrderSpan {
  uint32_t low;
  int shift;
  bool empty;
};
__device__ __forceinline__ OrderSpan SpanOf(const uint32_t* range, int h) {
  const uint32_t lo = range[h * 2], hi = ~range[h * 2 + 1];
  if (lo > hi) return {0, 0, true};
  const uint32_t span = hi - lo;
  return {lo, span == 0 ? 0 : max(0, 32 - __clz(span) - kBinBits), false};
}

// Elements of head h: the clusters (index = cluster, weight = its tokens,
// target and cap from the step's parameters) ...
struct ClusterCut {
  static constexpr bool kUnit = false;  // weights vary (ResolveCut keeps them)
  const uint32_t* ord;
  const int64_t* base;
  const int32_t* counts;
  const int64_t* params;
  __device__ int64_t Begin(int h) const { return base[h]; }
  __device__ int64_t Len(int h) const { return base[h + 1] - base[h]; }
  __device__ uint32_t Index(int h, int64_t i) const { return uint32_t(i - base[h]); }
  __device__ int64_t Weight(int64_t i) const { return counts[i]; }
  __device__ int64_t Target(int h) const { return params[h * kParams + 1]; }
  __device__ int64_t Cap(int h) const { return params[h * kParams + 2]; }
  __device__ int IndexBits(int h) const { return Len(h) > 1 ? 32 - __clz(uint32_t(Len(h) - 1)) : 0; }
};
// ... or the candidates (index = token id, weight 1, the best `keep`).
struct CandidateCut {
  static constexpr bool kUnit = true;  // every weight 1: the count is the weight
  const uint32_t* ord;
  const int32_t* cand;
  const int64_t* sel;
  const int64_t* params;
  int64_t tmax;
  int64_t tokens;  // token ids are below it
  __device__ int64_t Begin(int h) const { return int64_t(h) * tmax; }
  __device__ int64_t Len(int h) const { return sel[h * 2 + 1]; }
  __device__ uint32_t Index(int, int64_t i) const { return uint32_t(cand[i]); }
  __device__ int64_t Weight(int64_t) const { return 1; }
  __device__ int64_t Target(int h) const { return params[h * kParams + 3]; }
  __device__ int64_t Cap(int h) const { return params[h * kParams + 3]; }
  __device__ int IndexBits(int) const { return tokens > 1 ? 32 - __clz(uint32_t(tokens - 1)) : 0; }
};

template <typename S>
__device__ __forceinline__ uint64_t KeyOf(const S& s, uint32_t low, int h, int64_t i) {
  return (uint64_t(s.ord[i] - low) << 32) | s.Index(h, i);
}

template <typename S>
__global__ void OrderRange(S s, uint32_t* range) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t b = s.Begin(h), n = s.Len(h);
  uint32_t lo = kExcluded, notHi = kExcluded;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t o = s.ord[b + j];
    if (o == kExcluded) continue;
    lo = min(lo, o);
    notHi = min(notHi, ~o);
  }
  lo = __reduce_min_sync(0xffffffffu, lo);
  notHi = __reduce_min_sync(0xffffffffu, notHi);
  if ((threadIdx.x & 31) == 0 && lo != kExcluded) {
    atomicMin(range + h * 2, lo);
    atomicMin(range + h * 2 + 1, notHi);
  }
}

// hist [kvHeads, kBins, 2]: weight and count per bin, summed in shared
// memory and added to the global bins they touched.
template <typename S>
__global__ void Histogram(S s, const uint32_t* range, uint32_t* hist) {
  AfterPrior();
  __shared__ uint32_t local[kBins * 2];
  const int h = blockIdx.y;
  const OrderSpan sp = SpanOf(range, h);
  if (sp.empty) return;
  for (int k = threadIdx.x; k < kBins * 2; k += blockDim.x) local[k] = 0;
  __syncthreads();
  const int64_t b = s.Begin(h), n = s.Len(h);
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t o = s.ord[b + j];
    if (o == kExcluded) continue;
    const uint32_t bin = (o - sp.low) >> sp.shift;
    atomicAdd(local + bin * 2, uint32_t(s.Weight(b + j)));
    atomicAdd(local + bin * 2 + 1, 1u);
  }
  __syncthreads();
  uint32_t* hh = hist + size_t(h) * kBins * 2;
  for (int k = threadIdx.x; k < kBins; k += blockDim.x)
    if (local[k * 2 + 1]) {
      atomicAdd(hh + k * 2, local[k * 2]);
      atomicAdd(hh + k * 2 + 1, local[k * 2 + 1]);
    }
}

// One CTA per kv head: the first bin where the weight reaches the target or
// the count the cap, and what the bins before it hold.
template <typename S>
__global__ void __launch_bounds__(kFindThreads) FindBin(S s, const uint32_t* hist, CutState* cuts) {
  AfterPrior();
  using Scan = cub::BlockScan<longlong2, kFindThreads, cub::BLOCK_SCAN_WARP_SCANS>;  // raking spilled ~1 KB a thread
  __shared__ typename Scan::TempStorage scanTemp;
  __shared__ int found;
  const int h = blockIdx.x;
  const uint32_t* hh = hist + size_t(h) * kBins * 2;
  const int64_t target = s.Target(h), cap = s.Cap(h);
  CutState& c = cuts[h];
  if (target <= 0 || cap <= 0) {  // nothing is taken: no key is below 0, and the cut takes 0
    if (threadIdx.x == 0) c = CutState{0, 0, 0, 0, 0, kAll, 0};  // and no key is below cut 0
    return;
  }
  if (threadIdx.x == 0) found = kBins;
  const int first = threadIdx.x * kBinsPerThread;
  longlong2 mine = make_longlong2(0, 0);
  for (int k = 0; k < kBinsPerThread; ++k) {
    mine.x += hh[(first + k) * 2];
    mine.y += hh[(first + k) * 2 + 1];
  }
  longlong2 before;
  Scan(scanTemp).ExclusiveScan(mine, before, make_longlong2(0, 0),
                               [](const longlong2& a, const longlong2& b) { return make_longlong2(a.x + b.x, a.y + b.y); });
  __syncthreads();
  int64_t w = before.x, n = before.y;
  int at = kBins;
  for (int k = 0; k < kBinsPerThread; ++k) {
    const int64_t bw = hh[(first + k) * 2], bn = hh[(first + k) * 2 + 1];
    if (bn > 0 && (w + bw >= target || n + bn >= cap)) {
      at = first + k;
      break;
    }
    w += bw;
    n += bn;
  }
  if (at < kBins) atomicMin(&found, at);
  __syncthreads();
  if (found == kBins) {  // never reached: every element is taken
    if (threadIdx.x == kFindThreads - 1) c = CutState{w, n, ~0ull, 0, w, kAll, 0};
  } else if (at == found) {
    c = CutState{w, n, 0, 0, 0, at, 0};
  }
}

// FindBin's work done by the last of Histogram's CTAs to finish a head
// (HistogramFind): kT threads, kBins / kT bins each, the bins read from L2.
// The bin found and the sums before it are integer sums in bin order,
// whatever the thread count: FindBin's cut state.
template <typename S, int kT>
__device__ __forceinline__ void FindIn(S s, const uint32_t* hh, CutState& c, int h) {
  using Scan = cub::BlockScan<longlong2, kT, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scanTemp;
  __shared__ int found;
  constexpr int kPer = kBins / kT;
  const int64_t target = s.Target(h), cap = s.Cap(h);
  if (target <= 0 || cap <= 0) {  // as FindBin
    if (threadIdx.x == 0) c = CutState{0, 0, 0, 0, 0, kAll, 0};
    return;
  }
  if (threadIdx.x == 0) found = kBins;
  const int first = threadIdx.x * kPer;
  longlong2 mine = make_longlong2(0, 0);
  for (int k = 0; k < kPer; ++k) {
    mine.x += __ldcg(hh + (first + k) * 2);
    mine.y += __ldcg(hh + (first + k) * 2 + 1);
  }
  longlong2 before;
  Scan(scanTemp).ExclusiveScan(mine, before, make_longlong2(0, 0),
                               [](const longlong2& a, const longlong2& b) { return make_longlong2(a.x + b.x, a.y + b.y); });
  __syncthreads();
  int64_t w = before.x, n = before.y;
  int at = kBins;
  for (int k = 0; k < kPer; ++k) {
    const int64_t bw = __ldcg(hh + (first + k) * 2), bn = __ldcg(hh + (first + k) * 2 + 1);
    if (bn > 0 && (w + bw >= target || n + bn >= cap)) {
      at = first + k;
      break;
    }
    w += bw;
    n += bn;
  }
  if (at < kBins) atomicMin(&found, at);
  __syncthreads();
  if (found == kBins) {  // never reached: every element is taken; the last thread's sums are the totals
    if (threadIdx.x == kT - 1) c = CutState{w, n, ~0ull, 0, w, kAll, 0};
  } else if (at == found) {
    c = CutState{w, n, 0, 0, 0, at, 0};
  }
}

// Histogram, then FindBin in the head's last CTA to finish (one launch
// instead of two; done[h], cleared by StepClear, counts the CTAs through).
// Each CTA's bin atomics are fenced before it counts itself, so the last
// sees every CTA's bins. A head with an empty range counts no elements but
// its CTAs still count themselves: its last finds the bin in zero bins, as
// FindBin did.
template <typename S>
__global__ void __launch_bounds__(kThreads, 6) HistogramFind(S s, const uint32_t* range, uint32_t* hist, uint32_t* done, CutState* cuts) {
  AfterPrior();
  __shared__ uint32_t local[kBins * 2];
  __shared__ bool last;
  const int h = blockIdx.y;
  const OrderSpan sp = SpanOf(range, h);
  uint32_t* hh = hist + size_t(h) * kBins * 2;
  if (!sp.empty) {  // Histogram's body
    for (int k = threadIdx.x; k < kBins * 2; k += blockDim.x) local[k] = 0;
    __syncthreads();
    const int64_t b = s.Begin(h), n = s.Len(h);
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
      const uint32_t o = s.ord[b + j];
      if (o == kExcluded) continue;
      const uint32_t bin = (o - sp.low) >> sp.shift;
      atomicAdd(local + bin * 2, uint32_t(s.Weight(b + j)));
      atomicAdd(local + bin * 2 + 1, 1u);
    }
    __syncthreads();
    for (int k = threadIdx.x; k < kBins; k += blockDim.x)
      if (local[k * 2 + 1]) {
        atomicAdd(hh + k * 2, local[k * 2]);
        atomicAdd(hh + k * 2 + 1, local[k * 2 + 1]);
      }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done + h, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  FindIn<S, kThreads>(s, hh, cuts[h], h);
}

// Gathers the keys of the elements in the cut's bin into buf (head h at
// Begin(h)), with their weights.
template <typename S>
__global__ void CollectBin(S s, const uint32_t* range, CutState* cuts, uint64_t* buf, int64_t* bufW) {
  AfterPrior();
  const int h = blockIdx.y;
  const int32_t bin = cuts[h].bin;
  if (bin == kAll || s.Target(h) <= 0 || s.Cap(h) <= 0) return;
  const OrderSpan sp = SpanOf(range, h);
  const int64_t b = s.Begin(h), n = s.Len(h);
  const int lane = threadIdx.x & 31;
  for (int64_t j0 = int64_t(blockIdx.x) * blockDim.x; j0 < n; j0 += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const bool in = j < n && s.ord[b + j] != kExcluded && int32_t((s.ord[b + j] - sp.low) >> sp.shift) == bin;
    const unsigned mask = __ballot_sync(0xffffffffu, in);
    if (!mask) continue;
    int at = 0;
    if (lane == __ffs(mask) - 1) at = atomicAdd(&cuts[h].n, __popc(mask));
    at = __shfl_sync(0xffffffffu, at, __ffs(mask) - 1) + __popc(mask & ((1u << lane) - 1));
    if (in) {
      buf[b + at] = KeyOf(s, sp.low, h, b + j);
      bufW[b + at] = s.Weight(b + j);
    }
  }
}

// One CTA per kv head: the exact cut among the gathered keys, digit by digit
// below the bin's bits (keys are unique: it ends at one element, often
// early, when a digit holds a single key).
template <typename S>
__global__ void __launch_bounds__(kResolveThreads) ResolveCut(S s, const uint32_t* range, CutState* cuts, const uint64_t* buf,
                                                              const int64_t* bufW, bool stage /* false: none held (ResolveSmem not given) */) {
  AfterPrior();
  extern __shared__ __align__(16) unsigned long long held[];  // [ResolveHeld] keys, then (weighted) [ResolveHeld] weights
  __shared__ unsigned long long histW[256];
  __shared__ unsigned int histN[256];
  __shared__ uint64_t prefix;
  __shared__ int64_t wBefore, cBefore, wCut;
  __shared__ int low, single;
  const int h = blockIdx.x;
  CutState& c = cuts[h];
  if (c.bin == kAll || s.Target(h) <= 0 || s.Cap(h) <= 0) return;
  const int64_t b = s.Begin(h), n = c.n, target = s.Target(h), cap = s.Cap(h);
  const int top0 = 32 + SpanOf(range, h).shift;  // bits below the bin's
  const int indexBits = s.IndexBits(h);
  constexpr int64_t kHeld = ResolveHeld<S>();
  const int64_t nHeld = stage ? min(n, kHeld) : 0;
  for (int64_t j = threadIdx.x; j < nHeld; j += blockDim.x) {
    held[j] = buf[b + j];
    if (!S::kUnit) held[kHeld + j] = (unsigned long long)bufW[b + j];
  }
  const auto keyAt = [&](int64_t j) -> uint64_t { return j < nHeld ? uint64_t(held[j]) : buf[b + j]; };
  const auto weightAt = [&](int64_t j) -> int64_t {
    return S::kUnit ? 1 : j < nHeld ? int64_t(held[kHeld + j]) : bufW[b + j];
  };
  // A digit's weight (unit weights: its count; histW is then not kept).
  const auto binW = [&](int k) -> int64_t { return S::kUnit ? int64_t(histN[k]) : int64_t(histW[k]); };
  if (threadIdx.x == 0) {
    prefix = uint64_t(uint32_t(c.bin)) << top0;
    wBefore = c.wBefore;
    cBefore = c.cBefore;
    low = top0;
    single = 0;
    wCut = 0;
  }
  __syncthreads();
  while (low > 0 && !single) {
    const int top = low, shift = max(0, top - 8), digits = 1 << (top - shift);
    for (int k = threadIdx.x; k < 256; k += blockDim.x) histW[k] = 0, histN[k] = 0;
    __syncthreads();
    const uint64_t known = prefix, high = ~0ull << top;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const uint64_t key = keyAt(j);
      if ((key & high) != known) continue;
      const int digit = int((key >> shift) & uint64_t(digits - 1));
      if (!S::kUnit) atomicAdd(&histW[digit], (unsigned long long)weightAt(j));
      atomicAdd(&histN[digit], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // the first digit where the target or the cap is reached: a warp, 8 digits a lane
      const int lane = threadIdx.x, d0 = lane * 8;
      int64_t lw = 0, ln = 0;
      for (int k = d0; k < d0 + 8; ++k) lw += binW(k), ln += histN[k];
      int64_t ew = lw, en = ln;  // inclusive scans over the lanes, then exclusive
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t yw = __shfl_up_sync(0xffffffffu, ew, o), yn = __shfl_up_sync(0xffffffffu, en, o);
        if (lane >= o) ew += yw, en += yn;
      }
      int64_t w = wBefore + ew - lw, m = cBefore + en - ln;
      int at = 256;
      for (int k = d0; k < d0 + 8; ++k) {
        if (histN[k] > 0 && (w + binW(k) >= target || m + int64_t(histN[k]) >= cap)) {
          at = k;
          break;
        }
        w += binW(k);
        m += histN[k];
      }
      const unsigned hit = __ballot_sync(0xffffffffu, at < 256);
      if (!hit && lane == 0) single = 1;  // cannot happen (FindBin's bin holds the cut); never loop on it
      if (hit && lane == __ffs(hit) - 1) {
        prefix = known | (uint64_t(at) << shift);
        wBefore = w;
        cBefore = m;
        // Index bits above the largest index are 0 in every key: skip them
        // (all keys tied on their order would otherwise crowd one digit).
        low = shift <= 32 && shift > indexBits ? indexBits : shift;
        single = histN[at] == 1;
      }
    }
    __syncthreads();
  }
  // The cut's key: found whole, or the one key under the prefix.
  __shared__ uint64_t cutKey;
  const uint64_t want = prefix, mask = ~0ull << low;
  if (threadIdx.x == 0) cutKey = want;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if ((keyAt(j) & mask) == want) {  // one key matches
      cutKey = keyAt(j);
      wCut = weightAt(j);
    }
  __syncthreads();
  if (threadIdx.x == 0) {
    c.cut = cutKey;
    c.wBefore = wBefore;
    c.cBefore = cBefore;
    c.total = min(target, wBefore + wCut);
    c.take = c.total - wBefore;
  }
}

// What element i of head h takes: all of its weight before the cut, the
// cut's share at it, nothing after.
template <typename S>
__device__ __forceinline__ int64_t Taken(const S& s, uint32_t low, const CutState& c, int h, int64_t i) {
  if (s.ord[i] == kExcluded) return 0;
  const uint64_t key = KeyOf(s, low, h, i);
  return key < c.cut ? s.Weight(i) : key == c.cut ? c.take : 0;
}

// Tiles of kThreads elements in n (a head's row of tile sums).
__host__ __device__ constexpr int64_t Tiles(int64_t n) { return (n + kThreads - 1) / kThreads; }

// take[Begin(h) + j]: element j's share; blockIdx.y: the kv head.
// span: the positions written from Begin(h), zeros past Len(h) (the
// candidates: tmax); 0: Len(h) (the clusters, whose heads abut). Each tile
// of kThreads shares (a CTA's, one after another) summed into
// tiles[h * Tiles(cap) + tile], cap: the longest a head's span is.
template <typename S, typename T>
__global__ void TakeWeights(S s, const uint32_t* range, const CutState* cuts, T* take, int64_t span, T* tiles, int64_t cap) {
  AfterPrior();
  __shared__ T scratch[32];
  const int h = blockIdx.y;
  const uint32_t low = SpanOf(range, h).low;
  const int64_t b = s.Begin(h), n = s.Len(h), end = span > 0 ? span : n;
  for (int64_t t = blockIdx.x; t * blockDim.x < end; t += gridDim.x) {  // uniform over the CTA: its reduction
    const int64_t j = t * blockDim.x + threadIdx.x;
    T w = 0;
    if (j < end) take[b + j] = w = j < n ? T(Taken(s, low, cuts[h], h, b + j)) : T(0);
    w = BlockReduce(w, Add(), scratch);
    if (threadIdx.x == 0) tiles[size_t(h) * size_t(Tiles(cap)) + t] = w;
  }
}

// Element v's place among its head's (tile blockIdx.x, of kThreads, whose
// head's tile sums start at tiles): the tiles before it summed, plus the
// exclusive scan of v over the block. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ T PlaceInHead(T v, const T* tiles) {
  using Scan = cub::BlockScan<T, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ T scratch[32];
  T before = 0;
  for (unsigned u = threadIdx.x; u < blockIdx.x; u += blockDim.x) before += tiles[u];
  before = BlockReduce(before, Add(), scratch);
  T at;
  Scan(scan).ExclusiveSum(v, at);
  return before + at;
}

// Members of the clusters taken (cnt: how many of each, the cut's first
// ones), in cluster order, into cand[h, 0 .. m); m into sel; cum: each
// cluster's inclusive scan of cnt within its head (PartialLogitsFromDots
// finds a cluster's candidates at cum - cnt). tiles: TakeWeights' sums.
__global__ void GatherCandidates(StepParams p, const CutState* cuts, const int64_t* tiles) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t b = p.base[h], len = p.base[h + 1] - b, r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r == 0) p.sel[h * 2 + 1] = cuts[h].total;
  if (int64_t(blockIdx.x) * blockDim.x >= len) return;  // uniform: the whole tile past the head's clusters
  const int64_t i = b + r, take = r < len ? p.cnt[i] : 0;
  const int32_t start = r < len ? p.memberStart[i] : 0;  // loaded beside cnt, not after the block scan's barriers
  const int64_t at = PlaceInHead<int64_t>(take, tiles + size_t(h) * size_t(Tiles(p.cmax)));
  if (r < len) p.cum[i] = at + take;
  if (take == 0) return;
  int32_t* dst = p.cand + size_t(h) * p.tmax + at;
  // kCopyBatch loads in flight before their stores: one at a time, each a
  // round trip (the compiler cannot move a load of the list past a store to dst).
  constexpr int kCopyBatch = 8;
  for (int64_t k0 = 0; k0 < take; k0 += kCopyBatch) {
    int32_t v[kCopyBatch];
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) v[u] = k0 + u < take ? MemberToken(p.maps, p.N, h, start + k0 + u) : 0;
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u)
      if (k0 + u < take) dst[k0 + u] = v[u];
  }
}

// The step's clears in one launch (the old path's six memsets, each a graph
// node): both cuts' histograms (the candidates' cut has its own, the second
// half of hist, so it needs no clear between the cuts), their order ranges
// (all ones: OrderRange takes minima), sel, keptN and touchedN. Each is
// written or read in the step only after where its memset was.
__global__ void StepClear(StepParams p, uint32_t* range, uint32_t* hist, int H) {
  AfterPrior();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < int64_t(H) * kBins) reinterpret_cast<uint4*>(hist)[i] = make_uint4(0, 0, 0, 0);  // 2 x [H, kBins, 2] words
  if (i < 4 * H) range[i] = 0xffffffffu;
  if (i < 2 * H) range[4 * H + i] = 0;  // HistogramFind's counters, [2, H] after the ranges
  if (i < 2 * H) p.sel[i] = 0, p.touchedN[i] = 0;
  if (i < H) p.keptN[i] = 0;
}

// The kept candidates' ids, in candidate order, into keptIds[h, 0 .. keptN[h]),
// with dotsOn their candidate positions into keptPos (where their dots are).
__global__ void ScatterKept(StepParams p, const CutState* cuts) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j == 0) p.keptN[h] = cuts[h].total;
  if (int64_t(blockIdx.x) * blockDim.x >= p.tmax) return;  // uniform: the whole tile past tmax
  const size_t i = size_t(h) * p.tmax + j;
  const int32_t take = j < p.tmax ? p.take2[i] : 0;
  const int64_t at = PlaceInHead<int32_t>(take, p.cum2 + size_t(h) * size_t(Tiles(p.tmax)));
  if (!take) return;
  p.keptIds[size_t(h) * p.width + at] = p.cand[i];
  if (p.dotsOn) p.keptPos[size_t(h) * p.width + at] = int32_t(j);
}

// The kept ids into outIds, -1 after them, and the counts.
__global__ void PackIds(StepParams p) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, kept = Kept(p, h);
  if (i < p.width) p.outIds[size_t(h) * p.width + i] = i < kept ? p.keptIds[size_t(h) * p.width + i] : -1;
  if (i == 0) {
    p.outCounts[h * 2] = kept;
    p.outCounts[h * 2 + 1] = p.sel[h * 2 + 1];
  }
}

// ScatterKept and PackIds in one launch (a grid over the largest of tmax,
// width and, with packOwners, exactCount): each kept id also goes to outIds
// at its place, the places from the kept count to width get -1, and the
// counts are written, as PackIds wrote them from keptIds and keptN
// afterwards. The scan places the kept ids at 0 .. total - 1 (PackIds read
// exactly those), so the same outIds. With packOwners, each exact row
// position (kept ids, then the sinks/window rows) is offered to its row's
// owner here, as ExactRows<0> offers it: the same minima.
__global__ void ScatterPack(StepParams p, const CutState* cuts) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, kept = cuts[h].total;
  if (j == 0) {
    p.keptN[h] = kept;
    p.outCounts[h * 2] = kept;
    p.outCounts[h * 2 + 1] = p.sel[h * 2 + 1];
  }
  if (j >= kept && j < p.width) p.outIds[size_t(h) * p.width + j] = -1;
  int32_t* const owner = p.owner + size_t(h) * p.N;
  // packOwners: the sinks/window row at position kept + j (ExactRow's), as ExactRows<0> takes it.
  if (p.packOwners && j < ExactCount(p)) atomicMin(owner + p.exact[j], int32_t(kept + j));
  if (int64_t(blockIdx.x) * blockDim.x >= p.tmax) return;  // uniform: the whole tile past tmax
  const size_t i = size_t(h) * p.tmax + j;
  const int32_t take = j < p.tmax ? p.take2[i] : 0;
  const int64_t at = PlaceInHead<int32_t>(take, p.cum2 + size_t(h) * size_t(Tiles(p.tmax)));
  if (!take) return;
  p.keptIds[size_t(h) * p.width + at] = p.cand[i];
  p.outIds[size_t(h) * p.width + at] = p.cand[i];
  if (p.dotsOn) p.keptPos[size_t(h) * p.width + at] = int32_t(j);
  if (p.packOwners) atomicMin(owner + p.cand[i], int32_t(at));  // the kept row at position at
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
