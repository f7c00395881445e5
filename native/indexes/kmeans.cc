#include "indexes/kmeans.h"

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <vector>

#include "indexes/faiss_common.h"
#include "indexes/key_range.h"

namespace kvr {

namespace {

// One problem, inside the caller's BlasScope, its keys' range checked.
double KmeansScoped(const KmeansProblem& p) {
  const int64_t n = p.tokens;
  const int d = p.headDim, c = p.clusters;
  if (!IsWordDtype(p.dtype)) throw std::invalid_argument("keys must be f16 or bf16");
  if (d < 1 || n < 1 || n > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("need 1 <= tokens < 2^31 and headDim >= 1");
  if (c < 1 || c > n) throw std::invalid_argument("clusters must be in [1, tokens]");
  if (p.iterations < 1) throw std::invalid_argument("iterations must be >= 1");
  OmpThreads omp(p.threads > 0 ? p.threads : FaissThreads());

  std::vector<float> x(size_t(n) * d);
  WidenRows(p.keys, p.dtype, d, 0, n, x.data());

  faiss::ClusteringParameters cp;
  cp.niter = p.iterations;
  cp.nredo = 1;
  cp.seed = int(p.seed & 0x7fffffff);
  cp.spherical = false;
  cp.verbose = false;
  cp.min_points_per_centroid = 1;                   // no stderr warning for small documents
  cp.max_points_per_centroid = int((n + c - 1) / c);  // n <= c * max: faiss uses every key
  faiss::Clustering clus(d, c, cp);
  faiss::IndexFlatL2 index(d);
  clus.train(n, x.data(), index);  // leaves the final centroids in index

  std::memcpy(p.centroids, clus.centroids.data(), size_t(c) * d * sizeof(float));
  if (index.ntotal != c) {  // defensive: faiss documents that index holds the centroids
    index.reset();
    index.add(c, p.centroids);
  }
  std::vector<int64_t> labels(static_cast<size_t>(n));
  std::vector<float> dist(static_cast<size_t>(n));
  index.search(n, x.data(), 1, dist.data(), labels.data());
  std::fill(p.sizes, p.sizes + c, 0);
  double objective = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = labels[size_t(i)];
    if (l < 0 || l >= c) throw std::runtime_error("k-means: a key got no centroid (non-finite keys?)");
    p.assign[i] = int32_t(l);
    ++p.sizes[l];
    objective += dist[size_t(i)];
  }
  return objective;
}

}  // namespace

double Kmeans(const KmeansProblem& p) {
  CheckClusterableKeys(p.keys, p.dtype, p.tokens * p.headDim);
  BlasScope blas(BlasScope::Kind::kWide);
  return KmeansScoped(p);
}

void KmeansMany(std::vector<KmeansProblem>& problems) {
  if (problems.empty()) return;
  for (const KmeansProblem& p : problems) CheckClusterableKeys(p.keys, p.dtype, p.tokens * p.headDim);  // before any work
  const int each = std::max(1, FaissThreads() / int(problems.size()));
  // One problem alone uses OpenBLAS's threads; problems side by side fill the
  // pool themselves, each sgemm on one BLAS thread (the only way OpenBLAS
  // 0.3.21 runs overlapping calls safely: faiss_common.h).
  BlasScope blas(problems.size() == 1 ? BlasScope::Kind::kWide : BlasScope::Kind::kNarrow);
  for (KmeansProblem& p : problems) p.threads = each;
  // The pool does not carry exceptions across threads: the first is kept and rethrown here.
  std::vector<std::exception_ptr> failed(problems.size());
  ThreadPool::Get().ParallelFor(problems.size(), [&](size_t i) {
    try {
      KmeansScoped(problems[i]);
    } catch (...) {
      failed[i] = std::current_exception();
    }
  });
  for (const std::exception_ptr& e : failed)
    if (e) std::rethrow_exception(e);
}

}  // namespace kvr
