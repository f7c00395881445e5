// Internal to the ra_graph_*.cc files: the best-first beam search that the
// public searches (ra_graph_search.cc, ra_graph_attention.cc, over the final
// CSR graph), the build's key-key edges (ra_graph_keys.cc) and its
// connectivity pass (ra_graph_build.cc, over the graph under construction)
// run.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "common/half.h"
#include "common/ranked_hits.h"
#include "indexes/ra_graph.h"

namespace kvr {
namespace ragraph {

// A per-thread "visited" bitset sized n (n/8 bytes: 8 KiB at 64K keys, so it
// stays in L1), cleared at the start of each search.
class Visited {
 public:
  static Visited& Local(int64_t n) {
    thread_local Visited v;
    v.Begin(n);
    return v;
  }
  bool Test(int32_t i) const { return (bits_[size_t(i) >> 6] >> (i & 63)) & 1; }
  bool TestAndSet(int32_t i) {
    uint64_t& w = bits_[size_t(i) >> 6];
    const uint64_t bit = uint64_t(1) << (i & 63);
    if (w & bit) return true;
    w |= bit;
    return false;
  }

 private:
  void Begin(int64_t n) {
    const size_t words = size_t((n + 63) / 64);
    if (bits_.size() < words) bits_.resize(words);
    std::memset(bits_.data(), 0, words * sizeof(uint64_t));
  }
  std::vector<uint64_t> bits_;
};

inline void Prefetch(const void* p) {
#ifdef KVR_X86_SIMD
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

inline void PrefetchRow(const uint16_t* row, int d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (size_t b = 0; b < size_t(d) * 2; b += 64) Prefetch(p + b);
}

// The final graph (CSR) and the one under construction (a list per key), as
// the search sees them: List(u) -> (pointer, count); the Prefetch calls hide
// the two dependent cache misses of reading a list (its offset, then it).
struct CsrView {
  const int64_t* off;
  const int32_t* nbr;
  std::pair<const int32_t*, size_t> List(int32_t u) const { return {nbr + off[u], size_t(off[u + 1] - off[u])}; }
  void PrefetchHead(int32_t u) const { Prefetch(off + u); }
  void PrefetchList(int32_t u) const { Prefetch(nbr + off[u]); }
};
struct AdjView {
  const std::vector<std::vector<int32_t>>* adj;
  std::pair<const int32_t*, size_t> List(int32_t u) const { return {(*adj)[size_t(u)].data(), (*adj)[size_t(u)].size()}; }
  void PrefetchHead(int32_t u) const { Prefetch(&(*adj)[size_t(u)]); }
  void PrefetchList(int32_t u) const { Prefetch((*adj)[size_t(u)].data()); }
};

constexpr size_t kPrefetchAhead = 8;

// Better and Worse as function objects: std::push_heap given the functions
// themselves calls them through a pointer, which at ~3 heap operations per
// key scored was ~10% of a 1M-key search.
struct BetterFn {
  bool operator()(const Hit& a, const Hit& b) const { return Better(a, b); }
};
struct WorseFn {
  bool operator()(const Hit& a, const Hit& b) const { return Better(b, a); }
};

// Offer (common/ranked_hits.h) with the comparator inlined.
inline void OfferHit(std::vector<Hit>& heap, size_t cap, const Hit& h) {
  if (heap.size() < cap) {
    heap.push_back(h);
    std::push_heap(heap.begin(), heap.end(), BetterFn());
  } else if (Better(h, heap.front())) {
    std::pop_heap(heap.begin(), heap.end(), BetterFn());
    heap.back() = h;
    std::push_heap(heap.begin(), heap.end(), BetterFn());
  }
}

// A min-heap of floats: the smallest on top. Replacing the top is one sift
// down where pop_heap + push_heap was two passes.
inline void ReplaceMin(std::vector<float>& heap, float x) {
  float* a = heap.data();
  const size_t n = heap.size();
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && a[c + 1] < a[c]) ++c;
    if (!(a[c] < x)) break;
    a[i] = a[c];
    i = c;
  }
  a[i] = x;
}

// The walk scores keys through `scorer.Batch(ids, count, out)`: out[i] = the
// score of ids[i], for up to kPrefetchAhead keys at a time, always in the
// order the walk meets them (a scorer may keep per-key state in that order,
// as the attention search's partition sums do). A batch is one expanded
// node's new neighbours: their rows are loaded and scored side by side, and
// the walk's bookkeeping, whose branches hang on the scores, comes after.
//
// Starts from the entries and the seeds (ids outside [0, n) skipped), and
// from the free start keys `freeSeeds`: keys whose scores the caller has
// anyway (the steady zone a session attends in full), scored first, put on
// the candidate heap whatever they score, but neither counted in the return
// value (nor against maxScan) nor entered in `top` or the k-best bound: the
// walk expands from them, the result leaves them out. Fills `top` with the
// best min(ef, reachable) hits (in no particular order); returns how many
// keys were scored (free start keys not included). Stops when the best
// unexpanded candidate is worse than the worst of `top` with `top` full, so
// with ef >= n (and no margin) it expands every key reachable from the
// entries. The quality bound: with k >= 1 and a finite margin it also stops
// once the best unexpanded candidate scores below the k-th best so far
// minus margin. With maxScan > 0 it stops expanding once that many keys have
// been scored (the last expansion may pass it by one neighbour list).
//
// Cost at 1M keys (bench/ra-search.ts): most of it is reading the scored keys'
// rows from memory; the bookkeeping is kept off that path: `top` becomes a
// heap only once it holds ef hits (until then every hit enters it, and a
// search stopped by the margin often never fills it), the k-best heap
// replaces its top in one sift, a key already below the margin's bound never
// enters the candidate heap, and the thread's scratch is looked up once.
template <typename Graph, typename Scorer>
int64_t BeamSearchBatched(const Graph& graph, int64_t n, const int32_t* entries, size_t entryCount,
                          const int32_t* seeds, size_t seedCount, size_t ef, const uint16_t* keys, int d,
                          Scorer& scorer, std::vector<Hit>& top, size_t k = 0, float margin = 3.0e38f,
                          int64_t maxScan = 0, const int32_t* freeSeeds = nullptr, size_t freeCount = 0) {
  top.clear();
  if (n == 0 || ef == 0) return 0;
  struct Scratch {
    std::vector<Hit> cand;
    std::vector<int32_t> fresh;
    std::vector<float> kbest;  // min-heap of the k best scores so far
  };
  thread_local Scratch scratch;
  std::vector<Hit>& cand = scratch.cand;
  std::vector<int32_t>& fresh = scratch.fresh;
  std::vector<float>& kbest = scratch.kbest;
  cand.clear();
  kbest.clear();
  const bool bounded = k > 0 && margin < 3.0e38f;
  Visited& seen = Visited::Local(n);
  int64_t scanned = 0;
  bool full = false;  // top holds ef hits and is a heap (worst on top)
  auto consider = [&](int32_t id, float s) {
    ++scanned;
    if (bounded) {
      if (kbest.size() < k) {
        kbest.push_back(s);
        std::push_heap(kbest.begin(), kbest.end(), std::greater<float>());
      } else if (s > kbest.front()) {
        ReplaceMin(kbest, s);
      }
    }
    const Hit h{s, id};
    if (!full) {
      top.push_back(h);
      if (top.size() == ef) {
        std::make_heap(top.begin(), top.end(), BetterFn());
        full = true;
      }
    } else if (Better(h, top.front())) {
      std::pop_heap(top.begin(), top.end(), BetterFn());
      top.back() = h;
      std::push_heap(top.begin(), top.end(), BetterFn());
    } else {
      return;
    }
    // Below the bound now, below it whenever the walk would pop it (the
    // k-th best only rises): that pop would end the walk, and so does the
    // pop of whatever worse candidate stands in its place. Same walk, a
    // smaller heap.
    if (bounded && kbest.size() >= k && s < kbest.front() - margin) return;
    cand.push_back(h);
    std::push_heap(cand.begin(), cand.end(), WorseFn());
    graph.PrefetchHead(id);
  };
  float one;
  for (size_t e = 0; e < freeCount; ++e) {
    const int32_t id = freeSeeds[e];
    if (id < 0 || id >= n || seen.TestAndSet(id)) continue;
    scorer.Batch(&id, 1, &one);
    cand.push_back(Hit{one, id});
    std::push_heap(cand.begin(), cand.end(), WorseFn());
  }
  for (size_t e = 0; e < entryCount; ++e)
    if (!seen.TestAndSet(entries[e])) scorer.Batch(entries + e, 1, &one), consider(entries[e], one);
  for (size_t e = 0; e < seedCount; ++e)
    if (seeds[e] >= 0 && seeds[e] < n && !seen.TestAndSet(seeds[e])) scorer.Batch(seeds + e, 1, &one), consider(seeds[e], one);
  float batch[kPrefetchAhead];
  while (!cand.empty()) {
    std::pop_heap(cand.begin(), cand.end(), WorseFn());
    const Hit c = cand.back();
    cand.pop_back();
    if (full && Better(top.front(), c)) break;
    if (bounded && kbest.size() >= k && c.score < kbest.front() - margin) break;
    if (maxScan > 0 && scanned >= maxScan) break;
    if (!cand.empty()) graph.PrefetchList(cand.front().id);  // likely the next one expanded
    const auto nb = graph.List(c.id);
    fresh.clear();
    for (size_t i = 0; i < nb.second; ++i) {
      const int32_t v = nb.first[i];
      if (!seen.TestAndSet(v)) {
        if (fresh.size() < kPrefetchAhead) PrefetchRow(keys + size_t(v) * d, d);
        fresh.push_back(v);
      }
    }
    // Rows are prefetched a batch ahead of the one being scored (prefetching
    // them all at once stalls on the core's outstanding-miss limit).
    for (size_t i0 = 0; i0 < fresh.size(); i0 += kPrefetchAhead) {
      const size_t count = std::min(kPrefetchAhead, fresh.size() - i0);
      for (size_t i = i0 + kPrefetchAhead; i < std::min(fresh.size(), i0 + 2 * kPrefetchAhead); ++i)
        PrefetchRow(keys + size_t(fresh[i]) * d, d);
      scorer.Batch(fresh.data() + i0, count, batch);
      for (size_t i = 0; i < count; ++i) consider(fresh[i0 + i], batch[i]);
    }
  }
  return scanned;
}

// A scorer of one key at a time, score(id) -> float, as a batch scorer.
template <typename Score>
struct PerKey {
  Score& score;
  void Batch(const int32_t* ids, size_t count, float* out) {
    for (size_t i = 0; i < count; ++i) out[i] = score(ids[i]);
  }
};

// BeamSearchBatched with a scorer of one key at a time, score(id) -> float.
template <typename Graph, typename Score>
int64_t BeamSearch(const Graph& graph, int64_t n, const int32_t* entries, size_t entryCount, const int32_t* seeds,
                   size_t seedCount, size_t ef, const uint16_t* keys, int d, Score score, std::vector<Hit>& top,
                   size_t k = 0, float margin = 3.0e38f, int64_t maxScan = 0, const int32_t* freeSeeds = nullptr,
                   size_t freeCount = 0) {
  PerKey<Score> scorer{score};
  return BeamSearchBatched(graph, n, entries, entryCount, seeds, seedCount, ef, keys, d, scorer, top, k, margin,
                           maxScan, freeSeeds, freeCount);
}

// Appends to adj[u] up to params.keyNeighbors of u's nearest keys by cosine
// after centring, none already in adj[u] (ra_graph_keys.cc).
void AddKeyEdges(std::vector<std::vector<int32_t>>& adj, const RaBuildInput& in, const RaGraphParams& params);

}  // namespace ragraph
}  // namespace kvr
