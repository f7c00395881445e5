// IVF-Flat inner-product index over one kv head's keys (faiss), the `ivf`
// baseline of DESIGN.md. Keys arrive as 16-bit words and are widened to f32;
// the index holds its own f32 copy (n * d * 4 bytes plus 8-byte ids).
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

  // A checksummed envelope around faiss::write_index's bytes.
  std::vector<uint8_t> Save() const;

  enum class Scan { kNative, kFaiss };

  // q [group, d]; outIds/outScores hold at least min(k, tokens) entries and
  // receive the best keys first (score desc, then id asc); nprobe is clamped
  // to [1, nlist]. Runs in the calling thread, spreading over the native
  // thread pool only when the probed work is large; never starts an OpenMP
  // team. Reentrant: concurrent searches of one index are safe.
  IvfSearchResult Search(const float* q, int group, int k, int nprobe, int32_t* outIds, float* outScores,
                         Scan scan = Scan::kNative) const;

  int64_t Tokens() const;
  int Dim() const;
  int Lists() const;
  // Bytes held: vectors, ids and centroids.
  size_t MemoryBytes() const;

  static constexpr int64_t kTrainPerList = 64;

 private:
  explicit IvfIndex(std::unique_ptr<faiss::IndexIVFFlat> index);
  IvfSearchResult SearchFaiss(const float* q, int group, int64_t keep, int64_t nprobe, int32_t* outIds,
                              float* outScores) const;
  IvfSearchResult SearchNative(const float* q, int group, int64_t keep, int64_t nprobe, int32_t* outIds,
                               float* outScores) const;

  std::unique_ptr<faiss::IndexIVFFlat> index_;
  const float* centroids_;  // the flat quantizer's [nlist, d]
};

}  // namespace kvr
