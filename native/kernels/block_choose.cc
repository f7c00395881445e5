#include "kernels/block_choose.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvr {

namespace {
constexpr uint8_t kPrev = 1, kTop = 2, kChosen = 4, kExcluded = 8, kSeen = 16, kClass = 32;

// The best of a block's row scores as JS's Math.max took it: NaN when any is (a query past float32), so the
// previous blocks are ordered as they were when the method chose in JS. (-0 against +0 is not told apart: the
// scores are only compared.)
inline float BestOf(const float* scores, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t r = 0; r < n; ++r) {
    const float v = scores[r];
    nan |= v != v;
    best = v > best ? v : best;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

// Per-thread scratch, reused from step to step: a step allocates nothing once these have grown. The flags,
// one byte per block, are zero between calls; one array for every (document, layer) of the thread stays in
// cache from one layer's step to the next, where an array per (document, layer) was read cold.
struct Scored {
  float score;
  int32_t id;
};
struct Scratch {
  std::vector<int32_t> seen, top, prev;
  std::vector<Scored> below;
  std::vector<float> prevScores;
  std::vector<uint8_t> flags;
};

__attribute__((noinline)) Scratch& ThreadScratch() {
  thread_local Scratch t;
  return t;
}

// The flags scratch of the calling thread, `blocks` long and zero, and the scratch bound once (ThreadScratch is
// not inlined): in the addon (a shared object, -fPIC) an access to a thread_local is a __tls_get_addr call,
// which GCC repeats in every loop rather than keep the address in a register (perf on the 2-core VM: once or
// twice per candidate).
uint8_t* FlagsFor(Scratch& t, int64_t blocks) {
  if (t.flags.size() < size_t(blocks)) t.flags.resize(size_t(blocks), 0);
  return t.flags.data();
}

void MarkExcluded(const BlockStep& s, uint8_t* f) {
  for (int64_t i = 0; i < s.excludeN; ++i) f[s.exclude[i]] = kExcluded;
}

void ClearExcluded(const BlockStep& s, uint8_t* f) {
  for (int64_t i = 0; i < s.excludeN; ++i) f[s.exclude[i]] = 0;
}

// One head's choice with the step's excluded blocks already marked in f (and nothing else set); it leaves f as
// it found it.
int64_t ChooseHead(const BlockStep& s, const BlockStepHead& h, Scratch& t, uint8_t* f) {
  const int64_t R = s.reps;
  // The top rows' first `reach` distinct blocks, best first; the excluded ones among them are dropped.
  t.seen.clear(), t.top.clear();
  const size_t want = size_t(std::min(s.reach, s.blocks));
  // Rows are non-negative: a shift where reps is a power of two (the seal's 4), else a 32-bit division.
  const int shift = (R & (R - 1)) == 0 ? __builtin_ctzll(uint64_t(R)) : -1;
  for (int64_t i = 0; i < h.topRowsN && t.seen.size() < want; ++i) {
    const uint32_t row = uint32_t(h.topRows[i]);
    const int32_t b = int32_t(shift >= 0 ? row >> shift : row / uint32_t(R));
    const uint8_t fb = f[b];  // read once: the store below would be read back after the vector's
    if (fb & kSeen) continue;
    f[b] = fb | kSeen;
    t.seen.push_back(b);
    if (!(fb & kExcluded)) t.top.push_back(b);
  }
  // The previous blocks still allowed, each scored as the best of its rows.
  t.prev.clear(), t.prevScores.clear();
  for (int64_t i = 0; i < h.prevN; ++i) {
    const int32_t b = h.prev[i];
    if (f[b] & kExcluded) continue;
    t.prev.push_back(b);
    t.prevScores.push_back(BestOf(h.prevRowScores ? h.prevRowScores + i * R : h.rowScores + int64_t(b) * R, R));
  }
  // The query-agnostic blocks first: the most important ones not excluded. A chosen block of importance rank
  // below agnosticClass ≤ agnostic is one of them (the walk takes every block not excluded up to its rank), so
  // its class is marked here and no rank is read for the rest.
  int64_t n = 0;
  const bool classByWalk = s.agnosticClass <= s.agnostic;
  for (int64_t i = 0; i < s.blocks && n < s.agnostic; ++i) {
    const int32_t b = h.byImportance[i];
    if (f[b] & kExcluded) continue;
    f[b] |= i < s.agnosticClass ? kChosen | kClass : kChosen;
    h.out[n++] = b;
  }
  for (int32_t b : t.prev) f[b] |= kPrev;
  for (int32_t b : t.top) f[b] |= kTop;
  // Every block outside `top` ranks below it, so the candidates' order is
  // `top`, then the previous blocks outside it by their scores.
  t.below.clear();
  for (size_t i = 0; i < t.prev.size(); ++i)
    if (!(f[t.prev[i]] & kTop)) t.below.push_back({t.prevScores[i], t.prev[i]});
  std::sort(t.below.begin(), t.below.end(), [](const Scored& a, const Scored& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); });
  const int64_t maxNew = t.prev.empty() || s.maxNew < 0 ? INT64_MAX : s.maxNew;
  int64_t brought = 0;
  const int64_t topN = int64_t(t.top.size()), candidates = topN + int64_t(t.below.size());
  for (int64_t i = 0; i < candidates && n < s.budget; ++i) {
    const int32_t b = i < topN ? t.top[size_t(i)] : t.below[size_t(i - topN)].id;
    if (f[b] & kChosen) continue;
    if ((f[b] & kPrev) || brought < maxNew) {
      if (!(f[b] & kPrev)) ++brought;
      f[b] |= kChosen;
      h.out[n++] = b;
    }
  }
  std::sort(h.out, h.out + n);
  for (int64_t i = 0; i < n; ++i)
    h.cls[i] = s.protectAgnostic && (classByWalk ? (f[h.out[i]] & kClass) != 0 : h.importanceRank[h.out[i]] < s.agnosticClass) ? 1 : 0;
  // Back to the excluded marks alone (seen blocks may be excluded ones; prev and out never are).
  for (int32_t b : t.seen) f[b] &= kExcluded;
  for (int32_t b : t.prev) f[b] = 0;
  for (int64_t i = 0; i < n; ++i) f[h.out[i]] = 0;
  if (h.outRows)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < R; ++r) h.outRows[i * R + r] = int32_t(int64_t(h.out[i]) * R + r);
  return n;
}

}  // namespace

