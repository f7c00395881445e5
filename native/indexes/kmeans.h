// Seeded k-means of one kv head's keys (faiss::Clustering), for Squeezed
// Attention's offline clustering of a fixed document: centroids c, every key
// assigned to its nearest centroid, cluster sizes.
//
// Assignment is by L2 distance (IndexFlatL2), the objective k-means
// minimises: each centroid is then the mean of its keys, so at decode q·c is
// exactly the mean logit q·k over the cluster, the estimate that centroid
// scoring needs. Assigning by inner product with unnormalised centroids
// would be degenerate (the longest centroid wins every key), and spherical
// k-means would score directions, not the keys' mean logits.
#pragma once

#include <cstdint>
#include <vector>

#include "common/half.h"

namespace kvr {

struct KmeansProblem {
  const uint16_t* keys = nullptr;  // [tokens, headDim]
  int64_t tokens = 0;
  int headDim = 0;
  Dtype dtype = Dtype::kF16;
  int clusters = 0;    // 1 <= clusters <= tokens
  int iterations = 0;  // Lloyd iterations, >= 1
  uint64_t seed = 0;   // faiss takes 31 bits of it
  int threads = 0;     // faiss's OpenMP threads; 0: as many as the native pool has
  float* centroids = nullptr;  // out [clusters, headDim]
  int32_t* assign = nullptr;   // out [tokens], in [0, clusters)
  int32_t* sizes = nullptr;    // out [clusters], sums to tokens
};

// Trains on every key (no subsample: max_points_per_centroid is raised to
// ceil(tokens / clusters)), then reassigns every key to its nearest final
// centroid, so assign and sizes agree with the returned centroids. A cluster
// may end empty (size 0) although faiss splits big clusters into empty ones
// during training. Returns the final sum of squared distances.
// Memory: an f32 copy of the keys (tokens * headDim * 4 bytes).
double Kmeans(const KmeansProblem& p);

// Independent problems side by side (a wave head's 8K-token segments): each
// on a task of the native pool with faiss on pool threads / problems threads
// (at least 1). One small problem keeps few cores busy in faiss (its GEMMs
// are 8K x 1K x d), so the segments one after another left most of a 16-core
// host idle. Each problem's answer is the one Kmeans gives it alone: the
// same seed, and faiss's k-means does not depend on its thread count.
void KmeansMany(std::vector<KmeansProblem>& problems);

}  // namespace kvr
