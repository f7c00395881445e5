// IVF-Flat inner-product index over one kv head's keys (faiss), the `ivf`
// baseline of DESIGN.md. Keys arrive as 16-bit words and are widened to f32;
// the index holds its own f32 copy less the keys' mean (n * d * 4 bytes plus
// 8-byte ids, and the mean); scores are q·k, the mean added back.
//
// A search takes the G query rows of a GQA group; a key's score is the
// largest q·k over the rows, as in topk.h. Semantics are faiss's, row by
// row: each row probes its own nprobe lists and ranks the keys in them; the
// rows' results are merged by max score. With nprobe = nlist the result is
// the exact top-k.
//
// faiss does the training (k-means, BLAS), the coarse assignment of keys,
// the storage (inverted lists) and the serialisation. The search itself has
// two implementations with the same results:
//   - kNative (default): scores centroids and probed keys with this project's
//     AVX2/FMA Dot, each probed list once for all the rows that probed it.
//   - kFaiss: IndexFlatIP::search + IndexIVF::search_preassigned per row.
// Debian's libfaiss 1.7.3 is a generic (non-AVX2) build whose inner product
// is a scalar loop, so kFaiss is several times slower per key scored; it is
// kept as the off-the-shelf reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/half.h"

namespace faiss {
struct IndexIVFFlat;
}

namespace kvr {

struct IvfSearchResult {
  int64_t count = 0;    // ids written, <= k
  int64_t scanned = 0;  // keys scored: sum of probed list sizes over the G rows
};

class IvfIndex {
 public:
  // Trains the coarse quantizer (spherical k-means, faiss's default for inner
  // product) on at most kTrainPerList * nlist keys drawn with `seed`, then
  // adds every key with id = row. Requires 1 <= nlist <= n, n < 2^31.
  static std::unique_ptr<IvfIndex> Build(const uint16_t* keys, int64_t n, int d, Dtype dtype, int nlist,
                                         uint64_t seed);

  // Parses bytes written by Save(). Throws std::runtime_error on anything
  // that is not an intact IVF-Flat inner-product index of ours.
  static std::unique_ptr<IvfIndex> Load(const uint8_t* bytes, size_t size);

  ~IvfIndex();

  // A checksummed envelope around faiss::write_index's bytes and the mean.
  std::vector<uint8_t> Save() const;

  enum class Scan { kNative, kFaiss };

  // q [group, d]; outIds/outScores hold at least min(k, tokens) entries and
  // receive the best keys first (score desc, then id asc); nprobe is clamped
  // to [1, nlist]. Runs in the calling thread, spreading over the native
  // thread pool only when the probed work is large; never starts an OpenMP
  // team. Reentrant: concurrent searches of one index are safe.
  //
  // attentionScale 0: a key's score is max over the rows of q·k. > 0 (native
  // scan only): the log of the group's attention on it, log sum_g exp(scale
  // q_g·k - lse_g), over the rows that probed its list, each row's lse_g
  // from its probed keys plus a strided sample of the lists it did not probe
  // (ivf_attention.cc; the sample counts in `scanned`).
  IvfSearchResult Search(const float* q, int group, int k, int nprobe, int32_t* outIds, float* outScores,
                         Scan scan = Scan::kNative, float attentionScale = 0) const;

  int64_t Tokens() const;
  int Dim() const;
  int Lists() const;
  // Bytes held: vectors, ids, centroids and the mean.
  size_t MemoryBytes() const;

  static constexpr int64_t kTrainPerList = 64;

 private:
  IvfIndex(std::unique_ptr<faiss::IndexIVFFlat> index, std::vector<float> mean);
  IvfSearchResult SearchFaiss(const float* q, int group, int64_t keep, int64_t nprobe, int32_t* outIds,
                              float* outScores) const;
  // The lists a group's rows probe, each with the rows that probed it, and
  // how the scan splits into pool tasks.
  struct ProbePlan {
    struct List {
      int64_t list, size;
      size_t rows0, rows1;  // into rows
    };
    std::vector<List> lists;     // by list number, non-empty only
    std::vector<int32_t> rows;   // the rows of each list, ascending
    std::vector<size_t> bounds;  // task t scans lists [bounds[t], bounds[t+1])
    int64_t scanned = 0;         // probed list sizes summed over the rows
  };
  ProbePlan Probe(const float* q, int group, int64_t nprobe) const;
  float RowShift(const float* row) const;  // q·mean: the lists hold k - mean
  IvfSearchResult SearchNative(const float* q, int group, int64_t keep, const ProbePlan& plan, int32_t* outIds,
                               float* outScores) const;
  IvfSearchResult SearchAttention(const float* q, int group, int64_t keep, const ProbePlan& plan, float scale,
                                  int32_t* outIds, float* outScores) const;

  std::unique_ptr<faiss::IndexIVFFlat> index_;
  const float* centroids_;  // the flat quantizer's [nlist, d]
  std::vector<float> mean_;  // [d], subtracted from every key held (zero for a version 1 index)
};

}  // namespace kvr
