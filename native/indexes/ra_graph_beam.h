// Internal to the ra_graph_*.cc files: the best-first beam search that the
// public searches (ra_graph_search.cc, ra_graph_attention.cc, over the final
// CSR graph), the build's key-key edges (ra_graph_keys.cc) and its
// connectivity pass (ra_graph_build.cc, over the graph under construction)
// run.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
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
  // On the heap, reached through a thread_local pointer: a reference to a
  // thread_local object itself is an address GCC recomputes (a call to
  // __tls_get_addr in this shared library) at each use inside the walks' loops.
  static Visited& Local(int64_t n) {
    thread_local std::unique_ptr<Visited> v(new Visited);
    v->Begin(n);
    return *v;
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

// Rows are prefetched kPrefetchAhead keys ahead of the one scored, kScoreBatch
// keys at a time: 8 rows (32 lines) issued at once overran the core's
// outstanding misses here (the prefetch instructions stalled), 4 do not.
constexpr size_t kPrefetchAhead = 8, kScoreBatch = 4;

// Better as a function object: std::push_heap given the function itself
// calls it through a pointer.
struct BetterFn {
  bool operator()(const Hit& a, const Hit& b) const { return Better(a, b); }
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

// A hit as a 64-bit key that orders as Better does, smaller = better: the
// score's bits made monotone and inverted (higher first; -0 as +0, as
// Better's compare has it), then the id. Scores are never NaN here.
inline uint64_t BetterKey(float score, int32_t id) {
  uint32_t u;
  const float f = score + 0.f;  // -0 -> +0
  std::memcpy(&u, &f, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(~u) << 32) | uint32_t(id);
}
inline float ScoreOfKey(uint64_t key) {
  uint32_t u = ~uint32_t(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Binary heaps whose top is the entry to leave first (before(a[0], any)),
// kept as plain arrays of n entries followed by a sentinel that no entry
// comes after, which stands in for a missing right child. A level of a sift
// down is then a select, not a branch: std::pop_heap over Hits branched on
// Better's two compares at every level, half of them mispredicted (the beam
// heap's alone was ~14% of a search at 64K keys, session default). The walk
// keeps hits as BetterKey keys, so a compare is one integer compare; the
// order, ties included, is Better's, so the walk pops what it popped
// before.
//
// The top replaced by x: the hole goes down to a leaf along the children
// that come first, then x rises from there (Floyd's order: fewer compares
// when x belongs low, as a replacing entry mostly does).
template <typename T, typename Before>
inline void PushUp(T* a, size_t i, T x, Before before) {  // x into the hole a[i], rising
  while (i > 0) {
    const size_t p = (i - 1) / 2;
    if (!before(x, a[p])) break;
    a[i] = a[p];
    i = p;
  }
  a[i] = x;
}
template <typename T, typename Before>
inline void ReplaceTop(T* a, size_t n, T x, Before before) {
  size_t i = 0;
  for (size_t c = 1; c < n; c = 2 * i + 1) {
    c += before(a[c + 1], a[c]) ? 1 : 0;
    a[i] = a[c];
    i = c;
  }
  PushUp(a, i, x, before);
}
struct KeyLess {
  bool operator()(uint64_t a, uint64_t b) const { return a < b; }
};
struct KeyGreater {
  bool operator()(uint64_t a, uint64_t b) const { return a > b; }
};

// A heap over a vector with its sentinel kept at the end.
template <typename T, typename Before>
class SentinelHeap {
 public:
  explicit SentinelHeap(T sentinel) : sentinel_(sentinel), a_(1, sentinel) {}
  void Clear() { a_.assign(1, sentinel_); }
  size_t Size() const { return a_.size() - 1; }
  bool Empty() const { return a_.size() == 1; }
  const T& Top() const { return a_[0]; }
  void Push(T x) {
    const size_t i = a_.size() - 1;
    a_.push_back(sentinel_);
    PushUp(a_.data(), i, x, Before());
  }
  void ReplaceTop(T x) { ragraph::ReplaceTop(a_.data(), Size(), x, Before()); }
  T Pop() {
    const T first = a_[0];
    const size_t n = Size() - 1;  // entries left
    const T last = a_[n];
    a_[n] = sentinel_;
    a_.pop_back();
    if (n > 0) ragraph::ReplaceTop(a_.data(), n, last, Before());
    return first;
  }
  // Entries appended in any order, then made a heap at once (Heapify).
  void Append(T x) { a_.back() = x, a_.push_back(sentinel_); }
  void Heapify() {
    std::make_heap(a_.begin(), a_.end() - 1, [](const T& x, const T& y) { return Before()(y, x); });
  }
  const T* begin() const { return a_.data(); }
  const T* end() const { return a_.data() + Size(); }
  // Only the first `cap` entries by Before kept (WalkStats::poolCap).
  void KeepFirst(size_t cap) {
    if (Size() <= cap) return;
    std::nth_element(a_.begin(), a_.begin() + cap, a_.end() - 1, Before());
    a_.resize(cap);
    a_.push_back(sentinel_);
    Heapify();
  }

 private:
  T sentinel_;
  std::vector<T> a_;
};

// The k-th best of the scores added so far (the walk's quality bound), as
// bounds that cost an add and a compare: the scores are counted in 65,536
// bins of their order-preserving bits (the top 16: ~0.8% of a score's size
// wide), and the bin holding the k-th best is tracked as scores arrive (it
// only moves up). Lower() and Upper() are that bin's ends; Exact() selects
// within the bin, kept until a score above it lands in its bin or above
// (past a budget linear in the scores, it falls back to a heap of the k
// best). The binary heap of the k best that this replaces sifted 14 levels
// at random for about half the keys scored: ~15% of a search at 1M keys
// capped at 3%.
class KthScore {
 public:
  void Begin(size_t k) {
    for (const uint32_t j : touched_) count_[j] = 0;
    touched_.clear();
    vals_.clear();
    next_.clear();
    best_.clear();
    k_ = k;
    n_ = 0;
    work_ = 0;
    top_ = 0;
    heap_ = false;
  }
  void Add(float s) {
    ++n_;
    if (heap_) {
      if (s > best_.front()) {
        std::pop_heap(best_.begin(), best_.end(), std::greater<float>());
        best_.back() = s;
        std::push_heap(best_.begin(), best_.end(), std::greater<float>());
      }
      return;
    }
    const uint32_t j = Mono(s) >> 16;
    if (count_[j]++ == 0) touched_.push_back(j), head_[j] = -1, top_ = std::max(top_, j);
    next_.push_back(head_[j]);
    head_[j] = int32_t(vals_.size());
    vals_.push_back(s);
    if (n_ < k_) return;
    if (n_ == k_) {  // the k-th's bin, found from the top
      b_ = top_;
      above_ = 0;
      while (above_ + count_[b_] < k_) above_ += count_[b_--];
      exact_ = false;
    } else if (j > b_) {
      if (++above_ >= k_) {
        do {
          do ++b_;
          while (count_[b_] == 0);
          above_ -= count_[b_];
        } while (above_ >= k_);
      }
      exact_ = false;
    } else if (j == b_ && s > kth_) {  // one at or below the k-th leaves it where it is
      exact_ = false;
    }
  }
  bool Known() const { return n_ >= k_; }
  float Lower() const { return heap_ ? best_.front() : Unmono(b_ << 16); }
  float Upper() const { return heap_ ? best_.front() : Unmono((b_ << 16) | 0xffffu); }
  float Exact() {
    if (heap_) return best_.front();
    if (!exact_) {
      bin_.clear();
      for (int32_t i = head_[b_]; i >= 0; i = next_[size_t(i)]) bin_.push_back(vals_[size_t(i)]);
      work_ += bin_.size();
      // Scores crowded into the k-th's bin, asked for often (a margin
      // narrower than a bin): selecting in the bin again and again would
      // grow with the square of the keys scored. Past a linear budget, the
      // k best as a heap from here on, as before the bins.
      if (work_ > 4 * n_ + 65536) {
        best_.assign(vals_.begin(), vals_.end());
        std::nth_element(best_.begin(), best_.begin() + (k_ - 1), best_.end(), std::greater<float>());
        best_.resize(k_);
        std::make_heap(best_.begin(), best_.end(), std::greater<float>());
        heap_ = true;
        return best_.front();
      }
      const size_t r = k_ - above_;  // 1-based, from the top of the bin
      std::nth_element(bin_.begin(), bin_.begin() + (r - 1), bin_.end(), std::greater<float>());
      kth_ = bin_[r - 1];
      exact_ = true;
    }
    return kth_;
  }

 private:
  static uint32_t Mono(float s) {
    uint32_t u;
    std::memcpy(&u, &s, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  static float Unmono(uint32_t u) {
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  std::vector<uint32_t> count_ = std::vector<uint32_t>(65536, 0);
  std::vector<int32_t> head_ = std::vector<int32_t>(65536, -1);
  std::vector<uint32_t> touched_;
  std::vector<float> vals_, bin_, best_;
  std::vector<int32_t> next_;  // the previous score added to the same bin, -1 at its first
  size_t k_ = 0, n_ = 0, above_ = 0, work_ = 0;  // above_: scores in bins above b_; work_: scores gathered by Exact
  uint32_t b_ = 0, top_ = 0;
  float kth_ = 0;
  bool exact_ = false, heap_ = false;
};

// The walk's shape, for the searches' results (RaSearchResult) and a GPU
// walk's design (bench/ra-gpu-walk.ts): counted where the caller asks. In:
// poolCap > 0 keeps only the best poolCap candidates after each round, as a
// candidate pool of fixed size in a CTA's shared memory would (an
// experiment: RaSearchOptions::poolCap; 0, the default, is the unbounded
// heap).
struct WalkStats {
  size_t poolCap = 0;
  int64_t rounds = 0;          // rounds of expansions: the walk's sequential depth
  int64_t expanded = 0;        // candidates expanded (neighbour lists read)
  int64_t startKeys = 0;       // keys scored before the first round (entries, seeds)
  int64_t peakCandidates = 0;  // the candidate heap's largest size after a round's scores (before a cut)
};

// The walk scores keys through `scorer.Batch(ids, count, out, rows)`: out[i]
// = the score of ids[i] (its row at rows[i] where rows is not null, else the
// keys' own), for up to kPrefetchAhead keys at a time (kScoreBatch in rounds), always in the
// order the walk meets them (a scorer may keep per-key state in that order,
// as the attention search's partition sums do). A batch is part of a
// round's new keys: their rows are loaded and scored side by side, and the
// walk's bookkeeping, whose branches hang on the scores, comes after.
//
// Starts from the entries (their rows copied side by side at entryRows,
// entry e's at entryRows + e·d, where not null) and the seeds (ids outside
// [0, n) skipped), and
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
// `width` candidates are expanded a round: the best ones that each pass the
// stop tests as the walk stands before the round (a candidate that fails
// them is left where it is and tried again after the round; the walk ends
// when the best one fails), their lists read together and all their new
// neighbours scored as one stream, rows prefetched ahead across the lists.
// One at a time (width 1, the default and the build's walks) each
// expansion's rows wait behind its pop and its list, ~5 new keys each at 1M
// keys: width 8 takes 0.89-0.92 of that walk's CPU a search there on the
// 2-core VM, the scanned share and recall the same to 3-4 digits
// (bench/results/ra-search-1048576-vm-r5.md), but 1.13 of its capped
// layer-step on the 16-core GPU host (ra-search-1048576-h100-r5.md).
// Width 1 is the walk as it was, key for key.
//
// Cost at 1M keys (bench/ra-search.ts): most of it is reading the scored keys'
// rows from memory; the bookkeeping is kept off that path: `top` becomes a
// heap only once it holds ef hits (until then every hit enters it, and a
// search stopped by the margin often never fills it), the candidate and beam
// heaps sift without branching (SentinelHeap), the k-th best score is kept
// as counts in bins (KthScore), a key already below the margin's bound never
// enters the candidate heap, and the thread's scratch is looked up once.
template <typename Graph, typename Scorer>
int64_t BeamSearchBatched(const Graph& graph, int64_t n, const int32_t* entries, size_t entryCount,
                          const int32_t* seeds, size_t seedCount, size_t ef, const uint16_t* keys, int d,
                          Scorer& scorer, std::vector<Hit>& top, size_t k = 0, float margin = 3.0e38f,
                          int64_t maxScan = 0, const int32_t* freeSeeds = nullptr, size_t freeCount = 0,
                          const uint16_t* entryRows = nullptr, size_t width = 1, WalkStats* stats = nullptr) {
  top.clear();
  if (n == 0 || ef == 0) return 0;
  struct Scratch {
    SentinelHeap<uint64_t, KeyLess> cand{~uint64_t(0)};    // BetterKey keys, the best on top
    SentinelHeap<uint64_t, KeyGreater> beam{0};            // the best ef so far as keys, the worst on top once full
    KthScore kbest;                                         // the k-th best score so far
    std::vector<int32_t> fresh, nodes;  // a round's new keys; its expanded candidates
    std::vector<const uint16_t*> rows;  // the fresh entry points' rows, given entryRows
  };
  // On the heap, reached through a thread_local pointer (Visited::Local says
  // why): with the Scratch itself thread_local, the walk's pushes onto
  // `fresh` each called __tls_get_addr (44 calls in this function at -O3;
  // the walk took 0.93-0.94 of the CPU a group-search at 1M keys without
  // them, bench/results/ra-search-1048576-vm-r6.md).
  thread_local std::unique_ptr<Scratch> held(new Scratch);
  Scratch& scratch = *held;
  auto& cand = scratch.cand;
  auto& beam = scratch.beam;
  auto& kbest = scratch.kbest;
  std::vector<int32_t>& fresh = scratch.fresh;
  std::vector<int32_t>& nodes = scratch.nodes;
  const size_t W = std::max<size_t>(1, width);
  std::vector<const uint16_t*>& rows = scratch.rows;
  cand.Clear();
  beam.Clear();
  kbest.Begin(k);
  const bool bounded = k > 0 && margin < 3.0e38f;
  Visited& seen = Visited::Local(n);
  int64_t scanned = 0;
  bool full = false;  // beam holds ef hits and is a heap (worst on top)
  auto consider = [&](int32_t id, float s) {
    ++scanned;
    if (bounded) kbest.Add(s);
    const uint64_t key = BetterKey(s, id);
    if (!full) {
      beam.Append(key);
      if (beam.Size() == ef) {
        beam.Heapify();
        full = true;
      }
    } else if (key < beam.Top()) {
      beam.ReplaceTop(key);
    } else {
      return;
    }
    // Below the bound now (the k-th best's bin's lower end, at most the k-th
    // best), below it whenever the walk would pop it (the k-th best only
    // rises): that pop would end the walk, and so does the pop of whatever
    // worse candidate stands in its place. Same walk, a smaller heap. (A key
    // the bin's end lets in that the k-th best would keep off is such a
    // candidate: its pop ends the walk where a worse one's would.)
    if (bounded && kbest.Known() && s < kbest.Lower() - margin) return;
    cand.Push(key);
    // One at a time, the list's offset is fetched at the push (the pop that
    // needs it comes right after a batch); a round fetches its candidates'
    // offsets together at their pops instead, and most pushed candidates
    // are never popped (~29K pushes, ~5K pops capped at 3% at 1M keys).
    if (W == 1) graph.PrefetchHead(id);
  };
  float batch[kPrefetchAhead];
  // Scores fresh[0..) in the order given, `per` keys a batch, the rows
  // kPrefetchAhead keys ahead prefetched before each batch (prefetching them
  // all at once stalls on the core's outstanding-miss limit); the first
  // kPrefetchAhead rows are prefetched by the caller. With `at` the rows are
  // at[i], not the keys' rows. One at a time (W = 1) a batch is
  // kPrefetchAhead keys, the next batch's rows prefetched whole, as before
  // the rounds: kScoreBatch there took 1.11 of the CPU a search capped at 3%
  // at 1M on the 2-core VM, the same ids (4 pairs alternated).
  const size_t per = W == 1 ? kPrefetchAhead : kScoreBatch;
  auto scoreFresh = [&](auto each, const uint16_t* const* at) {
    size_t ahead = std::min(fresh.size(), kPrefetchAhead);  // rows prefetched so far
    for (size_t i0 = 0; i0 < fresh.size(); i0 += per) {
      const size_t count = std::min(per, fresh.size() - i0);
      for (; ahead < std::min(fresh.size(), i0 + per + kPrefetchAhead); ++ahead)
        PrefetchRow(at ? at[ahead] : keys + size_t(fresh[ahead]) * d, d);
      scorer.Batch(fresh.data() + i0, count, batch, at ? at + i0 : nullptr);
      for (size_t i = 0; i < count; ++i) each(fresh[i0 + i], batch[i]);
    }
  };
  // The start keys are batched as the walk's keys are. Scored one at a time,
  // each waited for its row: at 1M keys the 4K entry points alone took
  // ~1.5 ms of a 9 ms search capped at 3%.
  auto startKeys = [&](const int32_t* ids, size_t count, bool inRange) {
    for (size_t e = 0; e < count; ++e) {
      const int32_t id = ids[e];
      if ((inRange || (id >= 0 && id < n)) && !seen.TestAndSet(id)) {
        if (fresh.size() < kPrefetchAhead) PrefetchRow(keys + size_t(id) * d, d);
        fresh.push_back(id);
      }
    }
  };
  fresh.clear();
  startKeys(freeSeeds, freeCount, false);
  scoreFresh([&](int32_t id, float s) { cand.Push(BetterKey(s, id)); }, nullptr);
  fresh.clear();
  if (entryRows) {
    // The entry points' rows side by side (the caller's copy): read in
    // order, not one page each.
    rows.clear();
    for (size_t e = 0; e < entryCount; ++e)
      if (!seen.TestAndSet(entries[e])) fresh.push_back(entries[e]), rows.push_back(entryRows + e * size_t(d));
    for (size_t i = 0; i < std::min(rows.size(), kPrefetchAhead); ++i) PrefetchRow(rows[i], d);
    scoreFresh(consider, rows.data());
    fresh.clear();
  } else {
    startKeys(entries, entryCount, true);
  }
  startKeys(seeds, seedCount, false);
  scoreFresh(consider, nullptr);
  if (stats) {
    stats->startKeys = scanned;
    stats->peakCandidates = int64_t(cand.Size());
    if (stats->poolCap > 0) cand.KeepFirst(stats->poolCap);
  }
  for (;;) {
    // A round: up to W of the best candidates, each passing the stop tests.
    nodes.clear();
    while (nodes.size() < W && !cand.Empty()) {
      const uint64_t ckey = cand.Top();
      const float cs = ScoreOfKey(ckey);
      if (full && beam.Top() < ckey) break;
      // cs < (k-th best) - margin, decided by the bin's ends where they
      // agree (x - margin rounds monotonely in x), else by the exact k-th.
      if (bounded && kbest.Known() && cs < kbest.Lower() - margin) break;
      if (bounded && kbest.Known() && !(cs >= kbest.Upper() - margin) && cs < kbest.Exact() - margin) break;
      if (maxScan > 0 && scanned >= maxScan) break;
      cand.Pop();
      nodes.push_back(int32_t(uint32_t(ckey)));
      if (W > 1) graph.PrefetchHead(nodes.back());
    }
    if (nodes.empty()) break;
    if (W == 1) {
      if (!cand.Empty()) graph.PrefetchList(int32_t(uint32_t(cand.Top())));  // likely the next one expanded
    } else {
      for (const int32_t u : nodes) graph.PrefetchList(u);
    }
    fresh.clear();
    for (const int32_t u : nodes) {
      // The cap as one node at a time has it: a list that would start past
      // it is not read, and the walk ends after this round.
      if (maxScan > 0 && scanned + int64_t(fresh.size()) >= maxScan) break;
      const auto nb = graph.List(u);
      for (size_t i = 0; i < nb.second; ++i) {
        const int32_t v = nb.first[i];
        if (!seen.TestAndSet(v)) {
          if (fresh.size() < kPrefetchAhead) PrefetchRow(keys + size_t(v) * d, d);
          fresh.push_back(v);
        }
      }
    }
    scoreFresh(consider, nullptr);
    if (stats) {
      ++stats->rounds;
      stats->expanded += int64_t(nodes.size());
      stats->peakCandidates = std::max(stats->peakCandidates, int64_t(cand.Size()));
      if (stats->poolCap > 0) cand.KeepFirst(stats->poolCap);
    }
  }
  top.reserve(beam.Size());
  for (const uint64_t key : beam) top.push_back(Hit{ScoreOfKey(key), int32_t(uint32_t(key))});
  return scanned;
}

// A scorer of one key at a time, score(id) -> float, as a batch scorer.
template <typename Score>
struct PerKey {
  Score& score;
  void Batch(const int32_t* ids, size_t count, float* out, const uint16_t* const* /*rows*/) {
    for (size_t i = 0; i < count; ++i) out[i] = score(ids[i]);
  }
};

// BeamSearchBatched with a scorer of one key at a time, score(id) -> float.
template <typename Graph, typename Score>
int64_t BeamSearch(const Graph& graph, int64_t n, const int32_t* entries, size_t entryCount, const int32_t* seeds,
                   size_t seedCount, size_t ef, const uint16_t* keys, int d, Score score, std::vector<Hit>& top,
                   size_t k = 0, float margin = 3.0e38f, int64_t maxScan = 0, const int32_t* freeSeeds = nullptr,
                   size_t freeCount = 0, size_t width = 1) {
  PerKey<Score> scorer{score};
  return BeamSearchBatched(graph, n, entries, entryCount, seeds, seedCount, ef, keys, d, scorer, top, k, margin,
                           maxScan, freeSeeds, freeCount, nullptr, width);
}

// Appends to adj[u] up to params.keyNeighbors of u's nearest keys by cosine
// after centring, none already in adj[u] (ra_graph_keys.cc).
void AddKeyEdges(std::vector<std::vector<int32_t>>& adj, const RaBuildInput& in, const RaGraphParams& params);

}  // namespace ragraph
}  // namespace kvr
