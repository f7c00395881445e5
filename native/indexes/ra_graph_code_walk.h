// Internal to ra_graph_attention.cc: the code-gated walk
// (RaSearchOptions::codeWalk), the walk bench/retrieval-code-walk.ts
// simulated, over the graph's CSR.
//
// Each neighbour the walk meets is read first as its 4-bit code
// (ra_key_codes.h), whose approximate walk score says whether the key is
// worth its exact score: at or above `cut` (τ − δ) it is scored exactly and
// queued by that score, below it is queued by the approximate score alone,
// so the walk still crosses keys outside the top on its way to others. One
// queue holds both kinds of score. The result is the best k of the keys
// scored exactly (the caller's step 4). There is no beam and no margin here:
// the walk runs until the caps stop it or nothing is left, which with no
// caps is every key reachable from the start keys, each scored exactly when
// δ is infinite (an exhaustive search).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "indexes/ra_graph_beam.h"
#include "indexes/ra_code_ranks.h"
#include "indexes/ra_graph_exp.h"
#include "indexes/ra_key_codes.h"
#include "indexes/ra_walk_lists.h"

namespace kvr {
namespace ragraph {

// The approximate walk scores of keys from their codes: the G approximate
// logits of each (RaKeyCodes::QuantLogits, the int8 form) ranked as exact
// logits are, in float (CodeRanks). Batch(ids, count, out, gate) also adds
// each key scoring below `gate` (queued by its code alone) to `sum`, per
// row: a key read only as a code enters the refined partitions at its
// approximate logits, where an unmet key enters at the unreached sample's
// mean (the keys the walk met lie near what it sought, above that mean); a
// key scored exactly enters at its exact ones (the scorer's sums). On the
// generator at 1M (bench/retrieval-code-walk.ts) the output error was the
// same to 0.01 points either way: the walk's exact keys and the free steady
// keys hold most of the partitions there.
class CodeScorer {
 public:
  // sum: the rows' sums over the keys queued by their codes, each kept
  // relative to c0_h (their terms are the keys' shares of the estimated
  // partitions, CodeRanks): begun here.
  CodeScorer(const RaKeyCodes& codes, const RaCodeQuery& cq, const float* c0, LogSums& sum, std::vector<float>& xs)
      : codes_(codes), cq_(cq), c0_(c0), sum_(sum), xs_(xs) {
    for (int h = 0; h < cq.G; ++h) sum_.ref[h] = c0[h], sum_.sum[h] = 0;
  }
  const RaKeyCodes& codes() const { return codes_; }
  void Batch(const int32_t* ids, size_t count, float* out, float gate) {
    const int G = cq_.G;
    const size_t ld = (count + 7) / 8 * 8;
    xs_.resize(size_t(G) * ld);
    codes_.QuantLogits(cq_, ids, count, xs_.data(), ld);
    for (int h = 0; h < G; ++h)
      std::fill(xs_.begin() + ptrdiff_t(size_t(h) * ld + count), xs_.begin() + ptrdiff_t(size_t(h + 1) * ld), 0.f);
    float part[kCodeRankRows];
    CodeRanks(xs_.data(), ld, count, G, c0_, gate, out, part);
    for (int h = 0; h < G; ++h) sum_.sum[h] += double(part[h]);
  }

