// A few representatives per block of keys, for ranking blocks (the block
// methods' summaries, index/block-summary.ts): each block's keys split by
// k-means into at most `reps` sub-clusters. A block's mean hides a lone key
// a query seeks (a pass key's digits among 64 bytes of code, issue #16); a
// sub-centroid does not: the farthest-first start gives such a key a
// cluster of its own, and the block scores as its best sub-cluster.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {

struct BlockRepsProblem {
  const uint16_t* keys = nullptr;  // [tokens, headDim] storage words
  Dtype dtype = Dtype::kF16;
  int64_t tokens = 0;
  int headDim = 0;
  int blockSize = 64;
  int reps = 4;
  int iterations = 8;
  // Outputs, per block b and slot r at b * reps + r:
  uint16_t* centroids = nullptr;  // [blocks * reps, headDim] storage words (rounded to nearest)
  float* radii = nullptr;         // [blocks * reps] largest distance of a member from its stored centroid
  int32_t* counts = nullptr;      // [blocks * reps] members (a block's counts sum to its tokens)
};

// Per block, deterministic: slot 0 starts at the block mean, slot r at the
// key farthest from slots 0..r-1 (ties to the lower token); `iterations`
// rounds of Lloyd's algorithm (a key to its nearest slot, ties to the lower
// slot; an emptied slot keeps its centroid); then each centroid is rounded
// to the storage dtype and the keys assigned once more against the rounded
// centroids, so the radii bound the members' distances from what is stored.
// A slot left without members (a block of fewer distinct keys than reps)
// copies the centroid and radius of the first slot that has members, with
// count 0, so it never scores above the slot it copies. Multithreaded over
// blocks.
void BlockReps(const BlockRepsProblem& p);

}  // namespace kvr
