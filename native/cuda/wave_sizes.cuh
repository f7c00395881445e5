// A wave step's sizes as its launches bake them in (wave_step.cu's Step).
// Included by wave_step.cu.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cuda/wave_buffers.cuh"

namespace kvr {
namespace cuda {
namespace {

// The size a step's strides, grids and buffer layouts are taken from: x
// rounded up to a multiple of max(256, x's highest power of two / 8); 0 stays
// 0 (the launches that only run for a non-empty set keep their test).
//
// Why: StepGraph's key is everything a launch bakes in, and while a session's
// own tokens are fewer than its window the exact rows' count E (sinks + the
// document's window rows) shrinks by one a step, the budget (keep + the rows
// the ranges cover) with it, and the candidates (probe x budget) by the
// probe: with the sizes themselves every step's key was new and ran one by
// one (0.616 ms on the H100 at 1M against 0.56 replayed). A quantity moving
// by one a step keeps its bucket for 256 steps below 2048 (a whole default
// window for E), for x/8 steps above. What a bucket adds does nothing: every
// kernel bounds its work by the counts, which are device data (the per-head
// params, the candidates gathered, the kept count, exactN), and positions
// past them return at once or write what an absent row writes (an empty tile,
// an excluded order, a -1 id, as a head with a smaller budget already does).
// The cost is the CTAs launched for the pad: at most 255 rows of E and of the
// budget (a row each: a compare; at kTile = 512 rows a tile, one empty tile
// more at most), and at most 1/8 of the candidates (RescoreHeld's CTAs that
// stage q and write excluded orders, the cuts' streaming grids).
inline int64_t StepBucket(int64_t x) {
  if (x <= 0) return 0;
  int64_t top = 1;
  while (top <= x / 2) top *= 2;
  const int64_t q = std::max<int64_t>(256, top / 8);
  return Cdiv(x, q) * q;
}

// Rows the skip ranges hold: their union within [0, N).
inline int64_t SkippedRows(const std::vector<std::pair<int64_t, int64_t>>& skip, int64_t N) {
  std::vector<std::pair<int64_t, int64_t>> r;
  for (const auto& [lo, hi] : skip)
    if (std::min(hi, N) > std::max<int64_t>(lo, 0)) r.emplace_back(std::max<int64_t>(lo, 0), std::min(hi, N));
  std::sort(r.begin(), r.end());
  int64_t end = 0, skipped = 0;
  for (const auto& [lo, hi] : r) {
    skipped += std::max<int64_t>(0, hi - std::max(lo, end));
    end = std::max(end, hi);
  }
  return skipped;
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
