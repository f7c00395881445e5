#include "indexes/ivf_index.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/io.h>
#include <faiss/index_io.h>
#include <faiss/invlists/InvertedLists.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <typeinfo>

#include "common/checksum.h"
#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "common/thread_pool.h"
#include "indexes/faiss_common.h"
#include "indexes/key_range.h"
#include "indexes/ivf_tasks.h"

namespace kvr {
namespace {

using idx_t = int64_t;  // faiss::Index::idx_t in 1.7.3, faiss::idx_t later

// Rows added to faiss per call, so the f32 staging copy stays bounded.
constexpr int64_t kAddChunk = 65536;
constexpr int64_t kParallelWork = kIvfParallelWork;

// Envelope: magic, payload length, payload checksum (common/checksum.h), then
// the payload: faiss's bytes, then (version 2) the keys' mean as d f32. A
// version 1 payload (faiss's bytes alone, uncentred keys) loads with a zero
// mean.
constexpr char kMagic[8] = {'K', 'V', 'R', 'I', 'V', 'F', '0', '2'};
constexpr char kMagicV1[8] = {'K', 'V', 'R', 'I', 'V', 'F', '0', '1'};
constexpr size_t kHeader = 24;

void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}

uint64_t GetU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// Seeded sample of `count` distinct rows of [0, n), sorted.
std::vector<int64_t> SampleRows(int64_t n, int64_t count, uint64_t seed) {
  std::vector<int64_t> rows(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) rows[size_t(i)] = i;
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < count; ++i) {  // partial Fisher-Yates
    int64_t j = i + int64_t(rng() % uint64_t(n - i));
    std::swap(rows[size_t(i)], rows[size_t(j)]);
  }
  rows.resize(size_t(count));
  std::sort(rows.begin(), rows.end());
  return rows;
}

[[noreturn]] void Corrupt(const std::string& why) { throw std::runtime_error("corrupt IVF index: " + why); }

// Reads little-endian fields of a faiss payload, never past its end.
class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  size_t Left() const { return n_ - pos_; }
  void Skip(uint64_t k) {
    if (k > Left()) Corrupt("unexpected layout (truncated)");
    pos_ += size_t(k);
  }
  uint64_t U64() { return Le(8); }
  uint32_t U32() { return uint32_t(Le(4)); }
  uint8_t U8() { return uint8_t(Le(1)); }
  void Tag(const char* fourcc) {
    uint32_t want = 0;
    for (int i = 0; i < 4; ++i) want |= uint32_t(uint8_t(fourcc[i])) << (8 * i);
    if (U32() != want) Corrupt(std::string("unexpected layout (expected ") + fourcc + ")");
  }

 private:
  uint64_t Le(int bytes) {
    if (size_t(bytes) > Left()) Corrupt("unexpected layout (truncated)");
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= uint64_t(p_[pos_ + i]) << (8 * i);
    pos_ += size_t(bytes);
    return v;
  }
  const uint8_t* p_;
  size_t n_, pos_ = 0;
};

// faiss::VectorIOReader's semantics over the caller's bytes, without
// copying them first.
struct SpanReader : faiss::IOReader {
  SpanReader(const uint8_t* p, size_t n) : p(p), n(n) {}
  size_t operator()(void* ptr, size_t size, size_t nitems) override {
    if (pos >= n || size == 0) return 0;
    nitems = std::min(nitems, (n - pos) / size);
    if (nitems > 0) {
      std::memcpy(ptr, p + pos, size * nitems);
      pos += size * nitems;
    }
    return nitems;
  }
  const uint8_t* p;
  size_t n, pos = 0;
};

void Expect(bool ok, const char* what) {
  if (!ok) Corrupt(std::string("unexpected layout (") + what + ")");
}