 private:
  const RaKeyCodes& codes_;
  const RaCodeQuery& cq_;
  const float* c0_;  // [G]: the rows' log-partitions before the walk (the ranks' offsets)
  LogSums& sum_;
  std::vector<float>& xs_;
};

// τ − δ: τ the (quantile · 1%)-quantile from the top of the approximate walk
// scores of the strided sample (keys off + j·stride, j < m), as
// bench/retrieval-code-walk.ts takes it (the score of index
// floor(m · quantile / 100) in descending order). The sample's exact scores
// are known, but the gate compares codes with codes: τ sits where the
// codes' own errors put the top.
inline float CodeCut(CodeScorer& approx, int64_t off, int64_t stride, int64_t m, float quantile, float delta,
                     std::vector<int32_t>& ids, std::vector<float>& r) {
  ids.resize(size_t(m));
  r.resize(size_t(m));
  for (int64_t j = 0; j < m; ++j) ids[size_t(j)] = int32_t(off + j * stride);
  for (int64_t j = 0; j < m; ++j) Prefetch(approx.codes().Row(ids[size_t(j)]));
  // A gate of −∞ queues none: the sample's codes stay out of the sums.
  approx.Batch(ids.data(), size_t(m), r.data(), -std::numeric_limits<float>::infinity());
  // quantile in (0, 100] (the binding's check); anything else clamps.
  const double share = quantile > 0 ? std::min(double(quantile), 100.0) / 100.0 : 0.0;
  const size_t at = std::min(size_t(m) - 1, size_t(double(m) * share));
  std::nth_element(r.begin(), r.begin() + ptrdiff_t(at), r.end(), std::greater<float>());
  return r[at] - delta;
}

// The graph's lists as the code walk reads them: PrefetchHead(u) for a
// round's nodes, then PrefetchRest(u), then List(u)[i], i < size(), in the
// CSR's order.
struct CsrWalkView {
  CsrView csr;
  struct List {
    const int32_t* ids;
    size_t count;
    size_t size() const { return count; }
    int32_t operator[](size_t i) const { return ids[i]; }
  };
  void PrefetchHead(int32_t u) const { csr.PrefetchHead(u); }
  // Every line of the list (~11 ids at 1M keys, 1.6 lines on average):
  // with the first alone requested the others were read one wait each
  // (the walk took 1/0.94 of the time, 2-core VM).
  // (A loop of prefetches alone: GCC 12 -O3 dropped it here as a loop with
  // no effect (the walk took 1.4x the CPU at 1M keys), hence the asm.)
  void PrefetchRest(int32_t u) const {
    const auto nb = csr.List(u);
    const uintptr_t end = reinterpret_cast<uintptr_t>(nb.first + nb.second);
    for (uintptr_t line = reinterpret_cast<uintptr_t>(nb.first) & ~uintptr_t(63); line < end; line += 64) {
#ifdef KVR_X86_SIMD
      asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char*>(line)));
#endif
    }
  }
  List ListOf(int32_t u) const {
    const auto nb = csr.List(u);
    return {nb.first, nb.second};
  }
};
// RaWalkLists' slots: the head is the list (its first kInline ids).
struct SlotWalkView {
  const int32_t* slots;
  const int32_t* overflow;
  struct List {
    const int32_t* ids;   // the slot's ids
    const int32_t* more;  // the rest, in overflow
    size_t count;
    size_t size() const { return count; }
    int32_t operator[](size_t i) const {
      return i < size_t(RaWalkLists::kInline) ? ids[i] : more[i - size_t(RaWalkLists::kInline)];
    }
  };
  void PrefetchHead(int32_t u) const { Prefetch(slots + size_t(u) * RaWalkLists::kSlot); }
  void PrefetchRest(int32_t) const {}
  List ListOf(int32_t u) const {
    const int32_t* s = slots + size_t(u) * RaWalkLists::kSlot;
    const uint32_t head = uint32_t(s[0]);
    return {s + 1, overflow + (head >> RaWalkLists::kCountBits), size_t(head & ((1u << RaWalkLists::kCountBits) - 1))};
  }
};

