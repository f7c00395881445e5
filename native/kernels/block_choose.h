// The block methods' choice of a step's blocks from their candidates
// (index/block-select.ts): the query-agnostic blocks first, then the
// candidates in score order, keeping what the previous step selected and
// bringing in at most maxNew others, up to the budget. O(candidates): a
// flags scratch of one byte per block marks them and is cleared again.
#pragma once

#include <cstdint>

namespace kvr {

struct BlockChoice {
  int64_t blocks = 0;
  const int32_t* top = nullptr;        // [topN] candidates by score, best first (ties: lower id)
  int64_t topN = 0;
  const int32_t* prev = nullptr;       // [prevN] the previous step's blocks, ascending
  const float* prevScores = nullptr;   // [prevN] their scores this step
  int64_t prevN = 0;
  const int32_t* agnostic = nullptr;   // [agnosticN] the query-agnostic blocks, most important first
  int64_t agnosticN = 0;
  const int32_t* importanceRank = nullptr;  // [blocks]: position in the importance order
  int64_t agnosticClass = 0;           // a chosen block with rank < this is class 1 (protectAgnostic), else 0
  bool protectAgnostic = false;
  int64_t budget = 0;
  int64_t maxNew = -1;                 // blocks outside prev brought in at most (< 0: no limit)
  uint8_t* flags = nullptr;            // [blocks] scratch, zero before and after
  int32_t* out = nullptr;              // capacity max(budget, agnosticN): the chosen blocks, ascending
  uint8_t* cls = nullptr;              // same capacity: each chosen block's pool class
};

// Returns how many blocks were chosen (written to out, ascending, and cls).
int64_t ChooseBlocks(const BlockChoice& c);

}  // namespace kvr