// Walks faiss's serialisation of exactly what Build() makes (faiss 1.7.x
// write_index of an IndexIVFFlat, inner product, IndexFlatIP quantizer, no
// direct map, ArrayInvertedLists) and checks every count against the bytes
// that follow, so read_index never sizes an allocation from a forged field.
// Anything else, including other faiss layouts, is rejected.
void CheckLayout(const uint8_t* p, size_t n) {
  Cursor c(p, n);
  auto header = [&](uint64_t* d, uint64_t* ntotal) {
    *d = c.U32();
    *ntotal = c.U64();
    c.Skip(16);  // two dummies
    Expect(c.U8() == 1, "not trained");
    Expect(c.U32() == uint32_t(faiss::METRIC_INNER_PRODUCT), "metric is not inner product");
  };
  uint64_t d, ntotal, qd, qn;
  c.Tag("IwFl");
  header(&d, &ntotal);
  Expect(d >= 1 && d <= (1u << 16), "dimension");
  Expect(ntotal <= uint64_t(std::numeric_limits<int32_t>::max()), "token count");
  const uint64_t nlist = c.U64();
  Expect(nlist >= 1 && nlist <= (uint64_t(1) << 24), "nlist");
  c.U64();  // nprobe: unused, every search passes its own
  c.Tag("IxFI");
  header(&qd, &qn);
  Expect(qd == d && qn == nlist, "quantizer shape");
  Expect(c.U64() == nlist * d, "centroid count");  // in floats
  c.Skip(nlist * d * sizeof(float));
  Expect(c.U8() == 0 && c.U64() == 0, "direct map");
  c.Tag("ilar");
  Expect(c.U64() == nlist, "list count");
  const uint64_t code = c.U64();
  Expect(code == d * sizeof(float), "code size");
  uint64_t sum = 0;
  const uint32_t kind = c.U32();
  auto add = [&](uint64_t s) {
    Expect(s <= ntotal && sum + s <= ntotal, "list size");
    sum += s;
  };
  if (kind == 0x6c6c7566u) {  // "full": one size per list
    Expect(c.U64() == nlist, "size table");
    for (uint64_t l = 0; l < nlist; ++l) add(c.U64());
  } else if (kind == 0x73727073u) {  // "sprs": (list, size) pairs
    const uint64_t words = c.U64();
    Expect(words % 2 == 0 && words / 2 <= nlist, "size table");
    uint64_t next = 0;  // list numbers ascend
    for (uint64_t i = 0; i < words / 2; ++i) {
      const uint64_t l = c.U64();
      Expect(l >= next && l < nlist, "list number");
      next = l + 1;
      add(c.U64());
    }
  } else {
    Corrupt("unexpected layout (list table)");
  }
  Expect(sum == ntotal, "lists do not hold every token");
  Expect(c.Left() == sum * (code + sizeof(int64_t)), "list bytes");
}

}  // namespace

IvfIndex::IvfIndex(std::unique_ptr<faiss::IndexIVFFlat> index, std::vector<float> mean)
    : index_(std::move(index)),
      centroids_(static_cast<const faiss::IndexFlat*>(index_->quantizer)->get_xb()),
      mean_(std::move(mean)) {}
IvfIndex::~IvfIndex() = default;

