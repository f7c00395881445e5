// The code-gated walk's own numbering of the keys (ra_graph_code_walk.h):
// a permutation of the graph's ids in which a key's neighbours tend to have
// nearby numbers, with the graph's lists, the keys' code rows and the walk's
// visited bits laid out in it. The walk reads ~40% of the code rows at 1M
// keys, each once, in an order the queue decides: numbered by token they
// are random lines in a 64 MB array; numbered so that what one round reads
// lies together, a round's rows share DRAM pages and the lists of the nodes
// it expands lie near one another.
//
// Only the walk uses it: the keys stay in token order and are scored by
// token id (key[v]), and every result, seed and sample index is a token id.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvr {

struct RaWalkOrder {
  std::vector<int32_t> key;   // [n]: walk id -> token id
  std::vector<int32_t> walk;  // [n]: token id -> walk id
  std::vector<int64_t> off;   // [n + 1]: the graph's CSR in walk ids
  std::vector<int32_t> nbr;
  std::vector<int32_t> entries;  // the graph's entry points, walk ids, in the graph's order
  std::vector<uint64_t> sample;  // bits over walk ids: the strided sample's keys (sampleOff + j·stride, j < m)

  // Breadth-first from the entry points over the lists (then any key not
  // reached, in token order): a key's first discoverer's other new
  // neighbours get the numbers beside it. O(edges).
  static RaWalkOrder Bfs(const int64_t* off, const int32_t* nbr, int64_t n, const std::vector<int32_t>& entries,
                         int64_t sampleOff, int64_t stride, int64_t m);
  // A seeded shuffle: no locality at all (the other end, for A/B).
  static RaWalkOrder Shuffled(const int64_t* off, const int32_t* nbr, int64_t n, const std::vector<int32_t>& entries,
                              int64_t sampleOff, int64_t stride, int64_t m);
  // Token order (the identity), the same structures: for tests and A/B.
  static RaWalkOrder Identity(const int64_t* off, const int32_t* nbr, int64_t n, const std::vector<int32_t>& entries,
                              int64_t sampleOff, int64_t stride, int64_t m);
  bool InSample(int32_t v) const { return (sample[size_t(v) >> 6] >> (v & 63)) & 1; }
  size_t Bytes() const {
    return (key.size() + walk.size() + nbr.size() + entries.size()) * 4 + (off.size() + sample.size()) * 8;
  }

 private:
  void Finish(const int64_t* off, const int32_t* nbr, int64_t n, const std::vector<int32_t>& entries,
              int64_t sampleOff, int64_t stride, int64_t m);
};

}  // namespace kvr
