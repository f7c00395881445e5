// ResolveCut: one CTA per kv head finds the exact cut among the keys of the
// cut's bin (wave_select.cuh's chain, or wave_cut_fold.cuh's fold, which
// also has it find the bin and write the bin's elements' shares).
#pragma once

#include "cuda/wave_cut_fold.cuh"

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

__device__ __forceinline__ void AtomicAddTo(int64_t* at, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(at), static_cast<unsigned long long>(v));
}
__device__ __forceinline__ void AtomicAddTo(int32_t* at, int32_t v) { atomicAdd(at, v); }

// One CTA per kv head: the exact cut among the gathered keys, digit by digit
// below the bin's bits (keys are unique: it ends at one element, often
// early, when a digit holds a single key). kFold: the bin found here
// (FindBinWarp), the elements gathered counted in f.binN, and at the end
// each of them given its share in f.take and added to its tile's sum; the
// cut state written whatever the bin (FindBin's where it is kNone or kAll).
template <typename S, typename T = int64_t, bool kFold = false>
__global__ void __launch_bounds__(kResolveThreads) ResolveCut(S s, const uint32_t* range, CutState* cuts, const uint64_t* buf,
                                                              const int64_t* bufW, bool stage /* false: none held (ResolveSmem not given) */,
                                                              FoldOut<T> f) {
  AfterPrior();
  extern __shared__ __align__(16) unsigned long long held[];  // [ResolveHeld] keys, then (weighted) [ResolveHeld] weights
  __shared__ unsigned long long histW[256];
  __shared__ unsigned int histN[256];
  __shared__ uint64_t prefix;
  __shared__ int64_t wBefore, cBefore, wCut;
  __shared__ int low, single;
  const int h = blockIdx.x;
  CutState& c = cuts[h];
  const int64_t b = s.Begin(h), target = s.Target(h), cap = s.Cap(h);
  int32_t bin;
  int64_t n, w0, c0;
  if constexpr (kFold) {
    __shared__ BinAt found;
    if (threadIdx.x < 32) {
      const BinAt at = FindBinWarp(f.coarse + size_t(h) * kCoarse * 2, f.hist + size_t(h) * kBins * 2, target, cap);
      if (threadIdx.x == 0) found = at;
    }
    __syncthreads();
    bin = found.bin;
    if (bin < 0) {  // nothing taken or everything: CollectTake gave every share
      if (threadIdx.x == 0) c = bin == kNone ? CutState{0, 0, 0, 0, 0, kAll, 0} : CutState{found.w, found.n, ~0ull, 0, found.w, kAll, 0};
      return;
    }
    n = f.binN[h], w0 = found.w, c0 = found.n;
  } else {
    if (c.bin == kAll || target <= 0 || cap <= 0) return;
    bin = c.bin, n = c.n, w0 = c.wBefore, c0 = c.cBefore;
  }
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
    prefix = uint64_t(uint32_t(bin)) << top0;
    wBefore = w0;
    cBefore = c0;
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
    c.bin = bin;
    c.n = int32_t(n);
  }
  if constexpr (kFold) {  // the bin's elements' shares, as TakeWeights gives them
    const uint64_t cut = cutKey;
    const int64_t takeCut = min(target, wBefore + wCut) - wBefore;
    T* const tiles = f.tiles + size_t(h) * size_t(Tiles(f.cap));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const uint64_t key = keyAt(j);
      const int64_t place = s.PlaceOf(key, S::kUnit ? bufW[b + j] : 0);
      const T v = key < cut ? T(weightAt(j)) : key == cut ? T(takeCut) : T(0);
      f.take[b + place] = v;
      if (v) AtomicAddTo(tiles + place / kThreads, v);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