std::unique_ptr<IvfIndex> IvfIndex::Build(const uint16_t* keys, int64_t n, int d, Dtype dtype, int nlist,
                                          uint64_t seed) {
  if (!IsWordDtype(dtype)) throw std::invalid_argument("keys must be f16 or bf16");
  if (d < 1 || n < 1 || n > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("need 1 <= tokens < 2^31 and headDim >= 1");
  if (nlist < 1 || nlist > n) throw std::invalid_argument("nlist must be in [1, tokens]");
  CheckClusterableKeys(keys, dtype, n * d);
  OmpThreads omp(FaissThreads());
  BlasScope blas(BlasScope::Kind::kWide);  // training and adds are sgemms

  auto quantizer = std::make_unique<faiss::IndexFlatIP>(d);
  auto index = std::make_unique<faiss::IndexIVFFlat>(quantizer.get(), size_t(d), size_t(nlist),
                                                     faiss::METRIC_INNER_PRODUCT);
  index->own_fields = true;
  quantizer.release();
  // IndexIVF already sets cp.spherical for inner product; cp.niter is 10.
  index->cp.seed = int(seed & 0x7fffffff);
  index->cp.min_points_per_centroid = 1;  // small documents: no stderr warning
  index->cp.max_points_per_centroid = int(kTrainPerList);

  // The index holds the keys less their mean: a model's keys share a large
  // offset, and spherical k-means of uncentred keys splits them by little but
  // it (lists overlap, a row's best keys spread over many; on clustered keys
  // with an offset twice their spread, top-k recall at the default probes 0.83
  // uncentred, 0.98 centred). q·k = q·(k - mean) + q·mean: within a row the
  // ranking is the same, and Search adds q·mean back before rows are merged.
  std::vector<float> mean(size_t(d), 0.0f);
  std::vector<float> chunk(size_t(std::min(n, kAddChunk)) * d);
  {
    std::vector<double> sum(size_t(d), 0.0);
    for (int64_t r0 = 0; r0 < n; r0 += kAddChunk) {
      const int64_t r1 = std::min(n, r0 + kAddChunk);
      WidenRows(keys, dtype, d, r0, r1, chunk.data());
      for (int64_t i = 0; i < (r1 - r0) * d; ++i) sum[size_t(i % d)] += chunk[size_t(i)];
    }
    for (int j = 0; j < d; ++j) mean[size_t(j)] = float(sum[size_t(j)] / double(n));
  }
  auto centre = [&](float* rows, int64_t count) {
    for (int64_t i = 0; i < count * d; ++i) rows[i] -= mean[size_t(i % d)];
  };
  {
    const int64_t sample = std::min<int64_t>(n, kTrainPerList * nlist);
    std::vector<float> train(size_t(sample) * d);
    if (sample == n)
      WidenRows(keys, dtype, d, 0, n, train.data());
    else
      WidenRows(keys, dtype, d, SampleRows(n, sample, seed), train.data());
    centre(train.data(), sample);
    index->train(sample, train.data());
  }
  for (int64_t r0 = 0; r0 < n; r0 += kAddChunk) {
    const int64_t r1 = std::min(n, r0 + kAddChunk);
    WidenRows(keys, dtype, d, r0, r1, chunk.data());
    centre(chunk.data(), r1 - r0);
    index->add(r1 - r0, chunk.data());  // ids continue from ntotal: id = row
  }
  return std::unique_ptr<IvfIndex>(new IvfIndex(std::move(index), std::move(mean)));
}

std::vector<uint8_t> IvfIndex::Save() const {
  faiss::VectorIOWriter w;
  w.data.reserve(kHeader + MemoryBytes() + 64 * index_->nlist + 4096);  // one allocation
  w.data.resize(kHeader);
  faiss::write_index(index_.get(), &w);
  const size_t meanAt = w.data.size();
  w.data.resize(meanAt + mean_.size() * sizeof(float));
  for (size_t j = 0; j < mean_.size(); ++j) {
    uint32_t bits;
    std::memcpy(&bits, &mean_[j], 4);
    for (int b = 0; b < 4; ++b) w.data[meanAt + 4 * j + size_t(b)] = uint8_t(bits >> (8 * b));
  }
  const size_t payload = w.data.size() - kHeader;
  std::memcpy(w.data.data(), kMagic, 8);
  PutU64(w.data.data() + 8, payload);
  PutU64(w.data.data() + 16, Checksum64(w.data.data() + kHeader, payload));
  return std::move(w.data);
}

std::unique_ptr<IvfIndex> IvfIndex::Load(const uint8_t* bytes, size_t size) {
  const bool v1 = size >= kHeader && std::memcmp(bytes, kMagicV1, 8) == 0;
  if (size < kHeader || (!v1 && std::memcmp(bytes, kMagic, 8) != 0)) Corrupt("not a kvrecall IVF index");
  uint64_t payload = GetU64(bytes + 8);
  if (payload != size - kHeader) Corrupt("length mismatch (truncated or padded)");
  if (Checksum64(bytes + kHeader, payload) != GetU64(bytes + 16)) Corrupt("checksum mismatch");
  std::vector<float> mean;
  if (!v1) {  // the mean trails faiss's bytes: d f32, d from faiss's header ("IwFl", then d as u32)
    Cursor c(bytes + kHeader, size_t(payload));
    c.Skip(4);
    const uint64_t d = c.U32();
    Expect(d >= 1 && d <= (1u << 16) && d * sizeof(float) <= payload, "dimension");
    payload -= d * sizeof(float);
    mean.resize(size_t(d));
    for (size_t j = 0; j < mean.size(); ++j) {
      const uint8_t* p = bytes + kHeader + payload + 4 * j;
      const uint32_t bits = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
      std::memcpy(&mean[j], &bits, 4);
      if (!std::isfinite(mean[j])) Corrupt("non-finite mean");
    }
  }
  CheckLayout(bytes + kHeader, size_t(payload));

  SpanReader r(bytes + kHeader, size_t(payload));
  std::unique_ptr<faiss::Index> read;
  try {
    read.reset(faiss::read_index(&r));
  } catch (const faiss::FaissException& e) {
    Corrupt(e.what());
  } catch (const std::exception& e) {  // bad_alloc, length_error from absurd sizes
    Corrupt(e.what());
  }
  if (!read || typeid(*read) != typeid(faiss::IndexIVFFlat)) Corrupt("not an IVF-Flat index");
  std::unique_ptr<faiss::IndexIVFFlat> ivf(static_cast<faiss::IndexIVFFlat*>(read.release()));
  if (r.pos != r.n) Corrupt("trailing bytes");
  const auto* q = dynamic_cast<const faiss::IndexFlat*>(ivf->quantizer);
  if (ivf->metric_type != faiss::METRIC_INNER_PRODUCT || !ivf->is_trained || !q ||
      q->metric_type != faiss::METRIC_INNER_PRODUCT || q->d != ivf->d || size_t(q->ntotal) != ivf->nlist)
    Corrupt("not an inner-product IVF-Flat index with a flat quantizer");
  for (size_t i = 0, e = size_t(q->ntotal) * size_t(q->d); i < e; ++i)
    if (!std::isfinite(q->get_xb()[i])) Corrupt("non-finite centroid");
  const auto* lists = dynamic_cast<const faiss::ArrayInvertedLists*>(ivf->invlists);
  if (ivf->d < 1 || !lists || lists->nlist != ivf->nlist || lists->code_size != size_t(ivf->d) * sizeof(float))
    Corrupt("unexpected inverted lists");
  const int64_t n = ivf->ntotal;
  if (n < 0 || n > std::numeric_limits<int32_t>::max()) Corrupt("token count out of range");
  // Ids must be exactly the rows 0..n-1, each once: search returns them as
  // int32 row numbers that callers use to index their keys.
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  int64_t total = 0;
  for (size_t l = 0; l < lists->nlist; ++l) {
    if (lists->ids[l].size() * lists->code_size != lists->codes[l].size()) Corrupt("list sizes disagree");
    for (idx_t id : lists->ids[l]) {
      if (id < 0 || id >= n || seen[size_t(id)]) Corrupt("bad or repeated id");
      seen[size_t(id)] = 1;
      ++total;
    }
  }
  if (total != n) Corrupt("lists do not hold every token");
  if (v1) mean.assign(size_t(ivf->d), 0.0f);
  return std::unique_ptr<IvfIndex>(new IvfIndex(std::move(ivf), std::move(mean)));
}

IvfSearchResult IvfIndex::Search(const float* q, int group, int k, int nprobe, int32_t* outIds, float* outScores,
                                 Scan scan, float attentionScale) const {
  if (attentionScale != 0 && (!(attentionScale > 0) || !std::isfinite(attentionScale) || scan != Scan::kNative))
    throw std::invalid_argument("an attention scale must be finite and > 0, with the native scan");
  const int64_t keep = std::min<int64_t>(k, index_->ntotal);
  if (keep <= 0 || group <= 0) return {};
  const int64_t np = std::clamp<int64_t>(nprobe, 1, int64_t(index_->nlist));
  if (scan == Scan::kFaiss) return SearchFaiss(q, group, keep, np, outIds, outScores);
  const ProbePlan plan = Probe(q, group, np);
  return attentionScale > 0 ? SearchAttention(q, group, keep, plan, attentionScale, outIds, outScores)
                            : SearchNative(q, group, keep, plan, outIds, outScores);
}

float IvfIndex::RowShift(const float* row) const { return Dot(row, mean_.data(), mean_.size()); }

IvfSearchResult IvfIndex::SearchFaiss(const float* q, int group, int64_t keep, int64_t np, int32_t* outIds,
                                      float* outScores) const {
  IvfSearchResult res;
  const int d = int(index_->d);
  // Everything faiss does here runs in this thread or in one pool task per
  // row: no OpenMP team, so a single group search never oversubscribes.
  OmpThreads serial(1);

  std::vector<idx_t> probe(size_t(group) * np);
  std::vector<float> coarse(size_t(group) * np);
  // A row at a time: faiss's flat search takes its sgemm path from 20 rows,
  // and a search must neither wait behind a seal's training at the BLAS gate
  // nor overlap it (faiss_common.h).
  for (int g = 0; g < group; ++g)
    index_->quantizer->search(1, q + size_t(g) * d, np, coarse.data() + size_t(g) * np, probe.data() + size_t(g) * np);
  for (idx_t l : probe)
    if (l >= 0) res.scanned += int64_t(index_->invlists->list_size(size_t(l)));

  std::vector<float> dist(size_t(group) * keep);
  std::vector<idx_t> ids(size_t(group) * keep);
  faiss::SearchParametersIVF params;
  params.nprobe = size_t(np);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(group));
  auto row = [&](size_t g) {
    try {
      OmpThreads one(1);  // pool workers are not OpenMP threads either
      faiss::IndexIVFStats stats;
      index_->search_preassigned(1, q + g * d, keep, probe.data() + g * np, coarse.data() + g * np,
                                 dist.data() + g * keep, ids.data() + g * keep, false, &params, &stats);
    } catch (...) {
      errors[g] = std::current_exception();
    }
  };
  if (group > 1 && res.scanned * d >= kParallelWork)
    ThreadPool::Get().ParallelFor(size_t(group), row);
  else
    for (size_t g = 0; g < size_t(group); ++g) row(g);
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (size_t g = 0; g < size_t(group); ++g) {
    const float shift = RowShift(q + g * d);  // the lists hold k - mean
    for (int64_t i = 0; i < keep; ++i) dist[g * keep + size_t(i)] += shift;
  }

  // Merge rows: a key's score is its best over the rows. The row that gives
  // a top-k key its max ranks it within that row's top-k, so the merge of
  // exact rows is exact.
  std::vector<Hit> all;
  all.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= 0)
      all.push_back({std::isnan(dist[i]) ? -std::numeric_limits<float>::infinity() : dist[i], int32_t(ids[i])});
  std::sort(all.begin(), all.end(),
            [](const Hit& a, const Hit& b) { return a.id < b.id || (a.id == b.id && a.score > b.score); });
  all.erase(std::unique(all.begin(), all.end(), [](const Hit& a, const Hit& b) { return a.id == b.id; }), all.end());
  res.count = WriteBest(all, keep, outIds, outScores);
  return res;
}


