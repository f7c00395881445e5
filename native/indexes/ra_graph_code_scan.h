// Internal to RaGraph::SearchAttention (ra_graph_attention.cc): the code
// scan (RaSearchOptions::codeScan), the third way to choose the keys scored
// exactly, beside the beam walk and the code-gated walk.
//
// Every key's 4-bit code (ra_key_codes.h) is scored in the int8 form the
// code walk ranks by (RaKeyCodes::QuantLogits), its rows read in order; the
// key's scan score is ρ(t) = max_h (x̃_h(t) − c0_h) over the group's rows,
// c0 the rows' log-partitions estimated from the strided sample before any
// walk. Graph entry points (the outlier keys among them) and seeds score +∞,
// free keys −∞ (a free seed stays −∞). The candidates are the best M keys by
// ρ, ties towards the lower id, −∞ keys never among them: an exact top-M
// set, which the GPU's scan (native/cuda/ra_scan*) must return too. A walk
// on the graph finds ~1 key of the group's top 1% per 11 scored at 1M keys;
// the codes' ρ order, read whole, puts 0.98 of it in the best 2%
// (bench/results/ra-gpu-walk-feasibility-vm.md, section 2), with no
// sequential depth, at the price of reading every code (64 MB a head at 1M
// keys, d = 128).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/thread_pool.h"
#include "indexes/ra_graph_beam.h"
#include "indexes/ra_key_codes.h"
#include "indexes/ra_pq_codes.h"

