// The graph's neighbour lists as the code-gated walk reads them
// (ra_graph_code_walk.h): one 64-byte slot a key, holding its count and up
// to kInline ids, so that reading a list is one cache line at a place known
// from the id alone. From the CSR a round read each list's offset, then
// (a wait later) its 1.6 lines on average at 1M keys: two dependent waits a
// round, and 140K lists a search. With the slots the code walk took
// 0.92-0.96 of the CPU a group-search at 1M keys on the 2-core VM, 7 reps
// alternated with the CSR and the commit before (per rep 0.92-0.98;
// layer-steps of 8 searches on the 2 cores 0.96-1.01), the same ids
// (bench/results/ra-search-1048576-vm-walk-lists.md): the lists were one
// of several waits (the code rows, the keys scored exactly, the visited
// bits, the queue). At 64K-512K keys, where the CSR mostly sits in the
// 32 MB L3, the same within the sittings' noise (0.87-1.09 of the CSR's
// medians, the CSR itself 0.71-1.03 of the commit before;
// ra-search-{65536,262144,524288}-vm-walk-lists*.md).
//
// The rest of a longer list (3% of the keys at 1M: degree 16 + positional +
// key neighbours reach 26) lies in `overflow`. 64 bytes a key (64 MB at 1M
// keys) beside the CSR's ~53 MB, made from the graph on the first code walk
// (RaGraph::WalkListsFor), not stored with it.
//
// A relabelling of the keys for the walk (breadth-first from the entry
// points, so that neighbours get nearby numbers) was measured and is not
// here: in token order 93% of the graph's edges already join keys less than
// 64 apart (a code row is 64 bytes: the same 4 KB page; a breadth-first
// numbering 27%, bench/results/ra-graph-locality-1048576.md), and the walk
// in a breadth-first numbering took 1.15-1.23x the CPU, in a shuffled one
// 1.31-1.33x, the identity through the same maps 1.11-1.14x, the same ids
// (bench/results/ra-search-1048576-vm-walk-order.md, commit ea05509): each
// code row is read once a search, so no numbering makes fewer lines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace kvr {

struct RaWalkLists {
  static constexpr int kSlot = 16, kInline = kSlot - 1;  // int32 words a slot; ids in it
  // Slot word 0: the count | (the start of the ids past kInline in overflow) << kCountBits.
  static constexpr int kCountBits = 5;
  struct Free {
    void operator()(int32_t* p) const;
  };
  std::unique_ptr<int32_t[], Free> slots;  // [n, kSlot], 64-byte lines (2 MB pages where the kernel gives them)
  std::vector<int32_t> overflow;
  size_t bytes = 0;

  // Null where a list is longer than 31 or the overflow reaches 2^26 ids
  // (then the walk reads the CSR).
  static std::unique_ptr<RaWalkLists> Build(const int64_t* off, const int32_t* nbr, int64_t n);
  size_t Bytes() const { return bytes + overflow.size() * sizeof(int32_t); }
};

}  // namespace kvr