IvfIndex::ProbePlan IvfIndex::Probe(const float* q, int group, int64_t np) const {
  ProbePlan plan;
  const int d = int(index_->d);
  const int64_t nlist = int64_t(index_->nlist);
  const float kNegInf = -std::numeric_limits<float>::infinity();

  // 1. Each row's np best lists by q·centroid (faiss's IndexFlatIP ranking;
  //    ties to the lower list). probes holds (list << 32 | row).
  std::vector<uint64_t> probes(size_t(group) * np);
  auto coarseRow = [&](size_t g) {
    std::vector<Hit> s(static_cast<size_t>(nlist));
    for (int64_t l = 0; l < nlist; ++l) {
      const float v = Dot(q + g * d, centroids_ + size_t(l) * d, size_t(d));
      s[size_t(l)] = {std::isnan(v) ? kNegInf : v, int32_t(l)};
    }
    if (np < nlist) std::nth_element(s.begin(), s.begin() + (np - 1), s.end(), Better);
    for (int64_t i = 0; i < np; ++i) probes[g * np + i] = (uint64_t(s[size_t(i)].id) << 32) | uint64_t(g);
  };
  const bool parallelCoarse = group > 1 && int64_t(group) * nlist * d >= kParallelWork;
  RunTasks(parallelCoarse ? size_t(group) : 1, [&](size_t t) {
    if (parallelCoarse)
      coarseRow(t);
    else
      for (size_t g = 0; g < size_t(group); ++g) coarseRow(g);
  });

  // 2. Group the probes by list: each probed list is read once, scoring each
  //    key against the rows that probed it (as many q·k as faiss computes).
  std::sort(probes.begin(), probes.end());
  std::vector<ProbePlan::List>& lists = plan.lists;
  std::vector<int32_t>& rows = plan.rows;
  rows.reserve(probes.size());
  for (size_t i = 0; i < probes.size();) {
    const int64_t l = int64_t(probes[i] >> 32);
    ProbePlan::List p{l, int64_t(index_->invlists->list_size(size_t(l))), rows.size(), 0};
    for (; i < probes.size() && int64_t(probes[i] >> 32) == l; ++i) rows.push_back(int32_t(probes[i] & 0xffffffffu));
    p.rows1 = rows.size();
    plan.scanned += p.size * int64_t(p.rows1 - p.rows0);
    if (p.size > 0) lists.push_back(p);
  }

  // 3. Tasks of about equal key count when the scan is big.
  size_t tasks = 1;
  if (plan.scanned * d >= kParallelWork) tasks = std::min(lists.size(), ThreadPool::Get().Threads() * 4);
  std::vector<size_t>& bounds = plan.bounds;
  bounds = {0};
  if (tasks > 1) {
    int64_t keys = 0, total = 0;
    for (auto& p : lists) total += p.size;
    for (size_t i = 0; i < lists.size(); ++i) {
      keys += lists[i].size;
      if (keys * int64_t(tasks) >= total * int64_t(bounds.size()) && bounds.size() < tasks) bounds.push_back(i + 1);
    }
  }
  if (bounds.back() != lists.size()) bounds.push_back(lists.size());
  return plan;
}

