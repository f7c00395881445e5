// Ranking a kv head's clusters for the retrieval zone by an optimistic
// score, max over the query group of
//   q.mu_c + spread * sqrt((q.a_c)^2 + sum_j q_j^2 var_cj)
// with mu_c the centroid, a_c the cluster's principal axis scaled by its
// standard deviation along it, var_c the per-channel key variance: the mean
// logit plus `spread` standard deviations of the members' logits, with the
// covariance taken as its top direction plus the channel variances. A lone
// high-scoring key (a planted fact) inside a cluster of ordinary ones
// dominates that cluster's covariance, so the axis points at it and its
// cluster ranks high along a query that wants it, where the centroid alone
// dilutes it by the cluster size and an isotropic radius lifts every wide
// cluster alike. Measured on the generator (32K tokens, clusters of 8, 2%
// exact after rescoring 8x the budget): planted needles kept 4/4 and 4/4
// (default / broad configuration) against 2/4 and 2/4 with the radius score
// of share 0.1, the top-k's candidates 0.94 / 0.98 of it against 0.89 / 0.96.
// Ties break towards the lower id (common/ranked_hits.h).
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {

struct ClusterRankProblem {
  const float* q = nullptr;  // [group, headDim]
  int group = 1, headDim = 0, centroidStride = 0;
  const uint16_t* centroids = nullptr;  // [clusters, centroidStride]: the first headDim are the centroid
  // The moments in 8 bits (common/moment_code.h), a scale per cluster.
  const int8_t* axes = nullptr;         // [clusters, headDim]
  const float* axisScales = nullptr;    // [clusters]
  const uint8_t* vars = nullptr;        // [clusters, headDim]
  const float* varScales = nullptr;     // [clusters]
  int64_t clusters = 0;
  Dtype dtype = Dtype::kF16;
  float spread = 2.f;
  int k = 0;
  int32_t* outIds = nullptr;   // [min(k, clusters)], best first
  float* outScores = nullptr;  // [min(k, clusters)]
  // Optional: the members of the best clusters, best cluster first, copied
  // into outRows until maxRows (the last cluster may be cut); cluster c's
  // members are members[offsets[c] .. offsets[c + 1]).
  const int32_t* offsets = nullptr;  // [clusters + 1]
  const int32_t* members = nullptr;
  int32_t* outRows = nullptr;        // [maxRows]
  int64_t maxRows = 0;
};

struct ClusterRankCounts {
  int64_t ids = 0;   // min(k, clusters)
  int64_t rows = 0;  // rows written to outRows
};

// Several independent problems (one per kv head) sharing the thread pool in
// one pass.
void RankClustersMany(const ClusterRankProblem* problems, size_t n, ClusterRankCounts* counts);

}  // namespace kvr
