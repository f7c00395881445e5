// RaGraph::Build: the exact top-kBuild scan of the build queries, the
// projection of the query-key graph onto the keys, pruning, entry points and
// the connectivity pass (see ra_graph.h).
#include "indexes/ra_graph.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "common/thread_pool.h"
#include "indexes/ra_graph_beam.h"
#include "kernels/outlier_scores.h"

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kEntryPoints = 64;
// One outlier entry point per kOutlierShare keys (step 4b).
constexpr int64_t kOutlierShare = 256;
double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct SplitMix64 {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t Below(uint64_t n) { return Next() % n; }  // bias is irrelevant here
};


// ---------------------------------------------------------------------------
// Exact top-k of many query rows: a blocked GEMM-like scan.
//
// Keys are widened tile by tile (kTileKeys keys) into panels of kNr keys laid
// out d-major ([d][kNr] f32), so the micro-kernel computes a kMr × kNr block
// of query·key scores with broadcast-FMA and no horizontal sums: 12 AVX2
// accumulators, 2 panel loads and 6 broadcasts per step of d. A panel stays
// in L1 while every query row of the task's block passes over it.

constexpr int kMr = 6, kNr = 16;
constexpr int64_t kTileKeys = 256;

void PackTile(const uint16_t* keys, Dtype dtype, int d, int64_t begin, int64_t count, float* packed, float* row) {
  const int64_t panels = (count + kNr - 1) / kNr;
  std::memset(packed, 0, sizeof(float) * size_t(panels) * kNr * d);
  for (int64_t j = 0; j < count; ++j) {
    WidenRow(keys + size_t(begin + j) * d, dtype, size_t(d), row);
    float* dst = packed + size_t(j / kNr) * kNr * d + (j % kNr);
    for (int t = 0; t < d; ++t) dst[size_t(t) * kNr] = row[t];
  }
}

