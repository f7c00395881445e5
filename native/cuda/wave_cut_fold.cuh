// A cut in four launches instead of six (KVRECALL_WAVE_FOLD, on by
// default): FindBin and TakeWeights folded into the kernels beside them.
// Each was a launch of its own on the step's critical path, a few
// microseconds of work behind a launch's fill and drain, and TakeWeights
// read every element a second time to learn what CollectBin had just seen.
//
//   Histogram (with coarse bins) -> CollectTake -> ResolveCut<fold> -> place
//
// - The cut's bin: Histogram also sums its bins 64 at a time, so any warp
//   finds the bin in two reads of 64 bins (FindBinWarp) instead of a CTA's
//   scan of 4096. CollectTake's CTAs and ResolveCut each find it themselves.
// - What each element takes: an element outside the cut's bin takes its
//   whole weight (bin before the cut's) or nothing (after), known without
//   the resolved key, so CollectTake writes it, and sums each tile of
//   kThreads elements as TakeWeights did, while it gathers the bin's
//   elements (with what places them: wave_select.cuh's Carry). ResolveCut
//   then writes the bin's elements' shares and adds them to their tiles.
//
// The same cut, the same shares and the same tile sums (integer sums, any
// order gives alike) as the chain's, so the same ids and answers bit for
// bit: bench/wave-gpu-ab.ts --old KVRECALL_WAVE_FOLD=0 checks that.
#pragma once

#include "cuda/wave_select.cuh"

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int32_t kNone = -2;  // a cut that takes nothing (target or cap <= 0); kAll: one that takes everything

// The cut's bin as FindBin finds it: bin kNone, kAll (w, n: the totals) or
// the first bin where the weight reaches the target or the count the cap,
// with the weight and count before it. The first bin whose inclusive sums
// pass is FindBin's first nonempty one that does: the sums pass first where
// they grow, and an empty bin's are its nonempty predecessor's. Called by a
// whole warp; every lane gets the answer.
struct BinAt {
  int32_t bin;
  int64_t w, n;
};
__device__ __forceinline__ BinAt FindBinWarp(const uint32_t* coarse /* the head's [kCoarse, 2] */,
                                             const uint32_t* fine /* the head's [kBins, 2] */, int64_t target, int64_t cap) {
  static_assert(kCoarse == 64 && (1 << kFineBits) == 64, "two bins a lane at each level");
  if (target <= 0 || cap <= 0) return {kNone, 0, 0};
  const int lane = threadIdx.x & 31;
  int64_t w0 = 0, n0 = 0;
  int at = 0;
  // One level: 64 bins, bins 2·lane and 2·lane + 1 in lane; false (and the
  // totals in w0, n0) when no bin passes.
  const auto level = [&](const uint32_t* bins) -> bool {
    const uint4 v = __ldcg(reinterpret_cast<const uint4*>(bins) + lane);  // {w, n} of both bins
    const int64_t lw = int64_t(v.x) + v.z, ln = int64_t(v.y) + v.w;
    int64_t ew = lw, en = ln;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t yw = __shfl_up_sync(0xffffffffu, ew, o), yn = __shfl_up_sync(0xffffffffu, en, o);
      if (lane >= o) ew += yw, en += yn;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, w0 + ew >= target || n0 + en >= cap);
    if (!hit) {
      w0 += __shfl_sync(0xffffffffu, ew, 31);
      n0 += __shfl_sync(0xffffffffu, en, 31);
      return false;
    }
    const int first = __ffs(hit) - 1;
    const int64_t bw = w0 + ew - lw, bn = n0 + en - ln;  // before this lane's bins
    const bool second = !(bw + v.x >= target || bn + v.y >= cap);
    const int mine = 2 * lane + (second ? 1 : 0);
    const int64_t sw = second ? bw + v.x : bw, sn = second ? bn + v.y : bn;
    at = __shfl_sync(0xffffffffu, mine, first);
    w0 = __shfl_sync(0xffffffffu, sw, first);
    n0 = __shfl_sync(0xffffffffu, sn, first);
    return true;
  };
  if (!level(coarse)) return {kAll, w0, n0};
  const int c = at;  // at, w0 and n0 are every lane's
  level(fine + size_t(c) * 64 * 2);  // passes: its coarse bin did
  return {int32_t(c * 64 + at), w0, n0};
}

// TakeWeights' shares and tile sums for the elements outside the cut's bin
// and CollectBin's gathering of those inside it (keys into buf, Carry into
// bufW, binN[h] counting them), in one pass. Grid and arguments as
// TakeWeights' (span, tiles, cap); the bin's elements' shares are left to
// ResolveCut<fold>.
template <typename S, typename T>
__global__ void CollectTake(S s, const uint32_t* range, const uint32_t* hist, const uint32_t* coarse, uint32_t* binN, uint64_t* buf,
                            int64_t* bufW, T* take, int64_t span, T* tiles, int64_t cap) {
  AfterPrior();
  __shared__ T scratch[32];
  __shared__ int32_t sBin;
  const int h = blockIdx.y;
  const OrderSpan sp = SpanOf(range, h);
  const int64_t b = s.Begin(h), n = s.Len(h), end = span > 0 ? span : n;
  const int lane = threadIdx.x & 31;
  // The first tile's order in flight while warp 0 finds the bin.
  const int64_t j0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t o = j0 < n ? s.ord[b + j0] : kExcluded;
  if (threadIdx.x < 32) {
    const BinAt f = FindBinWarp(coarse + size_t(h) * kCoarse * 2, hist + size_t(h) * kBins * 2, s.Target(h), s.Cap(h));
    if (lane == 0) sBin = f.bin;
  }
  __syncthreads();
  const int32_t bin = sBin;
  for (int64_t t = blockIdx.x; t * blockDim.x < end; t += gridDim.x) {  // uniform over the CTA: its reduction and ballots
    const int64_t j = t * blockDim.x + threadIdx.x;
    if (t != blockIdx.x) o = j < n ? s.ord[b + j] : kExcluded;
    const int32_t eb = o == kExcluded ? kNone : int32_t((o - sp.low) >> sp.shift);
    const bool in = bin >= 0 && eb == bin;
    const bool whole = o != kExcluded && (bin == kAll || (bin >= 0 && eb < bin));
    const T w = whole ? T(s.Weight(b + j)) : T(0);
    if (j < end && !in) take[b + j] = w;
    const unsigned mask = __ballot_sync(0xffffffffu, in);
    if (mask) {
      int place = 0;
      if (lane == __ffs(mask) - 1) place = int(atomicAdd(binN + h, uint32_t(__popc(mask))));
      place = __shfl_sync(0xffffffffu, place, __ffs(mask) - 1) + __popc(mask & ((1u << lane) - 1));
      if (in) {
        buf[b + place] = KeyOf(s, sp.low, h, b + j);
        bufW[b + place] = s.Carry(b + j, j);
      }
    }
    const T sum = BlockReduce(w, Add(), scratch);
    if (threadIdx.x == 0) tiles[size_t(h) * size_t(Tiles(cap)) + t] = sum;
  }
}

// What ResolveCut<fold> needs beyond the chain's: where to find the bin
// itself, and where the bin's elements' shares and tile sums go.
template <typename T>
struct FoldOut {
  const uint32_t* hist;
  const uint32_t* coarse;
  const uint32_t* binN;
  T* take;
  T* tiles;
  int64_t cap;  // TakeWeights' cap: a head's row of tile sums is Tiles(cap) long
};

}  // namespace
}  // namespace cuda
}  // namespace kvr