// The walk's candidates: a max-priority queue over scores binned finely
// (kBins bins over [lo, hi], ends clamped; last in, first out within a bin).
// The walk queues every key it meets, ~10 for each one it expands (at 1M
// keys, caps 3% / 40%: ~420K queued): a binary heap of them (3 MB) sifts
// each pop down 19 levels out of cache; at 8 candidates a round it took
// 1.27 of these bins' time a search (2-core VM, 3 pairs alternated, the
// same recall). A bin is an array: a push appends, a pop takes the last;
// the order differs from the exact one only within a bin (~0.003 logits at
// 1M keys). The arrays keep their capacity from search to search. (4,096
// bins, and the visited bits of a round prefetched before they are tested,
// took the same time at 1M on the 2-core VM, 3 pairs alternated.)
class BinQueue {
 public:
  static constexpr int kBins = 16384;
  void Begin(float lo, float hi) {
    for (size_t w = 0; w < bits_.size(); ++w)
      for (uint64_t b = bits_[w]; b; b &= b - 1) bins_[w * 64 + size_t(__builtin_ctzll(b))].clear();
    std::fill(bits_.begin(), bits_.end(), 0);
    top_ = -1;
    lo_ = lo;
    scale_ = hi > lo && std::isfinite(hi - lo) ? float(kBins - 1) / (hi - lo) : 0.f;
  }
  bool Empty() const { return top_ < 0; }
  void Push(float s, int32_t id) {
    const float f = (s - lo_) * scale_;
    // NaN and below the range: bin 0; above it: the top bin.
    const int b = f >= float(kBins - 1) ? kBins - 1 : (f > 0.f ? int(f) : 0);
    bins_[size_t(b)].push_back(id);
    bits_[size_t(b) >> 6] |= uint64_t(1) << (b & 63);
    top_ = std::max(top_, b);
  }
  int32_t Pop() {
    std::vector<int32_t>& bin = bins_[size_t(top_)];
    const int32_t id = bin.back();
    bin.pop_back();
    if (bin.empty()) {  // the next lower bin that is not empty
      size_t w = size_t(top_) >> 6;
      uint64_t b = bits_[w] & ~(uint64_t(1) << (top_ & 63));
      bits_[w] = b;
      while (b == 0 && w > 0) b = bits_[--w];
      top_ = b ? int(w * 64) + 63 - __builtin_clzll(b) : -1;
    }
    return id;
  }

 private:
  std::vector<std::vector<int32_t>> bins_ = std::vector<std::vector<int32_t>>(kBins);
  std::vector<uint64_t> bits_ = std::vector<uint64_t>(kBins / 64, 0);  // bins that are not empty
  int top_ = -1;
  float lo_ = 0, scale_ = 0;
};

// The walk's working memory, kept by the caller across searches (its
// thread's scratch, looked up once: every thread_local access in the shared
// library is a call).
struct CodeWalkScratch {
  BinQueue cand;
  std::vector<int32_t> exact, coded, nodes;
  std::vector<const uint16_t*> rows;
  std::vector<float> ranks;
};

struct CodeWalkCounts {
  int64_t exact = 0;  // keys scored exactly (free start keys not included)
  int64_t codes = 0;  // codes read
  int64_t codedOnly = 0;  // of them, keys not then scored exactly
};

