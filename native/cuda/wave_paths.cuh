// Which of the wave step's kernel paths a step runs (wave_step.cu's Step),
// read from the environment at each step and part of its graph's key, so
// that bench/wave-gpu-ab.ts can alternate two paths step by step on one
// store and compare their answers bit for bit (they are equal by
// construction: each change moves work, never a sum's order).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>
#include <utility>

#include "cuda/cuda_common.cuh"

namespace kvr {
namespace cuda {
namespace {

struct StepPaths {
  // KVRECALL_WAVE_LEGACY=1: the step before the rescored dots were kept, the
  // cuts' grids widened, ResolveCut held its keys in shared memory,
  // ScoreClusters ran CTAs of 64, the exact rows' estimate tiles joined the
  // attention's and the tiles prefetched their rows; and none of the below.
  bool legacy;
  // Each =0 turns off one change, the rest of the new path kept. Those
  // marked (round 2) were checked bit-identical on an H100 (session 16,
  // bench/results/wave-gpu-ab-round2-h100.md); KVRECALL_WAVE_ROUND2=0 turns
  // them all off. HistogramFind measured
  // slower than the Histogram + FindBin pair (0.737 against 0.689 ms a
  // step), so it runs only with KVRECALL_WAVE_FIND=1:
  bool swizzle;  // KVRECALL_WAVE_SWIZZLE: ScoreClusters' swizzled tile (and what needs it: fuse, split)
  bool fuse;     // KVRECALL_WAVE_SCORE_FUSE: its centroid and axis passes in one (round 2)
  bool split;    // KVRECALL_WAVE_SCORE_SPLIT: the fused kernel awaits its variances last (round 2)
  bool clear;    // KVRECALL_WAVE_CLEAR: StepClear for the step's memsets (and what needs it: find) (round 2)
  bool find;     // KVRECALL_WAVE_FIND=1: HistogramFind for Histogram + FindBin (round 2, off by default)
  bool held;     // KVRECALL_WAVE_RESCORE_HELD: RescoreHeld (d <= 128) for RescoreCandidates (round 2)
  bool pack;     // KVRECALL_WAVE_PACK: ScatterPack for ScatterKept + PackIds (round 2)
  // Round 4 (session 18), checked bit-identical and timed against its
  // switches on an H100 (visits AC and AD, bench/results/wave-round4-*.md);
  // those switches (KVRECALL_WAVE_ROUND4, _RANGE, _HALF, _PACK_OWNERS,
  // _TILES) were removed after it, and the kernels only they ran with them.
  // Its changes follow round 2's: the cuts' order ranges taken by
  // ScoreClusters and RescoreHeld where clear runs (else OrderRange's
  // launches), the exact rows' owners taken in ScatterPack where pack runs.
  bool range;
  bool owners;
  // KVRECALL_WAVE_MMA=0 turns off (on by default): ScoreClusters on the
  // tensor cores (wave_score_mma.cuh) where it applies; its scores are not
  // the host's bit for bit (that file says why), so neither are the step's
  // ids: a cluster at the cut may fall the other side of it.
  bool mma;
  // KVRECALL_WAVE_MMA_TILES=0 turns off (on by default): AttendAndClusters'
  // tiles on the tensor cores (wave_tile_mma.cuh) where they apply; their
  // sums are not TileNumerators' bit for bit (that file says why).
  // With mmaRescore too, the engine's call on an H100 took 0.873x the time
  // of all three off at the issue's shape (bench/results/wave-tiles-h100-s27.md).
  // The checks that compare ids with the host's bit for bit turn both off
  // (bench/wave-paths.ts: the plain path).
  bool mmaTiles;
  // KVRECALL_WAVE_MMA_RESCORE=0 turns off (on by default): RescoreHeld on
  // the tensor cores (wave_rescore_mma.cuh) where it applies; its dots are
  // not the host's bit for bit, so a candidate at the cut may fall the
  // other side of it.
  bool mmaRescore;
  bool pdl;      // KVRECALL_WAVE_PDL=1 (off by default): a kernel launched while the one before it ends (StepLauncher), not after
};

inline StepPaths ReadStepPaths(int d) {
  const auto is = [](const char* name, char c) {
    const char* v = std::getenv(name);
    return v && v[0] == c;
  };
  StepPaths s{};
  s.legacy = is("KVRECALL_WAVE_LEGACY", '1');
  const auto on = [&](const char* name) { return !s.legacy && !is(name, '0'); };
  const bool round2 = !is("KVRECALL_WAVE_ROUND2", '0');
  s.swizzle = on("KVRECALL_WAVE_SWIZZLE");
  s.fuse = round2 && s.swizzle && on("KVRECALL_WAVE_SCORE_FUSE");
  s.split = s.fuse && on("KVRECALL_WAVE_SCORE_SPLIT");
  s.clear = round2 && on("KVRECALL_WAVE_CLEAR");
  s.find = s.clear && is("KVRECALL_WAVE_FIND", '1');
  s.held = round2 && on("KVRECALL_WAVE_RESCORE_HELD") && d <= 128;
  s.pack = round2 && on("KVRECALL_WAVE_PACK");
  s.range = s.clear;
  s.owners = s.pack;
  // Off unless asked for: on the H100 it cost the engine's call 8 us (0.663 -> 0.671 ms, visit AC).
  s.pdl = !s.legacy && is("KVRECALL_WAVE_PDL", '1');
  s.mma = !s.legacy && !is("KVRECALL_WAVE_MMA", '0');
  s.mmaTiles = !s.legacy && !is("KVRECALL_WAVE_MMA_TILES", '0');
  s.mmaRescore = !s.legacy && !is("KVRECALL_WAVE_MMA_RESCORE", '0');
  return s;
}

// The step's kernel launches on one stream. With pdl, a kernel right after
// another of the step's kernels is launched with programmatic stream
// serialization: the device may start its CTAs while the kernel before it
// ends (its last CTAs running, its writes being flushed) instead of after,
// which a chain of ~20 short dependent kernels pays at every link. It is
// still ordered: each step kernel's first statement, AfterPrior()
// (wave_step_kernels.cuh), waits for the kernel before it and its writes.
// A kernel after a copy, a memset or anything else (Other) launches as usual.
class StepLauncher {
 public:
  StepLauncher(cudaStream_t s, bool pdl) : s_(s), pdl_(pdl) {}
  template <typename... Exp, typename... Act>
  void operator()(void (*kernel)(Exp...), dim3 grid, dim3 block, size_t smem, Act&&... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s_;
    cudaLaunchAttribute early[1] = {};
    if (pdl_ && afterKernel_) {
      early[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      early[0].val.programmaticStreamSerializationAllowed = 1;
      cfg.attrs = early;
      cfg.numAttrs = 1;
    }
    Check(cudaLaunchKernelEx(&cfg, kernel, std::forward<Act>(args)...), "wave step launch");
    afterKernel_ = true;
  }
  // A kernel launched on the stream otherwise (<<<>>>): the next may follow it early.
  void Kernel() { afterKernel_ = true; }
  // A copy, memset or other stream work since the last kernel.
  void Other() { afterKernel_ = false; }

 private:
  cudaStream_t s_;
  bool pdl_;
  bool afterKernel_ = false;
};

// f(B, G) with B (bf16) and G (the paged store: KvRow's row map) as
// std::bool_constant values, to name a kernel's instantiation:
// K<B(), G()><<<...>>>(p).
template <class F>
void WithKinds(bool bf16, bool paged, F&& f) {
  if (bf16 && paged) f(std::true_type(), std::true_type());
  else if (bf16) f(std::true_type(), std::false_type());
  else if (paged) f(std::false_type(), std::true_type());
  else f(std::false_type(), std::false_type());
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
