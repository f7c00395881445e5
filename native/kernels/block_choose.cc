#include "kernels/block_choose.h"

#include <algorithm>
#include <vector>

namespace kvr {

namespace {
constexpr uint8_t kPrev = 1, kTop = 2, kChosen = 4;
}  // namespace

int64_t ChooseBlocks(const BlockChoice& c) {
  uint8_t* f = c.flags;
  int64_t n = 0;
  for (int64_t i = 0; i < c.agnosticN; ++i) {
    f[c.agnostic[i]] |= kChosen;
    c.out[n++] = c.agnostic[i];
  }
  for (int64_t i = 0; i < c.prevN; ++i) f[c.prev[i]] |= kPrev;
  for (int64_t i = 0; i < c.topN; ++i) f[c.top[i]] |= kTop;
  // Every block outside `top` ranks below it, so the candidates' order is
  // `top`, then the previous blocks outside it by their scores.
  std::vector<int32_t> below;
  for (int64_t i = 0; i < c.prevN; ++i)
    if (!(f[c.prev[i]] & kTop)) below.push_back(int32_t(i));
  std::sort(below.begin(), below.end(), [&](int32_t a, int32_t b) {
    return c.prevScores[a] > c.prevScores[b] || (c.prevScores[a] == c.prevScores[b] && c.prev[a] < c.prev[b]);
  });
  const int64_t maxNew = c.prevN == 0 || c.maxNew < 0 ? INT64_MAX : c.maxNew;
  int64_t brought = 0;
  const int64_t candidates = c.topN + int64_t(below.size());
  for (int64_t i = 0; i < candidates && n < c.budget; ++i) {
    const int32_t b = i < c.topN ? c.top[i] : c.prev[below[size_t(i - c.topN)]];
    if (f[b] & kChosen) continue;
    if ((f[b] & kPrev) || brought < maxNew) {
      if (!(f[b] & kPrev)) ++brought;
      f[b] |= kChosen;
      c.out[n++] = b;
    }
  }
  for (int64_t i = 0; i < c.agnosticN; ++i) f[c.agnostic[i]] = 0;
  for (int64_t i = 0; i < c.prevN; ++i) f[c.prev[i]] = 0;
  for (int64_t i = 0; i < c.topN; ++i) f[c.top[i]] = 0;
  for (int64_t i = 0; i < n; ++i) f[c.out[i]] = 0;
  std::sort(c.out, c.out + n);
  for (int64_t i = 0; i < n; ++i) c.cls[i] = c.protectAgnostic && c.importanceRank[c.out[i]] < c.agnosticClass ? 1 : 0;
  return n;
}

}  // namespace kvr