// out[i*kNr + j] = q_i · panel key j for i < kMr; q rows have stride d.
inline void Micro(const float* q, const float* panel, int d, float* out) {
#ifdef KVR_X86_SIMD
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float *q0 = q, *q1 = q + d, *q2 = q + 2 * d, *q3 = q + 3 * d, *q4 = q + 4 * d, *q5 = q + 5 * d;
  for (int t = 0; t < d; ++t) {
    const __m256 b0 = _mm256_loadu_ps(panel + size_t(t) * kNr), b1 = _mm256_loadu_ps(panel + size_t(t) * kNr + 8);
    __m256 a = _mm256_broadcast_ss(q0 + t);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(q1 + t);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(q2 + t);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(q3 + t);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(q4 + t);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(q5 + t);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  _mm256_storeu_ps(out + 0, c00);
  _mm256_storeu_ps(out + 8, c01);
  _mm256_storeu_ps(out + 16, c10);
  _mm256_storeu_ps(out + 24, c11);
  _mm256_storeu_ps(out + 32, c20);
  _mm256_storeu_ps(out + 40, c21);
  _mm256_storeu_ps(out + 48, c30);
  _mm256_storeu_ps(out + 56, c31);
  _mm256_storeu_ps(out + 64, c40);
  _mm256_storeu_ps(out + 72, c41);
  _mm256_storeu_ps(out + 80, c50);
  _mm256_storeu_ps(out + 88, c51);
#else
  for (int i = 0; i < kMr * kNr; ++i) out[i] = 0.f;
  for (int t = 0; t < d; ++t)
    for (int i = 0; i < kMr; ++i) {
      const float a = q[size_t(i) * d + t];
      for (int j = 0; j < kNr; ++j) out[i * kNr + j] += a * panel[size_t(t) * kNr + j];
    }
#endif
}

// For each of the m query rows, its best min(kb, n) keys by inner product,
// best first: lists[i*kb .. i*kb + kb).
std::vector<int32_t> ExactTopKRows(const uint16_t* keys, int64_t n, int d, Dtype dtype, const float* queries,
                                   int64_t m, int kb) {
  std::vector<int32_t> lists(size_t(m) * kb, -1);
  if (m == 0 || n == 0 || kb == 0) return lists;
  const int64_t threads = int64_t(ThreadPool::Get().Threads());
  // Query rows per task: a multiple of kMr, small enough to give every core
  // several tasks, at most 96 (their rows stay in L2 while the keys stream).
  int64_t rows = (m + threads * 4 - 1) / (threads * 4);
  rows = std::min<int64_t>(96, std::max<int64_t>(kMr, (rows + kMr - 1) / kMr * kMr));
  const int64_t tasks = (m + rows - 1) / rows;
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t task) {
    const int64_t q0 = int64_t(task) * rows, qn = std::min(rows, m - q0);
    const int64_t groups = (qn + kMr - 1) / kMr;
    std::vector<float> packed(size_t(kTileKeys) * d), row(static_cast<size_t>(d)), pad(size_t(kMr) * d, 0.f);
    alignas(32) float block[kMr * kNr];
    std::vector<std::vector<Hit>> heaps(static_cast<size_t>(qn));
    for (auto& h : heaps) h.reserve(size_t(kb) + 1);
    std::vector<float> thr(size_t(qn), -std::numeric_limits<float>::infinity());
    // The last group may be partial: copy its rows to a zero-padded buffer.
    const int64_t tailRows = qn - (groups - 1) * kMr;
    std::memcpy(pad.data(), queries + size_t(q0 + (groups - 1) * kMr) * d, sizeof(float) * size_t(tailRows) * d);
    for (int64_t t0 = 0; t0 < n; t0 += kTileKeys) {
      const int64_t tn = std::min(kTileKeys, n - t0);
      PackTile(keys, dtype, d, t0, tn, packed.data(), row.data());
      const int64_t panels = (tn + kNr - 1) / kNr;
      for (int64_t p = 0; p < panels; ++p) {
        const float* panel = packed.data() + size_t(p) * kNr * d;
        const int jn = int(std::min<int64_t>(kNr, tn - p * kNr));
        const int32_t id0 = int32_t(t0 + p * kNr);
        for (int64_t g = 0; g < groups; ++g) {
          const bool tail = g == groups - 1;
          const float* qrows = tail ? pad.data() : queries + size_t(q0 + g * kMr) * d;
          Micro(qrows, panel, d, block);
          const int in = tail ? int(tailRows) : kMr;
          for (int i = 0; i < in; ++i) {
            const size_t qi = size_t(g * kMr + i);
            const float th = thr[qi];
            const float* s = block + i * kNr;
            for (int j = 0; j < jn; ++j) {
              if (!(s[j] > th) && heaps[qi].size() >= size_t(kb)) continue;
              if (std::isnan(s[j])) continue;
              Offer(heaps[qi], size_t(kb), Hit{s[j], id0 + j});
              if (heaps[qi].size() >= size_t(kb)) thr[qi] = heaps[qi].front().score;
            }
          }
        }
      }
    }
    for (int64_t i = 0; i < qn; ++i) {
      auto& h = heaps[size_t(i)];
      std::sort(h.begin(), h.end(), Better);
      int32_t* dst = lists.data() + size_t(q0 + i) * kb;
      for (size_t j = 0; j < h.size(); ++j) dst[j] = h[j].id;
    }
  });
  return lists;
}

}  // namespace

