// Exhaustive top-k inner-product scan of a query group over 16-bit keys.
// A key's score is the largest q·k over the group's query heads (the heads
// of a GQA group share one selection). Ties break towards the lower id.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {

struct TopkProblem {
  const float* q = nullptr;  // [group, headDim]
  int group = 1, headDim = 0;
  const uint16_t* keys = nullptr;  // [tokens, headDim]
  int64_t tokens = 0;
  Dtype dtype = Dtype::kF16;
  int k = 0;
  int32_t* outIds = nullptr;   // [min(k, tokens)], best first
  float* outScores = nullptr;  // [min(k, tokens)]
  float* allScores = nullptr;  // optional [tokens]: every row's score, by row
  // Optional: scan only these rows (each < tokens; no allScores then); ids written are rows.
  const int32_t* rows = nullptr;
  int64_t rowCount = 0;
  bool hasRows = false;  // rows given (an empty list scans nothing; its pointer may be null)
};

// Rows a problem scans: its row list, or every row.
inline int64_t ScanCount(const TopkProblem& p) { return p.hasRows ? p.rowCount : p.tokens; }

// Returns how many ids were written: min(k, tokens).
int64_t TopK(const TopkProblem& p);
// Several independent problems (e.g. one per kv head) sharing the thread
// pool in one pass; counts[i] = what TopK(problems[i]) would return.
void TopKMany(const TopkProblem* problems, size_t n, int64_t* counts);

}  // namespace kvr
