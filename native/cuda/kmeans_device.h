// Lloyd's k-means of many independent problems on the GPU (a wave head's
// 8K-token segments, all at once): the seal's clustering where a device is
// present. On the host, KmeansMany (faiss) takes ~12 s per million keys of
// d=128 on a 16-core host, most of a wave layer's 100 s seal at 1M tokens.
// Plain C++ interface: this header names no CUDA type.
//
// The same contract as KmeansMany's (indexes/kmeans.h): per problem its
// centroids, every key's nearest final centroid, the clusters' sizes, the
// final sum of squared distances. Not faiss's algorithm step for step (its
// initial sample and its splitting of big clusters into empty ones), so the
// clusters differ from the host's; each run is deterministic (initial
// centroids are a seeded sample of the keys; each cluster's sum is taken in
// key order; ties go to the lower centroid). A cluster that empties keeps
// its centroid.
#pragma once

#include <vector>

#include "indexes/kmeans.h"

namespace kvr {
namespace cuda {

// Every problem must share headDim (a multiple of 4, at most 1024), dtype
// and iterations. Blocks until done; throws std::runtime_error (no device,
// out of memory, a shape it refuses).
void KmeansManyDevice(std::vector<KmeansProblem>& problems);

}  // namespace cuda
}  // namespace kvr