IvfSearchResult IvfIndex::SearchNative(const float* q, int group, int64_t keep, const ProbePlan& plan,
                                       int32_t* outIds, float* outScores) const {
  IvfSearchResult res;
  res.scanned = plan.scanned;
  const int d = int(index_->d);
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const auto& lists = plan.lists;
  const auto& rows = plan.rows;
  const auto& bounds = plan.bounds;
  std::vector<float> shift(static_cast<size_t>(group));  // q·mean per row: the lists hold k - mean
  for (size_t g = 0; g < size_t(group); ++g) shift[g] = RowShift(q + g * d);
  std::vector<TopHeap> heaps(bounds.size() - 1, TopHeap(keep));
  RunTasks(heaps.size(), [&](size_t t) {
    TopHeap& heap = heaps[t];
    for (size_t i = bounds[t]; i < bounds[t + 1]; ++i) {
      const ProbePlan::List& p = lists[i];
      faiss::InvertedLists::ScopedCodes codes(index_->invlists, size_t(p.list));
      faiss::InvertedLists::ScopedIds ids(index_->invlists, size_t(p.list));
      const float* x = reinterpret_cast<const float*>(codes.get());
      for (int64_t j = 0; j < p.size; ++j, x += d) {
        float s = kNegInf;  // NaN products never win
        for (size_t r = p.rows0; r < p.rows1; ++r)
          s = std::max(s, Dot(q + size_t(rows[r]) * d, x, size_t(d)) + shift[size_t(rows[r])]);
        heap.Push(s, int32_t(ids[size_t(j)]));
      }
    }
  });

  // Each key lives in one list, so the heaps hold distinct ids.
  std::vector<Hit> all;
  for (auto& h : heaps) all.insert(all.end(), h.hits.begin(), h.hits.end());
  res.count = WriteBest(all, keep, outIds, outScores);
  return res;
}

int64_t IvfIndex::Tokens() const { return index_->ntotal; }
int IvfIndex::Dim() const { return int(index_->d); }
int IvfIndex::Lists() const { return int(index_->nlist); }
size_t IvfIndex::MemoryBytes() const {
  return size_t(index_->ntotal) * (size_t(index_->d) * sizeof(float) + sizeof(idx_t)) +
         (index_->nlist + 1) * size_t(index_->d) * sizeof(float);
}

}  // namespace kvr
