// Per-cluster summaries of one k-means segment of a kv head (the wave
// index, index/wave/cluster-build.ts): for each cluster its mean key and
// radius (the largest distance of a member key from it), its mean value,
// each channel's key variance, and its principal axis scaled by the
// members' standard deviation along it (power iteration from the farthest
// member). Clusters are independent, so they run in parallel on the native
// pool; each is summed over its members in token order with the roundings
// the TypeScript loops it replaced had (float32 sums, float64 products and
// dots), so the artifact's bytes did not change.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {

struct ClusterSummaryProblem {
  const uint16_t* keys = nullptr;    // [tokens, headDim] f16/bf16: the segment's rows
  const uint16_t* values = nullptr;  // [tokens, headDim]
  Dtype dtype = Dtype::kF16;
  int64_t tokens = 0;
  int headDim = 0;
  int stride = 0;                    // centroid row: headDim values, the radius, padding
  const int32_t* cluster = nullptr;  // [tokens]: the row's cluster, in [0, clusters)
  int64_t clusters = 0;
  int axisIterations = 4;
  // Outputs, written for every cluster with a member (others left as they are).
  float* centroids = nullptr;   // [clusters, stride]: mean key in [0, headDim), radius at headDim
  float* valueMeans = nullptr;  // [clusters, headDim]
  float* keyVars = nullptr;     // [clusters, headDim]
  float* keyAxes = nullptr;     // [clusters, headDim]
};

void ClusterSummary(const ClusterSummaryProblem& p);

}  // namespace kvr