void ChooseStepBlocksHeads(const BlockStep& s, const BlockStepHead* heads, int64_t count, int32_t* chosen) {
  // The excluded blocks are the step's, not a head's: marked once for every head (8 at the shape, ~130
  // blocks each at 1M: the window extended back), where each head marked and cleared them.
  Scratch& t = ThreadScratch();
  uint8_t* f = FlagsFor(t, s.blocks);
  MarkExcluded(s, f);
  for (int64_t h = 0; h < count; ++h) chosen[h] = int32_t(ChooseHead(s, heads[h], t, f));
  ClearExcluded(s, f);
}

// The sum of squares is JS's bit for bit: a float's square is exact in double, so each step rounds once
// whether or not the compiler fuses it into a multiply-add; the order is the same. Four rows at a time: each
// row's sum is one chain of dependent adds (headDim of them, ~4 cycles each), so four chains side by side
// take the time of one (32 rows: ~5 of the ~7 us a call took on the 2-core VM); each row's own order is kept.
void AugmentQueryRows(const float* q, int64_t rows, int64_t group, int64_t headDim, const double* shares, float* out) {
  const int64_t stride = headDim + 8;
  const float root = float(std::sqrt(double(headDim)));
  constexpr int kRows = 4;
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows) {
    double ss[kRows] = {0, 0, 0, 0};
    for (int64_t j = 0; j < headDim; ++j)
      for (int r = 0; r < kRows; ++r) {
        const float x = q[(i + r) * headDim + j];
        out[(i + r) * stride + j] = x;
        const double v = x;
        ss[r] += v * v;
      }
    for (int r = 0; r < kRows; ++r) {
      float* o = out + (i + r) * stride;
      o[headDim] = float(shares[(i + r) / group] * std::sqrt(ss[r]));
      o[headDim + 1] = root;  // REPS_COUNT_COLUMN (index/block-calibration.ts)
    }
  }
  for (; i < rows; ++i) {
    const float* x = q + i * headDim;
    float* o = out + i * stride;
    double ss = 0;
    for (int64_t j = 0; j < headDim; ++j) {
      o[j] = x[j];
      const double v = x[j];
      ss += v * v;
    }
    o[headDim] = float(shares[i / group] * std::sqrt(ss));
    o[headDim + 1] = root;  // REPS_COUNT_COLUMN (index/block-calibration.ts)
  }
}

}  // namespace kvr