// graph: CsrWalkView or SlotWalkView. scorer.Batch(ids, count, out, rows) as BeamSearchBatched's scorer (at most
// kPrefetchAhead keys a call); approx.Batch(ids, count, out, gate) the
// approximate walk scores of a round's keys from their codes (CodeScorer),
// told that those below `gate` are queued by that score alone; inSample(id)
// whether the key was scored before the walk (its exact score costs nothing:
// it is not read as a code). codeRow(id) the address of a key's code row.
// [lo, hi]: the range of walk scores the queue resolves finely (BinQueue).
// `width` candidates are expanded a round, their lists and codes fetched
// together. Stops expanding once maxExact keys are scored exactly or maxCodes
// codes read (0 = no cap): either may be passed by one round's lists. With
// both caps and adapt > 0 each round's cutoff is cut + adapt · (the share of
// maxExact the walk has used since its start keys − the share of maxCodes
// read): it tightens while exact scoring runs ahead of the codes read and
// loosens while it lags (ra_graph.h, RaSearchOptions::codeAdapt).
template <typename Graph, typename Scorer, typename Approx, typename InSample, typename CodeRow>
CodeWalkCounts CodeGatedWalk(const Graph& graph, int64_t n, const int32_t* entries, size_t entryCount,
                             const uint16_t* entryRows, const int32_t* seeds, size_t seedCount,
                             const int32_t* freeSeeds, size_t freeCount, const uint16_t* keys, int d,
                             Scorer& scorer, Approx& approx, InSample inSample, CodeRow codeRow, float cut,
                             float lo, float hi, int64_t maxExact, int64_t maxCodes, size_t width,
                             float adapt, CodeWalkScratch& scratch) {
  CodeWalkCounts counts;
  BinQueue& cand = scratch.cand;
  std::vector<int32_t>& exact = scratch.exact;
  std::vector<int32_t>& coded = scratch.coded;
  cand.Begin(lo, hi);
  Visited& seen = Visited::Local(n);
  float out[kPrefetchAhead];
  // Scores `exact` (rows at `at` where given) kPrefetchAhead keys a batch,
  // the next batch's rows prefetched before it, as the beam walk at width 1
  // does; queues each by its exact score.
  auto scoreExact = [&](const uint16_t* const* at, bool counted) {
    const size_t total = exact.size();
    for (size_t i = 0; i < std::min(total, kPrefetchAhead); ++i)
      PrefetchRow(at ? at[i] : keys + size_t(exact[i]) * d, d);
    for (size_t i0 = 0; i0 < total; i0 += kPrefetchAhead) {
      const size_t count = std::min(kPrefetchAhead, total - i0);
      for (size_t i = i0 + kPrefetchAhead; i < std::min(total, i0 + 2 * kPrefetchAhead); ++i)
        PrefetchRow(at ? at[i] : keys + size_t(exact[i]) * d, d);
      scorer.Batch(exact.data() + i0, count, out, at ? at + i0 : nullptr);
      for (size_t i = 0; i < count; ++i) cand.Push(out[i], exact[i0 + i]);
    }
    if (counted) counts.exact += int64_t(total);
    exact.clear();
  };
  auto startKeys = [&](const int32_t* ids, size_t count) {
    for (size_t e = 0; e < count; ++e)
      if (ids[e] >= 0 && ids[e] < n && !seen.TestAndSet(ids[e])) exact.push_back(ids[e]);
  };
  exact.clear();
  startKeys(freeSeeds, freeCount);
  scoreExact(nullptr, false);
  auto& rows = scratch.rows;
  rows.clear();
  for (size_t e = 0; e < entryCount; ++e)
    if (!seen.TestAndSet(entries[e]))
      exact.push_back(entries[e]), rows.push_back(entryRows ? entryRows + e * size_t(d) : keys + size_t(entries[e]) * d);
  scoreExact(rows.data(), true);
  startKeys(seeds, seedCount);
  scoreExact(nullptr, true);
  std::vector<int32_t>& nodes = scratch.nodes;
  const size_t W = std::max<size_t>(1, width);
  const int64_t exact0 = counts.exact;
  const bool adapting = adapt > 0 && maxExact > exact0 && maxCodes > 0;
  while (!cand.Empty()) {
    if (maxExact > 0 && counts.exact >= maxExact) break;
    if (maxCodes > 0 && counts.codes >= maxCodes) break;
    const float gate = adapting ? cut + adapt * (float(counts.exact - exact0) / float(maxExact - exact0) -
                                                 float(counts.codes) / float(maxCodes))
                                : cut;
    // A round: the best W candidates, their lists fetched side by side.
    nodes.clear();
    while (nodes.size() < W && !cand.Empty()) nodes.push_back(cand.Pop()), graph.PrefetchHead(nodes.back());
    for (const int32_t u : nodes) graph.PrefetchRest(u);
    coded.clear();
    for (const int32_t u : nodes) {
      const auto nb = graph.ListOf(u);
      for (size_t i = 0; i < nb.size(); ++i) {
        const int32_t v = nb[i];
        if (seen.TestAndSet(v)) continue;
        if (inSample(v)) {
          exact.push_back(v);
        } else {
          // A code row (64 bytes at d = 128) is one line: the round's rows
          // all requested as the lists are read, where 16 ahead of the one
          // scored left the first of each round waiting.
          coded.push_back(v);
          Prefetch(codeRow(v));
        }
      }
    }
    std::vector<float>& ranks = scratch.ranks;
    ranks.resize(coded.size());
    approx.Batch(coded.data(), coded.size(), ranks.data(), gate);
    for (size_t i = 0; i < coded.size(); ++i) {
      const int32_t v = coded[i];
      if (ranks[i] < gate) {  // as CodeRanks tells queued keys
        ++counts.codedOnly;
        cand.Push(ranks[i], v);
      } else {
        exact.push_back(v);
        PrefetchRow(keys + size_t(v) * d, d);  // scored at the round's end
      }
    }
    counts.codes += int64_t(coded.size());
    scoreExact(nullptr, true);
  }
  return counts;
}

}  // namespace ragraph
}  // namespace kvr