RaGraph RaGraph::Build(const RaBuildInput& in, const RaGraphParams& params, RaBuildStats* statsOut) {
  if (in.tokens < 0 || in.tokens > int64_t(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("ra-graph: tokens out of range");
  if (in.headDim < 1) throw std::invalid_argument("ra-graph: headDim must be positive");
  if (params.degree < 1 || params.kBuild < 1 || params.maxQueries < 1)
    throw std::invalid_argument("ra-graph: degree, kBuild and maxQueries must be positive");
  if (!IsWordDtype(in.dtype)) throw std::invalid_argument("ra-graph: keys must be f16 or bf16");
  if (in.queryCount < 0) throw std::invalid_argument("ra-graph: queryCount must be >= 0");

  RaBuildStats stats;
  RaGraph g;
  const int64_t n = in.tokens;
  const int d = in.headDim;
  g.n_ = n;
  g.d_ = d;
  g.params_ = params;
  g.offsets_.assign(size_t(n) + 1, 0);
  if (n == 0) {
    if (statsOut) *statsOut = stats;
    return g;
  }
  const size_t degree = size_t(params.degree);
  const int kb = int(std::min<int64_t>(params.kBuild, n));
  SplitMix64 rng{params.seed};

  // 1. Build queries: a seeded subsample of the prefill query rows, or, with
  //    no prefill queries, of the keys themselves (widened) as pseudo-queries:
  //    the result is then a plain key-to-key inner-product graph.
  auto t0 = Clock::now();
  const bool pseudo = in.queryCount == 0 || in.queries == nullptr;
  const int64_t pool = pseudo ? n : in.queryCount;
  const int64_t m = std::min<int64_t>(pool, params.maxQueries);
  std::vector<int64_t> pick;
  if (m < pool) {  // partial Fisher-Yates over a sparse permutation, then sort for locality
    std::vector<int64_t> perm(static_cast<size_t>(pool));
    for (int64_t i = 0; i < pool; ++i) perm[size_t(i)] = i;
    for (int64_t i = 0; i < m; ++i) std::swap(perm[size_t(i)], perm[size_t(i + int64_t(rng.Below(uint64_t(pool - i))))]);
    pick.assign(perm.begin(), perm.begin() + m);
    std::sort(pick.begin(), pick.end());
  }
  std::vector<float> qbuf;
  const float* queries = in.queries;
  if (pseudo || !pick.empty()) {
    qbuf.resize(size_t(m) * d);
    ThreadPool::Get().ParallelFor(size_t((m + 1023) / 1024), [&](size_t t) {
      for (int64_t i = int64_t(t) * 1024; i < std::min<int64_t>(m, int64_t(t + 1) * 1024); ++i) {
        const int64_t src = pick.empty() ? i : pick[size_t(i)];
        if (pseudo)
          WidenRow(in.keys + size_t(src) * d, in.dtype, size_t(d), qbuf.data() + size_t(i) * d);
        else
          std::memcpy(qbuf.data() + size_t(i) * d, in.queries + size_t(src) * d, sizeof(float) * d);
      }
    });
    queries = qbuf.data();
  }
  stats.queriesUsed = m;
  g.queriesUsed_ = m;

  // 2. Exact top-kb keys of every build query (the dominant cost).
  std::vector<int32_t> lists = ExactTopKRows(in.keys, n, d, in.dtype, queries, m, kb);
  stats.knnSeconds = Since(t0);

  // 3. Project the query→key bipartite graph onto the keys: each query's
  //    nearest key (its pivot) is linked to the query's other top keys, and
  //    they back to the pivot; keys adjacent in a query's ranking are linked
  //    both ways too, so that a search can walk down a query's list instead
  //    of dead-ending at the pivot (on clustered keys with shifted queries
  //    this lifted recall@100 at ~1.3% scanned from 0.81 to 0.94: without
  //    it most keys had one or two in-edges). Multiplicity counts how often
  //    two keys were co-retrieved.
  t0 = Clock::now();
  std::vector<int64_t> candOff(size_t(n) + 1, 0);
  std::vector<int32_t> pivotCount(size_t(n), 0), retrieved(size_t(n), 0);
  auto pairs = [&](auto emit) {
    for (int64_t i = 0; i < m; ++i) {
      const int32_t* L = lists.data() + size_t(i) * kb;
      int len = 0;
      while (len < kb && L[len] >= 0) ++len;
      for (int j = 1; j < len; ++j) {
        emit(L[0], L[j]);
        emit(L[j], L[0]);
        if (j + 1 < len) {
          emit(L[j], L[j + 1]);
          emit(L[j + 1], L[j]);
        }
      }
    }
  };
  for (int64_t i = 0; i < m; ++i) {
    const int32_t* L = lists.data() + size_t(i) * kb;
    if (L[0] < 0) continue;
    ++pivotCount[size_t(L[0])];
    for (int j = 0; j < kb && L[j] >= 0; ++j) retrieved[size_t(L[j])] = 1;
  }
  pairs([&](int32_t u, int32_t) { ++candOff[size_t(u) + 1]; });
  for (int64_t u = 0; u < n; ++u) candOff[size_t(u) + 1] += candOff[size_t(u)];
  std::vector<int32_t> cand(size_t(candOff[size_t(n)]));
  {
    std::vector<int64_t> fill(candOff.begin(), candOff.end() - 1);
    pairs([&](int32_t u, int32_t c) { cand[size_t(fill[size_t(u)]++)] = c; });
  }
  std::vector<int32_t>().swap(lists);

  // Prune each key's candidates to `degree` diverse neighbours: rank them by
  // co-retrieval count (then by inner product with the key), keep the top
  // few times `degree`, then apply the RNG occlusion rule by angle (drop c if
  // an already kept s is closer in angle to c than the key itself is: the
  // search reaches c through s), and fill any slots left with the best of the
  // occluded ones.
  std::vector<std::vector<int32_t>> adj(static_cast<size_t>(n));
  const size_t shortlistCap = std::max<size_t>(4 * degree, 64);
  ThreadPool::Get().ParallelFor(size_t((n + 255) / 256), [&](size_t t) {
    std::vector<int32_t> cs;
    std::vector<std::pair<int32_t, int32_t>> counted;  // (count, id)
    std::vector<float> rows, self(static_cast<size_t>(d));
    std::vector<float> cosSelf;
    std::vector<uint8_t> kept;
    std::vector<size_t> keptIdx;
    for (int64_t u = int64_t(t) * 256; u < std::min<int64_t>(n, int64_t(t + 1) * 256); ++u) {
      cs.assign(cand.begin() + candOff[size_t(u)], cand.begin() + candOff[size_t(u) + 1]);
      if (cs.empty()) continue;
      std::sort(cs.begin(), cs.end());
      counted.clear();
      for (size_t i = 0; i < cs.size();) {
        size_t j = i;
        while (j < cs.size() && cs[j] == cs[i]) ++j;
        if (cs[i] != int32_t(u)) counted.push_back({int32_t(j - i), cs[i]});
        i = j;
      }
      if (counted.empty()) continue;
      WidenRow(in.keys + size_t(u) * d, in.dtype, size_t(d), self.data());
      const float selfNorm = std::sqrt(Dot(self.data(), self.data(), size_t(d)));
      // Shortlist by count first (cheap), then widen only the shortlist.
      std::stable_sort(counted.begin(), counted.end(), [](auto& a, auto& b) { return a.first > b.first; });
      const size_t cn = std::min(counted.size(), shortlistCap);
      rows.resize(cn * size_t(d));
      cosSelf.resize(cn);
      std::vector<std::pair<float, size_t>> order(cn);  // (ip with u, index) for ties in count
      for (size_t i = 0; i < cn; ++i) {
        float* r = rows.data() + i * d;
        WidenRow(in.keys + size_t(counted[i].second) * d, in.dtype, size_t(d), r);
        const float nr = std::sqrt(Dot(r, r, size_t(d)));
        if (nr > 0) Scale(1.f / nr, r, size_t(d));
        const float ip = Dot(self.data(), r, size_t(d));  // |u| cos(u, c)
        cosSelf[i] = selfNorm > 0 ? ip / selfNorm : 0.f;
        order[i] = {ip * nr, i};
      }
      std::stable_sort(order.begin(), order.end(), [&](auto& a, auto& b) {
        const int32_t ca = counted[a.second].first, cb = counted[b.second].first;
        return ca != cb ? ca > cb : a.first > b.first;
      });
      kept.assign(cn, 0);
      keptIdx.clear();
      auto& out = adj[size_t(u)];
      for (auto& o : order) {
        if (out.size() >= degree) break;
        const size_t i = o.second;
        const float* r = rows.data() + i * d;
        bool occluded = false;
        for (size_t s : keptIdx)
          if (Dot(rows.data() + s * d, r, size_t(d)) > cosSelf[i]) {
            occluded = true;
            break;
          }
        if (occluded) continue;
        kept[i] = 1;
        keptIdx.push_back(i);
        out.push_back(counted[i].second);
      }
      for (auto& o : order) {
        if (out.size() >= degree) break;
        if (!kept[o.second]) out.push_back(counted[o.second].second);
      }
    }
  });
  std::vector<int32_t>().swap(cand);
  std::vector<int64_t>().swap(candOff);

  // Positional edges, beyond `degree`: t-1..t-p and t+1..t+p. Adjacent
  // post-RoPE keys are near in key space and a span's tokens are attended
  // together, so a search that reaches a span walks along it; and the chain
  // makes every key reachable, also those no build query retrieved.
  if (params.positional > 0)
    ThreadPool::Get().ParallelFor(size_t((n + 4095) / 4096), [&](size_t t) {
      for (int64_t u = int64_t(t) * 4096; u < std::min<int64_t>(n, int64_t(t + 1) * 4096); ++u) {
        auto& out = adj[size_t(u)];
        const size_t projected = out.size();
        for (int64_t j = 1; j <= params.positional; ++j)
          for (int64_t v : {u - j, u + j})
            if (v >= 0 && v < n && std::find(out.begin(), out.begin() + projected, int32_t(v)) == out.begin() + projected)
              out.push_back(int32_t(v));
      }
    });

  stats.projectSeconds = Since(t0);

  // 3b. Key-key edges (RaGraphParams::keyNeighbors; ra_graph_keys.cc).
  t0 = Clock::now();
  ragraph::AddKeyEdges(adj, in, params);
  stats.keySeconds = Since(t0);

  // 4. Entry points: the keys that are the nearest key of the most build
  //    queries (hubs of the query distribution), ties to the larger norm:
  //    kEntryPoints / 4 over the whole context, then the best of each of
  //    the rest's equal stretches of positions (content comes in spans, so a
  //    query's region is seldom far from one of them).
  t0 = Clock::now();
  std::vector<float> norm2(static_cast<size_t>(n));
  ThreadPool::Get().ParallelFor(size_t((n + 4095) / 4096), [&](size_t t) {
    std::vector<float> r(static_cast<size_t>(d));
    for (int64_t i = int64_t(t) * 4096; i < std::min<int64_t>(n, int64_t(t + 1) * 4096); ++i) {
      WidenRow(in.keys + size_t(i) * d, in.dtype, size_t(d), r.data());
      norm2[size_t(i)] = Dot(r.data(), r.data(), size_t(d));
    }
  });
  {
    auto hub = [&](int32_t a, int32_t b) {
      if (pivotCount[size_t(a)] != pivotCount[size_t(b)]) return pivotCount[size_t(a)] > pivotCount[size_t(b)];
      if (norm2[size_t(a)] != norm2[size_t(b)]) return norm2[size_t(a)] > norm2[size_t(b)];
      return a < b;
    };
    const size_t global = size_t(std::min<int64_t>(n, kEntryPoints / 4));
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t(i);
    std::partial_sort(ids.begin(), ids.begin() + global, ids.end(), hub);
    g.entries_.assign(ids.begin(), ids.begin() + global);
    const int64_t stripes = std::min<int64_t>(n, kEntryPoints - int64_t(global));
    for (int64_t s = 0; s < stripes; ++s) {
      const int64_t a = s * n / stripes, b = (s + 1) * n / stripes;
      int32_t best = int32_t(a);
      for (int64_t i = a + 1; i < b; ++i)
        if (hub(int32_t(i), best)) best = int32_t(i);
      if (std::find(g.entries_.begin(), g.entries_.end(), best) == g.entries_.end()) g.entries_.push_back(best);
    }
  }

  // 4b. Outlier entry points: the keys that stand out most from the key
  //     distribution channel by channel (the largest Σ_c (k_c − μ_c)² /
  //     σ_c²), n / kOutlierShare of them. A fact no prefill query asked
  //     about is such a key when it carries content in channels where keys
  //     are otherwise quiet; at most it sits by chance deep in some query's
  //     list, its positional neighbours are ordinary keys, so a greedy
  //     search reaches it only by luck. As an entry point it is scored by
  //     every search: a query aimed at it finds it at once. Keys that are
  //     some build query's nearest key are not left out: one can be that by
  //     its ordinary channels alone (the prefill queries looked only there),
  //     and the projected edges that reach it then serve queries like those,
  //     not one aimed at its quiet channels (test/native/ra-graph.test.ts's
  //     outlier case, seed 1993662295: 3 of 8 facts found with the filter,
  //     8 of 8 without).
  {
    const int64_t want = std::min<int64_t>(n, n / kOutlierShare);
    if (want > 0) {
      std::vector<float> z(static_cast<size_t>(n));
      OutlierScores(in.keys, in.dtype, n, d, z.data());
      std::vector<int32_t> cand(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) cand[size_t(i)] = int32_t(i);
      const size_t take = std::min(cand.size(), size_t(want));
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), [&](int32_t a, int32_t b) {
        return z[size_t(a)] != z[size_t(b)] ? z[size_t(a)] > z[size_t(b)] : a < b;
      });
      for (size_t i = 0; i < take; ++i)
        if (std::find(g.entries_.begin(), g.entries_.begin() + std::min<size_t>(g.entries_.size(), kEntryPoints), cand[i]) == g.entries_.begin() + std::min<size_t>(g.entries_.size(), kEntryPoints))
          g.entries_.push_back(cand[i]);
    }
  }

  // 5. Connectivity: every key must be reachable from the entry points (the
  //    exhaustive search relies on it). Mark what the entries reach; for each
  //    key they do not (mostly keys no build query retrieved), search the
  //    graph for its nearest keys by Euclidean distance (score 2x·k - |k|²).
  //    All results are reachable, so linking the best ones to the key makes
  //    it reachable; a key without out-edges also gets edges to them. The
  //    searches run in parallel on the unchanged graph, the edges are added
  //    after, so one pass suffices. A bridging in-edge comes from one of the
  //    two nearest results with fewer than degree + degree/4 edges (from the
  //    one with the fewest when none has room), so out-degrees may pass
  //    `degree` a little (maxDegree() reports it).
  {
    std::vector<uint8_t> reached(size_t(n), 0);
    std::vector<int32_t> stack(g.entries_.begin(), g.entries_.end());
    for (int32_t e : stack) reached[size_t(e)] = 1;
    while (!stack.empty()) {
      const int32_t u = stack.back();
      stack.pop_back();
      for (int32_t v : adj[size_t(u)])
        if (!reached[size_t(v)]) {
          reached[size_t(v)] = 1;
          stack.push_back(v);
        }
    }
    std::vector<int32_t> lost;
    for (int64_t i = 0; i < n; ++i) {
      if (!reached[size_t(i)]) lost.push_back(int32_t(i));
      if (!retrieved[size_t(i)]) ++stats.unretrieved;
    }
    const size_t linkEf = std::max<size_t>(32, degree);
    const size_t linkOut = std::max<size_t>(1, degree / 2);
    std::vector<std::vector<int32_t>> found(lost.size());
    ThreadPool::Get().ParallelFor((lost.size() + 63) / 64, [&](size_t t) {
      std::vector<float> x(static_cast<size_t>(d)), r(static_cast<size_t>(d));
      std::vector<Hit> top;
      for (size_t li = t * 64; li < std::min(lost.size(), (t + 1) * 64); ++li) {
        const int32_t xi = lost[li];
        WidenRow(in.keys + size_t(xi) * d, in.dtype, size_t(d), x.data());
        ragraph::BeamSearch(
            ragraph::AdjView{&adj}, n, g.entries_.data(), g.entries_.size(), nullptr, 0, linkEf, in.keys, d,
            [&](int32_t id) {
              WidenRow(in.keys + size_t(id) * d, in.dtype, size_t(d), r.data());
              return 2.f * Dot(x.data(), r.data(), size_t(d)) - norm2[size_t(id)];
            },
            top);
        std::sort(top.begin(), top.end(), Better);
        for (const Hit& h : top)
          if (h.id != xi && found[li].size() < linkOut) found[li].push_back(h.id);
      }
    });
    const size_t slack = degree + std::max<size_t>(2, degree / 4);
    for (size_t li = 0; li < lost.size(); ++li) {
      const int32_t xi = lost[li];
      if (found[li].empty()) continue;  // only when n == 1 or every result is xi itself
      // In-edges: from up to two of the nearest results that have room; the
      // nearest one regardless of room when none has.
      int added = 0;
      for (int32_t u : found[li])
        if (added < 2 && adj[size_t(u)].size() < slack) {
          adj[size_t(u)].push_back(xi);
          ++added;
        }
      if (added == 0) {
        int32_t best = found[li][0];
        for (int32_t u : found[li]) if (adj[size_t(u)].size() < adj[size_t(best)].size()) best = u;
        adj[size_t(best)].push_back(xi);
      }
      stats.bridged += std::max(added, 1);
      auto& out = adj[size_t(xi)];
      for (int32_t v : found[li])
        if (out.size() < degree && std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
    }
  }
  stats.connectSeconds = Since(t0);

  // 6. CSR.
  for (int64_t u = 0; u < n; ++u) g.offsets_[size_t(u) + 1] = g.offsets_[size_t(u)] + int64_t(adj[size_t(u)].size());
  g.neighbors_.resize(size_t(g.offsets_[size_t(n)]));
  for (int64_t u = 0; u < n; ++u)
    std::copy(adj[size_t(u)].begin(), adj[size_t(u)].end(), g.neighbors_.begin() + g.offsets_[size_t(u)]);
  if (statsOut) *statsOut = stats;
  return g;
}

}  // namespace kvr
