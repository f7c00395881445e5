#include "kernels/block_choose.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvr {

namespace {
constexpr uint8_t kPrev = 1, kTop = 2, kChosen = 4, kExcluded = 8, kSeen = 16;

// JS's Math.max: NaN when either is, +0 over -0. The choice ranks previous blocks by these maxima as the
// method did in JS, so a NaN score (a query past float32) orders the candidates the same way it did there.
inline float JsMax(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  if (a == b) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}

// Per-thread scratch, reused from step to step: a step allocates nothing once these have grown.
struct Scratch {
  std::vector<int32_t> seen, top, prev, below;
  std::vector<float> prevScores;
};
}  // namespace

int64_t ChooseStepBlocks(const BlockStep& s, const BlockStepHead& h) {
  thread_local Scratch t;
  uint8_t* f = s.flags;
  const int64_t R = s.reps;
  for (int64_t i = 0; i < s.excludeN; ++i) f[s.exclude[i]] |= kExcluded;
  // The top rows' first `reach` distinct blocks, best first; the excluded ones among them are dropped.
  t.seen.clear(), t.top.clear();
  const size_t want = size_t(std::min(s.reach, s.blocks));
  for (int64_t i = 0; i < h.topRowsN && t.seen.size() < want; ++i) {
    const int32_t b = int32_t(h.topRows[i] / R);
    if (f[b] & kSeen) continue;
    f[b] |= kSeen;
    t.seen.push_back(b);
    if (!(f[b] & kExcluded)) t.top.push_back(b);
  }
  // The previous blocks still allowed, each scored as the best of its rows.
  t.prev.clear(), t.prevScores.clear();
  for (int64_t i = 0; i < h.prevN; ++i) {
    const int32_t b = h.prev[i];
    if (f[b] & kExcluded) continue;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < R; ++r) best = JsMax(best, h.prevRowScores ? h.prevRowScores[i * R + r] : h.rowScores[int64_t(b) * R + r]);
    t.prev.push_back(b);
    t.prevScores.push_back(best);
  }
  // The query-agnostic blocks first: the most important ones not excluded.
  int64_t n = 0;
  for (int64_t i = 0; i < s.blocks && n < s.agnostic; ++i) {
    const int32_t b = h.byImportance[i];
    if (f[b] & kExcluded) continue;
    f[b] |= kChosen;
    h.out[n++] = b;
  }
  for (int32_t b : t.prev) f[b] |= kPrev;
  for (int32_t b : t.top) f[b] |= kTop;
  // Every block outside `top` ranks below it, so the candidates' order is
  // `top`, then the previous blocks outside it by their scores.
  t.below.clear();
  for (size_t i = 0; i < t.prev.size(); ++i)
    if (!(f[t.prev[i]] & kTop)) t.below.push_back(int32_t(i));
  const float* ps = t.prevScores.data();
  const int32_t* pb = t.prev.data();
  std::sort(t.below.begin(), t.below.end(), [&](int32_t a, int32_t b) { return ps[a] > ps[b] || (ps[a] == ps[b] && pb[a] < pb[b]); });
  const int64_t maxNew = t.prev.empty() || s.maxNew < 0 ? INT64_MAX : s.maxNew;
  int64_t brought = 0;
  const int64_t topN = int64_t(t.top.size()), candidates = topN + int64_t(t.below.size());
  for (int64_t i = 0; i < candidates && n < s.budget; ++i) {
    const int32_t b = i < topN ? t.top[size_t(i)] : pb[t.below[size_t(i - topN)]];
    if (f[b] & kChosen) continue;
    if ((f[b] & kPrev) || brought < maxNew) {
      if (!(f[b] & kPrev)) ++brought;
      f[b] |= kChosen;
      h.out[n++] = b;
    }
  }
  for (int64_t i = 0; i < s.excludeN; ++i) f[s.exclude[i]] = 0;
  for (int32_t b : t.seen) f[b] = 0;
  for (int32_t b : t.prev) f[b] = 0;
  for (int64_t i = 0; i < n; ++i) f[h.out[i]] = 0;
  std::sort(h.out, h.out + n);
  for (int64_t i = 0; i < n; ++i) h.cls[i] = s.protectAgnostic && h.importanceRank[h.out[i]] < s.agnosticClass ? 1 : 0;
  if (h.outRows)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < R; ++r) h.outRows[i * R + r] = int32_t(int64_t(h.out[i]) * R + r);
  return n;
}

}  // namespace kvr
