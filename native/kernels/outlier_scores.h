// How far each key stands out from the keys of its head, channel by channel:
// z_i = Σ_c (k_ic − μ_c)² / σ_c² over the head's per-channel means and
// variances (a diagonal Mahalanobis distance). A key carrying content in
// channels where the others are quiet (a fact stored once, a pass key's
// digits) scores high. The RetrievalAttention graph makes the highest its
// entry points (indexes/ra_graph_build.cc); the wave index makes them
// clusters of their own (index/wave/cluster-build.ts).
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {

// z[i] for keys [n, d] in storage dtype; multithreaded, two passes.
void OutlierScores(const uint16_t* keys, Dtype dtype, int64_t n, int d, float* z);

}  // namespace kvr
