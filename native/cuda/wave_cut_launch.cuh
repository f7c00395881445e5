// One cut's launches, from its histogram to every element's share and the
// tile sums the placing kernel scans (GatherCandidates, ScatterPack): the
// chain (Histogram, FindBin or HistogramFind, CollectBin, ResolveCut,
// TakeWeights: wave_select.cuh) or the fold (Histogram with coarse bins,
// CollectTake, ResolveCut<fold>: wave_cut_fold.cuh).
#pragma once

#include <cstdint>

#include "cuda/wave_cut_resolve.cuh"
#include "cuda/wave_paths.cuh"

namespace kvr {
namespace cuda {
namespace {

// Where a cut's scratch lives: hist [H, kBins, 2], coarse [H, kCoarse, 2]
// (cleared by StepClear), binN [H] (the fold's gathered counts, or
// HistogramFind's finished CTAs: StepClear zeroes both), cuts [H], the
// bin's keys and what CollectBin / CollectTake keep beside them.
struct CutScratch {
  uint32_t *range, *hist, *coarse, *binN;
  CutState* cuts;
  uint64_t* buf;
  int64_t* bufW;
};

// take[Begin(h) + j]: element j's share, written up to span (0: Len(h));
// tiles: each tile of kThreads shares summed, Tiles(cap) a head. grid(n,
// per): the streaming kernels' grid over n elements a head, per a thread.
// binned(): the bin is found (the stage mark between the two halves).
template <typename S, typename T, typename Grid, typename Mark>
void LaunchCut(StepLauncher& L, const StepPaths& P, const S& s, int H, const CutScratch& c, int64_t n, T* take, int64_t span, T* tiles,
               int64_t cap, Grid grid, Mark binned) {
  if (P.fold) {
    L(Histogram<S>, grid(n, P.histPer), kThreads, 0, s, c.range, c.hist, c.coarse);
    binned();
    L(CollectTake<S, T>, grid(n, P.collectPer), kThreads, 0, s, c.range, c.hist, c.coarse, c.binN, c.buf, c.bufW, take, span, tiles, cap);
    L(ResolveCut<S, T, true>, unsigned(H), kResolveThreads, ResolveSmem<S>(), s, c.range, c.cuts, c.buf, c.bufW, true,
      FoldOut<T>{c.hist, c.coarse, c.binN, take, tiles, cap});
    return;
  }
  if (P.find) {
    L(HistogramFind<S>, grid(n, P.histPer), kThreads, 0, s, c.range, c.hist, c.binN, c.cuts);
  } else {
    L(Histogram<S>, grid(n, P.histPer), kThreads, 0, s, c.range, c.hist, static_cast<uint32_t*>(nullptr));
    L(FindBin<S>, H, kFindThreads, 0, s, c.hist, c.cuts);
  }
  binned();
  L(CollectBin<S>, grid(n, kScanPer), kThreads, 0, s, c.range, c.cuts, c.buf, c.bufW);
  L(ResolveCut<S, int64_t, false>, unsigned(H), kResolveThreads, P.legacy ? 0 : ResolveSmem<S>(), s, c.range, c.cuts, c.buf, c.bufW,
    !P.legacy, FoldOut<int64_t>{});
  L(TakeWeights<S, T>, grid(n, kScanPer), kThreads, 0, s, c.range, c.cuts, take, span, tiles, cap);
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
