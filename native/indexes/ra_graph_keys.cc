// ragraph::AddKeyEdges (ra_graph_beam.h): RaGraph::Build's key-key edges
// (RaGraphParams::keyNeighbors), RoarGraph's connectivity enhancement: each
// key's nearest keys by centred cosine, from a beam search over the graph so
// far started at the key's own edges. The searches read the graph unchanged;
// the edges are added after, so every key sees the same graph.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "common/thread_pool.h"
#include "indexes/ra_graph.h"
#include "indexes/ra_graph_beam.h"

namespace kvr {
namespace ragraph {

void AddKeyEdges(std::vector<std::vector<int32_t>>& adj, const RaBuildInput& in, const RaGraphParams& params) {
  const int64_t n = in.tokens;
  const int d = in.headDim;
  if (params.keyNeighbors <= 0 || n <= 1) return;
  std::vector<double> sum(size_t(d), 0.0);
  {
    const int64_t blocks = (n + 4095) / 4096;
    std::vector<double> part(size_t(blocks) * d, 0.0);
    ThreadPool::Get().ParallelFor(size_t(blocks), [&](size_t t) {
      std::vector<float> r(static_cast<size_t>(d));
      double* acc = part.data() + t * d;
      for (int64_t i = int64_t(t) * 4096; i < std::min<int64_t>(n, int64_t(t + 1) * 4096); ++i) {
        WidenRow(in.keys + size_t(i) * d, in.dtype, size_t(d), r.data());
        for (int c = 0; c < d; ++c) acc[c] += r[size_t(c)];
      }
    });
    for (int64_t t = 0; t < blocks; ++t)
      for (int c = 0; c < d; ++c) sum[size_t(c)] += part[size_t(t) * d + c];
  }
  std::vector<float> mu(static_cast<size_t>(d)), invNorm(static_cast<size_t>(n));
  for (int c = 0; c < d; ++c) mu[size_t(c)] = float(sum[size_t(c)] / double(n));
  ThreadPool::Get().ParallelFor(size_t((n + 4095) / 4096), [&](size_t t) {
    std::vector<float> r(static_cast<size_t>(d));
    for (int64_t i = int64_t(t) * 4096; i < std::min<int64_t>(n, int64_t(t + 1) * 4096); ++i) {
      WidenRow(in.keys + size_t(i) * d, in.dtype, size_t(d), r.data());
      for (int c = 0; c < d; ++c) r[size_t(c)] -= mu[size_t(c)];
      const float nn = std::sqrt(Dot(r.data(), r.data(), size_t(d)));
      invNorm[size_t(i)] = nn > 0 ? 1.f / nn : 0.f;
    }
  });
  const size_t want = size_t(params.keyNeighbors);
  const size_t ef = std::max<size_t>(size_t(std::max(params.keyEf, 1)), want + 1);
  std::vector<std::vector<int32_t>> extra(static_cast<size_t>(n));
  ThreadPool::Get().ParallelFor(size_t((n + 255) / 256), [&](size_t t) {
    std::vector<float> x(static_cast<size_t>(d)), r(static_cast<size_t>(d));
    std::vector<int32_t> start;
    std::vector<Hit> top;
    for (int64_t u = int64_t(t) * 256; u < std::min<int64_t>(n, int64_t(t + 1) * 256); ++u) {
      WidenRow(in.keys + size_t(u) * d, in.dtype, size_t(d), x.data());
      for (int c = 0; c < d; ++c) x[size_t(c)] -= mu[size_t(c)];
      const float xMu = Dot(x.data(), mu.data(), size_t(d));
      const auto& own = adj[size_t(u)];
      start.assign(own.begin(), own.end());
      start.push_back(int32_t(u));
      // (x · (k − μ)) / |k − μ|: the cosine up to |x|, which ranks alike.
      ragraph::BeamSearch(
          ragraph::AdjView{&adj}, n, start.data(), start.size(), nullptr, 0, ef, in.keys, d,
          [&](int32_t id) {
            WidenRow(in.keys + size_t(id) * d, in.dtype, size_t(d), r.data());
            return (Dot(x.data(), r.data(), size_t(d)) - xMu) * invNorm[size_t(id)];
          },
          top);
      std::sort(top.begin(), top.end(), Better);
      auto& out = extra[size_t(u)];
      for (const Hit& h : top) {
        if (out.size() >= want) break;
        if (h.id != int32_t(u) && std::find(own.begin(), own.end(), h.id) == own.end()) out.push_back(h.id);
      }
    }
  });
  for (int64_t u = 0; u < n; ++u) adj[size_t(u)].insert(adj[size_t(u)].end(), extra[size_t(u)].begin(), extra[size_t(u)].end());
}

}  // namespace ragraph
}  // namespace kvr
