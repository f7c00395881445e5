// The block methods' choice of a step's blocks (index/block-select.ts), from
// what the scorer returned, for one kv head: the candidates are the first
// `reach` distinct blocks of the scorer's top rows (best first) and the
// previous step's blocks (each scored as the best of its rows); blocks the
// static part touches (`exclude`) are never chosen. The query-agnostic
// blocks (the first `agnostic` of the importance order, excluded ones
// skipped) come first, then the candidates in score order, keeping what the
// previous step selected and bringing in at most maxNew others, up to the
// budget. O(candidates): a flags scratch of one byte per block (one per
// thread) marks them and is cleared again; the heads' importance orders are
// read, not copied.
#pragma once

#include <cstdint>

namespace kvr {

// What every head of a step shares.
struct BlockStep {
  int64_t blocks = 0;
  int64_t reps = 1;                    // summary rows per block: block b's rows are b*reps .. b*reps + reps - 1
  int64_t reach = 0;                   // distinct blocks of the top rows taken as candidates (excluded ones count)
  int64_t budget = 0;
  int64_t maxNew = -1;                 // blocks outside prev brought in at most (< 0: no limit; none either on a first step)
  int64_t agnostic = 0;                // query-agnostic blocks taken first
  int64_t agnosticClass = 0;           // a chosen block with importance rank < this is class 1 (protectAgnostic), else 0
  bool protectAgnostic = false;
  const int32_t* exclude = nullptr;    // [excludeN] blocks never chosen
  int64_t excludeN = 0;
};

// One head's inputs and outputs.
struct BlockStepHead {
  const int32_t* topRows = nullptr;    // [topRowsN] the scorer's top rows, best first (ties: lower row)
  int64_t topRowsN = 0;
  const int32_t* prev = nullptr;       // [prevN] the previous step's blocks, ascending (excluded ones are dropped)
  int64_t prevN = 0;
  // Scores of the previous blocks' rows: prevRowScores[i*reps + r] is row prev[i]*reps + r's, or, when
  // prevRowScores is null, rowScores[row] (every row's score).
  const float* prevRowScores = nullptr;
  const float* rowScores = nullptr;
  const int32_t* byImportance = nullptr;    // [blocks] blocks by importance, most important first
  const int32_t* importanceRank = nullptr;  // [blocks] each block's position in byImportance
  int32_t* out = nullptr;              // capacity min(max(budget, agnostic), blocks): the chosen blocks, ascending
  uint8_t* cls = nullptr;              // same capacity: each chosen block's pool class
  int32_t* outRows = nullptr;          // capacity · reps, or null: the chosen blocks' rows, b*reps + r (the next step's extra rows)
};

// Each of `count` heads of one step chooses its blocks (written to its out ascending, cls and outRows); head h's
// count of blocks chosen in chosen[h].
void ChooseStepBlocksHeads(const BlockStep& s, const BlockStepHead* heads, int64_t count, int32_t* chosen);

// The query rows a step scores the summary rows with (index/block-summary.ts): row i of q [rows, headDim] as
// [q_i, share_h · ‖q_i‖, √headDim, 0 ...] at stride headDim + 8, share_h = shares[i / group]; out zeroed by
// the caller. ‖q_i‖ is summed in double in order, and the products rounded to float once, as JS computed them.
void AugmentQueryRows(const float* q, int64_t rows, int64_t group, int64_t headDim, const double* shares, float* out);

}  // namespace kvr