namespace kvr {
namespace ragraph {

// Keys a scan block: their ρ (and, at G > 4, the int8-form logits) stay in
// L1 or L2.
constexpr size_t kScanBlock = 256;

struct CodeScanScratch {
  std::vector<float> x, sampleRho;
  std::vector<uint64_t> found, kth;  // BetterKey(ρ, id) of the keys at or above the threshold; a copy to select in
  std::vector<std::vector<uint64_t>> parts;  // found, per pool task
  std::vector<int32_t> ids, start;
};

struct CodeScanCounts {
  int64_t exact = 0;  // keys scored exactly (free keys not included)
  int64_t codes = 0;  // codes scored: every key's (n) when the scan ran
  int64_t kept = 0;   // the two-pass form: keys whose 4-bit code was read after their PQ code
};

// The best `need` keys by ρ among those `special` does not mark (ties
// towards the lower id; NaN never, nor −∞ unless threshold −∞ is reached),
// left in S.found as BetterKey(ρ, id) in ascending id order. ρ is what
// sampleRho(ids, count, out) and rowsRho(first, count, out) give (the 4-bit
// codes' or the PQ codes'). Collecting every key's (ρ, id) and selecting
// among n would write and sort 8 MB a search at 1M keys; instead the keys are
// collected only at or above a threshold set from the strided sample's ρ
// (the sample is a uniform draw, so the share of keys above its r-th best
// is about r / m): r is the expected rank of the need-th key in the sample
// plus 4 standard deviations, so one pass collects ~1.1-1.3 need keys and
// the select runs over those. The threshold is only a guess: a pass that
// collected fewer than `need` keys is redone with r four times deeper (down
// to −∞, every key), so the set is the exact top whatever the guess.
//
// chunk > 0: the pass split into pool tasks of `chunk` keys (at least
// kScanBlock), each collecting its own keys, merged in task order: the same
// set whichever thread ran what (RaSearchOptions::scanChunk).
template <typename SampleRho, typename RowsRho>
inline void SelectTop(const SampleRho& sampleRho, const RowsRho& rowsRho, int64_t n, const Visited& special,
                      int64_t specials, int64_t need, int64_t off, int64_t stride, int64_t m, int64_t chunk,
                      CodeScanScratch& S) {
  const float kNone = -std::numeric_limits<float>::infinity();
  // The sample's ρ, for the threshold alone.
  S.start.resize(size_t(m));
  for (int64_t j = 0; j < m; ++j) S.start[size_t(j)] = int32_t(off + j * stride);
  S.sampleRho.resize(size_t(m));
  for (int64_t j0 = 0; j0 < m; j0 += int64_t(kScanBlock)) {
    const size_t count = size_t(std::min<int64_t>(int64_t(kScanBlock), m - j0));
    sampleRho(S.start.data() + j0, count, S.sampleRho.data() + j0);
  }
  std::sort(S.sampleRho.begin(), S.sampleRho.end(), std::greater<float>());
  const double p = double(need) / double(std::max<int64_t>(1, n - specials));
  double r = std::ceil(p * double(m) + 4.0 * std::sqrt(p * double(m)) + 4.0);
  const int64_t part = chunk > 0 ? std::max<int64_t>(chunk, int64_t(kScanBlock)) : n;
  const size_t tasks = size_t(std::max<int64_t>(1, (n + part - 1) / part));
  S.parts.resize(tasks);
  for (;;) {
    const float thr = r < double(m) ? S.sampleRho[size_t(r)] : kNone;
    auto scanPart = [&](size_t task) {
      std::vector<uint64_t>& found = S.parts[task];
      found.clear();
      std::vector<float> x;
      float rho[kScanBlock];
      const int64_t end = std::min(n, int64_t(task + 1) * part);
      for (int64_t t0 = int64_t(task) * part; t0 < end; t0 += int64_t(kScanBlock)) {
        const size_t count = size_t(std::min<int64_t>(int64_t(kScanBlock), end - t0));
        rowsRho(t0, count, rho, x);
        for (size_t i = 0; i < count; ++i) {
          const int32_t t = int32_t(t0 + int64_t(i));
          if (rho[i] >= thr && !special.Test(t)) found.push_back(BetterKey(rho[i], t));
        }
      }
    };
    if (tasks == 1) scanPart(0);
    else ThreadPool::Get().ParallelFor(tasks, scanPart);
    S.found.clear();
    for (const std::vector<uint64_t>& found : S.parts) S.found.insert(S.found.end(), found.begin(), found.end());
    if (int64_t(S.found.size()) >= need) {
      // The need-th best selected in a copy; the found keys, in id order as
      // collected, kept up to it: no sort of the ids afterwards.
      S.kth.assign(S.found.begin(), S.found.end());
      std::nth_element(S.kth.begin(), S.kth.begin() + (need - 1), S.kth.end());
      const uint64_t last = S.kth[size_t(need - 1)];
      size_t kept = 0;
      for (const uint64_t key : S.found) S.found[kept] = key, kept += key <= last ? 1 : 0;
      S.found.resize(kept);
      break;
    }
    if (thr == kNone) break;  // every key collected: fewer than need
    r = 4.0 * r;
  }
}

// ρ over the 4-bit codes: for the sample's rows, and for runs of rows.
inline void SelectScan(const RaKeyCodes& codes, const RaCodeQuery& cq, const float* c0, int64_t n,
                       const Visited& special, int64_t specials, int64_t need, int64_t off, int64_t stride,
                       int64_t m, int64_t chunk, CodeScanScratch& S) {
  S.x.resize(size_t(cq.G) * kScanBlock);
  auto sampleRho = [&](const int32_t* ids, size_t count, float* out) {
    codes.QuantLogits(cq, ids, count, S.x.data(), kScanBlock);
    for (size_t i = 0; i < count; ++i) {
      float r = S.x[i] - c0[0];
      for (int h = 1; h < cq.G; ++h) r = std::max(r, S.x[size_t(h) * kScanBlock + i] - c0[h]);
      out[i] = r;
    }
  };
  auto rowsRho = [&](int64_t first, size_t count, float* out, std::vector<float>& x) {
    codes.MaxShiftedRows(cq, c0, first, count, out, x);
  };
  SelectTop(sampleRho, rowsRho, n, special, specials, need, off, stride, m, chunk, S);
  for (const uint64_t key : S.found) S.ids.push_back(int32_t(uint32_t(key)));
}

// The two-pass form (RaSearchOptions::scanKeep): the best max(need, keep)
// keys by the PQ codes' ρ and the PQ codes' outliers, then the best `need`
// of those by the 4-bit codes' ρ (the scan's own ranking), appended to S.ids
// in ascending order. Returns the keys whose 4-bit code was read.
inline int64_t SelectScanPq(const RaPqCodes& pq, const RaPqQuery& pqq, const RaKeyCodes& codes,
                            const RaCodeQuery& cq, const float* c0, int64_t n, const Visited& special,
                            int64_t specials, int64_t need, int64_t keep, int64_t off, int64_t stride, int64_t m,
                            int64_t chunk, CodeScanScratch& S) {
  auto sampleRho = [&](const int32_t* ids, size_t count, float* out) { pq.MaxShiftedIds(pqq, c0, ids, count, out); };
  auto rowsRho = [&](int64_t first, size_t count, float* out, std::vector<float>&) {
    pq.MaxShiftedRows(pqq, c0, first, count, out);
  };
  SelectTop(sampleRho, rowsRho, n, special, specials, std::max(need, keep), off, stride, m, chunk, S);
  // The kept keys and the PQ codes' outliers (ra_pq_codes.h: kept whatever
  // their PQ code says), in id order, ranked again by their 4-bit codes as
  // the one-pass scan ranks every key.
  S.start.clear();
  const std::vector<int32_t>& outliers = pq.outliers();
  size_t o = 0;
  for (const uint64_t key : S.found) {
    const int32_t t = int32_t(uint32_t(key));
    for (; o < outliers.size() && outliers[o] <= t; ++o)
      if (outliers[o] < t && !special.Test(outliers[o])) S.start.push_back(outliers[o]);
    S.start.push_back(t);
  }
  for (; o < outliers.size(); ++o)
    if (!special.Test(outliers[o])) S.start.push_back(outliers[o]);
  const size_t kept = S.start.size();
  S.found.resize(kept);
  S.x.resize(size_t(cq.G) * kScanBlock);
  // Their rows are scattered: a run of kAhead requested ahead of the run scored.
  constexpr size_t kAhead = 64;
  const size_t rb = codes.rowBytes();
  auto ask = [&](size_t from) {
    for (size_t i = from; i < std::min(kept, from + kAhead); ++i)
      for (size_t b = 0; b < rb; b += 64) Prefetch(codes.Row(S.start[i]) + b);
  };
  ask(0);
  for (size_t i0 = 0; i0 < kept; i0 += kAhead) {
    const size_t count = std::min(kAhead, kept - i0);
    ask(i0 + kAhead);
    codes.QuantLogits(cq, S.start.data() + i0, count, S.x.data(), kScanBlock);
    for (size_t i = 0; i < count; ++i) {
      float r = S.x[i] - c0[0];
      for (int h = 1; h < cq.G; ++h) r = std::max(r, S.x[size_t(h) * kScanBlock + i] - c0[h]);
      S.found[i0 + i] = BetterKey(r, S.start[i0 + i]);
    }
  }
  if (int64_t(kept) > need) {
    S.kth.assign(S.found.begin(), S.found.end());
    std::nth_element(S.kth.begin(), S.kth.begin() + (need - 1), S.kth.end());
    const uint64_t last = S.kth[size_t(need - 1)];
    for (const uint64_t key : S.found)
      if (key <= last) S.ids.push_back(int32_t(uint32_t(key)));
  } else {
    for (const uint64_t key : S.found) S.ids.push_back(int32_t(uint32_t(key)));
  }
  return int64_t(kept);
}

// The scan in place of the walk. scorer.Batch(ids, count, out, rows) as
// BeamSearchBatched's scorer (at most kPrefetchAhead keys a call, rows may
// be null). The free keys are scored first (uncounted, as the walks do: they
// enter the refined partitions), then the candidates: the +∞ keys (entries,
// then seeds; if more than M of them, the M lowest ids) and the best of the
// rest by ρ, together the best M = max(0, maxExact) keys, scored in
// ascending id order (the rows read forward). With pq (and its query pqq):
// the rest chosen in two passes (SelectScanPq), keepShare · n kept by the first.
template <typename Scorer>
CodeScanCounts CodeScan(const RaKeyCodes& codes, const RaCodeQuery& cq, const float* c0, int64_t n,
                        const int32_t* entries, size_t entryCount, const int32_t* seeds, size_t seedCount,
                        const int32_t* freeSeeds, size_t freeCount, int64_t maxExact, int64_t off,
                        int64_t stride, int64_t m, int64_t chunk, const uint16_t* keys, int d, Scorer& scorer,
                        CodeScanScratch& S, const RaPqCodes* pq = nullptr, const RaPqQuery* pqq = nullptr,
                        double keepShare = 0) {
  CodeScanCounts counts;
  Visited& special = Visited::Local(n);
  float out[kPrefetchAhead];
  auto score = [&](const std::vector<int32_t>& ids) {
    const size_t total = ids.size();
    for (size_t i = 0; i < std::min(total, kPrefetchAhead); ++i) PrefetchRow(keys + size_t(ids[i]) * d, d);
    for (size_t i0 = 0; i0 < total; i0 += kPrefetchAhead) {
      const size_t count = std::min(kPrefetchAhead, total - i0);
      for (size_t i = i0 + kPrefetchAhead; i < std::min(total, i0 + 2 * kPrefetchAhead); ++i)
        PrefetchRow(keys + size_t(ids[i]) * d, d);
      scorer.Batch(ids.data() + i0, count, out, nullptr);
    }
  };
  S.ids.clear();
  for (size_t i = 0; i < freeCount; ++i)
    if (freeSeeds[i] >= 0 && freeSeeds[i] < n && !special.TestAndSet(freeSeeds[i])) S.ids.push_back(freeSeeds[i]);
  int64_t specials = int64_t(S.ids.size());
  score(S.ids);
  // The +∞ keys: marked, so the scan leaves them to this list.
  S.ids.clear();
  for (size_t e = 0; e < entryCount; ++e)
    if (!special.TestAndSet(entries[e])) S.ids.push_back(entries[e]);
  for (size_t e = 0; e < seedCount; ++e)
    if (seeds[e] >= 0 && seeds[e] < n && !special.TestAndSet(seeds[e])) S.ids.push_back(seeds[e]);
  specials += int64_t(S.ids.size());
  const int64_t M = std::max<int64_t>(0, maxExact);
  std::sort(S.ids.begin(), S.ids.end());
  if (int64_t(S.ids.size()) >= M) {
    S.ids.resize(size_t(M));
  } else {
    const size_t inf = S.ids.size();
    if (pq)
      counts.kept = SelectScanPq(*pq, *pqq, codes, cq, c0, n, special, specials, M - int64_t(inf),
                                 int64_t(std::ceil(std::min(1.0, keepShare) * double(n))), off, stride, m, chunk, S);
    else
      SelectScan(codes, cq, c0, n, special, specials, M - int64_t(inf), off, stride, m, chunk, S);
    counts.codes = n;
    std::inplace_merge(S.ids.begin(), S.ids.begin() + ptrdiff_t(inf), S.ids.end());
  }
  score(S.ids);
  counts.exact = int64_t(S.ids.size());
  return counts;
}

}  // namespace ragraph
}  // namespace kvr
